"""HTTP/1.1 passive decoding, transcript style: feed both directions, assert exchanges and listener calls."""

from __future__ import annotations

import gzip

import pytest
from tests.http.transcript import Recorder, connection, run

from oisp.http import Http1Decoder, HttpExchange


def req(method: str = "GET", target: str = "/", body: bytes = b"", *, headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {target} HTTP/1.1\r\nHost: api.example.com\r\n{headers}{length}\r\n".encode() + body


def resp(status: int = 200, body: bytes = b"", *, headers: str = "", reason: str = "OK") -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(*pieces: bytes, trailers: str = "") -> bytes:
    out = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    return out + b"0\r\n" + trailers.encode() + b"\r\n"


def test_keep_alive_pipelining_of_three_requests_matches_responses_in_order() -> None:
    client = req("POST", "/a", b"one") + req("POST", "/b?x=1", b"two!") + req("GET", "/c")
    server = resp(200, b"first") + resp(201, b"second", reason="Created") + resp(404, b"", reason="Not Found")
    recorder, decoder = run([("client", client), ("server", server)])

    assert decoder.error is None
    assert [e.request.target for e in recorder.exchanges] == ["/a", "/b?x=1", "/c"]
    assert [bytes(e.request.body) for e in recorder.exchanges] == [b"one", b"two!", b""]
    assert [e.response.status for e in recorder.exchanges if e.response] == [200, 201, 404]
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"first", b"second", b""]
    assert not any(e.partial for e in recorder.exchanges)
    assert recorder.exchanges[1].request.query == "x=1"
    assert recorder.exchanges[1].request.url == "https://api.example.com/b?x=1"
    recorder.assert_contract()
    # All three requests are reported as soon as they are complete, before any response arrives.
    assert [k for k, _, _ in recorder.calls[:3]] == ["request"] * 3


def test_pipelined_requests_interleaved_with_responses_byte_by_byte() -> None:
    client = req("POST", "/a", b"x" * 10) + req("POST", "/b", b"y" * 10)
    server = resp(200, b"A" * 7) + resp(200, b"B" * 9)
    wire = [("client", client[i : i + 1]) for i in range(len(client))]
    wire += [("server", server[i : i + 1]) for i in range(len(server))]
    recorder, _ = run(wire)
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"A" * 7, b"B" * 9]
    recorder.assert_contract()


def test_chunked_bodies_both_ways_with_trailers() -> None:
    client = (b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
              + chunked(b"hello ", b"world", trailers="X-Sum: 42\r\n"))
    server = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunked(b"data: 1\n\n", b"data: 2\n\n", trailers="X-Done: yes\r\nX-Count: 2\r\n"))
    recorder, _ = run([("client", client), ("server", server)])

    (exchange,) = recorder.exchanges
    assert bytes(exchange.request.body) == b"hello world"
    assert exchange.request.wire_size == 11
    assert exchange.request.trailers is not None
    assert list(exchange.request.trailers) == [("X-Sum", "42")]
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"data: 1\n\ndata: 2\n\n"
    assert exchange.response.trailers is not None
    assert exchange.response.trailers.get("x-done") == "yes"
    assert exchange.response.trailers.get_all("X-COUNT") == ["2"]
    assert not exchange.partial
    recorder.assert_contract()


def test_close_delimited_response_ends_at_server_eof() -> None:
    server = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstreamed until the end"
    recorder, _ = run([("client", req()), ("server", server)])
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data"]

    recorder, _ = run([("client", req()), ("server", server)], close=["server"])
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"streamed until the end"
    assert not exchange.partial


def test_http10_response_is_close_delimited() -> None:
    recorder, _ = run([("client", req()), ("server", b"HTTP/1.0 200 OK\r\n\r\nold style")], close=["server"])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert exchange.response.http_version == "1.0"
    assert bytes(exchange.response.body) == b"old style"
    assert not exchange.partial


def test_expect_100_continue_skips_the_informational_response() -> None:
    head = b"POST /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    wire = [
        ("client", head),
        ("server", b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("client", b"body"),
        ("server", resp(200, b"ok")),
        ("client", req("GET", "/next")),
        ("server", resp(200, b"next")),
    ]
    recorder, _ = run(wire)
    assert [e.response.status for e in recorder.exchanges if e.response] == [200, 200]
    assert bytes(recorder.exchanges[0].request.body) == b"body"
    assert not any(e.partial for e in recorder.exchanges)
    recorder.assert_contract()


