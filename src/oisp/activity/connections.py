"""Outbound TCP connections of agent processes that oisp does not intercept (sans-io: fed connection facts).

A source (:mod:`oisp.activity.flow`, the kernel's flow events; :mod:`oisp.activity.sockpoll`, the process's
socket table polled) observes that a process established a connection; :class:`ConnectionFilter` decides whether it
becomes a ``network.connect`` event: the process must be in scope, and the connection must not be one the proxy
intercepts (those get the proxy's own ``network.connect``, with the TLS and provider it saw; reporting them twice
would count every AI call as a tool's network request). :func:`connect_event` makes the event.

The v0.1 ``network.connect`` payload has no field saying a connection was not intercepted: like the proxy's own
events (``attrs["oisp.interception"]`` ``intercepted``, ``passthrough``, ...), these say
``attrs["oisp.interception"] = "not_intercepted"`` (:data:`oisp.events.spec_gaps.NOT_INTERCEPTED`, the one place
spec gaps are mapped; listed in docs/spec-gaps.md).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from oisp.activity.build import Clock, ProcessFacts, _source
from oisp.activity.procfs import read_process
from oisp.activity.scope import AgentScope
from oisp.events import Confidence, Endpoint, Event, NetworkConnect
from oisp.events.spec_gaps import INTERCEPTION_KEY, NOT_INTERCEPTED

__all__ = ["NOT_INTERCEPTED", "ConnectFacts", "ConnectionFilter", "Proxied", "connect_event", "intercepted_by",
           "own_listeners", "process_facts"]

log = logging.getLogger(__name__)


Address = tuple[str, int]
#: Says whether a connection (local address, remote address) is one the proxy intercepts (it reports it itself).
Proxied = Callable[[Address, Address], bool]

#: connections of processes not (yet) in scope kept for :meth:`ConnectionFilter.replay`
RECENT = 4096


class ConnectFacts(NamedTuple):
    """One established outbound TCP connection: who (``pid``), from where to where, when (monotonic ns)."""

    pid: int
    local: Address
    remote: Address
    ts_ns: int


def _norm(ip: str) -> str:
    ip = ip.split("%", 1)[0]
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _is_local(ip: str) -> bool:
    try:
        return ipaddress.ip_address(_norm(ip)).is_loopback
    except ValueError:
        return False


def own_listeners() -> set[int]:
    """The TCP ports this process listens on (the proxy's listener, in explicit mode); empty when unknown."""
    import psutil

    try:
        me = psutil.Process()
        connections = me.net_connections(kind="tcp") if hasattr(me, "net_connections") else me.connections("tcp")
    except (psutil.Error, OSError) as exc:
        log.debug("activity: this process's listeners could not be listed: %s", exc)
        return set()
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN and c.laddr}


class ConnectionFilter:
    """Which observed connections become events (sans-io but for the lookup of this process's own listeners).

    ``proxied``: predicates that recognise intercepted connections (the runner adds the interceptor's); a
    connection to a port this process listens on, on this machine (the proxy in explicit mode: the client's
    ``HTTPS_PROXY`` connection), is always the proxy's. ``listeners``: how this process's listening ports are
    found (cached for a second; looked up only for connections of processes in scope).
    """

    def __init__(self, scope: AgentScope, *, proxied: Iterable[Proxied] = (),
                 listeners: Callable[[], set[int]] = own_listeners, clock: Callable[[], float] = time.monotonic,
                 recent: int = RECENT) -> None:
        self.scope = scope
        self.proxied: list[Proxied] = list(proxied)
        self._listeners = listeners
        self._clock = clock
        self._ports: set[int] = set()
        self._ports_at = float("-inf")
        self._recent: collections.deque[ConnectFacts] = collections.deque(maxlen=recent)
        self._recent_lock = threading.Lock()  # a source's thread keeps them, the event loop's replays them
        self._own_pid = os.getpid()
        #: connections left out because the proxy intercepts them / because their process is not in scope
        self.intercepted = 0
        self.out_of_scope = 0

    def _listening(self, port: int) -> bool:
        now = self._clock()
        if port not in self._ports and now - self._ports_at > 1.0:  # a new listener: look again (once a second)
            self._ports, self._ports_at = self._listeners(), now
        return port in self._ports

    def is_proxied(self, local: Address, remote: Address) -> bool:
        """Whether the proxy intercepts the connection ``local`` -> ``remote`` (and reports it itself)."""
        if (_is_local(remote[0]) or _norm(remote[0]) == _norm(local[0])) and self._listening(remote[1]):
            return True
        for predicate in self.proxied:
            try:
                if predicate(local, remote):
                    return True
            except Exception:
                log.exception("activity: a proxied-connection predicate failed")
        return False

    def admit(self, facts: ConnectFacts) -> int | None:
        """The agent pid the connection is reported for, or None when it is not reported (0 in scope ``all``
        for a process of no agent). A connection of a process out of scope is kept a while for :meth:`replay`."""
        if facts.pid == self._own_pid or facts.pid <= 0:
            return None
        if not self.scope.in_scope(facts.pid):
            self.out_of_scope += 1
            with self._recent_lock:
                self._recent.append(facts)
            return None
        if self.is_proxied(facts.local, facts.remote):
            self.intercepted += 1
            return None
        agent = self.scope.agent_of(facts.pid)
        return agent if agent is not None else 0

    def replay(self, agent: int, since_ns: int) -> list[ConnectFacts]:
        """The kept connections, since ``since_ns``, of processes now in ``agent``'s tree (it was just learned:
        what it did before it was known is reported too); they are taken out of the ring."""
        found: list[ConnectFacts] = []
        with self._recent_lock:
            kept: collections.deque[ConnectFacts] = collections.deque(maxlen=self._recent.maxlen)
            for facts in self._recent:
                if facts.ts_ns >= since_ns and self.scope.agent_of(facts.pid) == agent:
                    found.append(facts)
                else:
                    kept.append(facts)
            self._recent = kept
        return [f for f in found if not self.is_proxied(f.local, f.remote)]


