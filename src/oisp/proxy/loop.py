"""Refusing requests addressed to the proxy itself: forwarding them would connect to oisp, which would forward
them again, until every file descriptor is used."""

from __future__ import annotations

import ipaddress
import socket
import time

import anyio
import psutil

__all__ = ["SelfAddresses", "loop_response"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

def loop_response(target: str) -> bytes:
    """What a client gets for a request addressed to oisp itself: ``508 Loop Detected``, saying why."""
    body = (f"oisp: refused: {target} is oisp's own listening address; forwarding the request there would loop "
            f"back to oisp\n").encode("utf-8", "replace")
    return (b"HTTP/1.1 508 Loop Detected\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def _normal(text: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class SelfAddresses:
    """The addresses at which the proxy's listener can be reached: its bound address, or, for a wildcard bind,
    every address of every interface (and all of loopback)."""

    #: How long the interfaces' addresses are reused before they are read again.
    REFRESH = 5.0

    def __init__(self, bound: tuple[str, int]) -> None:
        self.port = bound[1]
        self.bound = _normal(bound[0])
        self._interfaces: set[_Address] = set()
        self._read_at = float("-inf")

    def _local(self) -> set[_Address]:
        now = time.monotonic()
        if now - self._read_at > self.REFRESH:
            found: set[_Address] = set()
            try:
                for addresses in psutil.net_if_addrs().values():
                    for address in addresses:
                        if address.family in (socket.AF_INET, socket.AF_INET6):
                            normal = _normal(str(address.address))
                            if normal is not None:
                                found.add(normal)
            except OSError:
                pass
            self._interfaces, self._read_at = found, now
        return self._interfaces

    def is_self(self, ip: str, port: int) -> bool:
        """Whether connecting to ``ip:port`` reaches the proxy's listener."""
        address = _normal(ip)
        if port != self.port or address is None or self.bound is None:
            return False
        if self.bound.is_unspecified:
            if self.bound.version == 4 and address.version == 6:
                return False  # an IPv4 wildcard listener is not reachable over IPv6
            return address.is_loopback or address.is_unspecified or address in self._local()
        if address.is_unspecified:  # connecting to 0.0.0.0 or :: reaches this machine's loopback
            return self.bound.is_loopback
        return address == self.bound

    async def targets_self(self, host: str, port: int) -> bool:
        """Whether ``host:port`` (a name is resolved) is one of the proxy's own listening addresses."""
        if port != self.port:
            return False  # the common case: nothing to resolve
        if _normal(host) is not None:
            return self.is_self(host, port)
        try:
            with anyio.fail_after(5):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return False  # the connect will fail the same way
        return any(self.is_self(str(info[4][0]), port) for info in infos)
