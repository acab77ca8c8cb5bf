"""A JSON array streamed element by element, decoded incrementally.

Gemini's ``streamGenerateContent`` without ``alt=sse`` answers with one JSON array whose elements arrive one at a
time (``[{...}\\n,\\r\\n{...}\\n]``). :class:`JsonArrayDecoder` returns each top-level element as soon as its last
byte arrives. A small scanner follows strings, escapes and nesting depth to find where an element ends, without
parsing it; the element's bytes are then parsed with :func:`json.loads` (invalid UTF-8 replaced by U+FFFD).

What goes wrong becomes a :class:`~oisp.framing.FramingError` item and decoding goes on: an element that is not
valid JSON (``MALFORMED``), bytes between elements other than whitespace and one comma (``MALFORMED``, skipped up
to the next ``,`` or ``]``), an element larger than ``max_item_size`` bytes (``OVERSIZED``, scanned past without
being buffered), a stream that ends before the closing ``]`` (``INCOMPLETE``). A stream that does not start with
``[``, or has anything but whitespace after the closing ``]``, stops the decoder (``fatal``).
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

import attrs

from oisp.framing._contract import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    FramingError,
    FramingErrorKind,
    check_max_item_size,
    oversized_preview,
)

__all__ = ["JsonArrayDecoder", "JsonArrayElement"]

_BOM = b"\xef\xbb\xbf"
_WHITESPACE = re.compile(rb"[ \t\r\n]*+")
# Inside an object or array: everything up to the next bracket, whole strings included, in one C-level match.
# It stops at a bracket, at the opening quote of a string that is not complete yet, or at the end of the buffer.
_TO_BRACKET = re.compile(rb'(?:[^"{}\[\]]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
# Inside a string: up to the closing quote, or the end of the buffer (before a lone trailing backslash).
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_SCALAR_END = re.compile(rb"[,\] \t\r\n]")
_GARBAGE_END = re.compile(rb"[,\]]")
_PREVIEW = 1024
_OPEN = frozenset(b"{[")


class _Phase(enum.Enum):
    BEFORE_ARRAY = enum.auto()  # nothing but whitespace (and a BOM) seen yet
    VALUE = enum.auto()  # after "[" or ",": an element, or "]"
    ELEMENT = enum.auto()  # inside an element
    AFTER_VALUE = enum.auto()  # after an element: "," or "]"
    GARBAGE = enum.auto()  # skipping unexpected bytes up to the next "," or "]"
    AFTER_ARRAY = enum.auto()  # after the closing "]": only whitespace may follow
    STOPPED = enum.auto()


class _Shape(enum.Enum):
    CONTAINER = enum.auto()  # object or array: ends when the depth returns to 0
    STRING = enum.auto()  # ends at its closing quote
    SCALAR = enum.auto()  # number, literal or garbage: ends before ",", "]" or whitespace


@attrs.frozen
class JsonArrayElement:
    """One top-level element of the array: its JSON value and 0-based position (malformed ones counted)."""

    value: Any
    index: int


class JsonArrayDecoder:
    """Incremental decoder of one streamed JSON array: feed it bytes, get each element as it completes."""

    def __init__(self, *, max_item_size: int = DEFAULT_MAX_ITEM_SIZE) -> None:
        self._max = check_max_item_size(max_item_size)
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # next byte of _buf to look at
        self._phase = _Phase.BEFORE_ARRAY
        self._after_comma = False
        self._index = 0  # index of the next element
        # The element being scanned.
        self._shape = _Shape.CONTAINER
        self._start = 0  # its first byte in _buf
        self._start_offset = 0  # its first byte in the stream
        self._depth = 0
        self._in_string = False
        self._skipping = False  # oversized: scanned, not buffered
        # Unexpected bytes between elements.
        self._garbage_offset = 0
        self._garbage = bytearray()
        self._closed = False

    def feed(self, data: bytes) -> list[JsonArrayElement | FramingError]:
        """Decode the next bytes of the stream; return the elements (and error items) they complete."""
        if self._closed:
            raise DecoderClosedError("JsonArrayDecoder.feed() called after close()")
        out: list[JsonArrayElement | FramingError] = []
        if self._phase is _Phase.STOPPED or not data:
            return out
        self._buf += data
        self._run(out)
        self._compact(out)
        return out

    def close(self) -> list[JsonArrayElement | FramingError]:
        """End the stream; report an element or array cut short. Calling it again returns ``[]``."""
        if self._closed:
            return []
        self._closed = True
        out: list[JsonArrayElement | FramingError] = []
        phase = self._phase
        end = self._base + len(self._buf)
        if phase is _Phase.GARBAGE:
            out.append(self._garbage_error())
        if phase is _Phase.BEFORE_ARRAY:
            what = "empty stream" if end == 0 else "stream ended before the opening '['"
            out.append(self._error(FramingErrorKind.INCOMPLETE, f"{what}: expected a JSON array", end))
        elif phase is _Phase.ELEMENT:
            raw = b"" if self._skipping else bytes(self._buf[self._start :])
            out.append(
                self._error(
                    FramingErrorKind.INCOMPLETE,
                    f"stream ended inside element {self._index}",
                    self._start_offset,
                    raw=raw,
                )
            )
        elif phase is not _Phase.AFTER_ARRAY and phase is not _Phase.STOPPED:
            out.append(self._error(FramingErrorKind.INCOMPLETE, "stream ended before the closing ']'", end))
        self._buf.clear()
        self._phase = _Phase.STOPPED
        return out

    def _run(self, out: list[JsonArrayElement | FramingError]) -> None:
        buf = self._buf
        n = len(buf)
        pos = self._pos
        while pos < n:
            phase = self._phase
            if phase is _Phase.ELEMENT:
                pos = self._scan_element(pos, out)
                if self._phase is _Phase.ELEMENT:
                    break
                continue
            if phase is _Phase.GARBAGE:
                match = _GARBAGE_END.search(buf, pos)
                end = n if match is None else match.start()
                if len(self._garbage) < _PREVIEW:
                    self._garbage += buf[pos : min(end, pos + _PREVIEW - len(self._garbage))]
                pos = end
                if match is None:
                    break
                out.append(self._garbage_error())
                self._phase = _Phase.AFTER_VALUE
                continue
            match = _WHITESPACE.match(buf, pos)
            pos = match.end() if match is not None else pos
            if pos >= n:
                break
            byte = buf[pos]
            if phase is _Phase.VALUE:
                if byte == 0x5D:  # "]"
                    if self._after_comma:
                        out.append(
                            self._error(
                                FramingErrorKind.MALFORMED, "trailing ',' before the closing ']'", self._base + pos
                            )
                        )
                    self._phase = _Phase.AFTER_ARRAY
                    pos += 1
                elif byte == 0x2C:  # ","
                    out.append(
                        self._error(FramingErrorKind.MALFORMED, "empty element (two ',' in a row)", self._base + pos)
                    )
                    self._after_comma = True
                    pos += 1
                else:
                    self._begin_element(pos, byte)
                    pos += 1 if self._shape is not _Shape.SCALAR else 0
            elif phase is _Phase.AFTER_VALUE:
                if byte == 0x2C:
                    self._phase = _Phase.VALUE
                    self._after_comma = True
                    pos += 1
                elif byte == 0x5D:
                    self._phase = _Phase.AFTER_ARRAY
                    pos += 1
                else:
                    self._phase = _Phase.GARBAGE
                    self._garbage_offset = self._base + pos
                    self._garbage.clear()
            elif phase is _Phase.BEFORE_ARRAY:
                if self._base + pos == 0 and byte == _BOM[0]:
                    if n < len(_BOM) and _BOM.startswith(buf):
                        break  # wait for the rest of the BOM
                    if buf.startswith(_BOM):
                        pos += len(_BOM)
                        continue
                if byte == 0x5B:  # "["
                    self._phase = _Phase.VALUE
                    self._after_comma = False
                    pos += 1
                else:
                    self._stop(out, f"expected a JSON array, found {bytes([byte])!r}", pos)
                    return
            elif phase is _Phase.AFTER_ARRAY:
                self._stop(out, f"unexpected data after the closing ']': {bytes([byte])!r}", pos)
                return
            else:  # STOPPED
                return
        self._pos = pos

    def _begin_element(self, pos: int, byte: int) -> None:
        self._phase = _Phase.ELEMENT
        self._start = pos
        self._start_offset = self._base + pos
        self._skipping = False
        self._in_string = False
        if byte in _OPEN:
            self._shape = _Shape.CONTAINER
            self._depth = 1
        elif byte == 0x22:  # '"'
            self._shape = _Shape.STRING
            self._in_string = True
        else:
            self._shape = _Shape.SCALAR

    def _scan_element(self, pos: int, out: list[JsonArrayElement | FramingError]) -> int:
        """Scan the current element from ``pos``; finish it if its end is in the buffer. Returns the new pos."""
        buf = self._buf
        n = len(buf)
        if self._shape is _Shape.SCALAR:
            match = _SCALAR_END.search(buf, pos)
            if match is None:
                return n
            self._finish_element(match.start(), out)
            return match.start()
        depth = self._depth
        in_string = self._in_string
        while True:
            if in_string:
                end = _STRING_BODY.match(buf, pos).end()  # type: ignore[union-attr]  # always matches
                if end >= n or buf[end] != 0x22:
                    pos = end  # string not complete yet (end may be a lone trailing backslash)
                    break
                pos = end + 1
                in_string = False
                if depth == 0:  # a top-level string element
                    self._finish_element(pos, out)
                    return pos
            end = _TO_BRACKET.match(buf, pos).end()  # type: ignore[union-attr]  # always matches
            if end >= n:
                pos = n
                break
            byte = buf[end]
            pos = end + 1
            if byte == 0x22:
                in_string = True
            elif byte in _OPEN:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    self._depth = 0
                    self._in_string = False
                    self._finish_element(pos, out)
                    return pos
        self._depth = depth
        self._in_string = in_string
        return pos

    def _finish_element(self, end: int, out: list[JsonArrayElement | FramingError]) -> None:
        index = self._index
        self._index += 1
        self._phase = _Phase.AFTER_VALUE
        if self._skipping:
            self._skipping = False
            return
        if end - self._start > self._max:
            out.append(self._oversized(index, self._buf[self._start : self._start + _PREVIEW]))
            return
        raw = bytes(self._buf[self._start : end])
        try:
            out.append(JsonArrayElement(json.loads(raw.decode("utf-8", "replace")), index))
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, json.JSONDecodeError):
                reason = f"{exc.msg} (column {exc.colno})"
            elif isinstance(exc, RecursionError):
                reason = "nested too deeply"
            else:
                reason = str(exc)
            out.append(
                self._error(
                    FramingErrorKind.MALFORMED,
                    f"element {index} is not valid JSON: {reason}",
                    self._start_offset,
                    raw=raw,
                )
            )

    def _compact(self, out: list[JsonArrayElement | FramingError]) -> None:
        """Drop the bytes no longer needed; start skipping an element that has grown past the limit."""
        if self._phase is _Phase.ELEMENT and not self._skipping:
            if len(self._buf) - self._start > self._max:
                out.append(self._oversized(self._index, self._buf[self._start : self._start + _PREVIEW]))
                self._skipping = True
            else:
                keep = self._start
                self._start = 0
                self._drop(keep)
                return
        self._drop(self._pos)

    def _drop(self, count: int) -> None:
        if count:
            del self._buf[:count]
            self._base += count
            self._pos -= count

    def _oversized(self, index: int, preview: bytes | bytearray) -> FramingError:
        return self._error(
            FramingErrorKind.OVERSIZED,
            f"element {index} is larger than max_item_size ({self._max} bytes); skipped",
            self._start_offset,
            raw=oversized_preview(preview, self._max),
        )

    def _garbage_error(self) -> FramingError:
        return self._error(
            FramingErrorKind.MALFORMED,
            "unexpected data between array elements; skipped up to the next ',' or ']'",
            self._garbage_offset,
            raw=bytes(self._garbage),
        )

    def _stop(self, out: list[JsonArrayElement | FramingError], reason: str, pos: int) -> None:
        out.append(self._error(FramingErrorKind.MALFORMED, reason, self._base + pos, fatal=True))
        self._phase = _Phase.STOPPED
        self._buf.clear()
        self._pos = 0

    @staticmethod
    def _error(
        kind: FramingErrorKind, reason: str, offset: int, *, raw: bytes = b"", fatal: bool = False
    ) -> FramingError:
        return FramingError("json-array", kind, reason, offset=offset, raw=raw, fatal=fatal)
