"""QUIC to AI endpoints in transparent mode: dropped, so that clients fall back to TCP (which is intercepted),
and reported once per (process, host) as a ``network.connect`` event with protocol ``udp``.

QUIC (HTTP/3) runs over UDP 443 and its TLS cannot be terminated by a TCP proxy. Browsers, Electron apps and
other HTTP/3 clients race or try QUIC first and fall back to TCP when it gets no answer; dropping their UDP
packets to AI endpoints makes them do that, and the connection they then open over TCP is diverted and decoded
like any other. ``[interception] block_quic = false`` leaves UDP alone (nothing is diverted or reported).

Two halves:

- :class:`QuicGuard` (sans-io, on the interceptor's packet thread): reads a diverted UDP packet's addresses,
  drops it when its destination is a target, and hands each new UDP flow (client address and port, destination)
  to a callback once; packets to other addresses (the filter falls back to ports when it has too many address
  ranges) are passed.
- :class:`QuicReporter` (off the packet path): finds the process behind each flow's socket, keeps one report
  per (process, host), and turns it into a :class:`~oisp.proxy.report.ConnectionReport` (decision
  ``quic_blocked``, protocol ``udp``) that the proxy's observer makes its ``network.connect`` event from.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = ["QUIC_PORTS", "QuicAttempt", "QuicGuard", "QuicReporter", "udp_flow"]

logger = logging.getLogger(__name__)

#: UDP ports QUIC to AI endpoints is looked for on.
QUIC_PORTS: Final = frozenset({443})
_UDP: Final = 17
_PORTS: Final = struct.Struct("!HH")
#: UDP flows remembered (so that each is reported once); the oldest are forgotten first.
_MAX_FLOWS: Final = 4096
#: (process, host) pairs remembered by the reporter.
_MAX_REPORTED: Final = 4096
#: Flows waiting for the reporter; beyond that, new flows are counted but not reported.
_MAX_PENDING: Final = 1024

FlowKey = tuple[bytes, int, bytes, int]


def udp_flow(raw: bytes | bytearray | memoryview) -> FlowKey | None:
    """``(source address, source port, destination address, destination port)`` of an IPv4 or IPv6 UDP packet
    (addresses packed), or None for anything else (IPv6 extension headers are not followed)."""
    if len(raw) < 28:
        return None
    version = raw[0] >> 4
    if version == 4:
        header = (raw[0] & 0x0F) * 4
        if raw[9] != _UDP or len(raw) < header + 8 or header < 20:
            return None
        src_port, dst_port = _PORTS.unpack_from(raw, header)
        return bytes(raw[12:16]), src_port, bytes(raw[16:20]), dst_port
    if version == 6 and len(raw) >= 48 and raw[6] == _UDP:
        src_port, dst_port = _PORTS.unpack_from(raw, 40)
        return bytes(raw[8:24]), src_port, bytes(raw[24:40]), dst_port
    return None


@attrs.frozen
class QuicAttempt:
    """A client's first UDP packet to an AI endpoint's QUIC port, which oisp dropped."""

    client: tuple[str, int]
    destination: tuple[str, int]
    #: The endpoint's host name, when the interceptor knows which target the address belongs to.
    host: str | None


class QuicGuard:
    """Decides about diverted UDP packets (sans-io; used on the interceptor's packet thread).

    ``is_target(packed_ip, port)`` says whether a destination is an AI endpoint, ``host_for(packed_ip)`` names
    it, and ``report`` receives each new flow's :class:`QuicAttempt` once (it must not block; its errors are
    logged and ignored).
    """

    def __init__(self, is_target: Callable[[bytes, int], bool], host_for: Callable[[bytes], str | None],
                 report: Callable[[QuicAttempt], None] | None = None, *, max_flows: int = _MAX_FLOWS) -> None:
        self._is_target = is_target
        self._host_for = host_for
        self._report = report
        self._max_flows = max_flows
        self._flows: collections.OrderedDict[FlowKey, None] = collections.OrderedDict()
        self.dropped = 0
        self.passed = 0
        self.flows = 0

    @staticmethod
    def is_udp(raw: bytes | bytearray | memoryview) -> bool:
        """Whether a packet is UDP (the one check a TCP packet pays)."""
        return len(raw) > 9 and ((raw[0] >> 4 == 4 and raw[9] == _UDP) or (raw[0] >> 4 == 6 and raw[6] == _UDP))

    def should_drop(self, raw: bytes | bytearray | memoryview) -> bool:
        """True when the packet is QUIC to an AI endpoint (drop it); False to let it go on."""
        flow = udp_flow(raw)
        if flow is None or flow[3] not in QUIC_PORTS or not self._is_target(flow[2], flow[3]):
            self.passed += 1
            return False
        self.dropped += 1
        if flow in self._flows:
            self._flows.move_to_end(flow)
            return True
        self._flows[flow] = None
        if len(self._flows) > self._max_flows:
            self._flows.popitem(last=False)
        self.flows += 1
        if self._report is not None:
            attempt = QuicAttempt(client=(_text(flow[0]), flow[1]), destination=(_text(flow[2]), flow[3]),
                                  host=self._host_for(flow[2]))
            try:
                self._report(attempt)
            except Exception:
                logger.exception("reporting a blocked QUIC attempt failed")
        return True


def _text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def udp_socket_inode(client: tuple[str, int], *, proc_net: Path = Path("/proc/net")) -> int | None:
    """The inode of the UDP socket bound to ``client`` (Linux, this network namespace's socket tables)."""
    ip = ipaddress.ip_address(client[0])
    port = f"{client[1]:04X}"
    if ip.version == 4:  # an IPv4 client may also be a dual-stack socket (an IPv4-mapped address in udp6)
        candidates = [("udp", ip.packed[::-1].hex().upper()), ("udp6", _v6_hex(b"\0" * 10 + b"\xff\xff" + ip.packed))]
    else:
        candidates = [("udp6", _v6_hex(ip.packed))]
    wildcards = {"00000000", "0" * 32}
    for table, address in candidates:
        with contextlib.suppress(OSError):
            for line in (proc_net / table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10:
                    continue
                local_ip, _, local_port = fields[1].partition(":")
                if local_port == port and (local_ip == address or local_ip in wildcards):
                    return int(fields[9]) or None
    return None


def _v6_hex(packed: bytes) -> str:
    """An IPv6 address as /proc/net/udp6 writes it: four 32-bit words, each in host (little-endian) order."""
    return "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4))


def pid_owning(inode: int) -> int | None:
    """The process holding the socket ``inode`` open (scans /proc; None when not found or not allowed)."""
    target = f"socket:[{inode}]"
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) == target:
                            return int(entry.name)
    return None


class QuicReporter:
    """Turns :class:`QuicAttempt` flows into one connection report per (process, host), off the packet path.

    :meth:`submit` is the :class:`QuicGuard`'s ``report`` callback (never blocks). :meth:`next_report` (blocking;
    run it in a worker thread) returns the next report to hand to the proxy's observer, or None once
    :meth:`close` was called. ``attributor`` (an :class:`oisp.attribution.Attributor`) describes the process;
    ``provider_for(host)`` names the endpoint's provider.
    """

    def __init__(self, attributor: Any = None, provider_for: Callable[[str], str | None] | None = None, *,
                 pid_for: Callable[[tuple[str, int]], int | None] | None = None) -> None:
        self._attributor = attributor
        self._provider_for = provider_for
        self._pid_for = pid_for or _pid_for_udp_client
        self._pending: queue.SimpleQueue[QuicAttempt | None] = queue.SimpleQueue()
        self._pending_count = 0
        self._lock = threading.Lock()
        self._reported: collections.OrderedDict[tuple[int | None, str], None] = collections.OrderedDict()
        self.lost = 0

    def submit(self, attempt: QuicAttempt) -> None:
        """Queue a new flow (from the packet thread)."""
        with self._lock:
            if self._pending_count >= _MAX_PENDING:
                self.lost += 1
                return
            self._pending_count += 1
        self._pending.put(attempt)

    def close(self) -> None:
        """Make :meth:`next_report` return None."""
        self._pending.put(None)

    def next_report(self) -> Any:
        """Block until a flow needs reporting; its :class:`~oisp.proxy.report.ConnectionReport` (None: closed).
        Flows of a (process, host) already reported are skipped."""
        while True:
            attempt = self._pending.get()
            if attempt is None:
                return None
            with self._lock:
                self._pending_count -= 1
            report = self.report_for(attempt)
            if report is not None:
                return report

    def report_for(self, attempt: QuicAttempt) -> Any:
        """The report of one flow, or None when its (process, host) was reported already."""
        from oisp.proxy.report import ConnectionReport, Decision

        pid = self._pid_for(attempt.client)
        host = attempt.host or attempt.destination[0]
        key = (pid, host)
        if key in self._reported:
            self._reported.move_to_end(key)
            return None
        self._reported[key] = None
        if len(self._reported) > _MAX_REPORTED:
            self._reported.popitem(last=False)
        report = ConnectionReport(
            connection_id=f"quic-{attempt.client[0]}:{attempt.client[1]}", mode="transparent",
            client_addr=attempt.client, target_host=host, target_port=attempt.destination[1],
            decision=Decision.QUIC_BLOCKED, success=False,
            error="QUIC (UDP) to an AI endpoint dropped by oisp; the client is expected to fall back to TCP",
            upstream_addr=attempt.destination, protocol="udp",
            provider=self._provider_for(host) if self._provider_for is not None else None, pid_hint=pid)
        if pid is not None and self._attributor is not None:
            from oisp.attribution import PidSource

            try:
                report.attach(self._attributor.describe(pid, source=PidSource.PROC_NET))
            except Exception:
                logger.exception("describing the process of a QUIC attempt failed")
        return report


def _pid_for_udp_client(client: tuple[str, int]) -> int | None:
    inode = udp_socket_inode(client)
    return pid_owning(inode) if inode is not None else None
