"""HTTP/2 passive decoding. Byte streams come from real h2 client and server connections talking in memory,
or are built frame by frame with hyperframe/hpack where h2 cannot be made to send them."""

from __future__ import annotations

import gzip

import h2.errors
import h2.events
import h2.settings
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from tests.http.transcript import H2Pair, Recorder, connection, run

from oisp.http import Http2Decoder
from oisp.http.h2 import H2_CLIENT_PREFACE

REQUEST_FIELDS = [(":method", "POST"), (":path", "/v1/messages?beta=1"), (":authority", "api.example.com"),
                  (":scheme", "https"), ("content-type", "application/json")]


def frame_types(data: bytes) -> list[str]:
    """The frame types in a byte stream (without the client preface)."""
    if data.startswith(H2_CLIENT_PREFACE):
        data = data[len(H2_CLIENT_PREFACE):]
    types = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        types.append(type(frame).__name__)
        data = data[9 + length:]
    return types


def test_single_exchange_fields_go_to_request_and_response() -> None:
    pair = H2Pair()
    stream = pair.request("/v1/messages?beta=1", body=b'{"model": "m"}', headers=[("content-type", "application/json")])
    pair.flush()
    pair.respond(stream, body=b'{"id": 1}', headers=[("content-type", "application/json")])
    pair.flush()
    recorder, decoder = run(pair.wire, alpn="h2")

    assert decoder.error is None
    (exchange,) = recorder.exchanges
    assert exchange.stream_id == stream
    request = exchange.request
    assert (request.method, request.target, request.authority, request.scheme, request.http_version) == (
        "POST", "/v1/messages?beta=1", "api.example.com", "https", "2")
    assert request.path == "/v1/messages"
    assert list(request.headers) == [("content-type", "application/json")]
    assert bytes(request.body) == b'{"model": "m"}'
    assert exchange.response is not None
    assert exchange.response.status == 200
    assert exchange.response.http_version == "2"
    assert ":status" not in exchange.response.headers
    assert bytes(exchange.response.body) == b'{"id": 1}'
    assert not exchange.partial
    recorder.assert_contract()


def test_twenty_interleaved_streams_become_twenty_exchanges() -> None:
    pair = H2Pair()
    streams = [pair.request(f"/s/{i}", body=f"request {i}".encode()) for i in range(20)]
    pair.flush()
    for stream in streams:
        pair.server.send_headers(stream, [(b":status", b"200")])
    for round_ in range(3):  # DATA of all streams interleaved, round by round
        for i, stream in enumerate(streams):
            pair.server.send_data(stream, f"<{i}:{round_}>".encode(), end_stream=round_ == 2)
        pair.flush()
    recorder, decoder = run(pair.wire, alpn="h2")

    assert decoder.error is None
    assert len(recorder.exchanges) == 20
    for i, exchange in enumerate(sorted(recorder.exchanges, key=lambda e: e.stream_id or 0)):
        assert exchange.request.target == f"/s/{i}"
        assert bytes(exchange.request.body) == f"request {i}".encode()
        assert exchange.response is not None
        assert bytes(exchange.response.body) == f"<{i}:0><{i}:1><{i}:2>".encode()
        assert not exchange.partial
        assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    recorder.assert_contract()


def test_large_header_block_split_into_continuation_frames() -> None:
    pair = H2Pair()
    big = "v" * 40_000
    stream = pair.request("/", method="GET", headers=[("x-big", big), ("x-small", "s")])
    pair.flush()
    pair.respond(stream, headers=[("x-big-response", big)], body=b"ok")
    pair.flush()
    client_bytes = b"".join(d for direction, d in pair.wire if direction == "client")
    assert "ContinuationFrame" in frame_types(client_bytes)
    recorder, decoder = run(pair.wire, alpn="h2")

    assert decoder.error is None
    (exchange,) = recorder.exchanges
    assert exchange.request.headers.get("x-big") == big
    assert exchange.request.headers.get("x-small") == "s"
    assert exchange.response is not None
    assert exchange.response.headers.get("x-big-response") == big


