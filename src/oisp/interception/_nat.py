"""The NAT core (sans-io): decide and rewrite one captured outbound TCP packet, and keep the connection table.

Two shapes of diversion, both reversible per packet:

- **Remote destination** ``C:cport → D:dport``: the packet is turned into ``D:cport → C:proxy_port`` and
  re-injected *inbound*, so the proxy accepts a connection from ``D:cport``. The proxy's replies
  ``C:proxy_port → D:cport`` become ``D:dport → C:cport``, inbound to the client. (Re-injecting inbound with
  one of the machine's own addresses as source is dropped by the kernel; swapping keeps the source remote.)
- **Loopback destination** ``L:cport → L2:dport`` (Ollama on 127.0.0.1:11434): only the ports change,
  ``L:cport → L2:proxy_port`` and back, and the packets stay outbound on the loopback interface.

The table is keyed by full 4-tuples on both sides, bounded, and entries expire when the connection closes
(FIN both ways or RST seen here, or a FLOW-layer DELETED event) plus a linger time, or after an idle timeout.
Nothing here touches a socket or a clock of its own: bytes and times come in, verdicts go out.

**The fast path.** Once a connection is established (handshake seen, attribution looked for), its packets
without SYN, FIN or RST need nothing but the same rewrite each time: the addresses and ports, which in an IPv4
packet without options (bytes 12 to 24) and in an IPv6 packet without extension headers (bytes 8 to 44) lie
back to back. :meth:`Translator.outbound` records, for each such connection and direction, those header bytes
as captured and as rewritten in :attr:`NatTable.fast`, so a batch loop can translate such a packet with one
dictionary lookup and one slice assignment (:func:`fast_key`) instead of parsing it. An entry's fast keys go
when it is removed or marked closed; packets with SYN, FIN or RST, and packets whose TCP checksum is complete
(it would need the incremental update), always take :meth:`Translator.outbound`.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable

import attrs

__all__ = ["FAST_FLAGS", "FastRewrite", "FlowKey", "NatEntry", "NatTable", "Translator", "Verdict", "adjust_checksum",
           "fast_key", "parse_tcp"]

logger = logging.getLogger(__name__)

#: (source address, source port, destination address, destination port); addresses packed (4 or 16 bytes).
FlowKey = tuple[bytes, int, bytes, int]

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_PROTO_TCP = 6


class Verdict(enum.IntEnum):
    """What to do with a packet after :meth:`Translator.outbound`."""

    PASS = 0  # re-inject unchanged
    FORWARD = 1  # rewritten; re-inject in the direction it was captured (loopback)
    INBOUND = 2  # rewritten; re-inject as inbound
    DROP = 3  # do not re-inject


@attrs.define(slots=True, eq=False)
class NatEntry:
    """One diverted connection."""

    client_key: FlowKey  # as the client sends: client → original destination
    proxy_key: FlowKey  # as the proxy sees it: peer → listener
    loopback: bool
    ifindex: int
    created: float
    last_seen: float
    pid: int | None = None
    attributed: bool = False  # process attribution was looked for (found or not)
    fin_client: bool = False
    fin_proxy: bool = False
    closed_at: float | None = None
    #: This entry's keys in :attr:`NatTable.fast` (at most one per direction).
    fast_keys: list[bytes] = attrs.field(factory=list)

    @property
    def original(self) -> tuple[bytes, int]:
        """The original destination (packed address, port)."""
        return self.client_key[2], self.client_key[3]


def parse_tcp(buf: bytearray | bytes | memoryview) -> tuple[int, int, int] | None:
    """(address length, transport offset, TCP flags) of an IPv4/IPv6 TCP packet, or None for anything else.

    IPv6 extension headers and IPv4 fragments are not followed (returns None): such packets pass unchanged.
    """
    if len(buf) < 20:
        return None
    version = buf[0] >> 4
    if version == 4:
        ihl = (buf[0] & 0x0F) * 4
        if buf[9] != _PROTO_TCP or ihl < 20 or len(buf) < ihl + 20:
            return None
        if struct.unpack_from("!H", buf, 6)[0] & 0x1FFF:  # a non-first fragment has no TCP header
            return None
        return 4, ihl, buf[ihl + 13]
    if version == 6:
        if len(buf) < 60 or buf[6] != _PROTO_TCP:
            return None
        return 16, 40, buf[53]
    return None


#: TCP flags that always take the full path (they change the connection's state).
FAST_FLAGS = _SYN | _FIN | _RST


def fast_key(buf: bytearray | bytes | memoryview, start: int = 0,
             end: int | None = None) -> tuple[bytes, int, int] | None:
    """The fast-path key of the packet at ``buf[start:end]`` (its addresses and ports as bytes), where in ``buf``
    that key lies (first byte, end), or None when the packet cannot take the fast path (not TCP, IPv4 with
    options or fragmented, IPv6 with extension headers, too short, or SYN/FIN/RST set)."""
    size = (len(buf) if end is None else end) - start
    first = buf[start] if size > 0 else 0
    if first == 0x45 and size >= 40:  # IPv4 with a 20-byte header, and room for a TCP header (flags: byte 33)
        if buf[start + 9] != _PROTO_TCP or buf[start + 6] & 0x3F or buf[start + 7] or buf[start + 33] & FAST_FLAGS:
            return None
        return bytes(buf[start + 12:start + 24]), start + 12, start + 24
    if first >> 4 == 6 and size >= 60:  # IPv6, TCP right after the fixed header (flags: byte 53)
        if buf[start + 6] != _PROTO_TCP or buf[start + 53] & FAST_FLAGS:
            return None
        return bytes(buf[start + 8:start + 44]), start + 8, start + 44
    return None


def adjust_checksum(buf: bytearray | memoryview, at: int, old: int, new: int) -> None:
    """Update the 16-bit ones'-complement checksum at ``at`` for one 16-bit word of the summed data changing
    from ``old`` to ``new`` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), without summing the packet again."""
    total = (~struct.unpack_from("!H", buf, at)[0] & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", buf, at, ~total & 0xFFFF)


def _addrs(buf: bytearray | bytes | memoryview, alen: int) -> tuple[bytes, bytes]:
    if alen == 4:
        return bytes(buf[12:16]), bytes(buf[16:20])
    return bytes(buf[8:24]), bytes(buf[24:40])


def _set_addrs(buf: bytearray | memoryview, alen: int, src: bytes, dst: bytes) -> None:
    if alen == 4:
        buf[12:16] = src
        buf[16:20] = dst
    else:
        buf[8:24] = src
        buf[24:40] = dst


class NatTable:
    """The bounded table of diverted connections, indexed by the client's and by the proxy's 4-tuple."""

    def __init__(self, *, capacity: int = 65536, idle_timeout: float = 3600.0, close_linger: float = 30.0) -> None:
        if capacity < 1:
            raise ValueError("NAT capacity must be at least 1")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self.close_linger = close_linger
        self.by_client: dict[FlowKey, NatEntry] = {}
        self.by_proxy: dict[FlowKey, NatEntry] = {}
        #: The fast path: a packet's header bytes as captured (see :func:`fast_key`) → how to rewrite it.
        self.fast: dict[bytes, FastRewrite] = {}

    def __len__(self) -> int:
        return len(self.by_client)

    def add(self, entry: NatEntry) -> bool:
        """Insert ``entry``; False (nothing changed) when the table is full or the proxy key is taken."""
        old = self.by_client.get(entry.client_key)
        if old is not None:
            self.remove(old)
        taken = self.by_proxy.get(entry.proxy_key)
        if taken is not None:
            if taken.closed_at is None:
                return False
            self.remove(taken)
        if len(self.by_client) >= self.capacity:
            return False
        self.by_client[entry.client_key] = entry
        self.by_proxy[entry.proxy_key] = entry
        return True

    def remove(self, entry: NatEntry) -> None:
        """Forget ``entry`` (no error if it is already gone)."""
        if self.by_client.get(entry.client_key) is entry:
            del self.by_client[entry.client_key]
        if self.by_proxy.get(entry.proxy_key) is entry:
            del self.by_proxy[entry.proxy_key]
        self.forget_fast(entry)

    def clear(self) -> None:
        """Forget every entry."""
        self.by_client.clear()
        self.by_proxy.clear()
        self.fast.clear()

    def forget_fast(self, entry: NatEntry) -> None:
        """Send ``entry``'s packets through the full path again."""
        fast = self.fast
        for key in entry.fast_keys:
            known = fast.get(key)
            if known is not None and known[1] is entry:
                del fast[key]
        entry.fast_keys.clear()

    def remember_fast(self, entry: NatEntry, key: bytes, rewritten: bytes, verdict: Verdict) -> None:
        """Translate packets whose header bytes are ``key`` by writing ``rewritten`` over them (the fast path)."""
        if entry.closed_at is not None or key in self.fast:
            return
        self.fast[key] = (rewritten, entry, verdict)
        entry.fast_keys.append(key)

    def mark_closed(self, entry: NatEntry, now: float) -> None:
        """The connection is over; the entry stays ``close_linger`` seconds for its last packets."""
        if entry.closed_at is None:
            entry.closed_at = now
        self.forget_fast(entry)

    def expire(self, now: float) -> int:
        """Drop closed entries past their linger time and idle ones; returns how many went."""
        stale = [e for e in self.by_client.values()
                 if (e.closed_at is not None and now - e.closed_at >= self.close_linger)
                 or now - e.last_seen >= self.idle_timeout]
        for entry in stale:
            self.remove(entry)
        return len(stale)

    def original_addresses(self) -> set[tuple[bytes, int]]:
        """Original destinations of the entries still in the table (their packets must stay diverted)."""
        return {e.original for e in self.by_client.values()}


