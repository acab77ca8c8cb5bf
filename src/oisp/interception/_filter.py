"""Builds the diversion filter (WinDivert filter language) from the target addresses.

The kernel side of libebpfdivert runs a filter exactly only while it lowers to at most 64 conjunctive rules
per address family; a larger one is widened and every packet it lets through is checked in user space. So
addresses go into the filter while they fit (contiguous ones merged into ranges, at most ``max_ranges`` per
family); past that, that family falls back to "any address on a target port", and the interceptor checks the
address in Python for new connections (slower for all traffic on those ports, but never wrong).

Three kinds of packets are diverted, all outbound TCP:

1. packets to a target address and port (the connections being diverted);
2. optionally, SYNs to any target port: a connection to an address learned from DNS a moment ago is diverted
   even before the filter has been rebuilt to include it (only SYNs, so other traffic is unaffected);
3. packets from the proxy's listening port (its side of diverted connections).

With ``udp_ports`` (the QUIC guard, :mod:`oisp.interception.quic`), outbound UDP to the target addresses on
those ports (443: QUIC) is diverted too, so that it can be dropped and reported; the interceptor hands those
packets to the guard before anything else looks at them.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from typing import cast

import attrs

__all__ = ["DivertFilter", "build_filter"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class DivertFilter:
    """A filter string and what it covers: the (address, port) pairs in it, and the families left to Python."""

    text: str
    addresses: frozenset[tuple[bytes, int]]
    port_only_families: frozenset[int]

    def covers(self, packed_ip: bytes, port: int) -> bool:
        """True when packets to ``packed_ip:port`` are diverted by this filter (not only their SYNs)."""
        family = 4 if len(packed_ip) == 4 else 6
        return family in self.port_only_families or (packed_ip, port) in self.addresses


def _ranges(addresses: Iterable[IPAddress]) -> list[tuple[IPAddress, IPAddress]]:
    out: list[tuple[IPAddress, IPAddress]] = []
    nets = cast(Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                ipaddress.collapse_addresses(sorted(addresses)))
    for net in nets:
        first, last = net.network_address, net.broadcast_address
        if out and int(out[-1][1]) + 1 == int(first):
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def _term(field: str, first: IPAddress, last: IPAddress) -> str:
    if first == last:
        return f"{field} == {first}"
    return f"({field} >= {first} and {field} <= {last})"


def build_filter(addresses: Iterable[tuple[bytes, int]], ports: Iterable[int], proxy_port: int, *,
                 catch_syns: bool = True, max_ranges: int = 48, udp_ports: Iterable[int] = ()) -> DivertFilter:
    """The filter diverting ``addresses`` (packed address, port), SYNs to ``ports`` and the proxy's replies;
    and UDP to the addresses on ``udp_ports`` (QUIC)."""
    by_family_port: dict[int, dict[int, list[IPAddress]]] = {4: defaultdict(list), 6: defaultdict(list)}
    for packed, port in addresses:
        addr = ipaddress.ip_address(packed)
        by_family_port[addr.version][port].append(addr)
    terms: list[str] = []
    udp_terms: list[str] = []
    quic_ports = sorted(set(udp_ports))
    covered: set[tuple[bytes, int]] = set()
    port_only: set[int] = set()
    all_ports = sorted(set(ports) | {p for fam in by_family_port.values() for p in fam})
    for family, field, proto in ((4, "ip.DstAddr", "ip"), (6, "ipv6.DstAddr", "ipv6")):
        per_port = {port: _ranges(addrs) for port, addrs in by_family_port[family].items() if addrs}
        if sum(len(r) for r in per_port.values()) > max_ranges:
            port_only.add(family)
            terms += [f"({proto} and tcp.DstPort == {port})" for port in all_ports]
            udp_terms += [f"({proto} and udp.DstPort == {port})" for port in quic_ports]
            continue
        # UDP's address terms share the budget; past it, UDP of this family is checked in Python by port.
        udp_exact = sum(len(r) for p, r in per_port.items() if p in quic_ports) \
            + sum(len(r) for r in per_port.values()) <= max_ranges
        if not udp_exact:
            udp_terms += [f"({proto} and udp.DstPort == {port})" for port in quic_ports]
        for port, ranges in sorted(per_port.items()):
            alternatives = " or ".join(_term(field, first, last) for first, last in ranges)
            terms.append(f"(tcp.DstPort == {port} and ({alternatives}))")
            if udp_exact and port in quic_ports:
                udp_terms.append(f"(udp.DstPort == {port} and ({alternatives}))")
            covered.update((a.packed, port) for a in by_family_port[family][port])
    if catch_syns and all_ports:
        port_terms = " or ".join(f"tcp.DstPort == {port}" for port in all_ports)
        terms.append(f"(tcp.Syn and not tcp.Ack and ({port_terms}))")
    terms.append(f"tcp.SrcPort == {proxy_port}")
    text = "outbound and tcp and (" + " or ".join(terms) + ")"
    if udp_terms:
        text = ("outbound and ((tcp and (" + " or ".join(terms) + ")) or (udp and ("
                + " or ".join(udp_terms) + ")))")
    return DivertFilter(text, frozenset(covered), frozenset(port_only))
