from __future__ import annotations

import json
import struct
import uuid
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.framing.chunking import assert_split_invariant, chunkings, decode_split, decode_whole

from oisp.errors import ProtocolError
from oisp.framing import (
    EventStreamDecoder,
    EventStreamMessage,
    FramingError,
    FramingErrorKind,
    HeaderValue,
    encode_message,
)


def decode(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = EventStreamDecoder(**kwargs)
    return decoder.feed(data) + decoder.close()


def frame(raw_headers: bytes, payload: bytes, *, total: int | None = None) -> bytes:
    """A message around hand-written header bytes, with correct CRCs (and a chosen total length if given)."""
    length = 16 + len(raw_headers) + len(payload) if total is None else total
    prelude = struct.pack(">II", length, len(raw_headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_event(event_type: str, body: dict[str, Any]) -> bytes:
    headers: dict[str, HeaderValue] = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_message(headers, json.dumps(body, ensure_ascii=False).encode())


CONVERSE_STREAM = b"".join(
    [
        bedrock_event("messageStart", {"role": "assistant", "p": "abcd"}),
        bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hallo \U0001f30d"}}),
        bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " \u00e7a va"}}),
        bedrock_event("contentBlockStop", {"contentBlockIndex": 0}),
        bedrock_event("messageStop", {"stopReason": "end_turn"}),
        bedrock_event("metadata", {"usage": {"inputTokens": 12, "outputTokens": 5}}),
    ]
)


def test_empty_message_has_the_documented_bytes() -> None:
    # total 16, no headers; CRC32 (IEEE) of the 8-byte prelude is 0x05c248eb, of the first 12 bytes 0x7d98c8ff.
    raw = bytes.fromhex("00000010 00000000 05c248eb 7d98c8ff")
    assert encode_message({}, b"") == raw
    assert decode(raw) == [EventStreamMessage({}, b"")]


def test_converse_stream_decodes_at_any_split() -> None:
    items = assert_split_invariant(EventStreamDecoder, CONVERSE_STREAM)
    assert [item.event_type for item in items] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert all(item.message_type == "event" and item.content_type == "application/json" for item in items)
    assert json.loads(items[1].payload)["delta"]["text"] == "Hallo \U0001f30d"


def test_every_header_type_is_decoded() -> None:
    stamp = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    raw_headers = b"".join(
        [
            b"\x01t\x00",
            b"\x01f\x01",
            b"\x01b\x02\xff",
            b"\x01s\x03\x80\x00",
            b"\x01i\x04\x7f\xff\xff\xff",
            b"\x01l\x05" + struct.pack(">q", -(2**40)),
            b"\x05bytes\x06\x00\x03\x00\x01\x02",
            b"\x06string\x07\x00\x06" + "\u00e9\U0001f600".encode()[:6],
            b"\x02ts\x08" + struct.pack(">q", 1714566615123),
            b"\x04uuid\x09" + ident.bytes,
        ]
    )
    [message] = decode(frame(raw_headers, b"payload"))
    assert message.headers == {
        "t": True,
        "f": False,
        "b": -1,
        "s": -32768,
        "i": 2**31 - 1,
        "l": -(2**40),
        "bytes": b"\x00\x01\x02",
        "string": "\u00e9\U0001f600",
        "ts": stamp,
        "uuid": ident,
    }
    assert list(message.headers) == ["t", "f", "b", "s", "i", "l", "bytes", "string", "ts", "uuid"]
    assert message.payload == b"payload"


def test_header_helpers_are_none_when_absent_or_not_strings() -> None:
    message = EventStreamMessage({":event-type": 3}, b"")
    assert (message.message_type, message.event_type, message.content_type, message.exception_type) == (
        None,
        None,
        None,
        None,
    )
    exception = EventStreamMessage({":message-type": "exception", ":exception-type": "throttlingException"}, b"")
    assert exception.exception_type == "throttlingException"