def test_informational_103_before_final_response_is_skipped() -> None:
    server = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + resp(200, b"x")
    recorder, _ = run([("client", req()), ("server", server)])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert exchange.response.status == 200
    assert "link" not in exchange.response.headers


def test_head_response_has_no_body_despite_content_length() -> None:
    server = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n" + resp(200, b"after head")
    recorder, _ = run([("client", req("HEAD", "/file") + req("GET", "/next")), ("server", server)])
    head, after = recorder.exchanges
    assert head.response is not None
    assert head.response.headers.get("content-length") == "1234"
    assert bytes(head.response.body) == b""
    assert after.response is not None
    assert bytes(after.response.body) == b"after head"
    assert not head.partial and not after.partial


def test_websocket_upgrade_101_keeps_the_exchange_open_and_reads_frames() -> None:
    upgrade = req("GET", "/ws", headers="Upgrade: websocket\r\nConnection: Upgrade\r\n")
    wire = [
        ("client", upgrade + b"\x81\x85 websocket frame bytes"),
        ("server", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                   b"\x81\x05hello"),
        ("client", b"GET /not-http HTTP/1.1\r\n\r\n"),
        ("server", b"\x88\x00"),
    ]
    recorder, decoder = run(wire, close=["client", "server"])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert exchange.response.status == 101
    assert exchange.websocket
    # The client's bytes are not WebSocket frames (the second "frame" is not masked): that direction is no
    # longer decoded, the exchange says so, HTTP decoding does not resume, nothing raises.
    assert exchange.partial_reasons == ["websocket client frames: client frame not masked"]
    assert decoder.error is None
    assert recorder.kinds(exchange) == ["request", "response_start", "end"]


def test_declined_upgrade_resumes_http_decoding_of_held_requests() -> None:
    upgrade = req("GET", "/ws", headers="Upgrade: h2c\r\nConnection: Upgrade\r\n")
    recorder, _ = run([
        ("client", upgrade + req("GET", "/second")),
        ("server", resp(200, b"no upgrade") + resp(200, b"second")),
    ])
    assert [e.request.target for e in recorder.exchanges] == ["/ws", "/second"]
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"no upgrade", b"second"]
    recorder.assert_contract()


def test_connect_2xx_switches_protocol() -> None:
    connect = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n"
    recorder, decoder = run(
        [("client", connect + b"\x16\x03\x01 tls bytes"), ("server", b"HTTP/1.1 200 Connection established\r\n\r\n"
                                                                   b"\x16\x03\x03 more tls")],
        tls=False,
    )
    (exchange,) = recorder.exchanges
    assert exchange.request.method == "CONNECT"
    assert exchange.request.target == "api.example.com:443"
    assert exchange.response is not None
    assert exchange.response.status == 200
    assert recorder.kinds(exchange) == ["request", "response_start", "end"]
    assert decoder.error is None


def test_malformed_request_line_stops_decoding_without_raising() -> None:
    recorder, decoder = run([("client", b"THIS IS NOT HTTP\r\n\r\n"), ("server", resp(400))])
    assert recorder.calls == []
    assert decoder.error is not None
    assert decoder.error.startswith("malformed HTTP/1.1 request")


def test_malformed_request_after_a_good_one_ends_it_as_partial() -> None:
    recorder, decoder = run([("client", req("GET", "/ok") + b"\x00\x01garbage\r\n\r\n")])
    (exchange,) = recorder.exchanges
    assert exchange.partial
    assert exchange.partial_reasons[0].startswith("malformed HTTP/1.1 request")
    assert recorder.kinds(exchange) == ["request", "end"]
    assert decoder.error is not None
    # Later bytes are ignored, and nothing raises.
    assert decoder is not None
    decoder.feed_server(resp(200, b"late"))
    decoder.server_closed()


def test_malformed_response_marks_exchange_partial() -> None:
    recorder, decoder = run([("client", req()), ("server", b"HTTP/1.1 abc Broken\r\n\r\n")])
    (exchange,) = recorder.exchanges
    assert exchange.partial
    assert exchange.partial_reasons[0].startswith("malformed HTTP/1.1 response")
    assert decoder.error is not None