def handmade_client(*frames: Frame) -> bytes:
    return H2_CLIENT_PREFACE + SettingsFrame(0).serialize() + b"".join(f.serialize() for f in frames)


def headers_frame(stream_id: int, block: bytes, *flags: str, **attrs: int) -> HeadersFrame:
    frame = HeadersFrame(stream_id, data=block, flags=flags)
    for name, value in attrs.items():
        setattr(frame, name, value)
    return frame


def test_handmade_continuation_padding_and_priority() -> None:
    encoder = hpack.Encoder()
    block = encoder.encode([*REQUEST_FIELDS, ("x-long", "z" * 300)])
    client = handmade_client(
        headers_frame(1, block[:10], "PADDED", "PRIORITY", pad_length=7, depends_on=0, stream_weight=15),
        PriorityFrame(3, depends_on=1),  # not on the block's stream: must wait until the block is done
        ContinuationFrame(1, data=block[10:100]),
        ContinuationFrame(1, data=block[100:], flags=["END_HEADERS"]),
        PriorityFrame(3, depends_on=1),
        DataFrame(1, data=b"padded body", flags=["PADDED", "END_STREAM"], pad_length=20),
    )
    # The PRIORITY inside the header block is illegal; build the legal stream without it.
    legal = handmade_client(
        headers_frame(1, block[:10], "PADDED", "PRIORITY", pad_length=7, depends_on=0, stream_weight=15),
        ContinuationFrame(1, data=block[10:100]),
        ContinuationFrame(1, data=block[100:], flags=["END_HEADERS"]),
        PriorityFrame(3, depends_on=1),
        WindowUpdateFrame(0, window_increment=1000),
        PingFrame(0, opaque_data=b"12345678"),
        DataFrame(1, data=b"padded body", flags=["PADDED", "END_STREAM"], pad_length=20),
    )
    server_encoder = hpack.Encoder()
    server = (SettingsFrame(0).serialize()
              + headers_frame(1, server_encoder.encode([(":status", "200")]), "END_HEADERS", "PADDED",
                              pad_length=3).serialize()
              + DataFrame(1, data=b"answer", flags=["END_STREAM", "PADDED"], pad_length=255).serialize())

    recorder, decoder = run([("client", legal), ("server", server)], alpn="h2")
    assert decoder.error is None
    (exchange,) = recorder.exchanges
    assert exchange.request.headers.get("x-long") == "z" * 300
    assert bytes(exchange.request.body) == b"padded body"
    assert exchange.request.wire_size == len(b"padded body")
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"answer"
    assert not exchange.partial

    recorder, decoder = run([("client", client), ("server", server)], alpn="h2")
    assert decoder.error is not None
    assert "interrupted a header block" in decoder.error


def test_padded_data_from_h2() -> None:
    pair = H2Pair()
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.server.send_headers(stream, [(b":status", b"200")])
    pair.send_body(pair.server, stream, b"p" * 50_000, end=True, pad=100)
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"p" * 50_000
    assert exchange.response.wire_size == 50_000


def test_trailers_both_ways() -> None:
    pair = H2Pair()
    stream = pair.request("/grpc.Service/Method", body=b"\x00\x00\x00\x00\x02hi", trailers=[("x-req-trailer", "1")])
    pair.flush()
    pair.respond(stream, body=b"\x00\x00\x00\x00\x02ok", trailers=[("grpc-status", "0"), ("grpc-message", "")])
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.request.trailers is not None
    assert list(exchange.request.trailers) == [("x-req-trailer", "1")]
    assert exchange.response is not None
    assert exchange.response.trailers is not None
    assert exchange.response.trailers.get("grpc-status") == "0"
    assert not exchange.partial
    recorder.assert_contract()


