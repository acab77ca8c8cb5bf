"""The :class:`Interceptor`: diverts outbound TCP connections to AI endpoints to the local transparent proxy.

One background thread does all the packet work: it waits on the open handles (the NETWORK diversion, the
FLOW and SOCKET event layers for process attribution, and a DNS sniffer), rewrites packets of diverted
connections through the sans-io NAT core, learns target addresses from DNS answers, rebuilds the filter when
the target addresses change, and watches the proxy. A second thread re-resolves exact host names.

Failure behaviour:

- **Fails open.** When the proxy stops listening (or stops calling :meth:`Interceptor.heartbeat`, once it has
  called it), the NETWORK diversion is closed within ``liveness_interval`` seconds, so new connections go
  direct; it is reopened when the proxy is back. If this process dies, libebpfdivert's own heartbeat makes its
  filters pass everything within about 3 seconds.
- **Cleans up.** :meth:`Interceptor.stop` (also on interpreter exit, and on SIGTERM/SIGINT/SIGHUP when
  ``handle_signals`` is set) closes every handle, which detaches every filter. At :meth:`Interceptor.start`,
  filters of a crashed earlier run are reaped (Linux: needs bpffs at /sys/fs/bpf, mounted if missing).
- **No loops.** The proxy's upstream sockets must go through :func:`mark_upstream_socket`. If an upstream
  connection of the proxy comes back diverted anyway (it was not marked), the lookup refuses it.

QUIC: with ``block_quic`` (the default), UDP to the AI endpoints' port 443 is diverted too and dropped by a
:class:`~oisp.interception.quic.QuicGuard`, so that clients fall back to TCP; each new flow goes to ``on_quic``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ipaddress
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import attrs

from oisp import netns
from oisp.errors import ConfigurationError, InterceptionError, ProtocolError
from oisp.interception._backend import Backend, PacketBatch, Poller, current_backend
from oisp.interception._filter import DivertFilter, build_filter
from oisp.interception._nat import FlowKey, NatEntry, NatTable, Translator, Verdict, fast_key
from oisp.interception.dns import parse_dns_response
from oisp.interception.protocol import Address, OriginalDestination
from oisp.interception.quic import QUIC_PORTS, QuicAttempt, QuicGuard
from oisp.interception.targets import Target, TargetSet

__all__ = ["LOOPBACK_MAX_SEGMENT", "Interceptor", "InterceptorConfig"]

logger = logging.getLogger(__name__)

#: TCP_MAXSEG the proxy's transparent listener should use: on loopback, packets larger than 64 KiB (GSO) are
#: not diverted, and a clamped segment size keeps every packet of a diverted loopback connection below that.
LOOPBACK_MAX_SEGMENT = 32000

# WinDivert layers, flags and event numbers (the same on both backends).
_LAYER_NETWORK, _LAYER_FLOW, _LAYER_SOCKET = 0, 2, 3
_FLAG_SNIFF, _FLAG_RECV_ONLY = 1, 4
_EV_FLOW_ESTABLISHED, _EV_FLOW_DELETED, _EV_SOCKET_CONNECT, _EV_SOCKET_CLOSE = 1, 2, 4, 7
_BATCH = 256
_EVENT_DRAIN_MAX = 4096
_PID_CACHE = 65536
_SYN, _ACK = 0x02, 0x10
#: WINDIVERT_ADDRESS: the byte of its flags, their bits, and where a NETWORK packet's interface index is.
_ADDRESS_SIZE, _ADDRESS_FLAGS, _ADDRESS_IFINDEX = 80, 10, 16
_OUTBOUND, _LOOPBACK, _IP_CHECKSUM, _TCP_CHECKSUM = 0x02, 0x04, 0x20, 0x40


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigurationError(f"interception: {attribute.name} must be positive, not {value!r}")


def _port(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 < value < 65536:
        raise ConfigurationError(f"interception: {attribute.name} must be a TCP port (1-65535), not {value!r}")


def _tuple_or_none(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class InterceptorConfig:
    """How the :class:`Interceptor` diverts.

    ``proxy_port``: the port of the proxy's transparent listener (it must listen on the wildcard address,
    ``::``/``0.0.0.0``, since diverted connections arrive on the client's own address).
    ``interfaces``: interface names to divert on; None for every interface of this machine (of this network
    namespace). Loopback interfaces are added when a target is a loopback address (``localhost:11434``).
    ``refresh_interval``: seconds between re-resolutions of exact host names.
    ``sniff_dns``: learn target addresses from DNS answers (needed for wildcard patterns).
    ``attribute_processes``: open the FLOW and SOCKET layers to know each connection's process id.
    ``catch_new_syns``: divert SYNs to target ports so that addresses learned a moment ago are caught.
    ``max_filter_ranges``: address ranges per family kept in the kernel filter before falling back to ports.
    ``nat_capacity``/``idle_timeout``/``close_linger``: bounds of the connection table.
    ``liveness_interval``: how often the proxy is checked; ``heartbeat_timeout``: how stale its heartbeat may
    get, once it sends them.
    ``mount_bpffs``: mount bpffs at /sys/fs/bpf when missing (Linux; lets a crashed run be cleaned up).
    ``handle_signals``: stop (removing all filters) on SIGTERM, SIGINT and SIGHUP, then let the signal act.
    ``block_quic``: drop UDP to the AI endpoints' QUIC port (443) so that clients fall back to TCP.
    """

    proxy_port: int = attrs.field(validator=_port)
    interfaces: tuple[str, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    refresh_interval: float = attrs.field(default=60.0, validator=_positive)
    sniff_dns: bool = True
    attribute_processes: bool = True
    catch_new_syns: bool = True
    max_filter_ranges: int = attrs.field(default=48, validator=_positive)
    nat_capacity: int = attrs.field(default=65536, validator=_positive)
    idle_timeout: float = attrs.field(default=3600.0, validator=_positive)
    close_linger: float = attrs.field(default=30.0, validator=_positive)
    liveness_interval: float = attrs.field(default=0.5, validator=_positive)
    heartbeat_timeout: float = attrs.field(default=3.0, validator=_positive)
    mount_bpffs: bool = True
    handle_signals: bool = False
    block_quic: bool = True


def _packed(ip: str) -> bytes:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise ConfigurationError(f"interception: {ip!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.packed
    return addr.packed


def _text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _event_address(words: Any, ipv6: bool) -> bytes:
    """A FLOW/SOCKET-layer address (four host-order words, least significant first) as packed bytes."""
    if not ipv6:
        return struct.pack("!I", words[0])
    return struct.pack("!IIII", words[3], words[2], words[1], words[0])


class Interceptor:
    """Diverts outbound TCP to AI endpoints to the proxy, and answers its original-destination lookups.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Implements
    :class:`~oisp.interception.protocol.OriginalDestinationSource`.
    """

    def __init__(self, config: InterceptorConfig, targets: TargetSet | Iterable[str | Target], *,
                 proxy_alive: Callable[[], bool] | None = None, backend: Backend | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_quic: Callable[[QuicAttempt], None] | None = None) -> None:
        """``on_quic`` receives each new QUIC flow to an AI endpoint that was dropped (called on the packet
        thread: it must not block; :meth:`oisp.interception.quic.QuicReporter.submit` fits)."""
        self.config = config
        self.targets = targets if isinstance(targets, TargetSet) else TargetSet(
            targets, refresh_interval=config.refresh_interval)
        self._backend: Backend | None = backend
        self._proxy_alive_check = proxy_alive
        self._clock = clock
        self.table = NatTable(capacity=config.nat_capacity, idle_timeout=config.idle_timeout,
                              close_linger=config.close_linger)
        self._own_flows: collections.OrderedDict[FlowKey, float] = collections.OrderedDict()
        self._translator = Translator(self.table, config.proxy_port, self._is_target, is_own_flow=None)
        self._translator.target_ports = self.targets.ports
        self._quic = QuicGuard(self._is_target, self.targets.name_for, on_quic) if config.block_quic else None
        self._connect_pids: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self._thread: threading.Thread | None = None
        self._resolver_thread: threading.Thread | None = None
        self._poller: Poller | None = None
        #: Receives and re-injects NETWORK packets many at a time, where the backend can.
        self._batch: PacketBatch | None = None
        self._network: Any = None
        self._filter: DivertFilter | None = None
        self._filter_version = -1
        self._events: list[Any] = []
        self._dns: Any = None
        self._interfaces: list[str] | None = None
        self._diverting = threading.Event()
        self._last_heartbeat: float | None = None
        self._next_liveness = 0.0
        self._next_expiry = 0.0
        self._rebuild_wanted = False
        self._swapping = False
        self._last_rebuild = 0.0
        self._loop_warned = False
        self._failure: BaseException | None = None
        #: The network namespace diverted in (this thread's at start), held open for socket lookups in it.
        self._namespace: netns.HeldNamespace | None = None
        self._previous_handlers: dict[int, Any] = {}
        self.swaps = 0
        self.dns_answers = 0
        #: Batches received on the batch path, and the summed delay from the capture of each batch's first
        #: packet (its address's timestamp, CLOCK_MONOTONIC) to its receipt here: the packet thread's wake-up.
        self.batches = 0
        self._capture_delay_ns = 0
        #: Summed time from receiving each batch to having re-injected it (translation and injection).
        self._batch_busy_ns = 0

    # -- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> Interceptor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Open the event layers and the DNS sniffer, resolve the targets, and begin diverting once the proxy
        is live. Raises :class:`~oisp.errors.InterceptionError` when interception cannot start."""
        if self._started:
            raise InterceptionError("this interceptor is already started; create a new one to restart")
        self._started = True
        backend = self._backend = self._backend or current_backend()
        if not backend.uses_socket_marks:
            self._translator.is_own_flow = self._is_own_flow
        backend.prepare(mount_bpffs=self.config.mount_bpffs)
        # The diversion attaches to the interfaces of this thread's network namespace (its packet thread, made
        # here, inherits it): the diverted clients' sockets are in there.
        self._namespace = netns.hold_current()
        self._interfaces = self._choose_interfaces(backend)
        self._poller = backend.poller()
        make_batch = getattr(backend, "packet_batch", None)
        self._batch = make_batch() if make_batch is not None else None
        try:
            self.targets.refresh()
            if self.config.attribute_processes:
                self._open_events(backend)
            if self.config.sniff_dns:
                sniff_ifaces = None if self._interfaces is None else sorted(
                    {*self._interfaces, *backend.loopback_interfaces()})
                self._dns = backend.open("udp.SrcPort == 53 and (inbound or loopback)", _LAYER_NETWORK,
                                         _FLAG_SNIFF | _FLAG_RECV_ONLY, interfaces=sniff_ifaces)
                self._poller.add(self._dns)
            if self._proxy_alive():
                self._open_network()
            else:
                logger.warning("the proxy is not listening on port %d yet: nothing is diverted until it is",
                               self.config.proxy_port)
        except BaseException:
            self._close_all()
            raise
        atexit.register(self.stop)
        if self.config.handle_signals:
            self._install_signal_handlers()
        self._thread = threading.Thread(target=self._run, name="oisp-interceptor", daemon=True)
        self._thread.start()
        self._resolver_thread = threading.Thread(target=self._resolve_loop, name="oisp-resolver", daemon=True)
        self._resolver_thread.start()

    def stop(self) -> None:
        """Stop diverting and remove every filter (idempotent)."""
        if not self._started or self._stop.is_set():
            return
        self._stop.set()
        for thread in (self._thread, self._resolver_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
        self._close_all()
        self._restore_signal_handlers()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        logger.info("interception stopped; all filters removed")

    @property
    def diverting(self) -> bool:
        """True while new connections to AI endpoints are being diverted to the proxy."""
        return self._diverting.is_set()

    def wait_diverting(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until connections are being diverted; True if they are."""
        return self._diverting.wait(timeout)

    def heartbeat(self) -> None:
        """The proxy says it is alive; once called, silence longer than ``heartbeat_timeout`` fails open."""
        self._last_heartbeat = self._clock()

    # -- the original-destination protocol ------------------------------------------------------------------

    def original_destination(self, client: Address, local: Address) -> OriginalDestination | None:
        """Where the connection the proxy accepted from ``client`` on ``local`` was going (None: not diverted)."""
        key: FlowKey = (_packed(client[0]), int(client[1]), _packed(local[0]), int(local[1]))
        entry = self.table.by_proxy.get(key)
        if entry is None:
            return None
        if entry.pid is not None and entry.pid == os.getpid():
            if not self._loop_warned:
                self._loop_warned = True
                logger.error("the proxy's own upstream connection was diverted back to it: call "
                             "oisp.interception.mark_upstream_socket(sock) before connecting upstream")
            return None
        backend = self._backend
        interface = backend.interface_name(entry.ifindex) if backend is not None and entry.ifindex else None
        c_ip, c_port = entry.client_key[0], entry.client_key[1]
        o_ip, o_port = entry.original
        held = self._namespace
        return OriginalDestination(ip=_text(o_ip), port=o_port, pid=entry.pid, interface=interface,
                                   client=(_text(c_ip), c_port), loopback=entry.loopback,
                                   netns=held.namespace if held is not None else None)

    # -- statistics -----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: connections diverted, packets translated/passed/dropped (and translated through the fast
        path), filter swaps, DNS answers; batches received on the batch path and the summed delay from the
        capture of each batch's first packet to its receipt (``capture_delay_us``: the packet thread's wake-up
        latency, divided by ``batches``), and the summed time from receipt to re-injection (``batch_busy_us``)."""
        s = self._translator.stats
        return {
            "diverted_connections": s.diverted_connections,
            "translated_packets": s.translated,
            "checksums_updated": s.checksums_updated,
            "passed_packets": s.passed,
            "dropped_packets": s.dropped,
            "refused_table_full": s.refused_full,
            "refused_collision": s.refused_collision,
            "own_flows_passed": s.own_flows,
            "nat_entries": len(self.table),
            "filter_swaps": self.swaps,
            "dns_answers": self.dns_answers,
            "target_addresses": len(self.targets.addresses()),
            "quic_dropped_packets": self._quic.dropped if self._quic is not None else 0,
            "quic_flows": self._quic.flows if self._quic is not None else 0,
            "fast_path_packets": s.fast_path,
            "batches": self.batches,
            "capture_delay_us": self._capture_delay_ns // 1000,
            "batch_busy_us": self._batch_busy_ns // 1000,
        }

    @property
    def filter(self) -> str | None:
        """The diversion filter in force, or None while nothing is diverted."""
        return self._filter.text if self._filter is not None and self._network is not None else None

    # -- setup helpers --------------------------------------------------------------------------------------

    def _choose_interfaces(self, backend: Backend) -> list[str] | None:
        if self.config.interfaces is None:
            return None
        chosen = list(self.config.interfaces)
        wants_loopback = any(
            t.host == "localhost" or (t.is_ip and ipaddress.ip_address(t.host).is_loopback)
            for t in self.targets.targets)
        if wants_loopback:
            chosen += [name for name in backend.loopback_interfaces() if name not in chosen]
        return chosen

    def _open_events(self, backend: Backend) -> None:
        ports = " or ".join(f"remotePort == {p}" for p in sorted(self.targets.ports))
        try:
            flow = backend.open(f"tcp and ({ports})", _LAYER_FLOW, _FLAG_SNIFF | _FLAG_RECV_ONLY)
            sock = backend.open(f"tcp and (event == CONNECT or event == CLOSE) and ({ports})", _LAYER_SOCKET,
                                _FLAG_SNIFF | _FLAG_RECV_ONLY)
        except InterceptionError as exc:
            for handle in self._events:
                with contextlib.suppress(Exception):
                    handle.close()
            self._events = []
            logger.warning("the FLOW/SOCKET layers are unavailable (%s): connections are diverted without pids "
                           "from them; processes are found by looking each client's socket up by its original "
                           "addresses instead", exc)
            return
        self._events = [flow, sock]
        assert self._poller is not None
        for handle in self._events:
            self._poller.add(handle)

    def _wanted_filter(self) -> DivertFilter:
        addresses = set(self.targets.addresses()) | self.table.original_addresses()
        return build_filter(addresses, self.targets.ports, self.config.proxy_port,
                            catch_syns=self.config.catch_new_syns, max_ranges=self.config.max_filter_ranges,
                            udp_ports=QUIC_PORTS & self.targets.ports if self._quic is not None else ())

    def _open_network(self) -> None:
        """Open the NETWORK diversion with the current filter (replacing one that is open, without a gap)."""
        backend, poller = self._backend, self._poller
        assert backend is not None and poller is not None
        version = self.targets.version
        wanted = self._wanted_filter()
        new = backend.open(wanted.text, _LAYER_NETWORK, 0, interfaces=self._interfaces)
        old, self._network, self._filter = self._network, new, wanted
        self._filter_version = version
        poller.add(new)
        if old is not None:
            self._swapping = True
            # The old handle stops capturing (its programs pass everything on to the new one); what it had
            # already captured is still translated and re-injected through it, then it is closed.
            backend.shutdown_recv(old)
            poller.remove(old)
            for _ in range(100_000):
                packet = poller.recv_nowait(old)
                if packet is None:
                    break
                self._on_network_packet(old, packet)
            old.close()
            self._swapping = False
            self.swaps += 1
        self._translator.target_ports = self.targets.ports
        self._translator.enabled = True
        self._diverting.set()
        logger.debug("diversion filter: %s", wanted.text)

    def _close_network(self) -> None:
        self._diverting.clear()
        self._translator.enabled = False
        handle, self._network = self._network, None
        if handle is not None:
            if self._poller is not None:
                self._poller.remove(handle)
            with contextlib.suppress(Exception):
                handle.close()
        self.table.clear()

    def _close_all(self) -> None:
        with self._lock:
            self._close_network()
            for handle in [*self._events, self._dns]:
                if handle is None:
                    continue
                if self._poller is not None:
                    with contextlib.suppress(Exception):
                        self._poller.remove(handle)
                with contextlib.suppress(Exception):
                    handle.close()
            self._events, self._dns = [], None
            if self._poller is not None:
                self._poller.close()
            if self._namespace is not None:
                self._namespace.close()
                self._namespace = None

    # -- the packet thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = self._poller
        assert poller is not None
        try:
            while not self._stop.is_set():
                for handle in poller.wait(0.1):
                    self._drain(handle)
                self._housekeeping()
        except BaseException as exc:  # the thread must not die silently with filters holding traffic
            self._failure = exc
            logger.exception("interception failed; removing all filters (traffic goes direct)")
            self._close_all()

    def _drain(self, handle: Any) -> None:
        poller = self._poller
        assert poller is not None
        if handle is self._network and self._batch is not None:
            self._drain_network(handle, self._batch)
            return
        for _ in range(_BATCH):
            # A filter swap while handling a packet closes the handle being drained: stop with it.
            if handle is self._network:
                kind = "network"
            elif handle is self._dns:
                kind = "dns"
            elif any(handle is h for h in self._events):
                kind = "event"
            else:
                return
            packet = poller.recv_nowait(handle)
            if packet is None:
                return
            if kind == "network":
                self._on_network_packet(handle, packet)
            elif kind == "dns":
                self._on_dns_packet(packet)
            else:
                self._on_event(packet)

    def _drain_network(self, handle: Any, batch: PacketBatch) -> None:
        """Translate what waits on the NETWORK handle a batch at a time: one call to receive up to a few hundred
        packets, each rewritten where it lies, one call to re-inject them (split only around a packet that is
        dropped, or a SYN that changes the filter)."""
        translator = self._translator
        outbound = translator.outbound
        fast = self.table.fast
        quic = self._quic
        for _ in range(4):  # then the event and DNS handles get their turn
            count = batch.receive(handle)
            if not count:
                return
            now = self._clock()
            view, addresses, offsets = batch.view, batch.addresses, batch.offsets
            self.batches += 1
            received_ns = time.monotonic_ns()
            self._capture_delay_ns += received_ns - int.from_bytes(addresses[0:8], "little", signed=True)
            unsent = 0  # the first packet not re-injected yet
            fast_count = 0
            for i in range(count):
                at = i * _ADDRESS_SIZE
                flags_at = at + _ADDRESS_FLAGS
                address_flags = addresses[flags_at]
                valid = bool(address_flags & _TCP_CHECKSUM)
                if not valid:  # the fast path: an established connection's plain segment (see _nat.py)
                    found = fast_key(view, offsets[i], offsets[i + 1])
                    rewrite = fast.get(found[0]) if found is not None else None
                    if rewrite is not None and found is not None:
                        view[found[1]:found[2]] = rewrite[0]
                        rewrite[1].last_seen = now
                        address_flags &= ~(_IP_CHECKSUM | _TCP_CHECKSUM)  # computed by the injector
                        if rewrite[2] is Verdict.INBOUND:
                            address_flags &= ~_OUTBOUND
                        addresses[flags_at] = address_flags
                        fast_count += 1
                        continue
                if quic is not None and quic.is_udp(view[offsets[i]:offsets[i] + 10]):
                    # QUIC to an AI endpoint: dropped (quic.py), as on the one-packet path
                    if quic.should_drop(view[offsets[i]:offsets[i + 1]]):
                        batch.send(handle, unsent, i)
                        unsent = i + 1
                    continue
                verdict, entry = outbound(view[offsets[i]:offsets[i + 1]], bool(address_flags & _LOOPBACK),
                                          int.from_bytes(addresses[at + _ADDRESS_IFINDEX:at + _ADDRESS_IFINDEX + 4],
                                                         "little"), now, checksum_valid=valid)
                if verdict is Verdict.PASS:
                    continue
                if verdict is Verdict.DROP:
                    batch.send(handle, unsent, i)
                    unsent = i + 1
                    continue
                if not valid:  # left for the injector to compute (the IPv4 header's too, as before)
                    address_flags &= ~(_IP_CHECKSUM | _TCP_CHECKSUM)
                if verdict is Verdict.INBOUND:
                    address_flags &= ~_OUTBOUND
                addresses[flags_at] = address_flags
                flags = translator.last_flags
                if entry is None or not flags & (_SYN | _ACK) or (entry.attributed and not flags & _SYN):
                    continue
                if self._handshake_step(entry, flags):
                    batch.send(handle, unsent, i)  # what came before goes out through the old handle
                    unsent = i
                    self._open_network()
                    handle = self._network  # this SYN, and the rest, through the handle that now diverts
            if fast_count:
                translator.stats.translated += fast_count
                translator.stats.fast_path += fast_count
            batch.send(handle, unsent, count)
            self._batch_busy_ns += time.monotonic_ns() - received_ns
            if handle is not self._network:
                return

    def _on_network_packet(self, handle: Any, packet: Any) -> None:
        quic = self._quic
        if quic is not None and quic.is_udp(packet.raw):  # QUIC to an AI endpoint: dropped (quic.py)
            if not quic.should_drop(packet.raw):
                handle.send(packet, recalculate_checksum=False)
            return
        addr = packet.wd_addr
        translator = self._translator
        verdict, entry = translator.outbound(packet.raw, bool(addr.Loopback), int(addr.u.Network.IfIdx),
                                             self._clock())
        if verdict is Verdict.PASS:
            handle.send(packet, recalculate_checksum=False)
            return
        if verdict is Verdict.DROP:
            return
        if entry is not None and self._handshake_step(entry, translator.last_flags):
            self._open_network()
            handle = self._network  # the SYN goes out through the handle that now diverts its flow
        addr.IPChecksum = 0
        addr.TCPChecksum = 0
        if verdict is Verdict.INBOUND:
            addr.Outbound = 0
        handle.send(packet, recalculate_checksum=False)

    def _handshake_step(self, entry: NatEntry, flags: int) -> bool:
        """What a translated handshake packet of ``entry`` asks of the packet loop (both paths): the client's
        handshake ACK makes its FLOW event due (read it now); a SYN diverted through the SYN catch needs its
        address in the filter. True when the NETWORK handle must be reopened before this packet is sent."""
        if not entry.attributed and self._translator.last_from_client and not flags & _SYN:
            # The client's handshake ACK: its socket is established, so the FLOW event is already queued.
            self._drain_events()
            entry.attributed = True
        if flags & _SYN and not flags & _ACK and self._filter is not None \
                and not self._filter.covers(*entry.original):
            # Diverted through the SYN catch: the rest of the connection needs the address in the filter.
            if not self._swapping:
                return True
            self._rebuild_wanted = True
        return False

    def _drain_events(self) -> None:
        poller = self._poller
        if poller is None:
            return
        for handle in self._events:
            for _ in range(_EVENT_DRAIN_MAX):
                event = poller.recv_nowait(handle)
                if event is None:
                    break
                self._on_event(event)

    def _on_event(self, packet: Any) -> None:
        addr = packet.wd_addr
        data = addr.u.Socket  # the FLOW and SOCKET unions share this layout
        layer, event = int(addr.Layer), int(addr.Event)
        pid = int(data.ProcessId) or None
        endpoint = int(data.EndpointId)
        if layer == _LAYER_SOCKET:
            if event == _EV_SOCKET_CONNECT:
                if pid is not None:
                    self._connect_pids[endpoint] = pid
                    if len(self._connect_pids) > _PID_CACHE:
                        self._connect_pids.popitem(last=False)
                if pid == os.getpid() and self._translator.is_own_flow is not None:
                    self._remember_own_flow(data, bool(addr.IPv6))
            elif event == _EV_SOCKET_CLOSE:
                self._connect_pids.pop(endpoint, None)
            return
        if layer != _LAYER_FLOW:
            return
        ipv6 = bool(addr.IPv6)
        key: FlowKey = (_event_address(data.LocalAddr, ipv6), int(data.LocalPort),
                        _event_address(data.RemoteAddr, ipv6), int(data.RemotePort))
        entry = self.table.by_client.get(key)
        if event == _EV_FLOW_ESTABLISHED:
            if entry is not None:
                entry.pid = pid or self._connect_pids.get(endpoint)
                entry.attributed = True
        elif event == _EV_FLOW_DELETED:
            if entry is not None:
                self.table.mark_closed(entry, self._clock())
            self._connect_pids.pop(endpoint, None)

    def _remember_own_flow(self, data: Any, ipv6: bool) -> None:
        key: FlowKey = (_event_address(data.LocalAddr, ipv6), int(data.LocalPort),
                        _event_address(data.RemoteAddr, ipv6), int(data.RemotePort))
        self._own_flows[key] = self._clock()
        if len(self._own_flows) > _PID_CACHE:
            self._own_flows.popitem(last=False)

    def _is_own_flow(self, key: FlowKey) -> bool:
        if key not in self._own_flows:
            self._drain_events()  # the proxy's CONNECT event precedes its SYN
        return key in self._own_flows

    def _is_target(self, packed_ip: bytes, port: int) -> bool:
        if self.targets.contains(packed_ip, port):
            return True
        if self._dns is not None and port in self.targets.ports and self._drain_dns():
            return self.targets.contains(packed_ip, port)
        return False

    def _drain_dns(self) -> bool:
        """Fold in DNS answers already captured (they precede any connection made with them)."""
        poller, before = self._poller, self.targets.version
        if poller is None or self._dns is None:
            return False
        for _ in range(_BATCH):
            packet = poller.recv_nowait(self._dns)
            if packet is None:
                break
            self._on_dns_packet(packet)
        return self.targets.version != before

    def _on_dns_packet(self, packet: Any) -> None:
        raw = bytes(packet.raw)
        if not raw:
            return
        if raw[0] >> 4 == 4:
            offset = (raw[0] & 0x0F) * 4 + 8
        elif raw[0] >> 4 == 6 and len(raw) > 6 and raw[6] == 17:
            offset = 48
        else:
            return
        try:
            response = parse_dns_response(raw[offset:])
        except ProtocolError as exc:
            logger.debug("ignoring a malformed DNS answer: %s", exc)
            return
        if response is None:
            return
        self.dns_answers += 1
        if self.targets.learn(response):
            self._rebuild_wanted = True

    # -- housekeeping ---------------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = self._clock()
        if now >= self._next_liveness:
            self._next_liveness = now + self.config.liveness_interval
            alive = self._proxy_alive()
            if alive and self._network is None:
                logger.info("the proxy is listening on port %d: diverting AI connections to it",
                            self.config.proxy_port)
                self._open_network()
            elif not alive and self._network is not None:
                logger.warning("the proxy on port %d stopped answering: diversion removed, connections go "
                               "direct (fail open)", self.config.proxy_port)
                self._close_network()
        if now >= self._next_expiry:
            self._next_expiry = now + 1.0
            self.table.expire(now)
            if self.targets.expire():
                self._rebuild_wanted = True
        if self._network is not None and (self._rebuild_wanted or self.targets.version != self._filter_version) \
                and now - self._last_rebuild >= 1.0:
            self._rebuild_wanted = False
            self._last_rebuild = now
            if self._wanted_filter().text != (self._filter.text if self._filter else None):
                self._open_network()
            else:
                self._filter_version = self.targets.version

    def _proxy_alive(self) -> bool:
        if self._last_heartbeat is not None and self._clock() - self._last_heartbeat > self.config.heartbeat_timeout:
            return False
        if self._proxy_alive_check is not None:
            try:
                return bool(self._proxy_alive_check())
            except Exception:
                logger.exception("the proxy liveness check failed; treating the proxy as down")
                return False
        backend = self._backend
        return backend is not None and backend.listener_alive(self.config.proxy_port)

    def _resolve_loop(self) -> None:
        while not self._stop.wait(1.0):
            if self.targets.refresh_due():
                try:
                    self.targets.refresh()
                except Exception:
                    logger.exception("re-resolving the AI endpoints failed")

    # -- signals --------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("handle_signals needs start() on the main thread; signals are not handled")
            return
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            self._previous_handlers[int(sig)] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.stop()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