def test_truncated_response_body_at_eof_is_partial() -> None:
    server = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50
    recorder, _ = run([("client", req()), ("server", server)], close=["server"])
    (exchange,) = recorder.exchanges
    assert exchange.partial
    assert exchange.partial_reasons == ["connection closed before response complete"]
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"x" * 50
    recorder.assert_contract()


def test_truncated_request_body_at_client_eof_is_partial_but_response_still_decoded() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc"
    recorder = Recorder()
    decoder = Http1Decoder(connection(), recorder)
    decoder.feed_client(head)
    decoder.client_closed()
    (exchange,) = recorder.exchanges
    assert exchange.partial_reasons == ["connection closed before request complete"]
    assert recorder.kinds(exchange) == ["request"]
    decoder.feed_server(resp(400, b"bad"))
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    assert exchange.response is not None
    assert exchange.response.status == 400


def test_request_without_response_is_partial_when_server_closes() -> None:
    recorder, _ = run([("client", req("GET", "/a") + req("GET", "/b")), ("server", resp(200, b"a"))],
                      close=["server"])
    first, second = recorder.exchanges
    assert not first.partial
    assert second.partial_reasons == ["connection closed before response complete"]
    assert second.response is None
    recorder.assert_contract()


def test_connection_close_response_leaves_pipelined_requests_unanswered() -> None:
    server = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na"
    recorder, _ = run([("client", req("GET", "/a") + req("GET", "/b")), ("server", server)], close=["server"])
    first, second = recorder.exchanges
    assert not first.partial
    assert second.partial
    recorder.assert_contract()


def test_early_response_before_request_body_complete() -> None:
    head = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc"
    recorder, _ = run([
        ("client", head),
        ("server", resp(413, b"too big", reason="Payload Too Large")),
        ("client", b"def"),
    ])
    (exchange,) = recorder.exchanges
    # The request is delivered when its response starts; the exchange ends once both halves are complete.
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    assert bytes(exchange.request.body) == b"abcdef"
    assert not exchange.partial


def test_each_response_chunk_is_delivered_as_it_arrives() -> None:
    recorder = Recorder()
    decoder = Http1Decoder(connection(), recorder)
    decoder.feed_client(req("POST", "/v1/chat/completions", b"{}"), 1)
    decoder.feed_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 2)
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request", "response_start"]
    for i, piece in enumerate([b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]):
        decoder.feed_server(f"{len(piece):x}\r\n".encode() + piece + b"\r\n", 10 + i)
        assert recorder.calls[-1] == ("response_data", exchange.exchange_id, piece)
    decoder.feed_server(b"0\r\n\r\n", 20)
    assert recorder.calls[-1] == ("end", exchange.exchange_id, b"")
    timings = exchange.timings
    assert timings.request_start == 1
    assert timings.request_end == 1
    assert timings.response_headers == 2
    assert timings.response_first_byte == 10
    assert timings.response_chunks == [(10, 9), (11, 9), (12, 14)]
    assert timings.response_end == 20


def test_listener_errors_are_logged_and_decoding_continues(caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(Recorder):
        def response_data(self, exchange: HttpExchange, data: bytes) -> None:
            super().response_data(exchange, data)
            raise RuntimeError("listener bug")

    recorder = Exploding()
    decoder = Http1Decoder(connection(), recorder)
    decoder.feed_client(req("GET", "/a") + req("GET", "/b"))
    decoder.feed_server(resp(200, b"one") + resp(200, b"two"))
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"one", b"two"]
    assert all(kind_list[-1] == "end" for kind_list in (recorder.kinds(e) for e in recorder.exchanges))
    assert "listener failed in response_data()" in caplog.text


def test_body_cap_truncates_storage_and_delivery_but_counts_wire_bytes() -> None:
    server = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"a" * 6, b"b" * 6, b"c" * 6)
    recorder, _ = run([("client", req("POST", "/", b"0123456789")), ("server", server)], body_cap=8)
    (exchange,) = recorder.exchanges
    assert bytes(exchange.request.body) == b"01234567"
    assert exchange.request.truncated
    assert exchange.request.wire_size == 10
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"aaaaaabb"
    assert exchange.response.truncated
    assert exchange.response.wire_size == 18
    assert recorder.delivered(exchange) == b"aaaaaabb"
    assert exchange.partial_reasons == ["request body truncated at cap", "response body truncated at cap"]
    assert recorder.kinds(exchange)[-1] == "end"