def test_rst_stream_from_client_ends_the_exchange_as_partial() -> None:
    pair = H2Pair()
    cancelled = pair.request("/stream", method="GET")
    other = pair.request("/other", method="GET")
    pair.flush()
    pair.server.send_headers(cancelled, [(b":status", b"200")])
    pair.server.send_data(cancelled, b"data: partial\n\n")
    pair.flush()
    pair.client.reset_stream(cancelled, h2.errors.ErrorCodes.CANCEL)
    pair.respond(other, body=b"fine")
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    by_target = {e.request.target: e for e in recorder.exchanges}
    cut = by_target["/stream"]
    assert cut.partial_reasons == ["stream reset by client (CANCEL)"]
    assert recorder.kinds(cut) == ["request", "response_start", "response_data", "end"]
    assert not by_target["/other"].partial
    recorder.assert_contract()


def test_rst_stream_from_server_names_the_error_code() -> None:
    pair = H2Pair()
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.server.reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.partial_reasons == ["stream reset by server (REFUSED_STREAM)"]
    assert exchange.response is None


def test_goaway_cuts_streams_above_last_stream_id() -> None:
    pair = H2Pair()
    streams = [pair.request(f"/{i}", method="GET") for i in range(4)]  # ids 1, 3, 5, 7
    pair.flush()
    for stream in streams[:2]:
        pair.respond(stream, body=b"done")
    responses = pair.server.data_to_send()
    # A graceful shutdown: GOAWAY first, then the streams it still serves finish. h2 refuses to send after its
    # GOAWAY, so the frames are produced in the other order and put on the wire in this one.
    pair.server.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=3)
    goaway = pair.server.data_to_send()
    wire = [*pair.wire, ("server", goaway), ("server", responses)]
    recorder, _ = run(wire, alpn="h2", close=["server"])
    by_stream = {e.stream_id: e for e in recorder.exchanges}
    assert not by_stream[1].partial and not by_stream[3].partial
    for stream_id in (5, 7):
        assert by_stream[stream_id].partial_reasons == [
            "stream not processed: server sent GOAWAY (last_stream_id=3, NO_ERROR)"]
    recorder.assert_contract()


def test_header_table_size_advertised_by_each_receiver_is_honoured() -> None:
    # The server allows the client a 64 KiB table, the client allows the server 256 bytes: h2's encoders then
    # announce those sizes in their header blocks, and the decoders must accept exactly what was advertised.
    pair = H2Pair(client_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 256},
                  server_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 65536})
    pair.flush()
    values = [f"value-{i}-" + "x" * 200 for i in range(100)]
    for i, value in enumerate(values):
        stream = pair.request(f"/{i}", method="GET", headers=[("x-token", value)])
        pair.flush()
        pair.respond(stream, headers=[("x-echo", value)], body=b"ok")
        pair.flush()
        if i == 50:  # shrink the client's table mid-connection; after the ACK the client must shrink too
            pair.server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
            pair.flush()
    assert pair.client.encoder.header_table_size == 0
    recorder = Recorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder)
    for direction, data in pair.wire:
        (decoder.feed_client if direction == "client" else decoder.feed_server)(data)
    assert decoder.error is None
    assert [e.request.headers.get("x-token") for e in recorder.exchanges] == values
    assert [e.response.headers.get("x-echo") for e in recorder.exchanges if e.response] == values
    client_hpack = decoder._client.hpack
    server_hpack = decoder._server.hpack
    assert client_hpack.max_allowed_table_size == 0
    assert server_hpack.max_allowed_table_size == 256


def test_table_size_update_above_what_the_receiver_advertised_is_an_error() -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = 8192  # the server never allowed more than the default 4096
    block = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")])
    client = handmade_client(headers_frame(1, block, "END_HEADERS", "END_STREAM"))
    recorder, decoder = run([("client", client)], alpn="h2")
    assert decoder.error is not None
    assert "HPACK" in decoder.error
    assert recorder.calls == []


