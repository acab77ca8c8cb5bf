"""Server-Sent Events (``text/event-stream``), decoded incrementally as the WHATWG HTML standard says.

What the standard's "event stream interpretation" prescribes, and this decoder does:

* the stream is UTF-8, decoded incrementally with invalid bytes replaced by U+FFFD; one BOM at the very start is
  dropped;
* lines end in CRLF, LF or CR; a CR that ends one chunk and an LF that starts the next are one line end;
* a line starting with ``:`` is a comment (OpenRouter's ``: OPENROUTER PROCESSING`` keep-alives); it is
  skipped, or returned as an :class:`SseComment` when the decoder is created with ``comments=True``;
* ``name: value`` sets a field (one space after the colon is dropped), a line without a colon is a field with
  an empty value; ``event``, ``data`` (several lines joined with ``\\n``), ``id`` (ignored if it contains
  U+0000) and ``retry`` (ASCII digits only) are understood, other names are ignored;
* a blank line dispatches the event, unless no ``data`` line was seen since the previous one.

Where the standard silently drops data, the decoder reports it: an event still pending when the stream ends is
returned from :meth:`SseDecoder.close` as an ``INCOMPLETE`` :class:`~oisp.framing.FramingError` (never as if it
were complete), and an event or line longer than ``max_item_size`` characters becomes an ``OVERSIZED`` error
item; the decoder then skips to the next blank line and goes on.
"""

from __future__ import annotations

import codecs
import re

import attrs

from oisp.framing._contract import (
    DEFAULT_MAX_ITEM_SIZE,
    DecoderClosedError,
    FramingError,
    FramingErrorKind,
    check_max_item_size,
    oversized_preview,
)

