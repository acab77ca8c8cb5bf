"""Passive WebSocket decoding (RFC 6455, RFC 7692 ``permessage-deflate``): :class:`WebSocketObserver`.

After an HTTP/1.1 ``101 Switching Protocols`` to ``Upgrade: websocket``, the HTTP/1.1 decoder hands the rest of
both directions to a :class:`WebSocketObserver`, which reads the frames of each direction with its own
:class:`FrameReader` (client frames must be masked, server frames must not) and reports every complete message
— text, binary, and the control frames close, ping and pong — as a :class:`WebSocketMessage`.

wsproto is built to *be* one endpoint (it answers pings, enforces its own side's state and keeps one
compression context per direction of *its* connection); a passive observer needs two independent readers and no
answers, so the frame format, which is small, is read here. Compressed messages are inflated with
``zlib.decompressobj(-15)`` per direction (the tail ``00 00 ff ff`` appended to each message, RFC 7692 §7.2.2;
a window of 2^15 reads data compressed with any smaller window); when the negotiated parameters say
``*_no_context_takeover``, each message of that direction starts with a fresh decompressor.

Memory is bounded: a message is stored up to the body cap, inflation never produces more than the cap
(``max_length``), and what lies beyond is counted, not kept: the message is ``truncated``. A compressed message
cut at the cap leaves the direction's compression context unknown (with context takeover), so later compressed
messages of that direction are reported without payload (``payload_lost``). Malformed frames stop decoding of
that direction only; the relay never depends on any of this.
"""

from __future__ import annotations

import zlib
from typing import Final, Literal

import attrs

from oisp.http.exchange import Headers

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "DeflateParams",
    "FrameReader",
    "WebSocketMessage",
    "negotiated_deflate",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPCODES: Final = frozenset({OP_TEXT, OP_BINARY})
_CONTROL_OPCODES: Final = frozenset({OP_CLOSE, OP_PING, OP_PONG})
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"
#: How much compressed input is inflated per step (bounds the work done per ``decompress`` call).
_INFLATE_STEP: Final = 64 * 1024

Direction = Literal["client", "server"]


@attrs.frozen
class WebSocketMessage:
    """One complete WebSocket message (or control frame), as its sender meant it: unmasked, defragmented,
    decompressed.

    ``direction`` is who sent it (``"client"``: client to server). ``payload`` holds at most the body cap;
    ``size`` counts every payload byte of the message after decompression (as far as it could be inflated),
    ``wire_size`` the payload bytes on the wire. ``truncated`` says ``payload`` is shorter than the message;
    ``problem`` says why a message could not be read whole (for instance ``"compression context lost"``).
    """

    direction: Direction
    opcode: int
    payload: bytes
    timestamp_ns: int
    size: int
    wire_size: int
    frames: int = 1
    compressed: bool = False
    truncated: bool = False
    problem: str | None = None
    #: Close frames: the status code and reason, when present.
    close_code: int | None = None
    close_reason: str | None = None

    @property
    def is_text(self) -> bool:
        return self.opcode == OP_TEXT

    @property
    def is_binary(self) -> bool:
        return self.opcode == OP_BINARY

    @property
    def text(self) -> str:
        """The payload as text (UTF-8, invalid bytes replaced); ``""`` for an empty payload."""
        return self.payload.decode("utf-8", "replace")


@attrs.frozen
class DeflateParams:
    """The ``permessage-deflate`` parameters the server accepted (RFC 7692 §7.1)."""

    client_no_context_takeover: bool = False
    server_no_context_takeover: bool = False
    client_max_window_bits: int | None = None
    server_max_window_bits: int | None = None


def negotiated_deflate(headers: Headers) -> DeflateParams | None:
    """The ``permessage-deflate`` parameters of a ``101`` response's ``Sec-WebSocket-Extensions``, or None when
    the server accepted no compression."""
    for value in headers.get_all("sec-websocket-extensions"):
        for extension in value.split(","):
            parts = [part.strip() for part in extension.split(";")]
            if parts[0].lower() != "permessage-deflate":
                continue
            options: dict[str, str | None] = {}
            for part in parts[1:]:
                name, _, raw = part.partition("=")
                options[name.strip().lower()] = raw.strip().strip('"') or None
            return DeflateParams(
                client_no_context_takeover="client_no_context_takeover" in options,
                server_no_context_takeover="server_no_context_takeover" in options,
                client_max_window_bits=_bits(options.get("client_max_window_bits")),
                server_max_window_bits=_bits(options.get("server_max_window_bits")),
            )
    return None