def test_server_push_is_ignored_without_breaking_decoding() -> None:
    pair = H2Pair()
    stream = pair.request("/index.html", method="GET")
    pair.flush()
    promised = pair.server.get_next_available_stream_id()
    pair.server.push_stream(stream, promised, [(b":method", b"GET"), (b":path", b"/style.css"),
                                               (b":authority", b"api.example.com"), (b":scheme", b"https")])
    pair.respond(stream, body=b"<html>", headers=[("content-type", "text/html")])
    pair.respond(promised, body=b"body {}", headers=[("content-type", "text/css")])
    second = pair.request("/after", method="GET")
    pair.flush()
    pair.respond(second, body=b"after", headers=[("content-type", "text/css")])
    pair.flush()
    recorder, decoder = run(pair.wire, alpn="h2")
    assert decoder.error is None
    assert [e.request.target for e in recorder.exchanges] == ["/index.html", "/after"]
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"<html>", b"after"]


def test_informational_responses_are_skipped() -> None:
    pair = H2Pair()
    stream = pair.request("/", headers=[("expect", "100-continue")], body=b"x", end=True)
    pair.flush()
    pair.server.send_headers(stream, [(b":status", b"103"), (b"link", b"</a>")])
    pair.respond(stream, body=b"ok")
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert exchange.response.status == 200
    assert "link" not in exchange.response.headers


def test_response_data_is_delivered_incrementally() -> None:
    pair = H2Pair()
    stream = pair.request("/v1/chat", body=b"{}")
    pair.flush()
    recorder = Recorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder)
    for direction, data in pair.wire:
        (decoder.feed_client if direction == "client" else decoder.feed_server)(data)
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request"]
    pair.wire.clear()
    pair.server.send_headers(stream, [(b":status", b"200"), (b"content-type", b"text/event-stream")])
    pair.flush()
    decoder.feed_server(b"".join(d for _, d in pair.wire))
    assert recorder.kinds(exchange) == ["request", "response_start"]
    for event in [b"data: 1\n\n", b"data: 2\n\n"]:
        pair.wire.clear()
        pair.server.send_data(stream, event)
        pair.flush()
        decoder.feed_server(b"".join(d for _, d in pair.wire))
        assert recorder.calls[-1] == ("response_data", exchange.exchange_id, event)
    pair.wire.clear()
    pair.server.end_stream(stream)
    pair.flush()
    decoder.feed_server(b"".join(d for _, d in pair.wire))
    assert recorder.calls[-1] == ("end", exchange.exchange_id, b"")


