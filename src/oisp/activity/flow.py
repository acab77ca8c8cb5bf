"""Outbound TCP connections from pydivert's FLOW and SOCKET layers, sniffed (never diverted).

Linux: pydivert's eBPF backend attaches cgroup programs to the first cgroup2 mount (every process of the machine,
whatever its network namespace); Windows: WinDivert's FLOW and SOCKET layers. Both handles are opened with
``SNIFF | RECV_ONLY``: packets and connections are never held or changed, the programs only report.

A FLOW ``ESTABLISHED`` event carries the connection's addresses, the process and the kernel's monotonic time, but
on the eBPF backend it does not say which side opened the connection (accepted connections are reported alike).
The SOCKET layer's ``CONNECT`` event, raised in the connecting process when it calls ``connect()``, does: a flow is
outbound when its endpoint had a ``CONNECT``. It is queued before the flow's ``ESTABLISHED``, so reading the flow
events first and the connect events after them finds the connect of every flow read.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from oisp.activity import connections
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.connections import ConnectFacts, ConnectionFilter
from oisp.activity.settings import ActivityStats
from oisp.events import Event

__all__ = ["FlowConnectionSource", "available"]

log = logging.getLogger(__name__)

_LAYER_FLOW, _LAYER_SOCKET = 2, 3
_FLAG_SNIFF, _FLAG_RECV_ONLY = 1, 4
_EV_FLOW_ESTABLISHED, _EV_SOCKET_CONNECT = 1, 4
#: endpoints whose CONNECT was seen, kept until their flow is established (a connect that never is: evicted)
_CONNECTS = 16384
_DRAIN = 4096
_EVENT_BUFFER = 256
#: processes whose facts are kept for their next connections, and for how long
_PROCESSES = 1024
_PROCESS_TTL_NS = 1_000_000_000
#: how far the watermark stays behind a pass that read nothing (events in libebpfdivert's hand-over)
IDLE_LAG_NS = 20_000_000


def available() -> str | None:
    """None when the FLOW layer can be tried here; else why not (a sentence)."""
    if sys.platform == "win32":
        return None
    if sys.platform != "linux":
        return f"pydivert's FLOW layer does not exist on {sys.platform}"
    if os.geteuid() != 0:
        return "pydivert's FLOW layer (eBPF cgroup programs) needs root"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            if not any(" - cgroup2 " in line for line in f):
                return "pydivert's FLOW layer needs a cgroup2 mount and there is none"
    except OSError as exc:
        return f"/proc/self/mountinfo could not be read ({exc})"
    return None


def _address(words: Any, ipv6: bool) -> str:
    if not ipv6:
        return str(ipaddress.IPv4Address(int(words[0])))
    return str(ipaddress.IPv6Address(struct.pack("!IIII", words[3], words[2], words[1], words[0])))


class FlowConnectionSource:
    """A thread reading FLOW and SOCKET events; each outbound connection of a process in scope becomes a
    ``network.connect`` (through ``deliver``), unless the proxy intercepts it (:class:`ConnectionFilter`)."""

    name = "connections"

    def __init__(self, filter: ConnectionFilter, stats: ActivityStats, clock: Clock,
                 deliver: Callable[[Any, list[Event], int], bool], admit: Callable[[int | None], bool], *,
                 backend: Any = None) -> None:
        from oisp.interception._backend import current_backend

        self.filter = filter
        self._stats = stats
        self._clock = clock
        self._deliver = deliver
        self._admit = admit
        self._backend = backend or current_backend()
        self._connects: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._processes: collections.OrderedDict[int, tuple[int, ProcessFacts]] = collections.OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._replayed: list[Event] = []
        # opened here, so that a failure is the caller's to report (InterceptionError)
        self._flow = self._backend.open("tcp", _LAYER_FLOW, _FLAG_SNIFF | _FLAG_RECV_ONLY)
        try:
            self._socket = self._backend.open("tcp and event == CONNECT", _LAYER_SOCKET,
                                              _FLAG_SNIFF | _FLAG_RECV_ONLY)
        except Exception:
            with contextlib.suppress(Exception):
                self._flow.close()
            raise
        self._poller = self._backend.poller()
        self._poller.add(self._flow)
        self._poller.add(self._socket)

    def start(self) -> None:
        """Start the reader thread."""
        self._thread = threading.Thread(target=self._run, name="oisp-activity-flow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and close the handles (their programs are detached)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for handle in (self._flow, self._socket):
            with contextlib.suppress(Exception):
                self._poller.remove(handle)
            with contextlib.suppress(Exception):
                handle.close()
        with contextlib.suppress(Exception):
            self._poller.close()

    def replay(self, agent: int, since_ns: int) -> None:
        """``agent`` was just learned: its connections since ``since_ns`` are reported with the next pass."""
        found = self.filter.replay(agent, since_ns)
        events = [self._event(f, agent) for f in found]
        with self._lock:
            self._replayed += events

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poller.wait(0.02)
            mark = time.monotonic_ns() - IDLE_LAG_NS
            events: list[Event] = []
            try:
                newest = self.read(events)
            except Exception:
                log.exception("activity: reading flow events failed")
                newest = None
            if newest is not None and sys.platform == "linux":
                # libebpfdivert hands events over from its own thread: under load some queued before this pass
                # may not be receivable yet. They come in order, so everything up to the newest read is read.
                mark = min(mark, newest)
            with self._lock:
                if self._replayed:
                    events, self._replayed = self._replayed + events, []
            if not self._deliver(self, events, mark):
                break

    def _drain(self, handle: Any) -> list[Any]:
        out = []
        if sys.platform == "win32":  # the Windows poller's reader threads receive; they queue what they got
            for _ in range(_DRAIN):
                packet = self._poller.recv_nowait(handle)
                if packet is None:
                    break
                out.append(packet)
            return out
        for _ in range(_DRAIN):
            try:  # FLOW and SOCKET events have no payload: a small buffer (the default is 64 KiB per call)
                packet = handle.recv(bufsize=_EVENT_BUFFER, timeout=0)
            except TimeoutError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:  # shut down and drained
                    break
                raise
            out.append(packet)
        return out

    def read(self, out: list[Event]) -> int | None:
        """One pass: the flow events queued now, then the connect events (queued before their flows'); returns
        the newest kernel time of the events read (None: none were)."""
        flows = self._drain(self._flow)
        connects = self._drain(self._socket)
        newest = max((int(p.wd_addr.Timestamp) for p in (*flows, *connects)), default=None)
        for packet in connects:
            addr = packet.wd_addr
            if int(addr.Event) == _EV_SOCKET_CONNECT:
                data = addr.u.Socket
                self._connects[int(data.EndpointId)] = int(data.ProcessId)
                if len(self._connects) > _CONNECTS:
                    self._connects.popitem(last=False)
        for packet in flows:
            facts = self.decode(packet)
            if facts is None:
                continue
            agent = self.filter.admit(facts)
            if agent is None or not self._admit(agent or None):
                continue
            out.append(self._event(facts, agent))
        return newest

    def decode(self, packet: Any) -> ConnectFacts | None:
        """The facts of an outbound flow's ESTABLISHED event (None for others: accepted, deleted, unknown)."""
        addr = packet.wd_addr
        if int(addr.Event) != _EV_FLOW_ESTABLISHED:
            return None
        data = addr.u.Socket
        connecting = self._connects.pop(int(data.EndpointId), None)
        if connecting is None and not (sys.platform == "win32" and addr.Outbound):
            return None  # accepted, not connected (or its CONNECT was evicted)
        pid = int(data.ProcessId) or connecting or 0
        if pid <= 0:
            return None
        ipv6 = bool(addr.IPv6)
        ts = int(addr.Timestamp)
        if sys.platform == "win32" or ts <= 0:  # WinDivert's timestamps are QueryPerformanceCounter ticks
            ts = time.monotonic_ns()
        self._stats.connection_records += 1
        return ConnectFacts(pid, (_address(data.LocalAddr, ipv6), int(data.LocalPort)),
                            (_address(data.RemoteAddr, ipv6), int(data.RemotePort)), ts)

    def _event(self, facts: ConnectFacts, agent: int) -> Event:
        now = time.monotonic_ns()
        cached = self._processes.get(facts.pid)
        if cached is None or now - cached[0] > _PROCESS_TTL_NS or cached[1].agent != (agent or None):
            # a process's connections in a burst share what /proc says of it (read again after a second: an
            # exec may have changed it)
            cached = (now, connections.process_facts(facts.pid, agent))
            self._processes[facts.pid] = cached
            self._processes.move_to_end(facts.pid)
            if len(self._processes) > _PROCESSES:
                self._processes.popitem(last=False)
        return connections.connect_event(facts, cached[1], self._clock, point="flow_established")
