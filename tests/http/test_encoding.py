"""Content-Encoding removal: every coding, stacked codings, corrupt and truncated data, bombs, the cap."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.http.test_h1 import req, resp
from tests.http.transcript import H2Pair, run

from oisp.http.encoding import ContentDecoder, parse_content_codings

PAYLOAD = b"".join(f'data: {{"index": {i}, "text": "token {i * 7}"}}\n\n'.encode() for i in range(3000))


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def encode(codings: str, data: bytes) -> bytes:
    for coding in parse_content_codings(codings):
        data = ENCODERS[coding](data)
    return data


def decode_all(codings: str | None, data: bytes, *, limit: int = 1 << 30, piece: int = 0) -> ContentDecoder:
    decoder = ContentDecoder(codings, limit)
    out = bytearray()
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)] if piece else [data]
    for chunk in pieces:
        out += decoder.decode(chunk)
    decoder.finish()
    decoder.output = bytes(out)  # type: ignore[attr-defined]
    return decoder


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "br", "zstd", "identity", "GZip"])
@pytest.mark.parametrize("piece", [0, 1, 7, 4096])
def test_each_coding_decodes_incrementally(coding: str, piece: int) -> None:
    data = PAYLOAD[: 20_000] if piece == 1 else PAYLOAD
    encoded = data if coding == "identity" else encode(coding.lower(), data)
    decoder = decode_all(coding, encoded, piece=piece)
    assert decoder.output == data  # type: ignore[attr-defined]
    assert decoder.error is None
    assert not decoder.truncated


def test_raw_deflate_without_zlib_wrapper() -> None:
    decoder = decode_all("deflate", raw_deflate(PAYLOAD), piece=1000)
    assert decoder.output == PAYLOAD  # type: ignore[attr-defined]
    assert decoder.error is None


def test_gzip_with_several_members_and_zero_padding() -> None:
    data = gzip.compress(b"first ") + gzip.compress(b"second") + b"\0" * 8
    decoder = decode_all("gzip", data, piece=3)
    assert decoder.output == b"first second"  # type: ignore[attr-defined]
    assert decoder.error is None


@pytest.mark.parametrize("codings", ["gzip, br", "br, gzip", "deflate, zstd", "gzip,gzip", "identity, br"])
def test_stacked_codings_are_undone_in_reverse_order(codings: str) -> None:
    decoder = decode_all(codings, encode(codings, PAYLOAD), piece=999)
    assert decoder.output == PAYLOAD  # type: ignore[attr-defined]
    assert decoder.error is None


def test_unknown_coding_passes_raw_and_is_named() -> None:
    decoder = decode_all("gzip, compress", b"whatever bytes")
    assert decoder.unsupported == "compress"
    assert decoder.output == b"whatever bytes"  # type: ignore[attr-defined]


def test_corrupt_gzip_stops_decoding_without_raising() -> None:
    encoded = bytearray(gzip.compress(PAYLOAD))
    encoded[30:40] = b"\xff" * 10
    decoder = decode_all("gzip", bytes(encoded), piece=10)
    assert decoder.error is not None
    assert decoder.error.startswith("corrupt gzip data")
    assert decoder.decode(b"more") == b""


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_truncated_stream_is_reported_at_finish(coding: str) -> None:
    encoded = encode(coding, PAYLOAD)
    decoder = decode_all(coding, encoded[: len(encoded) // 2])
    assert decoder.error == f"{coding} data ended before the end of its stream"
    assert PAYLOAD.startswith(decoder.output)  # type: ignore[attr-defined]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "gzip, br"])
def test_decompression_bomb_never_inflates_past_the_limit(coding: str) -> None:
    bomb = encode(coding, bytes(64 * 1024 * 1024))
    limit = 1024 * 1024
    tracemalloc.start()
    try:
        decoder = ContentDecoder(coding, limit)
        total = sum(len(decoder.decode(bomb[i : i + 65536])) for i in range(0, len(bomb), 65536))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == limit
    assert decoder.truncated
    assert decoder.error is None
    # The 64 MiB were never materialised: peak memory stays within a few times the limit.
    assert peak < 4 * limit


@pytest.mark.parametrize("coding", [None, "gzip", "br", "zstd"])
def test_output_exactly_at_limit_is_not_truncated(coding: str | None) -> None:
    data = PAYLOAD[:5000]
    decoder = decode_all(coding, encode(coding or "", data), limit=len(data))
    assert decoder.output == data  # type: ignore[attr-defined]
    assert not decoder.truncated
    decoder = decode_all(coding, encode(coding or "", data), limit=len(data) - 1)
    assert decoder.output == data[:-1]  # type: ignore[attr-defined]
    assert decoder.truncated


@settings(max_examples=60, deadline=None)
@given(
    coding=st.sampled_from(["gzip", "deflate", "br", "zstd", "br, gzip"]),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_split_points_do_not_change_the_output(coding: str, cuts: list[int]) -> None:
    data = PAYLOAD[:30_000]
    encoded = encode(coding, data)
    decoder = ContentDecoder(coding, 1 << 20)
    out = bytearray()
    start = 0
    for cut in sorted(set(cuts)):
        out += decoder.decode(encoded[start:cut])
        start = max(start, cut)
    out += decoder.decode(encoded[start:])
    decoder.finish()
    assert bytes(out) == data
    assert decoder.error is None


# -- through the decoders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "gzip, br"])
def test_h1_response_bodies_are_content_decoded(coding: str) -> None:
    body = encode(coding, PAYLOAD)
    recorder, _ = run([("client", req()), ("server", resp(200, body, headers=f"Content-Encoding: {coding}\r\n"))])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == PAYLOAD
    assert exchange.response.wire_size == len(body)
    assert not exchange.partial


def test_h1_gzip_request_body_is_decoded() -> None:
    recorder, _ = run([("client", req("POST", "/", gzip.compress(b'{"a": 1}'), headers="Content-Encoding: gzip\r\n")),
                       ("server", resp(200))])
    (exchange,) = recorder.exchanges
    assert bytes(exchange.request.body) == b'{"a": 1}'


def test_h1_corrupt_gzip_marks_exchange_partial_and_keeps_decoding_the_connection() -> None:
    server = resp(200, b"\x1f\x8b\x08\x00garbage-garbage", headers="Content-Encoding: gzip\r\n") + resp(200, b"next")
    recorder, decoder = run([("client", req("GET", "/a") + req("GET", "/b")), ("server", server)])
    first, second = recorder.exchanges
    assert first.partial
    assert first.partial_reasons[0].startswith("response body: corrupt gzip data")
    assert not second.partial
    assert decoder.error is None


def test_h1_unknown_coding_keeps_body_as_sent_and_says_why() -> None:
    server = resp(200, b"LZW-bytes", headers="Content-Encoding: compress\r\n")
    recorder, _ = run([("client", req()), ("server", server)])
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == b"LZW-bytes"
    assert exchange.partial_reasons == ["response body has unsupported content-encoding 'compress'; stored as sent"]


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd", "deflate"])
def test_h2_response_bodies_are_content_decoded(coding: str) -> None:
    pair = H2Pair()
    stream = pair.request("/", method="GET")
    pair.flush()
    pair.respond(stream, body=encode(coding, PAYLOAD), headers=[("content-encoding", coding)])
    pair.flush()
    recorder, _ = run(pair.wire, alpn="h2")
    (exchange,) = recorder.exchanges
    assert exchange.response is not None
    assert bytes(exchange.response.body) == PAYLOAD
    assert recorder.delivered(exchange) == PAYLOAD