def test_invalid_preface_stops_decoding_without_raising() -> None:
    recorder, decoder = run([("client", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")], alpn="h2")
    assert decoder.error == "invalid HTTP/2 client connection preface"
    assert recorder.calls == []


def test_corrupt_hpack_ends_open_streams_as_partial() -> None:
    pair = H2Pair()
    pair.request("/first", method="GET")
    pair.flush()
    bad = HeadersFrame(3, data=b"\xff\xff\xff\xff\xff", flags=["END_HEADERS", "END_STREAM"]).serialize()
    recorder, decoder = run([*pair.wire, ("client", bad)], alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.partial
    assert decoder.error is not None
    assert exchange.partial_reasons == [decoder.error]


def test_server_close_ends_open_streams_as_partial() -> None:
    pair = H2Pair()
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.server.send_headers(stream, [(b":status", b"200")])
    pair.server.send_data(stream, b"half")
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2", close=["server"])
    (exchange,) = recorder.exchanges
    assert exchange.partial_reasons == ["connection closed before response complete"]
    recorder.assert_contract()


def test_encoded_bodies_are_decoded_and_capped() -> None:
    pair = H2Pair()
    payload = b"token " * 5000
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.respond(stream, body=gzip.compress(payload), headers=[("content-encoding", "gzip")])
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2", body_cap=1000)
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == payload[:1000]
    assert exchange.response.truncated
    assert exchange.response.wire_size == len(gzip.compress(payload))
    assert exchange.partial_reasons == ["response body truncated at cap"]


def test_prior_knowledge_h2_is_detected_without_alpn() -> None:
    pair = H2Pair()
    stream = pair.request("/api/chat", body=b"{}")
    pair.flush()
    pair.respond(stream, body=b"{}")
    pair.flush()
    recorder, decoder = run([(d, b[i:i + 5]) for d, b in pair.wire for i in range(0, len(b), 5)], alpn=None)
    assert decoder.error is None
    (exchange,) = recorder.exchanges
    assert exchange.request.http_version == "2"
    assert exchange.request.scheme == "https"


def test_big_data_frames_beyond_default_max_frame_size() -> None:
    pair = H2Pair(client_settings={h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
                                   h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.client.increment_flow_control_window((1 << 31) - 1 - 65535)
    pair.flush()
    pair.server.send_headers(stream, [(b":status", b"200")])
    pair.send_body(pair.server, stream, bytes(range(256)) * 8192, end=True)
    pair.flush()
    server_bytes = b"".join(d for direction, d in pair.wire if direction == "server")
    assert any(len(b) > 1 << 19 for b in [server_bytes])
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == bytes(range(256)) * 8192
    assert not exchange.partial


def test_h2_events_sanity() -> None:
    # The pair helper must produce a normal conversation (guards the other tests' premise).
    pair = H2Pair()
    stream = pair.request("/", body=b"abc")
    pair.flush()
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream for e in pair.server_events)


def test_lowered_table_size_applies_only_once_the_sender_acknowledges_it() -> None:
    # The server lowers the client's table to 0; a request the client sent before it saw that SETTINGS still
    # uses the old table (no size update) and must decode; the client's ACK switches the limit.
    pair = H2Pair()
    pair.flush()
    warm = pair.request("/warm", method="GET", headers=[("x-token", "t" * 100)])
    pair.flush()
    pair.respond(warm)
    pair.flush()
    pair.server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    settings = pair.server.data_to_send()
    in_flight = pair.request("/in-flight", method="GET", headers=[("x-token", "t" * 100)])
    before_ack = pair.client.data_to_send()
    pair.client_events += pair.client.receive_data(settings)
    after = pair.request("/after", method="GET", headers=[("x-token", "t" * 100)])
    ack_and_after = pair.client.data_to_send()
    wire = [*pair.wire, ("server", settings), ("client", before_ack), ("client", ack_and_after)]
    pair.server_events += pair.server.receive_data(before_ack + ack_and_after)
    pair.respond(in_flight)
    pair.respond(after)
    wire.append(("server", pair.server.data_to_send()))

    recorder, decoder = run(wire, alpn="h2")
    assert decoder.error is None
    assert [e.request.target for e in recorder.exchanges] == ["/warm", "/in-flight", "/after"]
    assert not any(e.partial for e in recorder.exchanges)
    assert [e.request.headers.get("x-token") for e in recorder.exchanges] == ["t" * 100] * 3


def test_client_close_cuts_incomplete_requests_but_responses_still_count() -> None:
    pair = H2Pair()
    stream = pair.request("/upload", body=b"part", end=False)
    pair.flush()
    pair.respond(stream, body=b"got part")
    pair.flush()
    recorder = Recorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder)
    client_bytes = b"".join(d for direction, d in pair.wire if direction == "client")
    server_bytes = b"".join(d for direction, d in pair.wire if direction == "server")
    decoder.feed_client(client_bytes)
    decoder.client_closed()
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request"]
    decoder.feed_server(server_bytes)
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    assert exchange.partial_reasons == ["connection closed before request complete"]
    assert bytes(exchange.request.body) == b"part"


def test_a_hpack_table_beyond_the_cap_stops_decoding_not_the_connection() -> None:
    # The server allows the client a 1 GiB header table, and the client fills it with unique headers: the
    # decoder mirrors at most its cap, then stops decoding that connection (exchanges partial, reason recorded).
    pair = H2Pair(server_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**30})
    pair.flush()
    cap = 64 * 1024
    recorder = Recorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder, max_table_size=cap)
    fed = 0
    for i in range(40):  # 40 x 8 KiB: 320 KiB of table, five times the cap
        stream = pair.request(f"/{i}", method="POST", headers=[("x-fill", f"{i}-" + "y" * 8192)], end=False)
        pair.flush()
        for direction, data in pair.wire[fed:]:
            (decoder.feed_client if direction == "client" else decoder.feed_server)(data)
        fed = len(pair.wire)
        assert decoder._client.hpack.header_table._current_size <= cap + 9000
    assert pair.client.encoder.header_table_size == 2**30  # the real client did use what it was allowed
    assert decoder.error is not None and "HPACK table" in decoder.error and str(cap) in decoder.error
    assert decoder._client.hpack.header_table._current_size == 0  # the mirrored table is let go
    ended = [e for e in recorder.exchanges if e.partial]
    assert ended and all(decoder.error in e.partial_reasons for e in ended)
    assert len(recorder.exchanges) < 40  # later requests are not decoded at all
    del stream


def test_the_default_hpack_cap_lets_ordinary_large_tables_through() -> None:
    pair = H2Pair(server_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 65536})
    pair.flush()
    for i in range(20):
        pair.request(f"/{i}", method="GET", headers=[("x-fill", f"{i}-" + "y" * 2000)])
        pair.flush()
    recorder = Recorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder)
    for direction, data in pair.wire:
        (decoder.feed_client if direction == "client" else decoder.feed_server)(data)
    assert decoder.error is None and len(recorder.exchanges) == 20


