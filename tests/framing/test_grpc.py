from __future__ import annotations

import base64
import functools
import gzip
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from tests.framing.chunking import assert_split_invariant, chunkings, decode_split, decode_whole

from oisp.framing import FramingError, FramingErrorKind, GrpcFrameDecoder, GrpcMessage
from oisp.framing.grpc import FLAG_END_STREAM, FLAG_TRAILERS, encode_envelope, parse_trailer_block


def decode(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = GrpcFrameDecoder(**kwargs)
    return decoder.feed(data) + decoder.close()


STREAM = b"".join([
    encode_envelope(b"first \x00\x01 message"),
    encode_envelope(b""),
    encode_envelope(b"x" * 300, encoding="gzip"),
    encode_envelope(b"grpc-status: 0\r\ngrpc-message: fine\r\n", flags=FLAG_TRAILERS),
])


def test_the_envelope_has_the_documented_bytes() -> None:
    assert encode_envelope(b"hi") == b"\x00\x00\x00\x00\x02hi"
    assert decode(b"\x00\x00\x00\x00\x02hi") == [GrpcMessage(0, b"hi", 2, 0)]


def test_messages_decode_at_any_split_with_gzip_and_trailers() -> None:
    items = assert_split_invariant(lambda: GrpcFrameDecoder(encoding="gzip"), STREAM)
    assert [item.payload for item in items[:3]] == [b"first \x00\x01 message", b"", b"x" * 300]
    assert items[2].compressed and items[2].wire_size < 300 and items[2].size == 300
    assert items[3].trailers and not items[0].trailers
    assert parse_trailer_block(items[3].payload) == [("grpc-status", "0"), ("grpc-message", "fine")]


def test_grpc_web_text_decodes_at_any_split_also_when_padded_between_messages() -> None:
    # grpc-web-text servers may encode each message separately, padding included.
    parts = [encode_envelope(b"a"), encode_envelope(b"bc"), encode_envelope(b"status", flags=FLAG_TRAILERS)]
    text = b"".join(base64.b64encode(part) for part in parts)
    assert b"=" in text[:-4]
    items = assert_split_invariant(lambda: GrpcFrameDecoder(text=True), text + b"\r\n")
    assert [item.payload for item in items] == [b"a", b"bc", b"status"]


def test_connect_end_stream_message_is_flagged() -> None:
    end = encode_envelope(b'{"error": {"code": "not_found"}}', flags=FLAG_END_STREAM)
    [item] = decode(end)
    assert item.end_stream and not item.trailers


def test_a_stream_cut_inside_a_message_or_its_prefix_is_incomplete() -> None:
    whole = encode_envelope(b"complete") + encode_envelope(b"cut short")
    items = decode(whole[:-3])
    assert items[0] == GrpcMessage(0, b"complete", 8, 0)
    assert isinstance(items[1], FramingError) and items[1].kind is FramingErrorKind.INCOMPLETE
    assert "6 of 9 bytes" in items[1].reason
    [prefix] = decode(b"\x00\x00\x00")
    assert isinstance(prefix, FramingError) and "prefix (3 of 5 bytes)" in prefix.reason


def test_an_oversized_message_is_skipped_without_buffering_and_the_next_is_found() -> None:
    stream = encode_envelope(b"y" * 5000) + encode_envelope(b"next")
    items = assert_split_invariant(lambda: GrpcFrameDecoder(max_item_size=1024), stream)
    assert isinstance(items[0], FramingError) and items[0].kind is FramingErrorKind.OVERSIZED
    assert not items[0].fatal
    assert items[1].payload == b"next"
    decoder = GrpcFrameDecoder(max_item_size=1024)
    decoder.feed(stream[:4000])
    assert len(decoder._buf) < 1024  # the big message was not kept


def test_a_small_message_that_decompresses_beyond_the_limit_is_oversized() -> None:
    bomb = encode_envelope(b"\x00" * 100_000, encoding="gzip")
    assert len(bomb) < 1024
    items = decode(bomb + encode_envelope(b"after"), encoding="gzip", max_item_size=10_000)
    assert isinstance(items[0], FramingError) and items[0].kind is FramingErrorKind.OVERSIZED
    assert items[1].payload == b"after"


def test_undecodable_compressed_messages_are_malformed_and_skipped() -> None:
    garbage = struct.pack(">BI", 1, 4) + b"nope"
    snappy = decode(garbage + encode_envelope(b"ok"), encoding="snappy")
    assert snappy[0].kind is FramingErrorKind.MALFORMED and "unsupported encoding 'snappy'" in snappy[0].reason
    assert snappy[1].payload == b"ok"
    unnamed = decode(garbage)
    assert "names no message encoding" in unnamed[0].reason
    broken = decode(garbage + encode_envelope(b"ok"), encoding="gzip")
    assert broken[0].kind is FramingErrorKind.MALFORMED and broken[1].payload == b"ok"
    cut = encode_envelope(b"z" * 100, encoding="gzip")
    cut_short = struct.pack(">BI", 1, 20) + cut[5:25]
    assert "cut short" in decode(cut_short, encoding="gzip")[0].reason


def test_a_body_that_is_not_enveloped_stops_the_decoder() -> None:
    items = assert_split_invariant(GrpcFrameDecoder, b"<html>upstream error</html>")
    assert len(items) == 1 and items[0].fatal and "not enveloped" in items[0].reason


def test_invalid_base64_stops_after_the_messages_before_it() -> None:
    text = base64.b64encode(encode_envelope(b"good")) + b"!!!!" + base64.b64encode(encode_envelope(b"lost"))
    items = assert_split_invariant(lambda: GrpcFrameDecoder(text=True), text)
    assert items[0].payload == b"good"
    assert items[1].fatal and "base64" in items[1].reason and len(items) == 2


def test_counters_see_every_envelope() -> None:
    decoder = GrpcFrameDecoder(max_item_size=10)
    decoder.feed(encode_envelope(b"0123456789abc") + encode_envelope(b"ok"))
    assert decoder.envelopes == 2 and decoder.stream_bytes == 25


@given(st.lists(st.tuples(st.binary(max_size=64), st.sampled_from([0, FLAG_TRAILERS]), st.booleans()), max_size=6),
       st.data())
def test_any_chunking_gives_the_same_items(messages: list[tuple[bytes, int, bool]], data: st.DataObject) -> None:
    raw = b"".join(encode_envelope(payload, flags=flags, encoding="gzip" if zipped else None)
                   for payload, flags, zipped in messages)
    make = lambda: GrpcFrameDecoder(encoding="gzip")  # noqa: E731
    expected = decode_whole(make, raw)
    assert [item.payload for item in expected] == [payload for payload, _, _ in messages]
    assert decode_split(make, raw, data.draw(chunkings(raw))) == expected


@given(st.binary(max_size=200), st.data())
def test_arbitrary_bytes_never_raise_and_split_the_same(raw: bytes, data: st.DataObject) -> None:
    for text in (False, True):
        make = functools.partial(GrpcFrameDecoder, encoding="gzip", max_item_size=64, text=text)
        assert decode_split(make, raw, data.draw(chunkings(raw))) == decode_whole(make, raw)


def test_gzip_helper_matches_the_standard_library() -> None:
    envelope = encode_envelope(b"abc", encoding="gzip")
    assert gzip.decompress(envelope[5:]) == b"abc" and envelope[0] == 1
