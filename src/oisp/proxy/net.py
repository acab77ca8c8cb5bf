"""Sockets for the proxy: the listener, upstream connections (with socket options set before connect), and a
stream that replays bytes already read."""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketListener, SocketStream

from oisp.errors import ConfigurationError

__all__ = ["PrefixedStream", "connect_tcp", "create_listener"]

logger = logging.getLogger(__name__)

#: Called with each upstream socket before it connects (loop prevention marks it so it is never diverted).
SocketHook = Callable[[socket.socket], None]


def describe(exc: BaseException) -> str:
    """An exception as text for a reason or an error field: its message, or its type's name when it has none
    (anyio's BrokenResourceError and EndOfStream have none)."""
    return str(exc) or type(exc).__name__


async def create_listener(host: str, port: int, *, max_segment: int | None = None,
                          backlog: int = 1024) -> SocketListener:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one).

    ``max_segment`` clamps TCP_MAXSEG (transparent mode on loopback: packets above 64 KiB are not diverted).
    """
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigurationError(f"listen: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if max_segment is not None and hasattr(socket, "TCP_MAXSEG"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, max_segment)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return await SocketListener.from_socket(sock)


async def connect_tcp(host: str, port: int, *, before_connect: SocketHook | None = None,
                      timeout: float = 10.0) -> SocketStream:
    """Connect to ``host:port`` (each resolved address in turn), running ``before_connect`` on each socket.

    Raises ``OSError`` with the last failure when no address accepts.
    """
    infos: Sequence[tuple[int, int, int, str, Any]]
    with anyio.fail_after(timeout):
        try:
            # An address needs no resolver: this answers at once, where anyio.getaddrinfo takes a worker thread.
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if before_connect is not None:
                    before_connect(sock)
                code = sock.connect_ex(sockaddr)
                if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", -1)):
                    raise OSError(code, f"connect to {host}:{port}: {errno.errorcode.get(code, code)}")
                if not _finished_connecting(sock):
                    await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, f"connect to {host}:{port}: {errno.errorcode.get(code, code)}")
                return await SocketStream.from_socket(sock)
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last or OSError(f"connect to {host}:{port}: no address")


def _finished_connecting(sock: socket.socket) -> bool:
    """Whether a non-blocking connect has already finished (on loopback it usually has), so no event loop round
    trip is needed to learn it. ``poll`` rather than ``select``: descriptors above 1023 are common in a proxy."""
    if sys.platform == "win32" or not hasattr(select, "poll"):  # the platform check is the one mypy understands
        return False
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


class PrefixedStream(ByteStream):
    """A byte stream that first returns ``prefix`` (bytes already read), then reads from ``inner``."""

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self):  # type: ignore[no-untyped-def]
        return self.inner.extra_attributes