def _bits(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


class FrameReader:
    """Reads the frames of one direction of a WebSocket connection and returns its complete messages.

    ``masked``: whether frames must be masked (client to server) or must not be (server to client).
    ``deflate``: whether ``permessage-deflate`` was negotiated, and ``reset_context`` whether this direction
    compresses each message on its own (``*_no_context_takeover``). Never raises on what it is fed: a protocol
    violation sets :attr:`error` and stops the reader.
    """

    def __init__(self, direction: Direction, *, masked: bool, cap: int, deflate: bool = False,
                 reset_context: bool = False) -> None:
        self.direction: Direction = direction
        self._masked = masked
        self._cap = cap
        self._deflate = deflate
        self._reset_context = reset_context
        self._inflater = zlib.decompressobj(-15) if deflate else None
        self._context_lost = False
        self.error: str | None = None
        self._buffer = bytearray()
        # The frame being read (header known, payload streaming).
        self._in_frame = False
        self._fin = False
        self._opcode = 0
        self._mask = b""
        self._remaining = 0
        self._offset = 0  # payload bytes of this frame already read (for the mask phase)
        self._control = bytearray()
        # The data message being assembled.
        self._message_opcode: int | None = None
        self._message_start = 0
        self._compressed = False
        self._payload = bytearray()
        self._size = 0
        self._wire = 0
        self._frames = 0
        self._truncated = False
        self._problem: str | None = None

    @property
    def in_message(self) -> bool:
        """Whether a message (or a frame) has begun and not ended."""
        return self._in_frame or self._message_opcode is not None or bool(self._buffer)

    def feed(self, data: bytes, now_ns: int) -> list[WebSocketMessage]:
        """The next bytes of this direction; returns the messages they complete."""
        if self.error is not None or not data:
            return []
        out: list[WebSocketMessage] = []
        self._buffer += data
        try:
            while self.error is None:
                if not self._in_frame:
                    if not self._read_header(now_ns):
                        break
                    if self._remaining == 0:
                        self._end_frame(now_ns, out)
                    continue
                if not self._buffer:
                    break
                take = min(self._remaining, len(self._buffer))
                chunk = bytes(self._buffer[:take])
                del self._buffer[:take]
                if self._mask:
                    chunk = _unmask(chunk, self._mask, self._offset)
                self._offset += take
                self._remaining -= take
                self._payload_piece(chunk)
                if self._remaining == 0:
                    self._end_frame(now_ns, out)
        except zlib.error as exc:  # pragma: no cover - _inflate handles its own errors
            self._stop(f"inflate failed: {exc}")
        return out

    # -- frames ----------------------------------------------------------------------------------------------

    def _read_header(self, now_ns: int) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        length = second & 0x7F
        pos = 2
        if length == 126:
            if len(buffer) < 4:
                return False
            length = int.from_bytes(buffer[2:4], "big")
            pos = 4
        elif length == 127:
            if len(buffer) < 10:
                return False
            length = int.from_bytes(buffer[2:10], "big")
            pos = 10
            if length >> 63:
                self._stop("frame length has its most significant bit set")
                return False
        masked = bool(second & 0x80)
        if len(buffer) < pos + (4 if masked else 0):
            return False
        fin, rsv1, rsv23, opcode = bool(first & 0x80), bool(first & 0x40), first & 0x30, first & 0x0F
        if masked != self._masked:
            self._stop("client frame not masked" if self._masked else "server frame masked")
            return False
        if rsv23 or (rsv1 and (not self._deflate or opcode not in _DATA_OPCODES)):
            self._stop("reserved bits set without an extension that defines them")
            return False
        if opcode in _CONTROL_OPCODES:
            if not fin or length > 125:
                self._stop("fragmented or oversized control frame")
                return False
        elif opcode in _DATA_OPCODES:
            if self._message_opcode is not None:
                self._stop("new data frame inside a fragmented message")
                return False
            self._message_opcode = opcode
            self._message_start = now_ns
            self._compressed = rsv1
            self._payload = bytearray()
            self._size = self._wire = self._frames = 0
            self._truncated = False
            self._problem = "compression context lost" if rsv1 and self._context_lost else None
        elif opcode == OP_CONTINUATION:
            if self._message_opcode is None:
                self._stop("continuation frame without a message")
                return False
            if rsv1:
                self._stop("RSV1 set on a continuation frame")
                return False
        else:
            self._stop(f"reserved opcode {opcode:#x}")
            return False
        self._mask = bytes(buffer[pos:pos + 4]) if masked else b""
        del buffer[:pos + (4 if masked else 0)]
        self._in_frame = True
        self._fin = fin
        self._opcode = opcode
        self._remaining = length
        self._offset = 0
        if opcode not in _CONTROL_OPCODES:
            self._frames += 1
        return True

    def _payload_piece(self, chunk: bytes) -> None:
        if self._opcode in _CONTROL_OPCODES:
            self._control += chunk
            return
        self._wire += len(chunk)
        if self._compressed:
            self._inflate(chunk)
        else:
            self._store(chunk)

    def _end_frame(self, now_ns: int, out: list[WebSocketMessage]) -> None:
        self._in_frame = False
        if self._opcode in _CONTROL_OPCODES:
            payload, self._control = bytes(self._control), bytearray()
            code = reason = None
            if self._opcode == OP_CLOSE and len(payload) >= 2:
                code = int.from_bytes(payload[:2], "big")
                reason = payload[2:].decode("utf-8", "replace")
            out.append(WebSocketMessage(self.direction, self._opcode, payload, now_ns, len(payload), len(payload),
                                        close_code=code, close_reason=reason))
            return
        if not self._fin:
            return
        if self._compressed:
            self._inflate(_DEFLATE_TAIL)
            if self._reset_context and self._inflater is not None:
                self._inflater = zlib.decompressobj(-15)
                self._context_lost = False
            elif self._truncated or self._problem:
                self._context_lost = True
        assert self._message_opcode is not None
        out.append(WebSocketMessage(
            self.direction, self._message_opcode, bytes(self._payload), self._message_start, self._size, self._wire,
            frames=self._frames, compressed=self._compressed, truncated=self._truncated, problem=self._problem,
        ))
        self._message_opcode = None
        self._payload = bytearray()

    # -- payload -----------------------------------------------------------------------------------------------

    def _store(self, data: bytes) -> None:
        self._size += len(data)
        room = self._cap - len(self._payload)
        if len(data) > room:
            self._truncated = True
            data = data[:max(room, 0)]
        self._payload += data

    def _inflate(self, data: bytes) -> None:
        """Inflate a piece of a compressed message, producing at most what fits under the cap."""
        if self._problem is not None or self._truncated or self._inflater is None:
            return  # the rest of this message is not inflated (its context is lost or it is over the cap)
        inflater = self._inflater
        pending = data
        while pending:
            room = self._cap - len(self._payload)
            if room <= 0:
                self._truncated = True
                return
            try:
                out = inflater.decompress(pending, min(room + 1, _INFLATE_STEP))
            except zlib.error as exc:
                self._problem = f"invalid compressed data: {exc}"
                self._context_lost = True
                return
            self._store(out)
            if self._truncated:
                return
            pending = inflater.unconsumed_tail
            if not out and pending:  # pragma: no cover - zlib made no progress
                break
        if inflater.eof:  # a final deflate block: the sender did not follow RFC 7692; start anew
            self._inflater = zlib.decompressobj(-15)

    def _stop(self, reason: str) -> None:
        self.error = reason
        self._buffer = bytearray()


def _unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``, ``offset`` bytes into the frame's payload."""
    if not data:
        return data
    shift = offset % 4
    key = (mask[shift:] + mask[:shift]) * (len(data) // 4 + 1)
    size = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:size], "big")).to_bytes(size, "big")
