"""Body bytes past the cap are left out of the decoder's copies: the sans-io skipper, and the real HTTP/1.1 decoder
fed with and without it giving the same exchanges (bodies, sizes, truncation, trailers, timings, listener calls)."""

from __future__ import annotations

import gzip
import random
from collections.abc import Sequence

import attrs
import pytest
from tests.http.transcript import Recorder, Wire, connection, summary

from oisp.http.h1 import Http1Decoder
from oisp.proxy.body_skip import MIN_SKIP, BodySkipper

CAP = 64 * 1024


def _request(method: str, body: bytes = b"", *, headers: str = "", chunked: Sequence[int] = ()) -> bytes:
    if chunked:
        pieces, at = [], 0
        for size in chunked:
            pieces.append(f"{size:x}\r\n".encode() + body[at:at + size] + b"\r\n")
            at += size
        return (f"{method} /up HTTP/1.1\r\nhost: api.example.com\r\ntransfer-encoding: chunked\r\n{headers}\r\n"
                .encode() + b"".join(pieces) + b"0\r\nx-trailer: done\r\n\r\n")
    return (f"{method} /up HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
            .encode() + body)


def _response(body: bytes, *, headers: str = "", chunk: int = 0, length: int | None = None) -> bytes:
    if chunk:
        framed = b"".join(f"{len(body[i:i + chunk]):x}\r\n".encode() + body[i:i + chunk] + b"\r\n"
                          for i in range(0, len(body), chunk))
        return f"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n{headers}\r\n".encode() + framed + b"0\r\n\r\n"
    size = len(body) if length is None else length
    return f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n{headers}\r\n".encode() + body


def _body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _conversation() -> Wire:
    """Keep-alive exchanges of every framing, big and small, with and without content coding."""
    big, other = _body(300 * 1024, 1), _body(500 * 1024, 2)
    coded = gzip.compress(_body(200 * 1024, 3))
    return [
        ("client", _request("POST", big)),
        ("server", _response(other)),
        ("client", _request("POST", other, chunked=[100 * 1024, 150 * 1024, 50 * 1024, 200 * 1024])),
        ("server", _response(big, chunk=70 * 1024)),
        ("client", _request("POST", b"small")),
        ("server", _response(b"{}")),
        ("client", _request("HEAD", b"")),
        ("server", _response(b"", length=10_000_000)),  # HEAD: no body follows, whatever its length says
        ("client", _request("POST", coded, headers="content-encoding: gzip\r\n")),
        ("server", _response(coded, headers="content-encoding: gzip\r\n")),
        ("client", _request("POST", big, headers="expect: 100-continue\r\n")),
        ("server", b"HTTP/1.1 100 Continue\r\n\r\n" + _response(big)),
    ]


def _reads(wire: Wire, seed: int) -> Wire:
    """The transcript as a relay might read it: every message cut at random places, some reads tiny."""
    rng = random.Random(seed)
    out: Wire = []
    for direction, data in wire:
        at = 0
        while at < len(data):
            size = rng.choice((1, 7, 100, 5000, *[16 * 1024, 64 * 1024, 256 * 1024] * 3))
            out.append((direction, data[at:at + size]))
            at += size
    return out


def _decode(reads: Wire, *, skip: bool) -> tuple[Recorder, int]:
    recorder = Recorder()
    decoder = Http1Decoder(connection(), recorder, body_cap=CAP)
    requests, responses = BodySkipper.pair(CAP)
    for now, (direction, data) in enumerate(reads, start=1000):
        feed = decoder.feed_client if direction == "client" else decoder.feed_server
        skip_bytes = decoder.skip_client if direction == "client" else decoder.skip_server
        if not skip:
            feed(data, now)
            continue
        pieces = (requests if direction == "client" else responses).feed(data)
        assert sum(p if isinstance(p, int) else len(p) for p in pieces) == len(data)
        for piece in pieces:
            if isinstance(piece, int):
                assert piece >= MIN_SKIP
                skip_bytes(piece, now)
            else:
                feed(piece, now)
    decoder.client_closed(10**9)
    decoder.server_closed(10**9)
    return recorder, requests.skipped + responses.skipped


@pytest.mark.parametrize("seed", range(3))
def test_the_decoder_gives_the_same_exchanges_with_bodies_past_the_cap_left_out(seed: int) -> None:
    wire = _conversation()
    reads = _reads(wire, seed)
    plain, _ = _decode(reads, skip=False)
    skipped_recorder, skipped = _decode(reads, skip=True)
    total = sum(len(data) for _, data in wire)
    assert skipped > total // 2  # most of the bytes were never copied
    assert len(plain.exchanges) == len(skipped_recorder.exchanges) == 6
    for before, after in zip(plain.exchanges, skipped_recorder.exchanges, strict=True):
        assert summary(after) == summary(before)
        assert attrs.asdict(after.timings) == attrs.asdict(before.timings)
    assert [(kind, data) for kind, _, data in skipped_recorder.calls] == [(kind, data) for kind, _, data in plain.calls]
    skipped_recorder.assert_contract()
    first = skipped_recorder.exchanges[0]
    assert first.request.truncated and first.request.wire_size == 300 * 1024 and len(first.request.body) == CAP
    assert first.partial_reasons == ["request body truncated at cap", "response body truncated at cap"]
    coded = skipped_recorder.exchanges[4]
    assert coded.request.truncated and coded.request.wire_size == len(gzip.compress(_body(200 * 1024, 3)))


def _pieces(skipper: BodySkipper, data: bytes) -> list[bytes | int]:
    return skipper.feed(data)


def test_the_pieces_are_the_bytes_with_body_past_the_cap_counted_and_the_last_byte_kept() -> None:
    requests, _ = BodySkipper.pair(1000)
    body = _body(100_000, 4)
    message = _request("POST", body)
    pieces = _pieces(requests, message)
    head = len(message) - len(body)
    assert pieces == [message[:head + 1001], 100_000 - 1002, message[-1:]]


def test_skipping_stops_for_good_at_anything_it_cannot_follow() -> None:
    requests, responses = BodySkipper.pair(1000)
    upgrade = b"GET /ws HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    assert _pieces(requests, upgrade) == [upgrade]
    assert not requests.active and not responses.active  # the responses cannot be followed without requests
    later = _request("POST", _body(50_000, 5))
    assert _pieces(requests, later) == [later]
    requests, responses = BodySkipper.pair(1000)
    bad = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n" + _body(50_000, 6)
    assert _pieces(requests, bad) == [bad] and not requests.active
    closing = b"HTTP/1.1 200 OK\r\n\r\n" + _body(50_000, 7)  # close-delimited: never skipped
    assert _pieces(responses, closing) == [closing] and not responses.active


def test_a_head_split_over_many_reads_is_copied_at_once_and_still_followed() -> None:
    requests, _ = BodySkipper.pair(1000)
    message = _request("POST", _body(20_000, 8), headers="x-long: " + "a" * 3000 + "\r\n")
    out: list[bytes | int] = []
    for at in range(0, 4000, 10):  # the head, ten bytes at a time: every byte goes on at once
        assert _pieces(requests, message[at:at + 10]) == [message[at:at + 10]]
    out = _pieces(requests, message[4000:])
    assert isinstance(out[1], int) and sum(len(p) for p in out if isinstance(p, bytes)) + out[1] == len(message) - 4000
