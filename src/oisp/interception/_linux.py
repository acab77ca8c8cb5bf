"""The Linux backend: pydivert's eBPF implementation (libebpfdivert).

What it attaches, and where (read from libebpfdivert, verified in network-namespace tests):

- NETWORK handles attach cls_bpf programs to the clsact qdisc of the interfaces of the *current network
  namespace* (``if_nameindex()``): all of them, or the ones named, plus the loopback interface (needed for
  inbound injection; loopback packets are only diverted when it is named or no list is given).
- FLOW/SOCKET handles attach cgroup programs to the first cgroup2 mount in ``/proc/self/mountinfo`` (on a
  normal machine the cgroup2 root, so they see every process).
- Each handle is recorded in a registry map pinned at ``/sys/fs/bpf/ebpfdivert/registry`` when a bpffs is
  mounted there, under the lock file ``/run/ebpfdivert.lock``. The programs of a handle whose process died
  stop diverting once its heartbeat is 3 s old; with the registry, the next open (or ``unregister()``) also
  detaches them. Without a bpffs they stay attached (passing traffic) until the interface goes away.

oisp pins nothing of its own in bpffs, so there is nothing of oisp's to remove by name there: crash cleanup is
libebpfdivert's reaping of dead handles, which :meth:`LinuxBackend.prepare` triggers after making sure the
bpffs is mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oisp.errors import InterceptionError
from oisp.interception._backend import ADDRESS_SIZE, packet_offsets
from oisp.sockdiag import tcp_listening

# Imported only on Linux (see _backend.py). A top-level platform assert also makes mypy skip the rest of this
# module in its --platform win32/darwin passes, where select.poll and os.geteuid do not exist.
assert sys.platform.startswith("linux"), "oisp.interception._linux is the Linux backend"

__all__ = ["BPFFS", "UPSTREAM_MARK", "EbpfPacketBatch", "LinuxBackend", "set_socket_mark"]

logger = logging.getLogger(__name__)

#: SO_MARK for the proxy's upstream sockets: libebpfdivert passes packets whose mark is 0x4D49xxxx with a
#: priority part at least its own; 0xFFFF is above every handle's, so these are never diverted.
UPSTREAM_MARK = 0x4D49FFFF
BPFFS = "/sys/fs/bpf"
_SO_MARK = getattr(socket, "SO_MARK", 36)
_IFF_LOOPBACK = 0x8
_TCP_LISTEN = "0A"
_SHUTDOWN_RECV = 1


def set_socket_mark(sock: socket.socket) -> None:
    """Set :data:`UPSTREAM_MARK` on ``sock`` so its packets are never diverted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, UPSTREAM_MARK)
    except PermissionError:
        raise InterceptionError("cannot mark the proxy's upstream socket (SO_MARK needs CAP_NET_ADMIN): run "
                                "oisp as root for transparent interception") from None


def _bpffs_mounted(path: str = BPFFS) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == path and " - bpf " in line:
                return True
    return False


def _mount_bpffs(path: str = BPFFS) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


def _listening_ports() -> set[int]:
    """The TCP ports listened on in this network namespace, from ``/proc/net/tcp`` and ``tcp6``.

    The kernel lists the listening sockets first, then walks its whole established-connection table (every
    bucket, on a busy machine megabytes of text, in the packet thread): reading stops at the first line that is
    not a listener, so that walk is never made.
    """
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) <= 3 or fields[3] != _TCP_LISTEN:
                        break
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


