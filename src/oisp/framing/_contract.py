"""What every framing decoder promises: the :class:`StreamDecoder` shape and the :class:`FramingError` item.

Decoders never raise on bad input. Whatever is wrong with the bytes (a JSON line that does not parse, a CRC that
does not match, an item larger than the limit, a stream that ends in the middle of an item) comes back as a
:class:`FramingError` *item*, in stream order among the good items, so that a provider plugin can mark the event
it is building as partial and carry on. ``fatal=True`` on an error item means the decoder could not find the
next item boundary and has stopped: later input is ignored and :meth:`StreamDecoder.close` returns nothing new.
"""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

import attrs

from oisp.errors import ConfigurationError, OispError, ProtocolError

__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "DecoderClosedError",
    "FramingError",
    "FramingErrorKind",
    "StreamDecoder",
]

#: Default limit of one item (an SSE event, a JSON line or array element, an eventstream message): 16 MiB.
DEFAULT_MAX_ITEM_SIZE = 16 * 1024 * 1024

#: How much of an oversized item an error item keeps in ``raw``: enough to recognise it in a log at DEBUG.
_OVERSIZED_PREVIEW = 1024

ItemT = TypeVar("ItemT")


class FramingErrorKind(enum.Enum):
    """Why an item could not be decoded."""

    #: The bytes of one item do not follow the format (invalid JSON, unknown header type, garbage).
    MALFORMED = "malformed"
    #: One item is larger than the decoder's ``max_item_size``; it was skipped without being buffered.
    OVERSIZED = "oversized"
    #: The stream ended (``close()``) in the middle of an item.
    INCOMPLETE = "incomplete"
    #: A checksum carried in the stream does not match the bytes it covers (eventstream CRC32).
    CHECKSUM = "checksum"


@attrs.frozen
class FramingError:
    """An item that could not be decoded, returned by ``feed``/``close`` in place of the item (never raised).

    ``raw`` holds the offending bytes as far as they are known (at most the first KiB of an oversized item), so
    treat it like a body: log it at DEBUG only. ``offset`` is the byte offset in the stream where the item
    began and ``line`` its 1-based line number, when the framing knows them.
    """

    #: Which framing produced the item: ``"sse"``, ``"ndjson"``, ``"json-array"`` or ``"eventstream"``.
    framing: str
    kind: FramingErrorKind
    #: What was wrong, for a human, without any of the item's content.
    reason: str
    offset: int | None = None
    line: int | None = None
    raw: bytes = attrs.field(default=b"", repr=False)
    #: True when the decoder stopped here: it cannot find the next item boundary, later bytes are ignored.
    fatal: bool = False

    @property
    def message(self) -> str:
        """One line saying where and what: ``"ndjson line 3: invalid JSON: Expecting value (column 1)"``."""
        where = self.framing
        if self.line is not None:
            where += f" line {self.line}"
        elif self.offset is not None:
            where += f" at byte {self.offset}"
        stopped = " (decoding stopped)" if self.fatal else ""
        return f"{where}: {self.reason}{stopped}"

    def to_exception(self) -> ProtocolError:
        """A :class:`~oisp.errors.ProtocolError` carrying :attr:`message`, for callers that prefer to raise."""
        return ProtocolError(self.message)


class DecoderClosedError(OispError, RuntimeError):
    """``feed()`` was called on a decoder after its ``close()``: create a new decoder for a new stream."""


class StreamDecoder(Protocol[ItemT]):
    """The shape shared by the framing decoders, for code that accepts any of them.

    ``feed`` takes the next bytes of the stream, split anywhere, and returns the items completed by them;
    ``close`` marks the end of the stream and returns what was still pending, including an ``INCOMPLETE``
    :class:`FramingError` for an item cut short. The items returned over a whole stream do not depend on how it
    was split into chunks.
    """

    def feed(self, data: bytes) -> list[ItemT | FramingError]:
        """Decode the next bytes of the stream; return the items they complete, in stream order."""
        ...

    def close(self) -> list[ItemT | FramingError]:
        """End the stream; return the items still pending. Calling it again returns ``[]``."""
        ...


def check_max_item_size(value: int) -> int:
    """Validate a ``max_item_size`` argument (private helper shared by the decoders)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"max_item_size must be a positive number of bytes, got {value!r}")
    return value


def oversized_preview(data: bytes | bytearray | memoryview, max_item_size: int) -> bytes:
    """The first bytes of an oversized item, kept in its error item's ``raw``.

    Never more than ``max_item_size``, so that the preview is the same whether the decoder noticed the item was
    too large from a part of it or from all of it.
    """
    return bytes(data[: min(_OVERSIZED_PREVIEW, max_item_size)])
