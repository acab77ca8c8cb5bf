"""Outbound TCP connections of agent processes by polling their socket tables (psutil): where there are no flow
events (no pydivert FLOW layer: not root, no cgroup2, macOS).

Every ``poll_interval`` seconds, while there are agent processes, the established TCP connections of each agent
process (at most :data:`MAX_PIDS` a poll; Linux: its open sockets matched to the TCP table of its own network
namespace) are compared with the last poll's; a new one whose local port is not one the process listens on is an
outbound connection. What this misses, and every event says so (``confidence.completeness`` ``"sampled"``,
``confidence.limitations`` ``connections_polled``): a connection opened and closed between two polls; the
connections of processes in scope that are not agent processes (scope ``all``); the time, which is the poll's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psutil

from oisp.activity import connections
from oisp.activity.build import Clock
from oisp.activity.connections import ConnectFacts, ConnectionFilter
from oisp.activity.polling import PolledSource
from oisp.activity.scope import AgentScope
from oisp.activity.settings import ActivitySettings, ActivityStats
from oisp.events import Event

__all__ = ["MAX_PIDS", "PolledConnectionSource"]

log = logging.getLogger(__name__)

LIMITATION = "connections_polled"
#: agent processes whose sockets are listed in one poll (the rest wait for the next polls, in turn)
MAX_PIDS = 256


def _connections(pid: int) -> list[Any]:
    proc = psutil.Process(pid)
    if hasattr(proc, "net_connections"):
        return list(proc.net_connections(kind="tcp"))
    return list(proc.connections(kind="tcp"))  # psutil < 6


class PolledConnectionSource(PolledSource):
    """A thread polling the TCP sockets of agent processes; each new outbound one becomes a ``network.connect``."""

    name = "connections"
    what = "polling connections"

    def __init__(self, scope: AgentScope, filter: ConnectionFilter, settings: ActivitySettings,
                 stats: ActivityStats, clock: Clock, deliver: Callable[[Any, list[Event], int], bool],
                 admit: Callable[[int | None], bool], *,
                 list_connections: Callable[[int], list[Any]] = _connections) -> None:
        super().__init__(settings, deliver)
        self._scope = scope
        self.filter = filter
        self._stats = stats
        self._clock = clock
        self._admit = admit
        self._list = list_connections
        #: pid -> the (local, remote) pairs of its established connections at the last poll
        self._known: dict[int, set[tuple[tuple[str, int], tuple[str, int]]]] = {}
        self._turn = 0

    def poll(self, out: list[Event]) -> None:
        """List the agent processes' connections; append the events of new outbound ones."""
        now = time.monotonic_ns()
        pids = sorted(self._scope.members())
        if len(pids) > MAX_PIDS:  # in turns, so every process is listed now and then
            start = self._turn % len(pids)
            pids = (pids[start:] + pids[:start])[:MAX_PIDS]
            self._turn += MAX_PIDS
        for pid in list(self._known):
            if self._scope.agent_of(pid) is None:
                del self._known[pid]
        for pid in pids:
            try:
                listed = self._list(pid)
            except (psutil.Error, OSError):
                self._known.pop(pid, None)
                continue
            listening = {c.laddr.port for c in listed if c.status == psutil.CONN_LISTEN and c.laddr}
            current = {((c.laddr.ip, c.laddr.port), (c.raddr.ip, c.raddr.port)) for c in listed
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.raddr
                       and c.laddr.port not in listening}
            before = self._known.get(pid)
            self._known[pid] = current
            for local, remote in sorted(current - (before or set())):
                self._stats.connection_records += 1
                facts = ConnectFacts(pid, local, remote, now)
                agent = self.filter.admit(facts)
                if agent is None or not self._admit(agent or None):
                    continue
                process = connections.process_facts(pid, agent)
                out.append(connections.connect_event(facts, process, self._clock, point="socket_table_poll",
                                                     sampled=True, limitations=[LIMITATION],
                                                     pid_source="socket_inode"))
