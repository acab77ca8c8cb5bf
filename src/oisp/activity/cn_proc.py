"""The kernel's process-events connector (netlink ``CN_PROC``): a sans-io parser and a thin socket.

Every fork, exec and exit on the machine is multicast by the kernel to listeners of the connector's process
group (root only). The messages are fixed C structs (``linux/cn_proc.h``), so parsing is a few ``struct`` calls;
:func:`parse_datagram` turns one datagram into :class:`ForkEvent` / :class:`ExecEvent` / :class:`ExitEvent`
records, and :class:`ProcConnector` is the socket (subscribe, non-blocking receive, overflow detection).

Why not pyroute2's ``ProcEventSocket``: it decodes through pyroute2's generic netlink marshal (a dict-like object
per message, several times the cost of three ``struct.unpack_from`` calls for a source that may see thousands of
messages a second), and its socket hides what this reader needs: a non-blocking drain in batches and the
``ENOBUFS`` that says the kernel dropped messages. The format is a stable kernel ABI of 5 structs.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import NamedTuple

assert sys.platform == "linux"

__all__ = [
    "ExecEvent",
    "ExitEvent",
    "ForkEvent",
    "ProcConnector",
    "ProcEvent",
    "parse_datagram",
    "subscribe_message",
]

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # cb_id.idx, cb_id.val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
_EXEC = struct.Struct("=ii")  # process_pid, process_tgid
_EXIT = struct.Struct("=iiII")  # process_pid, process_tgid, exit_code, exit_signal
_EXIT_PARENT = struct.Struct("=ii")  # parent_pid, parent_tgid (kernels >= 5.x append them)
_HEAD = _NLMSGHDR.size + _CN_MSG.size


class ForkEvent(NamedTuple):
    """A new process (``child`` forked by ``parent``; thread creations are not reported)."""

    timestamp_ns: int
    parent: int
    child: int


class ExecEvent(NamedTuple):
    """``pid`` replaced its program (``execve``)."""

    timestamp_ns: int
    pid: int


class ExitEvent(NamedTuple):
    """``pid`` (a whole process) ended; ``status`` is the wait status (exit code << 8 | signal)."""

    timestamp_ns: int
    pid: int
    status: int
    parent: int | None


ProcEvent = ForkEvent | ExecEvent | ExitEvent


def subscribe_message(*, listen: bool = True) -> bytes:
    """The datagram that starts (or stops) the kernel sending process events to this socket."""
    op = struct.pack("=I", PROC_CN_MCAST_LISTEN if listen else PROC_CN_MCAST_IGNORE)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def parse_datagram(data: bytes, out: list[ProcEvent]) -> int:
    """Append the fork/exec/exit events of one datagram (one or more netlink messages) to ``out``.

    Returns how many messages were not understood (truncated, another connector, an unknown event kind other
    than the ones ignored on purpose); never raises on bad input.
    """
    offset = 0
    bad = 0
    size = len(data)
    while offset + _NLMSGHDR.size <= size:
        length, _type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > size:
            return bad + 1
        bad += _parse_message(data, offset, offset + length, out)
        offset += (length + 3) & ~3
    return bad


def _parse_message(data: bytes, start: int, end: int, out: list[ProcEvent]) -> int:
    if start + _HEAD + _EVENT_HEAD.size > end:
        return 1
    idx, val, _seq, _ack, _len, _flags = _CN_MSG.unpack_from(data, start + _NLMSGHDR.size)
    if idx != CN_IDX_PROC or val != CN_VAL_PROC:
        return 1
    at = start + _HEAD
    what, _cpu, timestamp = _EVENT_HEAD.unpack_from(data, at)
    body = at + _EVENT_HEAD.size
    if what == PROC_EVENT_FORK:
        if body + _FORK.size > end:
            return 1
        _ppid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(data, body)
        if child_pid == child_tgid:  # a new process, not a new thread
            out.append(ForkEvent(timestamp, parent_tgid, child_tgid))
    elif what == PROC_EVENT_EXEC:
        if body + _EXEC.size > end:
            return 1
        pid, tgid = _EXEC.unpack_from(data, body)
        out.append(ExecEvent(timestamp, tgid))
    elif what == PROC_EVENT_EXIT:
        if body + _EXIT.size > end:
            return 1
        pid, tgid, code, _exit_signal = _EXIT.unpack_from(data, body)
        if pid == tgid:  # the process's main thread: the process ends
            parent = None
            if body + _EXIT.size + _EXIT_PARENT.size <= end:
                parent = _EXIT_PARENT.unpack_from(data, body + _EXIT.size)[1] or None
            out.append(ExitEvent(timestamp, tgid, code, parent))
    # uid/gid/sid/ptrace/comm/coredump and the subscription ack are not used
    return 0


class ProcConnector:
    """A netlink socket subscribed to the kernel's process events (needs root: ``CAP_NET_ADMIN``).

    ``receive_buffer`` is the kernel-side queue in bytes (about 40 bytes of it per message plus overhead);
    when it overflows the kernel drops messages and the next read reports it (:attr:`overruns`).
    """

    def __init__(self, *, receive_buffer: int = 8 << 20) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, receive_buffer)  # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.bind((0, CN_IDX_PROC))
            sock.send(subscribe_message())
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        #: times the kernel said it dropped messages (ENOBUFS): process events were lost.
        self.overruns = 0
        #: messages that could not be parsed.
        self.malformed = 0

    def fileno(self) -> int:
        """The socket's descriptor (to wait on it with ``select``/``poll``)."""
        return self._sock.fileno()

    def read(self, out: list[ProcEvent], *, limit: int = 4096) -> bool:
        """Append what is queued (at most ``limit`` datagrams); False when the queue was drained."""
        recv = self._sock.recv
        for _ in range(limit):
            try:
                data = recv(65536)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            self.malformed += parse_datagram(data, out)
        return True

    def close(self) -> None:
        """Unsubscribe and close the socket."""
        try:
            self._sock.send(subscribe_message(listen=False))
        except OSError:
            pass
        self._sock.close()


def available() -> str | None:
    """None when this process can listen to process events, else why not (in words)."""
    if not hasattr(socket, "AF_NETLINK"):
        return "the process-events connector is Linux only"
    if os.geteuid() != 0:
        return "listening to the kernel's process events (netlink CN_PROC) needs root (CAP_NET_ADMIN)"
    return None