def intercepted_by(interceptor: Any) -> Proxied:
    """The connections a transparent-mode :class:`~oisp.interception.Interceptor` diverts to the proxy: those in
    its connection table (diverted already) and those to its targets (diverted when their SYN went out)."""

    def proxied(local: Address, remote: Address) -> bool:
        try:
            remote_ip = ipaddress.ip_address(_norm(remote[0])).packed
            local_ip = ipaddress.ip_address(_norm(local[0])).packed
        except ValueError:
            return False
        if (local_ip, local[1], remote_ip, remote[1]) in interceptor.table.by_client:
            return True
        return bool(interceptor.targets.contains(remote_ip, remote[1]))

    return proxied


def process_facts(pid: int, agent: int | None) -> ProcessFacts:
    """What ``/proc`` (or psutil elsewhere) says of the connecting process now (what it could not, in
    ``missing``)."""
    import sys

    if sys.platform == "linux":
        snap = read_process(pid)
        return ProcessFacts(pid, ppid=snap.ppid, exe=snap.exe, args=snap.args, cwd=snap.cwd, uid=snap.uid,
                            gid=snap.gid, name=snap.name, agent=agent or None, missing=snap.missing)
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return ProcessFacts(pid, ppid=proc.ppid(), exe=proc.exe() or None, args=proc.cmdline() or None,
                                name=proc.name(), agent=agent or None)
    except (psutil.Error, OSError):
        return ProcessFacts(pid, agent=agent or None, missing=("exe", "args", "ppid"))


def _private(ip: str) -> bool | None:
    try:
        return ipaddress.ip_address(ip).is_private
    except ValueError:
        return None


def connect_event(facts: ConnectFacts, process: ProcessFacts, clock: Clock, *, point: str, method: str = "other",
                  sampled: bool = False, limitations: list[str] | None = None,
                  pid_source: str = "direct") -> Event:
    """``network.connect`` of a connection oisp did not intercept (``attrs["oisp.interception"]`` says so).

    ``sampled``: found by polling (the time is the poll's, a short connection may have been missed).
    ``pid_source``: how the process is known (``direct``: the kernel's event names it; ``socket_inode``: the
    socket was found among the process's open files)."""
    remote_ip, local_ip = _norm(facts.remote[0]), _norm(facts.local[0])
    data = NetworkConnect(dest=Endpoint(ip=remote_ip, port=facts.remote[1], is_private=_private(remote_ip)),
                          src=Endpoint(ip=local_ip, port=facts.local[1]), protocol="tcp", success=True)
    missing = list(process.missing)
    completeness = "sampled" if sampled else "partial" if missing else "metadata_only"
    confidence = Confidence(
        level="medium" if sampled else "high", completeness=completeness,
        reasons=["socket_table_polled" if sampled else "kernel_flow_event"],
        missing=missing or None, limitations=limitations, process_attribution=pid_source, content_source="none")
    return Event.create(data, ts=clock.wall(facts.ts_ns), ts_mono=facts.ts_ns, process=process.process_info(),
                        actor=process.actor(), source=_source(point, method), confidence=confidence,
                        attrs=process.attrs({INTERCEPTION_KEY: NOT_INTERCEPTED}))
