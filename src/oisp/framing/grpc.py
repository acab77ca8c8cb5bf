"""Length-prefixed message framing of gRPC, gRPC-Web and the Connect protocol: :class:`GrpcFrameDecoder`.

All three put each message in an envelope, integers big-endian::

    flags (1) | length (4) | message (length bytes)

Flag bits: ``0x01`` the message is compressed (with the stream's ``grpc-encoding`` /
``connect-content-encoding``), ``0x80`` the message is a gRPC-Web *trailers* block (HTTP/1-style header lines
in the body, since gRPC-Web has no HTTP trailers), ``0x02`` the message is a Connect *end-stream* message (JSON
with the error and trailing metadata). ``application/grpc-web-text`` bodies are the same bytes base64-encoded,
possibly padded in between; ``text=True`` decodes them first.

:class:`GrpcFrameDecoder` never raises on bad input (see :mod:`oisp.framing`). A message larger than
``max_item_size`` (on the wire, or once decompressed) is reported as an ``OVERSIZED`` error item and skipped
without being buffered; a compressed message that does not decompress is a ``MALFORMED`` item and the next
message is found by its length. Flag bits no protocol defines (the body is not enveloped messages at all, an
HTML error page say) or invalid base64 stop the decoder with a ``fatal`` error item.
:func:`encode_envelope` writes messages, for tests and test servers.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import struct
import zlib
from typing import Final

import attrs

from oisp.framing._contract import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    FramingError,
    FramingErrorKind,
    check_max_item_size,
    oversized_preview,
)

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_END_STREAM",
    "FLAG_TRAILERS",
    "GrpcFrameDecoder",
    "GrpcMessage",
    "encode_envelope",
    "parse_trailer_block",
]

#: The message is compressed with the stream's message encoding.
FLAG_COMPRESSED: Final = 0x01
#: Connect: the end-stream message (JSON: ``{"error": {...}, "metadata": {...}}``).
FLAG_END_STREAM: Final = 0x02
#: gRPC-Web: the trailers block (``grpc-status: 0\r\n...``).
FLAG_TRAILERS: Final = 0x80
_KNOWN_FLAGS: Final = FLAG_COMPRESSED | FLAG_END_STREAM | FLAG_TRAILERS
_PREFIX: Final = struct.Struct(">BI")
_PREFIX_SIZE: Final = 5
_FRAMING: Final = "grpc"
#: Message encodings that can be decompressed here (``identity`` means none).
SUPPORTED_ENCODINGS: Final = frozenset({"identity", "gzip", "deflate"})


@attrs.frozen
class GrpcMessage:
    """One enveloped message: its flags and its payload, decompressed when it was compressed."""

    flags: int
    payload: bytes = attrs.field(repr=False)
    #: The envelope's length field: the size of the message on the wire (compressed, if it is).
    wire_size: int
    #: Byte offset of the envelope in the (base64-decoded) stream.
    offset: int

    @property
    def compressed(self) -> bool:
        """Whether the message was compressed on the wire."""
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def trailers(self) -> bool:
        """Whether this is a gRPC-Web trailers block rather than a message."""
        return bool(self.flags & FLAG_TRAILERS)

    @property
    def end_stream(self) -> bool:
        """Whether this is a Connect end-stream message rather than a message."""
        return bool(self.flags & FLAG_END_STREAM)

    @property
    def size(self) -> int:
        """The size of the (decompressed) payload."""
        return len(self.payload)


def encode_envelope(payload: bytes, *, flags: int = 0, encoding: str | None = None) -> bytes:
    """One enveloped message; with ``encoding`` (``gzip``/``deflate``) the payload is compressed and the
    compressed flag set."""
    if encoding in ("gzip", "deflate"):
        payload = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
        flags |= FLAG_COMPRESSED
    return _PREFIX.pack(flags, len(payload)) + payload


def parse_trailer_block(payload: bytes) -> list[tuple[str, str]]:
    """The ``(name, value)`` lines of a gRPC-Web trailers block (names lower-cased; lines that are not
    ``name: value`` are left out)."""
    fields: list[tuple[str, str]] = []
    for line in payload.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.rstrip("\r").partition(":")
        if sep and name.strip():
            fields.append((name.strip().lower(), value.strip()))
    return fields


class GrpcFrameDecoder:
    """Incremental decoder of enveloped messages: feed it bytes, get :class:`GrpcMessage` items back.

    ``encoding`` is the stream's message encoding (``grpc-encoding`` or ``connect-content-encoding``; None or
    ``identity`` for none), used for the messages whose compressed flag is set. ``max_item_size`` bounds one
    message, on the wire and decompressed. ``text=True`` reads ``grpc-web-text`` (base64) bodies.
    """

    def __init__(self, *, encoding: str | None = None, max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
                 text: bool = False) -> None:
        self._max = check_max_item_size(max_item_size)
        self._encoding = (encoding or "identity").strip().lower()
        self._text = text
        self._text_buf = bytearray()
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._skip = 0  # bytes of an oversized message still to skip
        self._stopped = False
        self._closed = False
        #: Envelopes seen so far, including skipped and undecodable ones.
        self.envelopes = 0
        #: Bytes of the (decoded) stream seen so far.
        self.stream_bytes = 0

    def feed(self, data: bytes) -> list[GrpcMessage | FramingError]:
        """Decode the next bytes of the stream; return the messages they complete."""
        if self._closed:
            raise DecoderClosedError("GrpcFrameDecoder.feed() called after close()")
        out: list[GrpcMessage | FramingError] = []
        if self._stopped or not data:
            return out
        text_error = None
        if self._text:
            data, text_error = self._unbase64(data)
        self.stream_bytes += len(data)
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
        if text_error is not None and not self._stopped:
            self._stopped = True
            out.append(text_error)
        return out

    def close(self) -> list[GrpcMessage | FramingError]:
        """End the stream; a message cut short is reported as ``INCOMPLETE``. Calling it again returns ``[]``."""
        if self._closed:
            return []
        self._closed = True
        out: list[GrpcMessage | FramingError] = []
        if self._stopped:
            return out
        if self._text and self._text_buf.strip():
            out.append(FramingError(_FRAMING, FramingErrorKind.INCOMPLETE,
                                    f"stream ended inside a base64 group ({len(self._text_buf)} characters)",
                                    offset=self.stream_bytes))
        if self._skip:
            out.append(FramingError(_FRAMING, FramingErrorKind.INCOMPLETE,
                                    f"stream ended {self._skip} bytes before the end of an oversized message",
                                    offset=self._base))
        elif self._buf:
            have = len(self._buf)
            if have < _PREFIX_SIZE:
                reason = f"stream ended inside a message prefix ({have} of {_PREFIX_SIZE} bytes)"
            else:
                length = _PREFIX.unpack_from(self._buf)[1]
                reason = f"stream ended inside a message ({have - _PREFIX_SIZE} of {length} bytes)"
            out.append(FramingError(_FRAMING, FramingErrorKind.INCOMPLETE, reason, offset=self._base,
                                    raw=oversized_preview(self._buf, self._max)))
        self._buf.clear()
        self._text_buf.clear()
        return out

    # -- internals -------------------------------------------------------------------------------------------

    def _unbase64(self, data: bytes) -> tuple[bytes, FramingError | None]:
        """Decode the complete base64 groups of ``data`` (with what was left over): each group of four characters
        decodes on its own, so padding between messages is fine. A group that is not base64 ends the decoding:
        the bytes before it come back with a fatal error item to put after their messages."""
        buf = self._text_buf
        buf += data.translate(None, b" \t\r\n")
        usable = len(buf) - len(buf) % 4
        if not usable:
            return b"", None
        try:
            if b"=" in buf[:usable]:
                decoded = b"".join(base64.b64decode(bytes(buf[i : i + 4]), validate=True)
                                   for i in range(0, usable, 4))
            else:
                decoded = base64.b64decode(bytes(buf[:usable]), validate=True)
        except (binascii.Error, ValueError):
            good = bytearray()
            for i in range(0, usable, 4):
                try:
                    good += base64.b64decode(bytes(buf[i : i + 4]), validate=True)
                except (binascii.Error, ValueError):
                    break
            buf.clear()
            return bytes(good), FramingError(_FRAMING, FramingErrorKind.MALFORMED,
                                             "invalid base64 in a grpc-web-text body",
                                             offset=self.stream_bytes + len(good), fatal=True)
        del buf[:usable]
        return decoded, None

    def _run(self, out: list[GrpcMessage | FramingError]) -> int:
        """Decode every complete message in the buffer; return how many bytes were used."""
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= _PREFIX_SIZE:
            flags, length = _PREFIX.unpack_from(buf, pos)
            if flags & ~_KNOWN_FLAGS:
                self._stopped = True
                out.append(FramingError(_FRAMING, FramingErrorKind.MALFORMED,
                                        f"flags byte 0x{flags:02x} has bits no protocol defines: "
                                        "not enveloped messages", offset=self._base + pos, fatal=True,
                                        raw=bytes(buf[pos : pos + _PREFIX_SIZE])))
                return n
            if length > self._max:
                self.envelopes += 1
                out.append(FramingError(_FRAMING, FramingErrorKind.OVERSIZED,
                                        f"message of {length} bytes is larger than max_item_size "
                                        f"({self._max} bytes); skipped", offset=self._base + pos,
                                        raw=bytes(buf[pos : pos + _PREFIX_SIZE])))
                skipped = min(_PREFIX_SIZE + length, n - pos)
                self._skip = _PREFIX_SIZE + length - skipped
                pos += skipped
                continue
            end = pos + _PREFIX_SIZE + length
            if end > n:
                break
            self.envelopes += 1
            out.append(self._message(flags, bytes(buf[pos + _PREFIX_SIZE : end]), self._base + pos))
            pos = end
        return pos

    def _message(self, flags: int, body: bytes, offset: int) -> GrpcMessage | FramingError:
        if not flags & FLAG_COMPRESSED:
            return GrpcMessage(flags, body, len(body), offset)
        encoding = self._encoding
        if encoding == "identity":
            return FramingError(_FRAMING, FramingErrorKind.MALFORMED,
                                "message flagged compressed but the stream names no message encoding",
                                offset=offset)
        if encoding not in SUPPORTED_ENCODINGS:
            return FramingError(_FRAMING, FramingErrorKind.MALFORMED,
                                f"message compressed with unsupported encoding {encoding!r}", offset=offset)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            payload = inflater.decompress(body, self._max + 1)
        except zlib.error as exc:
            return FramingError(_FRAMING, FramingErrorKind.MALFORMED, f"{encoding} decompression failed: {exc}",
                                offset=offset)
        if len(payload) > self._max:
            return FramingError(_FRAMING, FramingErrorKind.OVERSIZED,
                                f"message decompresses to more than max_item_size ({self._max} bytes); skipped",
                                offset=offset)
        if not inflater.eof:
            return FramingError(_FRAMING, FramingErrorKind.MALFORMED, f"{encoding} data of a message is cut short",
                                offset=offset)
        return GrpcMessage(flags, payload, len(body), offset)
