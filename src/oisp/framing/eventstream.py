"""AWS ``application/vnd.amazon.eventstream`` binary framing (Bedrock ConverseStream, InvokeModelWithResponseStream).

A message is, all integers big-endian::

    total length (4) | headers length (4) | prelude CRC32 (4) | headers | payload | message CRC32 (4)

The prelude CRC covers the first 8 bytes, the message CRC everything before it; both are CRC32 as in
:func:`zlib.crc32`. Each header is a name length (1 byte), the UTF-8 name, a value type (1 byte) and the value:
0 true, 1 false, 2 byte, 3 short, 4 int, 5 long (signed integers of 1, 2, 4, 8 bytes), 6 bytes and 7 string
(2-byte length, then the value), 8 timestamp (8-byte signed milliseconds since the Unix epoch), 9 UUID (16 bytes).

:class:`EventStreamDecoder` never raises on bad input. A message whose CRC or headers are wrong, or that is
larger than ``max_item_size``, becomes a :class:`~oisp.framing.FramingError` item and is skipped: its length was
vouched for by the prelude CRC, so the next message is found. A prelude whose CRC does not match, or whose
lengths are impossible, leaves nothing to find the next message by: the decoder reports it as a ``fatal`` error
item and stops. :func:`encode_message` writes messages, for tests and test servers.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import attrs

from oisp.errors import ProtocolError
from oisp.framing._contract import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    FramingError,
    FramingErrorKind,
    check_max_item_size,
)

__all__ = ["EventStreamDecoder", "EventStreamMessage", "HeaderValue", "encode_message"]

#: The Python type of an eventstream header value (an ``int`` stands for the byte, short, int and long types).
HeaderValue = bool | int | bytes | str | datetime | uuid.UUID

_PRELUDE = struct.Struct(">III")
_UINT32 = struct.Struct(">I")
_UINT16 = struct.Struct(">H")
_INT_TYPES = {2: struct.Struct(">b"), 3: struct.Struct(">h"), 4: struct.Struct(">i"), 5: struct.Struct(">q")}
_INT64 = _INT_TYPES[5]
_PRELUDE_SIZE = 12
_MIN_MESSAGE = _PRELUDE_SIZE + 4
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_HEADER_CACHE_SIZE = 64
_CACHED_HEADERS_MAX_LENGTH = 512


@attrs.frozen
class EventStreamMessage:
    """One eventstream message: its headers, in wire order, and its payload."""

    headers: dict[str, HeaderValue]
    payload: bytes

    @property
    def message_type(self) -> str | None:
        """The ``:message-type`` header: ``"event"``, ``"exception"`` or ``"error"``; None if absent."""
        return self._string_header(":message-type")

    @property
    def event_type(self) -> str | None:
        """The ``:event-type`` header (Bedrock: ``"contentBlockDelta"``, ``"chunk"``, ...); None if absent."""
        return self._string_header(":event-type")

    @property
    def content_type(self) -> str | None:
        """The ``:content-type`` header of the payload (usually ``"application/json"``); None if absent."""
        return self._string_header(":content-type")

    @property
    def exception_type(self) -> str | None:
        """The ``:exception-type`` header of an exception message (``"throttlingException"``); None if absent."""
        return self._string_header(":exception-type")

    def _string_header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


class EventStreamDecoder:
    """Incremental eventstream decoder: feed it bytes, get :class:`EventStreamMessage` items back.

    ``max_item_size`` bounds the total length of one message; a longer one is reported and skipped without
    being buffered.
    """

    def __init__(self, *, max_item_size: int = DEFAULT_MAX_ITEM_SIZE) -> None:
        self._max = check_max_item_size(max_item_size)
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._skip = 0  # bytes of an oversized message still to skip
        self._stopped = False
        self._closed = False
        self._header_cache: dict[bytes, dict[str, HeaderValue]] = {}

    def feed(self, data: bytes) -> list[EventStreamMessage | FramingError]:
        """Decode the next bytes of the stream; return the messages they complete."""
        if self._closed:
            raise DecoderClosedError("EventStreamDecoder.feed() called after close()")
        out: list[EventStreamMessage | FramingError] = []
        if self._stopped or not data:
            return out
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            self._base += skipped
            data = data[skipped:]
        self._buf += data
        pos = self._run(out)
        if pos:
            del self._buf[:pos]
            self._base += pos
        return out

    def close(self) -> list[EventStreamMessage | FramingError]:
        """End the stream; a message cut short is reported as ``INCOMPLETE``. Calling it again returns ``[]``."""
        if self._closed:
            return []
        self._closed = True
        out: list[EventStreamMessage | FramingError] = []
        if self._stopped:
            return out
        if self._skip:
            out.append(
                self._error(
                    FramingErrorKind.INCOMPLETE,
                    f"stream ended {self._skip} bytes before the end of an oversized message",
                    self._base,
                )
            )
        elif self._buf:
            out.append(
                self._error(FramingErrorKind.INCOMPLETE, self._incomplete_reason(), self._base, raw=bytes(self._buf))
            )
        self._buf.clear()
        return out

    def _incomplete_reason(self) -> str:
        have = len(self._buf)
        if have < _PRELUDE_SIZE:
            return f"stream ended inside a message prelude ({have} of {_PRELUDE_SIZE} bytes)"
        total = _UINT32.unpack_from(self._buf)[0]
        return f"stream ended inside a message ({have} of {total} bytes)"

    def _run(self, out: list[EventStreamMessage | FramingError]) -> int:
        """Decode every complete message in the buffer; return how many bytes were used."""
        buf = self._buf
        n = len(buf)
        pos = 0
        crc32 = zlib.crc32
        while n - pos >= _PRELUDE_SIZE:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(buf, pos)
            computed = crc32(memoryview(buf)[pos : pos + 8])
            if computed != prelude_crc:
                self._stop(
                    out,
                    FramingErrorKind.CHECKSUM,
                    f"prelude CRC mismatch: expected 0x{prelude_crc:08x} (from the prelude), "
                    f"got 0x{computed:08x} (computed over its first 8 bytes)",
                    pos,
                )
                return pos
            if total < _MIN_MESSAGE or headers_length > total - _MIN_MESSAGE:
                self._stop(
                    out,
                    FramingErrorKind.MALFORMED,
                    f"impossible lengths in the prelude: total {total}, headers {headers_length}",
                    pos,
                )
                return pos
            if total > self._max:
                out.append(
                    self._error(
                        FramingErrorKind.OVERSIZED,
                        f"message of {total} bytes is larger than max_item_size ({self._max} bytes); skipped",
                        self._base + pos,
                        raw=bytes(buf[pos : pos + _PRELUDE_SIZE]),
                    )
                )
                skipped = min(total, n - pos)
                self._skip = total - skipped
                pos += skipped
                continue
            if n - pos < total:
                break
            end = pos + total
            message_crc = _UINT32.unpack_from(buf, end - 4)[0]
            computed = crc32(memoryview(buf)[pos : end - 4])
            if computed != message_crc:
                out.append(
                    self._error(
                        FramingErrorKind.CHECKSUM,
                        f"message CRC mismatch: expected 0x{message_crc:08x} (from the message), "
                        f"got 0x{computed:08x} (computed over its first {total - 4} bytes)",
                        self._base + pos,
                        raw=bytes(buf[pos:end]),
                    )
                )
                pos = end
                continue
            headers_end = pos + _PRELUDE_SIZE + headers_length
            headers = self._headers(buf, pos + _PRELUDE_SIZE, headers_end)
            if isinstance(headers, str):
                out.append(self._error(FramingErrorKind.MALFORMED, headers, self._base + pos, raw=bytes(buf[pos:end])))
            else:
                out.append(EventStreamMessage(headers, bytes(memoryview(buf)[headers_end : end - 4])))
            pos = end
        return pos

    def _headers(self, buf: bytearray, start: int, end: int) -> dict[str, HeaderValue] | str:
        """The decoded headers; a stream repeats the same few header blocks, so recent ones are remembered."""
        if end - start > _CACHED_HEADERS_MAX_LENGTH:
            return _decode_headers(buf, start, end)
        key = bytes(buf[start:end])
        cached = self._header_cache.get(key)
        if cached is not None:
            return dict(cached)  # each message gets its own dict: callers may change it
        headers = _decode_headers(buf, start, end)
        if not isinstance(headers, str):
            if len(self._header_cache) >= _HEADER_CACHE_SIZE:
                self._header_cache.clear()
            self._header_cache[key] = dict(headers)
        return headers

    def _stop(
        self, out: list[EventStreamMessage | FramingError], kind: FramingErrorKind, reason: str, pos: int
    ) -> None:
        out.append(
            self._error(kind, reason, self._base + pos, raw=bytes(self._buf[pos : pos + _PRELUDE_SIZE]), fatal=True)
        )
        self._stopped = True
        self._buf.clear()

    @staticmethod
    def _error(
        kind: FramingErrorKind, reason: str, offset: int, *, raw: bytes = b"", fatal: bool = False
    ) -> FramingError:
        return FramingError("eventstream", kind, reason, offset=offset, raw=raw, fatal=fatal)


def _decode_headers(buf: bytearray, pos: int, end: int) -> dict[str, HeaderValue] | str:
    """The headers in ``buf[pos:end]``, or the reason they cannot be decoded."""
    headers: dict[str, HeaderValue] = {}
    while pos < end:
        name_length = buf[pos]
        pos += 1
        if pos + name_length + 1 > end:
            return "header name runs past the end of the headers"
        try:
            name = buf[pos : pos + name_length].decode("utf-8")
        except UnicodeDecodeError:
            return f"header name is not UTF-8: {bytes(buf[pos : pos + name_length])!r}"
        pos += name_length
        value_type = buf[pos]
        pos += 1
        value: HeaderValue
        if value_type == 0:
            value = True
        elif value_type == 1:
            value = False
        elif value_type in _INT_TYPES:
            codec = _INT_TYPES[value_type]
            if pos + codec.size > end:
                return f"value of header {name!r} runs past the end of the headers"
            value = codec.unpack_from(buf, pos)[0]
            pos += codec.size
        elif value_type in (6, 7):
            if pos + 2 > end:
                return f"value of header {name!r} runs past the end of the headers"
            length = _UINT16.unpack_from(buf, pos)[0]
            pos += 2
            if pos + length > end:
                return f"value of header {name!r} runs past the end of the headers"
            raw = bytes(buf[pos : pos + length])
            pos += length
            if value_type == 6:
                value = raw
            else:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"string value of header {name!r} is not UTF-8"
        elif value_type == 8:
            if pos + 8 > end:
                return f"value of header {name!r} runs past the end of the headers"
            millis = _INT64.unpack_from(buf, pos)[0]
            pos += 8
            try:
                value = _EPOCH + millis * _MILLISECOND
            except OverflowError:
                return f"timestamp of header {name!r} is out of range: {millis} ms"
        elif value_type == 9:
            if pos + 16 > end:
                return f"value of header {name!r} runs past the end of the headers"
            value = uuid.UUID(bytes=bytes(buf[pos : pos + 16]))
            pos += 16
        else:
            return f"header {name!r} has unknown value type {value_type}"
        headers[name] = value
    return headers


def encode_message(headers: Mapping[str, HeaderValue], payload: bytes) -> bytes:
    """The eventstream bytes of one message with these headers (in mapping order) and payload.

    ``bool`` is written as type 0/1, ``int`` as the smallest of byte, short, int and long that holds it,
    ``bytes`` as 6, ``str`` as 7, a timezone-aware ``datetime`` as 8 (whole milliseconds), ``UUID`` as 9.
    Raises :class:`~oisp.errors.ProtocolError` for what the format cannot carry: a header name that is empty or
    longer than 255 UTF-8 bytes, a string or bytes value longer than 65535 bytes, an integer outside the
    signed 64-bit range, a naive datetime, a value of another type, or a message of 4 GiB or more.
    """
    parts: list[bytes] = []
    for name, value in headers.items():
        encoded_name = name.encode("utf-8")
        if not 1 <= len(encoded_name) <= 255:
            raise ProtocolError(f"eventstream header name {name!r} must be 1 to 255 UTF-8 bytes long")
        parts.append(bytes((len(encoded_name),)))
        parts.append(encoded_name)
        parts.append(_encode_value(name, value))
    header_bytes = b"".join(parts)
    total = _MIN_MESSAGE + len(header_bytes) + len(payload)
    if total >= 1 << 32:
        raise ProtocolError(f"eventstream message of {total} bytes is too large: the limit is 4 GiB")
    prelude = struct.pack(">II", total, len(header_bytes))
    message = b"".join((prelude, _UINT32.pack(zlib.crc32(prelude)), header_bytes, payload))
    return message + _UINT32.pack(zlib.crc32(message))


def _encode_value(name: str, value: HeaderValue) -> bytes:
    if isinstance(value, bool):
        return b"\x00" if value else b"\x01"
    if isinstance(value, int):
        for value_type, codec in _INT_TYPES.items():
            bits = codec.size * 8
            if -(1 << (bits - 1)) <= value < 1 << (bits - 1):
                return bytes((value_type,)) + codec.pack(value)
        raise ProtocolError(f"eventstream header {name!r}: integer {value} does not fit in 64 bits")
    if isinstance(value, bytes | str):
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ProtocolError(f"eventstream header {name!r}: value of {len(raw)} bytes is longer than 65535")
        return bytes((6 if isinstance(value, bytes) else 7,)) + _UINT16.pack(len(raw)) + raw
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ProtocolError(f"eventstream header {name!r}: timestamp must be timezone-aware")
        return b"\x08" + _INT64.pack((value - _EPOCH) // _MILLISECOND)
    if isinstance(value, uuid.UUID):
        return b"\x09" + value.bytes
    raise ProtocolError(
        f"eventstream header {name!r}: cannot encode a {type(value).__name__}; use bool, int, bytes, str, "
        "datetime or uuid.UUID"
    )