def test_body_exactly_at_cap_is_not_truncated() -> None:
    recorder, _ = run([("client", req()), ("server", resp(200, b"12345678"))], body_cap=8)
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert not exchange.response.truncated
    assert not exchange.partial


def test_gzip_response_is_delivered_decoded() -> None:
    payload = b'{"choices": []}' * 100
    server = resp(200, gzip.compress(payload), headers="Content-Encoding: gzip\r\n")
    recorder, _ = run([("client", req()), ("server", server)])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == payload
    assert exchange.response.wire_size == len(gzip.compress(payload))
    assert recorder.delivered(exchange) == payload


def test_absolute_form_target_fills_scheme_and_authority() -> None:
    client = b"GET http://localhost:11434/api/tags?x=1 HTTP/1.1\r\nHost: localhost:11434\r\n\r\n"
    recorder, _ = run([("client", client), ("server", resp(200, b"{}"))], tls=False)
    (exchange,) = recorder.exchanges
    assert exchange.request.target == "/api/tags?x=1"
    assert exchange.request.authority == "localhost:11434"
    assert exchange.request.url == "http://localhost:11434/api/tags?x=1"


def test_http10_request_without_host() -> None:
    recorder, _ = run([("client", b"GET /old HTTP/1.0\r\n\r\n"), ("server", b"HTTP/1.0 200 OK\r\n\r\nhi")],
                      close=["client", "server"])
    (exchange,) = recorder.exchanges
    assert exchange.request.http_version == "1.0"
    assert exchange.request.authority is None
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"hi"
    assert not exchange.partial


def test_unsolicited_server_bytes_without_request_are_ignored_at_close() -> None:
    recorder, decoder = run([("server", b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")],
                            close=["server"])
    assert recorder.calls == []
    assert decoder.error is None


def test_abort_ends_open_exchanges_with_the_reason() -> None:
    recorder = Recorder()
    decoder = Http1Decoder(connection(), recorder)
    decoder.feed_client(req("GET", "/a"))
    decoder.feed_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    decoder.abort("connection reset by peer")
    (exchange,) = recorder.exchanges
    assert exchange.partial_reasons == ["connection reset by peer"]
    assert recorder.kinds(exchange) == ["request", "response_start", "response_data", "end"]
    decoder.abort("again")
    decoder.feed_server(b"more")
    assert recorder.kinds(exchange)[-1] == "end"
    assert exchange.partial_reasons == ["connection reset by peer"]


def test_malformed_header_reason_does_not_quote_the_offending_line(caplog: pytest.LogCaptureFixture) -> None:
    client = b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization Bearer sk-secret-token\r\n\r\n"
    _, decoder = run([("client", client)])
    assert decoder.error == "malformed HTTP/1.1 request: illegal header line"
    assert "sk-secret" not in caplog.text


def test_invalid_body_cap_is_a_configuration_error() -> None:
    from oisp.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="body_cap"):
        Http1Decoder(connection(), Recorder(), body_cap=-1)


def test_whole_messages_take_the_direct_way_and_h11_takes_over_for_the_rest() -> None:
    """Whole simple messages in one piece skip h11; what follows them (a HEAD, a split message) still decodes."""
    client = req("POST", "/a", b"one") + req("HEAD", "/b") + req("POST", "/c", b"three")
    server = resp(200, b"first") + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + resp(200, b"third")
    recorder, decoder = run([("client", client[:-2]), ("client", client[-2:]), ("server", server[:-3]),
                             ("server", server[-3:])])

    assert decoder.error is None
    assert [bytes(e.request.body) for e in recorder.exchanges] == [b"one", b"", b"three"]
    assert [bytes(e.response.body) for e in recorder.exchanges if e.response] == [b"first", b"", b"third"]
    assert recorder.exchanges[1].response is not None
    assert recorder.exchanges[1].response.headers.get("content-length") == "99"
    assert not any(e.partial for e in recorder.exchanges)
    recorder.assert_contract()


def test_direct_way_keeps_h11_header_rules() -> None:
    """A message the direct way declines is judged by h11: a second Host header stops decoding as before."""
    recorder, decoder = run([("client", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")])

    assert decoder.error is not None
    assert recorder.exchanges == []