def test_the_hpack_cap_is_configurable() -> None:
    from oisp.config import parse_config
    from oisp.http.passive import make_decoder

    assert parse_config({"capture": {"hpack_table_cap": 1024}}).hpack_table_cap == 1024
    decoder = make_decoder("h2", connection(alpn="h2"), Recorder(), max_table_size=1024)
    assert isinstance(decoder, Http2Decoder) and decoder._max_table_size == 1024


def test_a_rapid_reset_flood_is_one_exchange_and_a_real_stream_beside_it_is_whole() -> None:
    """CVE-2023-44487's shape: the first streams reset before their response are reported one by one, the rest
    of the flood as one partial exchange that says how many; a stream answered meanwhile is reported as usual."""
    from oisp.http.h2 import RESET_FLOOD_THRESHOLD

    pair = H2Pair()
    flood = 1_000
    for n in range(flood):
        stream = pair.request("/v1/chat/completions", method="GET")  # HEADERS with END_STREAM: the request is whole
        pair.client.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        if n % 100 == 0:
            pair.flush()
    answered = pair.request("/v1/models", method="GET")
    pair.flush()
    pair.respond(answered, body=b"fine")
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2", close=("client", "server"))
    recorder.assert_contract()
    reset = [e for e in recorder.exchanges if e.request.target == "/v1/chat/completions"]
    assert len(reset) == RESET_FLOOD_THRESHOLD + 1
    assert all(e.partial_reasons == ["stream reset by client (CANCEL)"] for e in reset[:RESET_FLOOD_THRESHOLD])
    assert reset[-1].partial_reasons == [
        f"rapid reset: the client reset {flood - RESET_FLOOD_THRESHOLD} streams before their response (after "
        f"{RESET_FLOOD_THRESHOLD} reported one by one); they are reported as this one exchange"]
    (fine,) = [e for e in recorder.exchanges if e.request.target == "/v1/models"]
    assert not fine.partial and fine.response is not None and bytes(fine.response.body) == b"fine"
    assert recorder.kinds(fine) == ["request", "response_start", "response_data", "end"]