#: How the fast path rewrites a packet: the header bytes to write, the connection, the verdict.
FastRewrite = tuple[bytes, NatEntry, Verdict]


@attrs.define
class TranslatorStats:
    """Packet counters of a :class:`Translator`."""

    diverted_connections: int = 0
    translated: int = 0
    passed: int = 0
    dropped: int = 0
    refused_full: int = 0
    refused_collision: int = 0
    own_flows: int = 0
    #: Translated packets whose TCP checksum was updated incrementally (the others are left to the injector).
    checksums_updated: int = 0
    #: Of ``translated``, the packets a caller translated through :attr:`NatTable.fast` (it counts them here).
    fast_path: int = 0


class Translator:
    """Rewrites outbound TCP packets of diverted connections in place, using and maintaining a :class:`NatTable`.

    ``is_target(packed_ip, port)`` says whether a new connection should be diverted; ``is_own_flow(key)`` (for
    platforms without socket marks) says whether a SYN belongs to the proxy itself. ``enabled`` False lets
    new connections go direct (fail open) while existing entries keep being translated.
    """

    def __init__(self, table: NatTable, proxy_port: int, is_target: Callable[[bytes, int], bool],
                 *, is_own_flow: Callable[[FlowKey], bool] | None = None) -> None:
        self.table = table
        self.proxy_port = proxy_port
        self.is_target = is_target
        self.is_own_flow = is_own_flow
        self.target_ports: frozenset[int] = frozenset()
        self.enabled = True
        #: Facts about the packet of the last :meth:`outbound` call: its TCP flags, and whether it came from
        #: the client side (rather than from the proxy's listening port).
        self.last_flags = 0
        self.last_from_client = False
        self.stats = TranslatorStats()

    def outbound(self, buf: bytearray | memoryview, loopback: bool, ifindex: int,
                 now: float, *, checksum_valid: bool = False) -> tuple[Verdict, NatEntry | None]:
        """Decide about one captured outbound packet, rewriting ``buf`` when it belongs to a diverted flow.

        ``checksum_valid``: the packet's TCP checksum is complete (not left to offload); it is then kept valid
        by an incremental update for the port that changes. The addresses are swapped or kept, which changes
        neither the IPv4 header's sum nor the TCP pseudo-header's. Without it the checksum is left as it is,
        for the injector to compute.
        """
        parsed = parse_tcp(buf)
        if parsed is None:
            self.stats.passed += 1
            return Verdict.PASS, None
        alen, toff, flags = parsed
        src, dst = _addrs(buf, alen)
        sport, dport = struct.unpack_from("!HH", buf, toff)
        table = self.table
        self.last_flags = flags
        self.last_from_client = sport != self.proxy_port

        # The fast path may learn this packet's rewrite: an established connection, a plain segment, a checksum
        # left to the injector, no IP options or extension headers (addresses and ports back to back).
        fast_from, captured = -1, b""
        if not flags & FAST_FLAGS and not checksum_valid and (toff == 20 or alen == 16):
            fast_from = 12 if alen == 4 else 8
            captured = bytes(buf[fast_from:toff + 4])

        if sport == self.proxy_port:
            entry = table.by_proxy.get((dst, dport, src, sport))
            if entry is None:
                return self._orphan_reply(dst, loopback)
            entry.last_seen = now
            self._track(entry, flags, from_client=False, now=now)
            orig_port = entry.client_key[3]
            struct.pack_into("!H", buf, toff, orig_port)
            if checksum_valid:
                adjust_checksum(buf, toff + 16, sport, orig_port)
                self.stats.checksums_updated += 1
            self.stats.translated += 1
            verdict = Verdict.FORWARD if entry.loopback else Verdict.INBOUND
            if verdict is Verdict.INBOUND:
                _set_addrs(buf, alen, dst, src)
            if fast_from >= 0 and entry.attributed:
                table.remember_fast(entry, captured, bytes(buf[fast_from:toff + 4]), verdict)
            return verdict, entry

        key: FlowKey = (src, sport, dst, dport)
        entry = table.by_client.get(key)
        if entry is not None and flags & _SYN and not flags & _ACK and entry.closed_at is not None:
            table.remove(entry)  # the 4-tuple is being reused for a new connection
            entry = None
        if entry is None:
            if not (flags & _SYN) or flags & _ACK or not self.enabled or not self.is_target(dst, dport):
                self.stats.passed += 1
                return Verdict.PASS, None
            if self.is_own_flow is not None and self.is_own_flow(key):
                self.stats.own_flows += 1
                self.stats.passed += 1
                return Verdict.PASS, None
            proxy_key: FlowKey = (src, sport, dst, self.proxy_port) if loopback else (dst, sport, src, self.proxy_port)
            entry = NatEntry(client_key=key, proxy_key=proxy_key, loopback=loopback, ifindex=ifindex,
                             created=now, last_seen=now)
            if not table.add(entry):
                if len(table) >= table.capacity:
                    self.stats.refused_full += 1
                    logger.warning("NAT table full (%d connections): a new AI connection goes direct",
                                   table.capacity)
                else:
                    self.stats.refused_collision += 1
                    logger.info("4-tuple collision: a new AI connection goes direct")
                self.stats.passed += 1
                return Verdict.PASS, None
            self.stats.diverted_connections += 1
        entry.last_seen = now
        self._track(entry, flags, from_client=True, now=now)
        struct.pack_into("!H", buf, toff + 2, self.proxy_port)
        if checksum_valid:
            adjust_checksum(buf, toff + 16, dport, self.proxy_port)
            self.stats.checksums_updated += 1
        self.stats.translated += 1
        verdict = Verdict.FORWARD if entry.loopback else Verdict.INBOUND
        if verdict is Verdict.INBOUND:
            _set_addrs(buf, alen, dst, src)
        if fast_from >= 0 and entry.attributed:
            table.remember_fast(entry, captured, bytes(buf[fast_from:toff + 4]), verdict)
        return verdict, entry

    def _orphan_reply(self, dst: bytes, loopback: bool) -> tuple[Verdict, NatEntry | None]:
        # A reply from the proxy port with no entry, heading for a remote AI endpoint's address: it belongs to a
        # diverted connection we no longer know, and sent as is it would leak the proxy's port to that server.
        # (On loopback nothing can leak, and direct local connections to the listener must keep working.)
        if not loopback and any(self.is_target(dst, port) for port in self.target_ports):
            self.stats.dropped += 1
            return Verdict.DROP, None
        self.stats.passed += 1
        return Verdict.PASS, None

    def _track(self, entry: NatEntry, flags: int, *, from_client: bool, now: float) -> None:
        if flags & _RST:
            self.table.mark_closed(entry, now)
        elif flags & _FIN:
            if from_client:
                entry.fin_client = True
            else:
                entry.fin_proxy = True
            if entry.fin_client and entry.fin_proxy:
                self.table.mark_closed(entry, now)
