"""The target set: which (IP address, port) pairs are AI endpoints, kept current as DNS changes.

Targets are given as host names or patterns with an optional port (443 when omitted)::

    api.openai.com            *.openai.azure.com        bedrock-runtime.*.amazonaws.com
    localhost:11434           127.0.0.1:1234            [::1]:11434          203.0.113.9:8443

- IP literals are targets as they are.
- Exact names are resolved with :func:`socket.getaddrinfo` and re-resolved every ``refresh_interval`` seconds.
  The standard library does not report DNS TTLs, so this is a fixed, configurable interval; addresses a
  failed resolution would drop are kept until the next successful one.
- Every name (exact or wildcard) also learns addresses from DNS answers the interceptor sniffs
  (:meth:`TargetSet.learn`): that is the only way to know the addresses of wildcard patterns, and it catches
  the addresses a client was actually given when they differ from ours (round-robin, geo DNS). Learned
  addresses expire with their DNS TTL, clamped to ``[min_ttl, max_ttl]``.

Pattern semantics are those of :class:`oisp.endpoints.EndpointTable` (``*`` stays inside one DNS label).
Lookups (:meth:`TargetSet.contains`) read an immutable snapshot and are safe from any thread; updates are
serialized by a lock.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from oisp.endpoints import EndpointTable
from oisp.errors import ConfigurationError
from oisp.hookspecs import EndpointSpec
from oisp.interception.dns import DnsResponse, addresses_for

__all__ = ["Target", "TargetSet", "parse_target"]

logger = logging.getLogger(__name__)

#: ``getaddrinfo``-shaped resolver: (host, port, family, type) -> list of (family, type, proto, name, sockaddr).
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


@attrs.frozen
class Target:
    """One configured target: a host name, pattern or IP literal, and the TCP port it serves on."""

    host: str
    port: int = 443

    @property
    def is_pattern(self) -> bool:
        """True for wildcard patterns (their addresses are only learned from DNS answers)."""
        return "*" in self.host

    @property
    def is_ip(self) -> bool:
        """True when ``host`` is an IP literal."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_target(text: str) -> Target:
    """Parse ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal into a :class:`Target`."""
    raw = text.strip()
    if not raw:
        raise ConfigurationError("targets: an empty target was given; use a host name, pattern or IP")
    host, port = raw, 443
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise ConfigurationError(f"targets: {text!r} opens '[' but never closes it")
        host, rest = raw[1:close], raw[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigurationError(f"targets: {text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        port = _port(port_text, text)
    host = host.lower().rstrip(".")
    if not host:
        raise ConfigurationError(f"targets: {text!r} has no host")
    return Target(host, port)


def _port(text: str, original: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(f"targets: {original!r}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"targets: {original!r}: port {port} must be 1-65535")
    return port


def _packed(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


class TargetSet:
    """Which (address, port) pairs are AI endpoints; see the module documentation for how it stays current.

    ``version`` increases whenever the set of addresses changes, so a consumer can rebuild what depends on it.
    """

    def __init__(self, targets: Iterable[str | Target | EndpointSpec], *, refresh_interval: float = 60.0,
                 min_ttl: float = 30.0, max_ttl: float = 86400.0, resolver: Resolver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if refresh_interval <= 0:
            raise ConfigurationError("targets: refresh_interval must be a positive number of seconds")
        self._targets: list[Target] = []
        for item in targets:
            if isinstance(item, Target):
                target = item
            elif isinstance(item, EndpointSpec):
                target = Target(item.host.lower().rstrip("."), item.port)
            else:
                target = parse_target(item)
            if target not in self._targets:
                self._targets.append(target)
        if not self._targets:
            raise ConfigurationError("targets: at least one AI endpoint is needed")
        self._table = EndpointTable(EndpointSpec("target", t.host, t.port) for t in self._targets)
        self.refresh_interval = refresh_interval
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._resolver: Resolver = resolver or socket.getaddrinfo
        self._clock = clock
        self._lock = threading.Lock()
        self._resolved: dict[Target, frozenset[bytes]] = {}
        self._learned: dict[tuple[bytes, int], float] = {}
        #: The name each learned address was answered for (for reports: QUIC attempts name the host).
        self._learned_names: dict[bytes, str] = {}
        self._next_refresh = 0.0
        self._snapshot: frozenset[tuple[bytes, int]] = frozenset()
        self.version = 0
        with self._lock:
            for target in self._targets:
                if target.is_ip:
                    self._resolved[target] = frozenset({_packed(target.host)})
            self._publish()

    @classmethod
    def from_endpoints(cls, table: EndpointTable, **kwargs: Any) -> TargetSet:
        """A target set with every endpoint of ``table`` (the built-in table by default in the runner)."""
        return cls(table.hosts(), **kwargs)

    # -- queries --------------------------------------------------------------------------------------------

    @property
    def targets(self) -> tuple[Target, ...]:
        """The configured targets, in the order given."""
        return tuple(self._targets)

    @property
    def ports(self) -> frozenset[int]:
        """Every port some target serves on."""
        return frozenset(t.port for t in self._targets)

    def contains(self, packed_ip: bytes, port: int) -> bool:
        """True when ``packed_ip`` (4 or 16 bytes, as on the wire) on ``port`` is a target."""
        return (packed_ip, port) in self._snapshot

    def matches(self, ip: str, port: int) -> bool:
        """True when the text address ``ip`` on ``port`` is a target."""
        return self.contains(_packed(ip), port)

    def addresses(self) -> frozenset[tuple[bytes, int]]:
        """The current (packed address, port) pairs."""
        return self._snapshot

    def name_for(self, packed_ip: bytes) -> str | None:
        """The target host name an address belongs to (configured, or answered for in DNS), if known."""
        with self._lock:
            for target, addrs in self._resolved.items():
                if packed_ip in addrs:
                    return target.host
            return self._learned_names.get(packed_ip)

    def matches_name(self, name: str, port: int) -> bool:
        """True when the DNS name ``name`` on ``port`` is a target (exactly or through a pattern)."""
        return self._table.match(name, port) is not None

    # -- updates --------------------------------------------------------------------------------------------

    def refresh_due(self) -> bool:
        """True when the exact names should be resolved again."""
        return self._clock() >= self._next_refresh

    def refresh(self) -> bool:
        """Resolve every exact name now (blocking: call it off the packet path); True if the set changed."""
        results: dict[Target, frozenset[bytes]] = {}
        for target in self._targets:
            if target.is_pattern or target.is_ip:
                continue
            try:
                infos = self._resolver(target.host, target.port, 0, socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("cannot resolve AI endpoint %s (keeping its previous addresses): %s",
                               target.host, exc)
                continue
            results[target] = frozenset(_packed(str(info[4][0])) for info in infos)
        with self._lock:
            self._next_refresh = self._clock() + self.refresh_interval
            changed = False
            for target, addrs in results.items():
                if self._resolved.get(target) != addrs:
                    self._resolved[target] = addrs
                    changed = True
            return self._publish() if changed else False

    def learn(self, response: DnsResponse) -> bool:
        """Learn target addresses from a sniffed DNS answer; True if the set changed."""
        if response.rcode != 0 or not response.records:
            return False
        names = {*response.questions, *(r.name for r in response.records)}
        now = self._clock()
        new: dict[tuple[bytes, int], float] = {}
        host_of: dict[bytes, str] = {}
        for name in [*response.questions, *sorted(names - set(response.questions))]:
            ports = [port for port in self.ports if self.matches_name(name, port)]
            if not ports:
                continue
            for ip, ttl in addresses_for(response, name).items():
                expiry = now + min(max(float(ttl), self.min_ttl), self.max_ttl)
                packed = _packed(ip)
                host_of.setdefault(packed, name)
                for port in ports:
                    new[(packed, port)] = expiry
        if not new:
            return False
        with self._lock:
            added = any(key not in self._learned for key in new)
            for key, expiry in new.items():
                if expiry > self._learned.get(key, 0.0):
                    self._learned[key] = expiry
            self._learned_names.update(host_of)
            if added:
                logger.debug("learned %d AI endpoint address(es) from DNS", len(new))
            return self._publish() if added else False

    def expire(self) -> bool:
        """Forget learned addresses whose TTL has passed; True if the set changed."""
        now = self._clock()
        with self._lock:
            stale = [key for key, expiry in self._learned.items() if expiry <= now]
            for key in stale:
                del self._learned[key]
            if stale:
                kept = {addr for addr, _ in self._learned}
                self._learned_names = {a: n for a, n in self._learned_names.items() if a in kept}
            return self._publish() if stale else False

    def _publish(self) -> bool:
        pairs = {(addr, t.port) for t, addrs in self._resolved.items() for addr in addrs}
        pairs.update(self._learned)
        snapshot = frozenset(pairs)
        if snapshot == self._snapshot:
            return False
        self._snapshot = snapshot
        self.version += 1
        return True
