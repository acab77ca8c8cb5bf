"""Builds raw IPv4/IPv6 TCP packets and DNS messages for the sans-io tests."""

from __future__ import annotations

import ipaddress
import struct

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def tcp_packet(src: str, sport: int, dst: str, dport: int, flags: int = ACK, payload: bytes = b"") -> bytearray:
    """An IPv4 or IPv6 TCP segment (checksums left zero: the injector recomputes them)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, s.packed, d.packed)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s.packed, d.packed)
    return bytearray(ip + tcp)


def fields(packet: bytearray | memoryview) -> tuple[str, int, str, int]:
    """(source, source port, destination, destination port) of a packet made by :func:`tcp_packet`."""
    if packet[0] >> 4 == 4:
        src, dst, off = bytes(packet[12:16]), bytes(packet[16:20]), 20
    else:
        src, dst, off = bytes(packet[8:24]), bytes(packet[24:40]), 40
    sport, dport = struct.unpack_from("!HH", packet, off)
    return str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport


def dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\x00"


def dns_response(question: str, records: list[tuple[str, int, int, bytes]], *, rcode: int = 0,
                 ident: int = 7, compress_first: bool = True) -> bytes:
    """A DNS response; each record is (name, type, ttl, rdata). A record named like the question is compressed
    to a pointer at the question when ``compress_first``."""
    header = struct.pack("!6H", ident, 0x8180 | rcode, 1, len(records), 0, 0)
    body = dns_name(question) + struct.pack("!HH", 1, 1)
    for name, rtype, ttl, rdata in records:
        owner = b"\xc0\x0c" if compress_first and name == question else dns_name(name)
        body += owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
    return header + body


def a(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def aaaa(ip: str) -> bytes:
    return ipaddress.IPv6Address(ip).packed