class _EpollPoller:
    """Waits on libebpfdivert's per-handle event descriptors (readable whenever recv would not block)."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, Any] = {}

    def add(self, handle: Any) -> None:
        fd = int(handle._event_fd)
        self._by_fd[fd] = handle
        self._poll.register(fd, select.POLLIN)

    def remove(self, handle: Any) -> None:
        for fd, known in list(self._by_fd.items()):
            if known is handle:
                self._poll.unregister(fd)
                del self._by_fd[fd]

    def wait(self, timeout: float) -> list[Any]:
        try:
            ready = self._poll.poll(max(0, int(timeout * 1000)))
        except InterruptedError:  # pragma: no cover - retried by the caller's loop
            return []
        return [self._by_fd[fd] for fd, _ in ready if fd in self._by_fd]

    def recv_nowait(self, handle: Any) -> Any | None:
        try:
            return handle.recv(timeout=0)
        except TimeoutError:
            return None
        except OSError as exc:
            if exc.errno == errno.EBADF:  # shut down for receiving and drained
                return None
            raise

    def close(self) -> None:
        for fd in list(self._by_fd):
            self._poll.unregister(fd)
        self._by_fd.clear()


class EbpfPacketBatch:
    """Packets taken from a NETWORK handle many at a time and re-injected the same way (libebpfdivert's
    ``recv_ex``/``send_ex``): they lie back to back in one buffer, where they are rewritten in place, and their
    addresses (WINDIVERT_ADDRESS, 80 bytes each) are edited in place in one array. Nothing is allocated per
    packet; pydivert's own ``recv_batch``/``send_batch`` receive and send one packet per call.
    """

    def __init__(self, capacity: int = 256, size: int = 1 << 20) -> None:
        from pydivert.bpf import libebpfdivert
        from pydivert.windivert_dll.structs import WinDivertAddress

        if libebpfdivert is None:
            raise InterceptionError("pydivert's libebpfdivert could not be loaded")
        self._lib = libebpfdivert
        self.capacity = capacity
        self.size = size
        #: The received packets, back to back; packet ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``.
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self._buffer_c = (ctypes.c_char * size).from_buffer(self.buffer)
        self._address_type = ctypes.POINTER(WinDivertAddress)
        self._addresses_c = (WinDivertAddress * capacity)()
        #: The packets' addresses as bytes: packet ``i``'s is ``addresses[80 * i:80 * (i + 1)]``.
        self.addresses = memoryview(self._addresses_c).cast("B")
        self.offsets: list[int] = [0]
        self.count = 0
        self._received = ctypes.c_uint32(0)
        self._count_c = ctypes.c_uint32(0)
        self._sent = ctypes.c_uint32(0)

    @staticmethod
    def _raw(handle: Any) -> Any:
        raw = getattr(getattr(handle, "_impl", handle), "_handle", None)
        if not raw:
            raise OSError(errno.EBADF, "divert handle is not open")
        return raw

    def receive(self, handle: Any) -> int:
        """Take the packets waiting on ``handle`` (at most :attr:`capacity`), without waiting; how many."""
        self._count_c.value = self.capacity
        ret = self._lib.ebpfdivert_recv_ex(self._raw(handle), self._buffer_c, self.size, ctypes.byref(self._received),
                                           self._addresses_c, ctypes.byref(self._count_c), 0)
        if ret < 0:
            if -ret in (errno.EAGAIN, errno.ESHUTDOWN):  # nothing waiting; shut down and drained
                self.count = 0
                return 0
            raise OSError(-ret, f"ebpfdivert_recv_ex: {os.strerror(-ret)}")
        count = self._count_c.value
        try:  # each packet's length is in its IP header (libebpfdivert's send_ex reads it too)
            offsets = packet_offsets(self.buffer, count, self._received.value)
        except OSError as exc:
            raise OSError(exc.errno, f"ebpfdivert_recv_ex: {exc.strerror}") from None
        self.offsets, self.count = offsets, count
        return count

    def send(self, handle: Any, first: int, stop: int) -> None:
        """Re-inject packets ``first`` to ``stop - 1`` (as rewritten, with their addresses as edited)."""
        if first >= stop:
            return
        start = self.offsets[first]
        ret = self._lib.ebpfdivert_send_ex(
            self._raw(handle), ctypes.addressof(self._buffer_c) + start, self.offsets[stop] - start,
            ctypes.byref(self._sent),
            ctypes.cast(ctypes.addressof(self._addresses_c) + first * ADDRESS_SIZE, self._address_type),
            stop - first)
        if ret < 0:  # the packets are lost, as a failed send of one is: TCP sends them again
            logger.debug("re-injecting %d packets failed: %s", stop - first, os.strerror(-ret))



class LinuxBackend:
    """pydivert's eBPF backend: root, a kernel with BPF and cgroup2 (for process attribution)."""

    uses_socket_marks = True

    def prepare(self, *, mount_bpffs: bool) -> None:
        """Check privileges and the library, mount bpffs if asked and needed, and reap dead handles."""
        if os.geteuid() != 0:
            raise InterceptionError("transparent interception on Linux needs root (eBPF programs and TC "
                                    "filters); run oisp as root, or use explicit mode (HTTPS_PROXY)")
        from pydivert import EBPFDivert

        if not EBPFDivert.is_registered():
            raise InterceptionError("pydivert's libebpfdivert could not be loaded; reinstall pydivert, or set "
                                    "PYDIVERT_EBPFDIVERT_LIB to the library path")
        if not _bpffs_mounted():
            if mount_bpffs:
                try:
                    _mount_bpffs()
                    logger.info("mounted bpffs at %s (handle registry: crashed runs are cleaned up)", BPFFS)
                except OSError as exc:
                    logger.warning("no bpffs at %s and mounting one failed (%s): filters of a crashed run stay "
                                   "attached, passing traffic, until the next cleanup", BPFFS, exc)
            else:
                logger.warning("no bpffs at %s: filters of a crashed run cannot be detached automatically", BPFFS)
        EBPFDivert.unregister()

    def open(self, filter: str, layer: Any, flags: Any, *, interfaces: Sequence[str] | None = None,
             priority: int = 0) -> Any:
        """Open a pydivert handle; errors become InterceptionError with the filter and layer named."""
        from pydivert import Divert, Flag, Layer

        kwargs: dict[str, Any] = {}
        if interfaces is not None:
            kwargs["interfaces"] = list(interfaces)
        handle = Divert(filter, layer=Layer(layer), priority=priority, flags=Flag(flags), **kwargs)
        try:
            handle.open()
        except (OSError, NotImplementedError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENODEV:
                detail = f"one of the interfaces {list(interfaces or [])} does not exist"
            raise InterceptionError(f"cannot open the {getattr(layer, 'name', layer)} diversion "
                                    f"({filter!r}): {detail}") from exc
        return handle

    def shutdown_recv(self, handle: Any) -> None:
        """Stop capturing on ``handle``; its programs then pass everything to lower-priority handles."""
        handle.shutdown(_SHUTDOWN_RECV)

    def packet_batch(self) -> EbpfPacketBatch | None:
        """Batched receive and re-injection for NETWORK handles (None with a libebpfdivert without them)."""
        from pydivert.bpf import libebpfdivert

        if libebpfdivert is None or not hasattr(libebpfdivert, "ebpfdivert_recv_ex"):
            return None
        return EbpfPacketBatch()

    def poller(self) -> _EpollPoller:
        """A poller over libebpfdivert's event descriptors."""
        return _EpollPoller()

    def listener_alive(self, port: int) -> bool:
        """True when this network namespace has a TCP socket listening on ``port``."""
        try:
            return tcp_listening(port)
        except (OSError, ValueError):  # no sock_diag (a kernel without it): the slower /proc tables
            return port in _listening_ports()

    def interface_name(self, ifindex: int) -> str | None:
        """The interface name for ``ifindex`` in this network namespace."""
        try:
            return socket.if_indextoname(ifindex)
        except OSError:
            return None

    def loopback_interfaces(self) -> list[str]:
        """Interfaces with IFF_LOOPBACK set, from sysfs."""
        names = []
        for _, name in socket.if_nameindex():
            try:
                flags = int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
            except (OSError, ValueError):
                continue
            if flags & _IFF_LOOPBACK:
                names.append(name)
        return names

    def mark_upstream_socket(self, sock: socket.socket) -> None:
        """Set the upstream mark on ``sock``."""
        set_socket_mark(sock)