def test_encoder_uses_the_smallest_integer_type() -> None:
    encoded = encode_message({"a": 1, "b": 300, "c": 70000, "d": 2**40}, b"")
    assert b"\x01a\x02\x01" in encoded
    assert b"\x01b\x03\x01\x2c" in encoded
    assert b"\x01c\x04\x00\x01\x11\x70" in encoded
    assert b"\x01d\x05" in encoded


def test_message_crc_mismatch_is_reported_and_the_next_message_decoded() -> None:
    good = encode_message({":event-type": "chunk"}, b'{"bytes": "x"}')
    bad = bytearray(good)
    bad[20] ^= 0x40
    items = assert_split_invariant(EventStreamDecoder, bytes(bad) + good)
    assert isinstance(items[0], FramingError)
    assert items[0].kind is FramingErrorKind.CHECKSUM
    assert items[0].reason.startswith("message CRC mismatch: expected 0x")
    assert not items[0].fatal
    assert items[1] == EventStreamMessage({":event-type": "chunk"}, b'{"bytes": "x"}')


def test_prelude_crc_mismatch_stops_the_decoder() -> None:
    good = encode_message({":event-type": "chunk"}, b"{}")
    bad = bytearray(good)
    bad[3] += 1  # the total length
    decoder = EventStreamDecoder()
    [error] = decoder.feed(bytes(bad) + good)
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.CHECKSUM
    assert error.fatal
    expected = struct.unpack(">I", good[8:12])[0]
    computed = zlib.crc32(bytes(bad[:8]))
    assert error.reason == (
        f"prelude CRC mismatch: expected 0x{expected:08x} (from the prelude), "
        f"got 0x{computed:08x} (computed over its first 8 bytes)"
    )
    assert decoder.feed(good) == []
    assert decoder.close() == []


def test_prelude_crc_mismatch_after_good_messages_keeps_them() -> None:
    good = encode_message({}, b"1")
    items = decode(good + b"\x00" * 16 + good)
    assert items[0] == EventStreamMessage({}, b"1")
    assert isinstance(items[1], FramingError)
    assert items[1].fatal
    assert items[1].offset == len(good)
    assert len(items) == 2


@pytest.mark.parametrize(
    ("total", "headers_length"),
    [(8, 0), (15, 0), (20, 5), (16, 1)],
)
def test_impossible_lengths_stop_the_decoder(total: int, headers_length: int) -> None:
    prelude = struct.pack(">II", total, headers_length)
    raw = prelude + struct.pack(">I", zlib.crc32(prelude)) + b"\x00" * 64
    [error] = decode(raw)
    assert isinstance(error, FramingError)
    assert error.kind is FramingErrorKind.MALFORMED
    assert error.fatal


def test_oversized_message_is_skipped_without_buffering() -> None:
    big = encode_message({":event-type": "chunk"}, b"x" * 5000)
    small = encode_message({":event-type": "chunk"}, b"ok")
    decoder = EventStreamDecoder(max_item_size=1024)
    items: list[Any] = []
    for start in range(0, len(big), 100):
        items += decoder.feed(big[start : start + 100])
        assert len(decoder._buf) < 1024
    items += decoder.feed(small) + decoder.close()
    assert isinstance(items[0], FramingError)
    assert items[0].kind is FramingErrorKind.OVERSIZED
    assert not items[0].fatal
    assert items[1:] == [EventStreamMessage({":event-type": "chunk"}, b"ok")]
    assert assert_split_invariant(lambda: EventStreamDecoder(max_item_size=1024), big + small) == items


def test_oversized_message_cut_short_is_incomplete_at_close() -> None:
    big = encode_message({}, b"x" * 5000)
    items = decode(big[:3000], max_item_size=1024)
    assert [item.kind for item in items] == [FramingErrorKind.OVERSIZED, FramingErrorKind.INCOMPLETE]


def test_message_cut_short_is_incomplete_at_close() -> None:
    message = encode_message({":event-type": "chunk"}, b"payload")
    for cut in (5, 12, len(message) - 1):
        decoder = EventStreamDecoder()
        assert decoder.feed(message + message[:cut]) == [EventStreamMessage({":event-type": "chunk"}, b"payload")]
        [error] = decoder.close()
        assert isinstance(error, FramingError)
        assert error.kind is FramingErrorKind.INCOMPLETE
        assert error.offset == len(message)
        assert error.raw == message[:cut]


