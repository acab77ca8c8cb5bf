"""Memory of clients that refuse oisp's certificate (certificate pinning), so their next connections are
passed through untouched instead of being broken again."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["PinnedClients"]


class PinnedClients:
    """Remembers (host, process key) pairs for ``ttl`` seconds; at most ``max_entries`` (oldest forgotten).

    The process key is the client's executable path where known (stable across its connections and
    restarts), else None: then the host alone is remembered, for every client.
    """

    def __init__(self, ttl: float = 3600.0, *, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str | None], float] = OrderedDict()

    def remember(self, host: str, process_key: str | None) -> None:
        """Pass ``host`` through for this process from now on, for ``ttl`` seconds."""
        key = (host.lower(), process_key)
        self._entries.pop(key, None)
        self._entries[key] = self._clock() + self.ttl
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def is_pinned(self, host: str, process_key: str | None) -> bool:
        """Whether connections of this process to ``host`` are to be passed through."""
        now = self._clock()
        for key in ((host.lower(), process_key), (host.lower(), None)):
            expires = self._entries.get(key)
            if expires is None:
                continue
            if expires > now:
                return True
            del self._entries[key]
        return False

    def __len__(self) -> int:
        return len(self._entries)
