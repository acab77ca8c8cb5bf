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
        #: How many entries each host has (whatever the process).
        self._hosts: dict[str, int] = {}

    def remember(self, host: str, process_key: str | None) -> None:
        """Pass ``host`` through for this process from now on, for ``ttl`` seconds."""
        key = (host.lower(), process_key)
        if self._entries.pop(key, None) is None:
            self._hosts[key[0]] = self._hosts.get(key[0], 0) + 1
        self._entries[key] = self._clock() + self.ttl
        while len(self._entries) > self.max_entries:
            self._forget(self._entries.popitem(last=False)[0])

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
            self._forget(key)
        return False

    def knows(self, host: str) -> bool:
        """Whether any client may be pinned for ``host``: when not, :meth:`is_pinned` is False for every process
        (so the proxy need not wait to learn the process before deciding)."""
        return host.lower() in self._hosts

    def _forget(self, key: tuple[str, str | None]) -> None:
        left = self._hosts.get(key[0], 0) - 1
        if left > 0:
            self._hosts[key[0]] = left
        else:
            self._hosts.pop(key[0], None)

    def __len__(self) -> int:
        return len(self._entries)