@pytest.mark.parametrize(
    ("raw_headers", "reason"),
    [
        (b"\x01x\x0a", "header 'x' has unknown value type 10"),
        (b"\x05ab", "header name runs past the end of the headers"),
        (b"\x01x\x04\x00\x00", "value of header 'x' runs past the end of the headers"),
        (b"\x01x\x07\x00\x09abc", "value of header 'x' runs past the end of the headers"),
        (b"\x01x\x07\x00\x01\xff", "string value of header 'x' is not UTF-8"),
        (b"\x01\xff\x00", "header name is not UTF-8: b'\\xff'"),
        (b"\x01x\x08" + struct.pack(">q", 2**62), "timestamp of header 'x' is out of range: 4611686018427387904 ms"),
    ],
)
def test_malformed_headers_are_reported_and_the_next_message_decoded(raw_headers: bytes, reason: str) -> None:
    items = decode(frame(raw_headers, b"p") + encode_message({}, b"next"))
    assert isinstance(items[0], FramingError)
    assert items[0].kind is FramingErrorKind.MALFORMED
    assert items[0].reason == reason
    assert not items[0].fatal
    assert items[1] == EventStreamMessage({}, b"next")


@pytest.mark.parametrize(
    "headers",
    [
        {"": "empty name"},
        {"n" * 256: "long name"},
        {"v": "x" * 65536},
        {"v": b"x" * 65536},
        {"v": 2**63},
        {"v": datetime(2024, 1, 1)},  # naive: refused
        {"v": 1.5},
    ],
)
def test_encoder_refuses_what_the_format_cannot_carry(headers: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        encode_message(headers, b"")


# Property tests --------------------------------------------------------------------------------------------

_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(lambda s: len(s.encode()) <= 255)
_header_values: st.SearchStrategy[HeaderValue] = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=20),
    st.text(st.characters(codec="utf-8"), max_size=10) | st.just("\U0001f600\u00e9"),
    st.integers(min_value=-(2**40), max_value=2**45).map(
        lambda ms: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    ),
    st.uuids(),
)
_messages = st.tuples(st.dictionaries(_names, _header_values, max_size=5), st.binary(max_size=64))


@given(st.lists(_messages, max_size=5), st.data())
def test_any_chunking_of_encoded_messages_gives_them_back(
    messages: list[tuple[dict[str, HeaderValue], bytes]], data: st.DataObject
) -> None:
    raw = b"".join(encode_message(headers, payload) for headers, payload in messages)
    expected = [EventStreamMessage(headers, payload) for headers, payload in messages]
    assert decode_whole(EventStreamDecoder, raw) == expected
    assert decode_split(EventStreamDecoder, raw, data.draw(chunkings(raw))) == expected


def test_timestamp_in_another_timezone_is_the_same_instant() -> None:
    stamp = datetime(2024, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    [message] = decode(encode_message({"t": stamp}, b""))
    assert message.headers["t"] == stamp
    assert message.headers["t"].tzinfo is UTC


@given(st.lists(_messages, min_size=1, max_size=4), st.data())
def test_any_chunking_of_corrupted_bytes_gives_the_same_items(
    messages: list[tuple[dict[str, HeaderValue], bytes]], data: st.DataObject
) -> None:
    raw = bytearray(b"".join(encode_message(headers, payload) for headers, payload in messages))
    for _ in range(data.draw(st.integers(0, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    corrupted = bytes(raw)

    def make() -> EventStreamDecoder:
        return EventStreamDecoder(max_item_size=64)

    assert decode_split(make, corrupted, data.draw(chunkings(corrupted))) == decode_whole(make, corrupted)


def test_messages_with_the_same_headers_do_not_share_their_header_dict() -> None:
    message = encode_message({":event-type": "chunk"}, b"")
    first, second = decode(message + message)
    first.headers["changed"] = True
    assert second.headers == {":event-type": "chunk"}
