"""Newline-delimited JSON (Ollama's ``/api/chat`` and ``/api/generate``, Cohere v1 streams), decoded incrementally.

Each line that is not blank is one JSON value. Lines end in LF; a CR before it is tolerated, and so is a UTF-8
BOM at the very start. Bytes that are not valid UTF-8 are replaced by U+FFFD rather than failing the line. A
line that is not valid JSON becomes a ``MALFORMED`` :class:`~oisp.framing.FramingError` carrying its line number,
and decoding goes on with the next line; a line longer than ``max_item_size`` bytes becomes an ``OVERSIZED``
error item and is skipped, without being buffered, up to its end. A last line without a newline is parsed by
:meth:`NdjsonDecoder.close`.
"""

from __future__ import annotations

import json
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

__all__ = ["NdjsonDecoder", "NdjsonValue"]

_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r"


@attrs.frozen
class NdjsonValue:
    """One decoded line: its JSON value (dict, list, str, int, float, bool or None) and 1-based line number."""

    value: Any
    line: int


class NdjsonDecoder:
    """Incremental NDJSON decoder: feed it bytes, get one :class:`NdjsonValue` per non-blank line."""

    def __init__(self, *, max_item_size: int = DEFAULT_MAX_ITEM_SIZE) -> None:
        self._max = check_max_item_size(max_item_size)
        self._partial = bytearray()
        self._line = 0  # lines completed so far
        self._offset = 0  # stream offset of the current (partial) line
        self._fed = 0  # bytes fed before the current call
        self._skipping = False  # inside a line already reported as oversized
        self._closed = False

    def feed(self, data: bytes) -> list[NdjsonValue | FramingError]:
        """Decode the next bytes of the stream; return one item per line they complete."""
        if self._closed:
            raise DecoderClosedError("NdjsonDecoder.feed() called after close()")
        out: list[NdjsonValue | FramingError] = []
        if b"\n" not in data:
            self._extend_partial(data, out)
            self._fed += len(data)
            return out
        lines = data.split(b"\n")
        tail = lines.pop()
        if self._skipping:
            self._skipping = False
            self._line += 1
            self._offset = self._fed + len(lines[0]) + 1
            del lines[0]
        elif self._partial:
            self._partial += lines[0]
            lines[0] = bytes(self._partial)
            self._partial.clear()
        self._fed += len(data)
        line_no = self._line
        offset = self._offset
        limit = self._max
        for line in lines:
            line_no += 1
            size = len(line)
            if size > limit:
                out.append(self._oversized(line, line_no, offset))
            else:
                item = self._parse(line, line_no, offset)
                if item is not None:
                    out.append(item)
            offset += size + 1
        self._line = line_no
        self._offset = offset
        self._extend_partial(tail, out)
        return out

    def close(self) -> list[NdjsonValue | FramingError]:
        """End the stream: parse a last line that had no newline. Calling it again returns ``[]``."""
        if self._closed:
            return []
        self._closed = True
        if self._skipping or not self._partial:
            return []
        item = self._parse(bytes(self._partial), self._line + 1, self._offset)
        self._partial.clear()
        return [] if item is None else [item]

    @staticmethod
    def _parse(line: bytes, line_no: int, offset: int) -> NdjsonValue | FramingError | None:
        """The item of one complete line; None for a blank line."""
        if line_no == 1 and line.startswith(_BOM):
            line = line[3:]
        if not line.strip(_BLANK):
            return None
        try:
            return NdjsonValue(json.loads(line.decode("utf-8", "replace")), line_no)
        except (ValueError, RecursionError) as exc:
            # ValueError covers json.JSONDecodeError and integers too long to convert; RecursionError, nesting
            # deeper than the interpreter's stack.
            if isinstance(exc, json.JSONDecodeError):
                reason = f"{exc.msg} (column {exc.colno})"
            elif isinstance(exc, RecursionError):
                reason = "nested too deeply"
            else:
                reason = str(exc)
            return FramingError(
                "ndjson",
                FramingErrorKind.MALFORMED,
                f"invalid JSON: {reason}",
                offset=offset,
                line=line_no,
                raw=line,
            )

    def _extend_partial(self, data: bytes, out: list[NdjsonValue | FramingError]) -> None:
        if self._skipping or not data:
            return
        if len(self._partial) + len(data) > self._max:
            head = bytes(self._partial[:1024]) + data[:1024]
            out.append(self._oversized(head, self._line + 1, self._offset))
            self._partial.clear()
            self._skipping = True
        else:
            self._partial += data

    def _oversized(self, line: bytes | bytearray, line_no: int, offset: int) -> FramingError:
        return FramingError(
            "ndjson",
            FramingErrorKind.OVERSIZED,
            f"line longer than max_item_size ({self._max} bytes); skipped",
            offset=offset,
            line=line_no,
            raw=oversized_preview(line, self._max),
        )
