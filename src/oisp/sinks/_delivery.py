"""The decisions of the ``webhook`` sink, without any I/O: which answers are retried, how long to wait, which
spooled batches go when the spool is over its bound, and how spool files are named.

Kept apart from the sink's sockets and files so each can be tested on its own.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime

import attrs

__all__ = [
    "MAX_RETRY_AFTER",
    "Outcome",
    "RetryPolicy",
    "SpoolEntry",
    "SpoolIndex",
    "classify_status",
    "parse_retry_after",
    "spool_name",
]

#: The longest a ``Retry-After`` is honoured (seconds); a longer one is treated as this.
MAX_RETRY_AFTER = 3600.0


class Outcome(enum.Enum):
    """What an HTTP answer means for a batch."""

    DELIVERED = "delivered"  # 2xx: the batch is gone from the spool
    RETRY = "retry"  # 408, 425, 429, 5xx (and connection errors): the batch waits, then goes again
    REJECTED = "rejected"  # any other answer: the receiver refuses this batch; retrying cannot help


def classify_status(status: int) -> Outcome:
    """:class:`Outcome` of an HTTP status code."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (408, 425, 429) or 500 <= status < 600:
        return Outcome.RETRY
    return Outcome.REJECTED


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay seconds or an HTTP date; RFC 9110 §10.2.3), at most
    :data:`MAX_RETRY_AFTER`; None when absent or not understood. ``now`` is seconds since the epoch."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+", value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)


@attrs.define
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``n`` (1 for the first retry) waits a random time between half and
    all of ``min(base * 2**(n-1), cap)``. A ``Retry-After`` the receiver sent replaces it."""

    base: float = 0.5
    cap: float = 60.0
    random: Callable[[], float] = random.random

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.base * 2.0 ** min(max(attempt - 1, 0), 62), self.cap)
        return ceiling * (0.5 + 0.5 * self.random())


_SPOOL_NAME = re.compile(r"(?P<seq>\d{20})-(?P<count>\d+)\.ndjson")


def spool_name(seq: int, count: int) -> str:
    """The file name of spooled batch ``seq`` holding ``count`` events: names sort in the order batches came."""
    return f"{seq:020d}-{count}.ndjson"


@attrs.frozen
class SpoolEntry:
    """One spooled batch."""

    seq: int
    count: int
    size: int

    @property
    def name(self) -> str:
        return spool_name(self.seq, self.count)

    @classmethod
    def parse(cls, name: str, size: int) -> SpoolEntry | None:
        match = _SPOOL_NAME.fullmatch(name)
        if match is None:
            return None
        return cls(int(match["seq"]), int(match["count"]), size)


@attrs.define
class SpoolIndex:
    """The spooled batches, oldest first, and their total size: what to send next, what to drop over the bound."""

    max_bytes: int
    entries: list[SpoolEntry] = attrs.field(factory=list)
    total_bytes: int = 0
    #: Events in the spooled batches.
    events: int = 0
    next_seq: int = 0

    def load(self, found: Iterable[SpoolEntry]) -> None:
        """Take the batches found on disk (any order) at start."""
        self.entries = sorted(found, key=lambda e: e.seq)
        self.total_bytes = sum(e.size for e in self.entries)
        self.events = sum(e.count for e in self.entries)
        self.next_seq = self.entries[-1].seq + 1 if self.entries else 0

    def allocate(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def add(self, entry: SpoolEntry) -> None:
        self.entries.append(entry)
        self.total_bytes += entry.size
        self.events += entry.count

    def oldest(self) -> SpoolEntry | None:
        return self.entries[0] if self.entries else None

    def remove(self, entry: SpoolEntry) -> bool:
        """Forget ``entry``; False when it was no longer there (dropped meanwhile)."""
        try:
            self.entries.remove(entry)
        except ValueError:
            return False
        self.total_bytes -= entry.size
        self.events -= entry.count
        return True

    def over_bound(self, busy: SpoolEntry | None) -> list[SpoolEntry]:
        """Remove and return the oldest batches until the spool fits ``max_bytes`` again, never ``busy`` (the batch
        being sent) and never the newest batch (a single batch larger than the bound is still kept)."""
        dropped: list[SpoolEntry] = []
        index = 0
        while self.total_bytes > self.max_bytes and index < len(self.entries) - 1:
            entry = self.entries[index]
            if entry == busy:
                index += 1
                continue
            del self.entries[index]
            self.total_bytes -= entry.size
            self.events -= entry.count
            dropped.append(entry)
        return dropped
