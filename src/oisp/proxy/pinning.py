"""Memory of clients that refuse oisp's certificate (certificate pinning), so their next connections are
passed through untouched instead of being broken again.

Pinning turns inspection off, so it is not a switch any local process can flip for others: it is decided only on
real evidence (the client's TLS alert about oisp's certificate, seen :attr:`PinnedClients.strikes` times within
``ttl`` seconds), and only for that one process (executable, command line, pid and its start time: a pin ends with
the process). A client whose process is unknown is never pinned.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import attrs

__all__ = ["PinnedClients", "ProcessKey"]


@attrs.frozen
class ProcessKey:
    """One process, for the lifetime of its pid."""

    exe: str
    cmdline: str
    pid: int
    start_time: str | None

    def label(self) -> str:
        name = self.exe.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        return f"{name}[{self.pid}]"


class PinnedClients:
    """Remembers (host, process) pairs for ``ttl`` seconds once the process gave ``strikes`` pieces of evidence
    within ``ttl`` seconds; at most ``max_entries`` pairs (oldest forgotten)."""

    def __init__(self, ttl: float = 300.0, *, strikes: int = 2, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.strikes = strikes
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, ProcessKey], float] = OrderedDict()
        self._evidence: OrderedDict[tuple[str, ProcessKey], list[float]] = OrderedDict()
        #: How many entries each host has (whatever the process).
        self._hosts: dict[str, int] = {}

    def evidence(self, host: str, process: ProcessKey | None) -> bool:
        """Record that ``process`` refused oisp's certificate for ``host``; True when this pins the pair (it was
        not pinned before). A process that is not known is never pinned."""
        if process is None:
            return False
        key = (host.lower(), process)
        if self.is_pinned(host, process):
            return False
        now = self._clock()
        seen = [t for t in self._evidence.pop(key, []) if t > now - self.ttl]
        seen.append(now)
        if len(seen) < self.strikes:
            self._evidence[key] = seen
            while len(self._evidence) > self.max_entries:
                self._evidence.popitem(last=False)
            return False
        self._entries[key] = now + self.ttl
        self._hosts[key[0]] = self._hosts.get(key[0], 0) + 1
        while len(self._entries) > self.max_entries:
            self._forget(self._entries.popitem(last=False)[0])
        return True

    def is_pinned(self, host: str, process: ProcessKey | None) -> bool:
        """Whether connections of this process to ``host`` are to be passed through."""
        if process is None:
            return False
        key = (host.lower(), process)
        expires = self._entries.get(key)
        if expires is None:
            return False
        if expires > self._clock():
            return True
        del self._entries[key]
        self._forget(key)
        return False

    def knows(self, host: str) -> bool:
        """Whether any client may be pinned for ``host``: when not, :meth:`is_pinned` is False for every process
        (so the proxy need not wait to learn the process before deciding)."""
        return host.lower() in self._hosts

    def pinned(self) -> list[tuple[str, ProcessKey]]:
        """The (host, process) pairs pinned now."""
        now = self._clock()
        return [key for key, expires in self._entries.items() if expires > now]

    def _forget(self, key: tuple[str, ProcessKey]) -> None:
        left = self._hosts.get(key[0], 0) - 1
        if left > 0:
            self._hosts[key[0]] = left
        else:
            self._hosts.pop(key[0], None)

    def __len__(self) -> int:
        return len(self._entries)
