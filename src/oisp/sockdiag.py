"""Finding one TCP socket by its 4-tuple with the kernel's sock_diag netlink interface (Linux): one exact lookup,
whatever the number of sockets, answered for the network namespace the netlink socket was created in.

:func:`diag_inode` asks about the caller's own namespace (a fresh netlink socket per question, so threads never
share one). :class:`NamespaceSockDiag` asks about another namespace: its netlink socket is created inside that
namespace (:func:`oisp.netns.run_inside`) and kept, and questions on it take turns.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
import sys
import threading

from oisp.netns import NetworkNamespace, run_inside

__all__ = ["NamespaceSockDiag", "diag_inode", "tcp_listening"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_TCPF_LISTEN = 1 << 10
_NLMSG_HEADER = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, extensions, pad, states; then inet_diag_sockid: source and destination
#: port (network order), source and destination address (16 bytes each), interface, cookie (two words).
_DIAG_REQUEST = struct.Struct("=BBBBIHH16s16sIII")
#: inet_diag_msg: family, state, timer, retransmits, the sockid (48 bytes), expires, rqueue, wqueue, uid, inode.
_DIAG_MESSAGE = struct.Struct("=BBBB48sIIIII")
_NO_COOKIE = 0xFFFFFFFF
_TIMEOUT = 1.0
_sequence = itertools.count(1)


def _norm_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


def _request(local: tuple[str, int], remote: tuple[str, int], sequence: int) -> bytes | None:
    """The netlink message asking for the TCP socket ``local`` → ``remote`` (None: mixed address families)."""
    source, destination = ipaddress.ip_address(_norm_ip(local[0])), ipaddress.ip_address(_norm_ip(remote[0]))
    if source.version != destination.version:
        return None
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF, socket.htons(local[1]),
                                 socket.htons(remote[1]),
                                 source.packed.ljust(16, b"\0"), destination.packed.ljust(16, b"\0"), 0,
                                 _NO_COOKIE, _NO_COOKIE)
    header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                                sequence, 0)
    return header + request


def _parse(reply: bytes) -> tuple[int, int | None]:
    """(sequence number, inode or None when there is no such socket) of one reply; raises on a kernel error."""
    if len(reply) < _NLMSG_HEADER.size:
        raise ValueError("short sock_diag reply")
    _, kind, _, sequence, _ = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, _NLMSG_HEADER.size)[0]
        if error == errno.ENOENT:
            return sequence, None  # no such socket (in this namespace)
        raise OSError(error, os.strerror(error))
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _NLMSG_HEADER.size + _DIAG_MESSAGE.size:
        raise ValueError(f"unexpected sock_diag reply (type {kind})")
    inode: int = _DIAG_MESSAGE.unpack_from(reply, _NLMSG_HEADER.size)[-1]
    return sequence, inode or None


def _ask(sock: socket.socket, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    sequence = next(_sequence) & 0xFFFFFFFF
    message = _request(local, remote, sequence)
    if message is None:
        return None
    sock.sendto(message, (0, 0))
    while True:  # a reply to an earlier question that timed out may still be queued: skip it
        answered, inode = _parse(sock.recv(8192))
        if answered == sequence:
            return inode


def _netlink_socket() -> socket.socket:
    if not sys.platform.startswith("linux"):
        raise OSError(errno.EAFNOSUPPORT, "sock_diag is Linux-only")  # callers fall back to other lookups
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    sock.settimeout(_TIMEOUT)
    return sock


def diag_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the TCP socket of the caller's network namespace whose own end is ``local`` and whose peer
    is ``remote``; None when there is no such socket; raises ``OSError`` (or ``ValueError`` for a reply it cannot
    read) when the interface is not available."""
    with _netlink_socket() as sock:
        return _ask(sock, local, remote)


def tcp_listening(port: int) -> bool:
    """Whether a TCP socket of the caller's network namespace listens on ``port`` (IPv4 or IPv6).

    It asks for a dump of listening sockets only, which the kernel answers from its table of listeners alone;
    ``/proc/net/tcp`` walks every bucket of the established-connection table too, which on a busy machine takes
    tens of milliseconds. Raises ``OSError`` (or ``ValueError``) when the interface is not available.
    """
    with _netlink_socket() as sock:
        return any(_listening_in(sock, family, port) for family in (socket.AF_INET, socket.AF_INET6))


def _listening_in(sock: socket.socket, family: int, port: int) -> bool:
    sequence = next(_sequence) & 0xFFFFFFFF
    request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN, 0, 0, bytes(16), bytes(16), 0,
                                 _NO_COOKIE, _NO_COOKIE)
    sock.sendto(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                   _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0) + request, (0, 0))
    found = False
    while True:
        reply = sock.recv(65536)
        offset = 0
        while len(reply) - offset >= _NLMSG_HEADER.size:
            length, kind, _, answered, _ = _NLMSG_HEADER.unpack_from(reply, offset)
            if length < _NLMSG_HEADER.size:
                raise ValueError("corrupt sock_diag reply")
            if answered == sequence:
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    error = -struct.unpack_from("=i", reply, offset + _NLMSG_HEADER.size)[0]
                    raise OSError(error, os.strerror(error))
                if kind == _SOCK_DIAG_BY_FAMILY and length >= _NLMSG_HEADER.size + 6:
                    # inet_diag_msg: family, state, timer, retransmits, then the source port (network order)
                    found = found or struct.unpack_from("!H", reply, offset + _NLMSG_HEADER.size + 4)[0] == port
            offset += (length + 3) & ~3


class NamespaceSockDiag:
    """sock_diag lookups in another network namespace, through one netlink socket created inside it.

    Raises ``OSError`` when the namespace cannot be entered (see :func:`oisp.netns.run_inside`).
    """

    def __init__(self, namespace: NetworkNamespace) -> None:
        self.namespace = namespace
        self._sock = run_inside(namespace, _netlink_socket)
        self._lock = threading.Lock()

    def inode(self, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
        """As :func:`diag_inode`, for a socket of this namespace."""
        with self._lock:
            return _ask(self._sock, local, remote)

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()
