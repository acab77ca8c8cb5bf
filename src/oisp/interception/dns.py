"""A small sans-io DNS response parser: bytes of one DNS message in, the A/AAAA/CNAME answers out.

The interceptor sniffs DNS answers (UDP source port 53) to learn the addresses of AI endpoints given as
wildcard patterns (``*.openai.azure.com``), and of exact names whose addresses differ from what our own
resolver saw (round-robin, geo DNS). Only what that needs is parsed: the header, the questions, and the
answer/authority/additional records of type A, AAAA and CNAME (others are skipped by their length).

Why not dnspython: it is well kept, but this needs about a hundred lines, runs on every sniffed DNS packet,
must never raise on hostile input except :class:`~oisp.errors.ProtocolError`, and would add a dependency for
it. The parser bounds everything: name length, label count, compression-pointer jumps, record count.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from oisp.errors import ProtocolError

__all__ = ["TYPE_A", "TYPE_AAAA", "TYPE_CNAME", "DnsRecord", "DnsResponse", "addresses_for", "parse_dns_response"]

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
_CLASS_IN = 1
_MAX_JUMPS = 32
_MAX_NAME = 255
_MAX_RECORDS = 512


@attrs.frozen
class DnsRecord:
    """One answer: ``name`` (lower case, no trailing dot) has ``value`` (an IP text, or the CNAME target)."""

    name: str
    rtype: int
    ttl: int
    value: str


@attrs.frozen
class DnsResponse:
    """A parsed DNS response: the id, the question names, and the A/AAAA/CNAME records of every section."""

    id: int
    rcode: int
    questions: tuple[str, ...]
    records: tuple[DnsRecord, ...]


def _read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """The (possibly compressed) name at ``offset`` and the offset just after it in the original position."""
    labels: list[str] = []
    length = 0
    jumps = 0
    end: int | None = None
    pos = offset
    while True:
        if pos >= len(msg):
            raise ProtocolError("DNS: name runs past the end of the message")
        size = msg[pos]
        if size & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise ProtocolError("DNS: truncated compression pointer")
            jumps += 1
            if jumps > _MAX_JUMPS:
                raise ProtocolError("DNS: too many compression pointers (loop?)")
            if end is None:
                end = pos + 2
            pos = ((size & 0x3F) << 8) | msg[pos + 1]
            continue
        if size & 0xC0:
            raise ProtocolError(f"DNS: unsupported label type {size >> 6}")
        pos += 1
        if size == 0:
            break
        if pos + size > len(msg):
            raise ProtocolError("DNS: label runs past the end of the message")
        length += size + 1
        if length > _MAX_NAME:
            raise ProtocolError("DNS: name longer than 255 bytes")
        labels.append(msg[pos:pos + size].decode("ascii", errors="replace").lower())
        pos += size
    return ".".join(labels), (end if end is not None else pos)


def parse_dns_response(message: bytes) -> DnsResponse | None:
    """Parse one DNS message; None when it is a query rather than a response.

    Raises :class:`~oisp.errors.ProtocolError` when the bytes are not a well-formed DNS message.
    """
    if len(message) < 12:
        raise ProtocolError("DNS: message shorter than its 12-byte header")
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", message, 0)
    if not flags & 0x8000:
        return None
    if qdcount + ancount + nscount + arcount > _MAX_RECORDS:
        raise ProtocolError("DNS: too many records")
    pos = 12
    questions: list[str] = []
    for _ in range(qdcount):
        name, pos = _read_name(message, pos)
        if pos + 4 > len(message):
            raise ProtocolError("DNS: truncated question")
        pos += 4
        questions.append(name)
    records: list[DnsRecord] = []
    for _ in range(ancount + nscount + arcount):
        name, pos = _read_name(message, pos)
        if pos + 10 > len(message):
            raise ProtocolError("DNS: truncated resource record")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", message, pos)
        pos += 10
        if pos + rdlength > len(message):
            raise ProtocolError("DNS: resource data runs past the end of the message")
        rdata = message[pos:pos + rdlength]
        if rclass == _CLASS_IN:
            if rtype == TYPE_A and rdlength == 4:
                records.append(DnsRecord(name, rtype, ttl, str(ipaddress.IPv4Address(rdata))))
            elif rtype == TYPE_AAAA and rdlength == 16:
                records.append(DnsRecord(name, rtype, ttl, str(ipaddress.IPv6Address(rdata))))
            elif rtype == TYPE_CNAME:
                target, _ = _read_name(message, pos)
                records.append(DnsRecord(name, rtype, ttl, target))
        pos += rdlength
    return DnsResponse(ident, flags & 0xF, tuple(questions), tuple(records))


def addresses_for(response: DnsResponse, name: str, *, max_depth: int = 16) -> dict[str, int]:
    """The addresses ``name`` resolves to in ``response`` (following CNAMEs), each with its smallest TTL."""
    by_name: dict[str, list[DnsRecord]] = {}
    for record in response.records:
        by_name.setdefault(record.name, []).append(record)
    found: dict[str, int] = {}
    frontier = [(name.lower().rstrip("."), 2**31)]
    seen: set[str] = set()
    for _ in range(max_depth):
        next_frontier: list[tuple[str, int]] = []
        for current, ttl in frontier:
            if current in seen:
                continue
            seen.add(current)
            for record in by_name.get(current, ()):
                path_ttl = min(ttl, record.ttl)
                if record.rtype == TYPE_CNAME:
                    next_frontier.append((record.value, path_ttl))
                else:
                    found[record.value] = min(found.get(record.value, path_ttl), path_ttl)
        if not next_frontier:
            break
        frontier = next_frontier
    return found
