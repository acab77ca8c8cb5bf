"""However the bytes of each direction are cut into feeds, the decoders report the same exchanges."""

from __future__ import annotations

import gzip
from typing import Any

import h2.errors
import h2.settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.http.test_h1 import chunked, req, resp
from tests.http.transcript import H2Pair, Recorder, Wire, run, summary


def h1_transcript() -> Wire:
    return [
        ("client", req("POST", "/a", b'{"first": true}') + req("HEAD", "/b")
         + b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
         + chunked(b"part one ", b"part two", trailers="X-Checksum: abc\r\n")),
        ("server", resp(200, b"first response") + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
        ("server", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
         + chunked(*(lambda z: [z[:10], z[10:30], z[30:]])(gzip.compress(b"data: x\n\n" * 50)),
                   trailers="X-Done: 1\r\n")),
        ("client", b"POST /d HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
        ("server", b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("client", b"hello"),
        ("server", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body"),
    ]


def h2_transcript() -> Wire:
    pair = H2Pair(server_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 8192})
    pair.flush()
    streams = [pair.request(f"/s/{i}", body=f"req {i}".encode() * 20, headers=[("x-i", str(i))]) for i in range(5)]
    big = pair.request("/big", method="GET", headers=[("x-big", "b" * 30_000)])
    pair.flush()
    for stream in streams:
        pair.server.send_headers(stream, [(b":status", b"200"), (b"x-s", str(stream).encode())])
    for round_ in range(3):
        for stream in streams:
            pair.send_body(pair.server, stream, f"[{stream}:{round_}]".encode() * 10, end=False, pad=round_ * 3)
        pair.flush()
    pair.server.send_headers(streams[0], [(b"grpc-status", b"0")], end_stream=True)
    pair.server.reset_stream(streams[1], h2.errors.ErrorCodes.INTERNAL_ERROR)
    for stream in streams[2:]:
        pair.server.end_stream(stream)
    pair.respond(big, body=gzip.compress(b"z" * 10_000), headers=[("content-encoding", "gzip")])
    pair.flush()
    return pair.wire


def observe(wire: Wire, alpn: str) -> tuple[list[dict[str, Any]], list[tuple[str, int]], Recorder]:
    recorder, decoder = run(wire, alpn=alpn, close=["client", "server"])
    assert decoder.error is None
    recorder.assert_contract()
    position = {e.exchange_id: i for i, e in enumerate(recorder.exchanges)}
    calls: list[tuple[str, int]] = []
    for kind, exchange_id, _ in recorder.calls:
        call = (kind, position[exchange_id])
        if not (kind == "response_data" and calls and calls[-1] == call):
            calls.append(call)
    return [summary(e) for e in recorder.exchanges], calls, recorder


def resplit(wire: Wire, data: st.DataObject) -> Wire:
    out: Wire = []
    for direction, message in wire:
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(message)), max_size=5))))
        start = 0
        for cut in [*cuts, len(message)]:
            if cut > start:
                out.append((direction, message[start:cut]))
                start = cut
    return out


H1_WIRE = h1_transcript()
H2_WIRE = h2_transcript()
H1_EXPECTED = observe(H1_WIRE, "http/1.1")
H2_EXPECTED = observe(H2_WIRE, "h2")


def test_h1_reference_transcript_is_what_we_think() -> None:
    summaries, _, _ = H1_EXPECTED
    assert [s["request"][1] for s in summaries] == ["/a", "/b", "/c", "/d"]
    assert [s["partial"] for s in summaries] == [False] * 4
    assert summaries[2]["response"][4] == b"data: x\n\n" * 50
    assert summaries[3]["response"][4] == b"close-delimited body"


def test_h2_reference_transcript_is_what_we_think() -> None:
    summaries, _, _ = H2_EXPECTED
    assert len(summaries) == 6
    assert [s["partial"] for s in summaries] == [False, True, False, False, False, False]
    assert summaries[1]["reasons"] == ["stream reset by server (INTERNAL_ERROR)"]
    assert summaries[5]["request"][5][0] == ("x-big", "b" * 30_000)
    assert summaries[5]["response"][4] == b"z" * 10_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_h1_random_split_points_give_identical_exchanges(data: st.DataObject) -> None:
    summaries, calls, _ = observe(resplit(H1_WIRE, data), "http/1.1")
    assert summaries == H1_EXPECTED[0]
    assert calls == H1_EXPECTED[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_h2_random_split_points_give_identical_exchanges(data: st.DataObject) -> None:
    summaries, calls, _ = observe(resplit(H2_WIRE, data), "h2")
    assert summaries == H2_EXPECTED[0]
    assert calls == H2_EXPECTED[1]


def test_byte_by_byte_feeding_gives_identical_exchanges() -> None:
    for wire, alpn, expected in [(H1_WIRE, "http/1.1", H1_EXPECTED), (H2_WIRE, "h2", H2_EXPECTED)]:
        single = [(direction, message[i : i + 1]) for direction, message in wire for i in range(len(message))]
        summaries, calls, _ = observe(single, alpn)
        assert summaries == expected[0]
        assert calls == expected[1]
