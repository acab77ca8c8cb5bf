"""``memory`` sink: keeps events in a list, for embedding oisp in a program and for tests."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from oisp.errors import ConfigurationError
from oisp.events import Event

__all__ = ["MemorySink"]


class MemorySink:
    """Keeps every event it receives (at most ``max_events``, oldest dropped first, drops counted)."""

    def __init__(self, max_events: int | None = None) -> None:
        if max_events is not None and max_events <= 0:
            raise ConfigurationError(f"sinks.memory.max_events: {max_events!r} must be a positive integer")
        self.max_events = max_events
        self.events: list[Event] = []
        self.dropped = 0
        self.closed = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MemorySink:
        """Build from configuration: ``max_events`` (optional) is the only option."""
        unknown = set(options) - {"max_events"}
        if unknown:
            raise ConfigurationError(f"sinks.memory: unknown option(s) {sorted(unknown)}; allowed: ['max_events']")
        return cls(max_events=options.get("max_events"))

    def write(self, events: Sequence[Event]) -> None:
        with self._changed:
            self.events.extend(events)
            if self.max_events is not None and len(self.events) > self.max_events:
                excess = len(self.events) - self.max_events
                del self.events[:excess]
                self.dropped += excess
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Block until at least ``count`` events arrived (or ``timeout`` seconds passed); returns a copy."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.events) >= count or self.closed, timeout=timeout)
            return list(self.events)