__all__ = ["SseComment", "SseDecoder", "SseEvent"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@attrs.frozen(kw_only=True)
class SseEvent:
    """One dispatched Server-Sent Event."""

    #: The event type: the last ``event`` field of the event, ``"message"`` when there was none (or it was empty).
    event: str = "message"
    #: The ``data`` lines of the event joined with ``\n``.
    data: str
    #: The stream's last event ID when the event was dispatched (as ``EventSource.lastEventId``): set by the
    #: latest ``id`` field of this *or an earlier* event; None while no ``id`` field has been seen.
    id: str | None = None
    #: The reconnection time in ms from a ``retry`` field seen since the previous dispatched event, else None.
    retry: int | None = None


@attrs.frozen
class SseComment:
    """A comment line (``:`` prefix), returned only by a decoder created with ``comments=True``."""

    #: The text after the colon, one leading space dropped (``": keep-alive"`` gives ``"keep-alive"``).
    text: str


class SseDecoder:
    """Incremental ``text/event-stream`` decoder: feed it bytes, get :class:`SseEvent` items back.

    ``max_item_size`` bounds, in characters, both one line and one event's data; whatever exceeds it is dropped
    (with an ``OVERSIZED`` error item) without being buffered. Decoding errors never raise.
    """

    def __init__(self, *, comments: bool = False, max_item_size: int = DEFAULT_MAX_ITEM_SIZE) -> None:
        self._comments = comments
        self._max = check_max_item_size(max_item_size)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self._skip_lf = False
        self._closed = False
        # The current partial line, in pieces to keep a long line arriving in small chunks linear.
        self._partial: list[str] = []
        self._partial_len = 0
        # Event being built.
        self._data: list[str] = []
        self._data_len = 0
        self._event_type = ""
        self._retry: int | None = None
        self._last_event_id: str | None = None
        self._reconnection_time: int | None = None
        # After an oversized line or event: drop the rest of the line / everything up to the next blank line.
        self._discard_line = False
        self._discard_event = False

    @property
    def last_event_id(self) -> str | None:
        """The stream's last event ID so far (the ``id`` a client would send when reconnecting)."""
        return self._last_event_id

    @property
    def reconnection_time(self) -> int | None:
        """The latest valid ``retry`` value of the stream so far, in milliseconds."""
        return self._reconnection_time

    def feed(self, data: bytes) -> list[SseEvent | SseComment | FramingError]:
        """Decode the next bytes of the stream; return the events and comments they complete."""
        if self._closed:
            raise DecoderClosedError("SseDecoder.feed() called after close()")
        out: list[SseEvent | SseComment | FramingError] = []
        self._feed_text(self._decoder.decode(data), out)
        return out

    def close(self) -> list[SseEvent | SseComment | FramingError]:
        """End the stream; an event without its terminating blank line is reported as ``INCOMPLETE``."""
        if self._closed:
            return []
        out: list[SseEvent | SseComment | FramingError] = []
        self._feed_text(self._decoder.decode(b"", True), out)
        self._closed = True
        if self._discard_line or self._discard_event:
            return out
        # The standard discards an unterminated last line; its data still belongs to the event cut short.
        if self._partial:
            line = "".join(self._partial)
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value[:1] == " " else value)
        if self._data:
            data = "\n".join(self._data)
            out.append(
                FramingError(
                    "sse",
                    FramingErrorKind.INCOMPLETE,
                    f"stream ended before the blank line that ends an event ({len(data)} characters of data)",
                    raw=data.encode("utf-8"),
                )
            )
        return out

    def _feed_text(self, text: str, out: list[SseEvent | SseComment | FramingError]) -> None:
        if not text:
            return
        if self._at_start:
            self._at_start = False
            if text[0] == _BOM:
                text = text[1:]
                if not text:
                    return
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return
        if "\r" in text:
            lines = _LINE_END.split(text)
            # A CR ending the chunk ends the line now; an LF starting the next chunk must not end another.
            self._skip_lf = text[-1] == "\r"
        else:
            lines = text.split("\n")
        tail = lines.pop()
        if lines:
            if self._discard_line:
                # The end of a line that was too long, or that belongs to an event being skipped.
                self._discard_line = False
                del lines[0]
            elif self._partial:
                self._partial.append(lines[0])
                lines[0] = "".join(self._partial)
            self._partial = []
            self._partial_len = 0
            self._process_lines(lines, out)
        if not tail or self._discard_line:
            return
        if self._discard_event:
            # The line belongs to an event being skipped: no need to keep it.
            self._discard_line = True
        else:
            self._partial.append(tail)
            self._partial_len += len(tail)
            if self._partial_len > self._max:
                preview = "".join(self._partial)[:1024]
                self._partial = []
                self._partial_len = 0
                self._discard_line = True
                self._oversized(out, "line", preview)

    def _process_lines(self, lines: list[str], out: list[SseEvent | SseComment | FramingError]) -> None:
        limit = self._max
        data = self._data
        for line in lines:
            if not line:
                if self._discard_event:
                    self._discard_event = False
                elif data:
                    out.append(
                        SseEvent(
                            event=self._event_type or "message",
                            data="\n".join(data),
                            id=self._last_event_id,
                            retry=self._retry,
                        )
                    )
                    data.clear()
                    self._data_len = 0
                    self._retry = None
                self._event_type = ""
                continue
            if self._discard_event:
                continue
            if len(line) > limit:
                self._oversized(out, "line", line[:1024])
                continue
            if line[0] == ":":
                if self._comments:
                    out.append(SseComment(line[2:] if line[1:2] == " " else line[1:]))
                continue
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
                self._data_len += len(value) + 1
                if self._data_len - 1 > limit:
                    self._oversized(out, "event", "\n".join(data)[:1024])
            elif name == "event":
                self._event_type = value
            elif name == "id":
                if "\x00" not in value:
                    self._last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                try:
                    self._retry = self._reconnection_time = int(value)
                except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                    pass

    def _oversized(self, out: list[SseEvent | SseComment | FramingError], what: str, preview: str) -> None:
        """Report an oversized line or event and drop the event it belongs to, up to the next blank line."""
        self._data.clear()
        self._data_len = 0
        self._event_type = ""
        self._discard_event = True
        out.append(
            FramingError(
                "sse",
                FramingErrorKind.OVERSIZED,
                f"{what} longer than max_item_size ({self._max} characters); "
                "the event was skipped up to the next blank line",
                raw=oversized_preview(preview.encode("utf-8"), self._max),
            )
        )
