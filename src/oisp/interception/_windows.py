"""The Windows backend: WinDivert through pydivert.

Differences from Linux that the interceptor relies on:

- WinDivert handles are not selectable, so each watched handle gets a reader thread that receives with a
  short timeout and queues what it gets; the poller waits on a shared condition.
- The NETWORK layer carries no process id and there is no socket mark: the proxy's own upstream connections
  are recognised by the SOCKET layer's CONNECT events for the proxy's process id (they carry the local port
  there, and precede the SYN), so :meth:`WindowsBackend.mark_upstream_socket` does nothing.
- A live listener is found with psutil (GetExtendedTcpTable).
- The NETWORK diversion is received and re-injected a batch at a time (:class:`WinDivertPacketBatch`:
  ``WinDivertRecvEx``/``WinDivertSendEx`` with arrays of addresses, through pydivert's ``windivert_dll``
  binding), like libebpfdivert's ``recv_ex``/``send_ex`` on Linux: the reader thread of that handle fills a
  batch (blocking, overlapped, with the same short timeout) and queues it whole; the interceptor's thread takes
  it with :meth:`WinDivertPacketBatch.receive`, rewrites the packets in place and re-injects them in one call.
  Two batch buffers per handle (about 2 MiB) bound the memory; while both are in use, packets wait in
  WinDivert's own queue (its QUEUE_LENGTH/QUEUE_TIME limits apply).

This backend is written against the same pydivert API as Linux but is not exercised by the test suite (it
has no Windows machine): **the batch path is untested** beyond type checking (``mypy --platform win32``);
the shared NAT core, the fast path and the process-id exclusion logic are unit-tested.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

from oisp.errors import InterceptionError
from oisp.interception._backend import ADDRESS_SIZE, packet_offsets

__all__ = ["WinDivertPacketBatch", "WindowsBackend"]

logger = logging.getLogger(__name__)

_SHUTDOWN_RECV = 1
_MAX_QUEUED = 8192
_LAYER_NETWORK = 0
_WAIT_OBJECT_0, _WAIT_TIMEOUT = 0, 0x102
_READ_TIMEOUT = 0.2
_BUFFERS_PER_HANDLE = 2


def _raw(handle: Any) -> Any:
    raw = getattr(getattr(handle, "_impl", handle), "_handle", None)
    if not raw:
        raise OSError(errno.EBADF, "WinDivert handle is not open")
    return raw


class _Filled:
    """One buffer of packets received by ``WinDivertRecvEx``: packet ``i`` is ``view[offsets[i]:offsets[i + 1]]``,
    its WINDIVERT_ADDRESS ``addresses[80 * i:80 * (i + 1)]``."""

    def __init__(self, capacity: int, size: int) -> None:
        from pydivert.windivert_dll.structs import WinDivertAddress

        self.capacity, self.size = capacity, size
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.buffer_c = (ctypes.c_char * size).from_buffer(self.buffer)
        self.addresses_c = (WinDivertAddress * capacity)()
        self.addresses = memoryview(self.addresses_c).cast("B")
        self.offsets: list[int] = [0]
        self.count = 0

    def fill(self, handle: Any, event: Any, timeout: float) -> int:
        """Receive up to ``capacity`` packets from ``handle``, waiting at most ``timeout`` seconds for the first
        (overlapped ``WinDivertRecvEx`` on ``event``); how many (0: none came)."""
        from pydivert import windivert_dll
        from pydivert.windivert_dll.structs import Overlapped

        raw = _raw(handle)
        received = ctypes.c_uint(0)
        address_bytes = ctypes.c_uint(self.capacity * ADDRESS_SIZE)
        overlapped = Overlapped(hEvent=event)
        done = windivert_dll.WinDivertRecvEx(raw, self.buffer_c, self.size, ctypes.byref(received), 0,
                                             self.addresses_c, ctypes.byref(address_bytes),
                                             ctypes.byref(overlapped))
        if not done:  # ERROR_IO_PENDING (other errors raise in pydivert's wrapper)
            kernel32 = windivert_dll.windll.kernel32
            waited = windivert_dll.WaitForSingleObject(event, int(timeout * 1000))
            if waited == _WAIT_TIMEOUT:
                kernel32.CancelIoEx(raw, ctypes.byref(overlapped))
            elif waited != _WAIT_OBJECT_0:
                raise OSError(errno.EIO, f"WaitForSingleObject on a WinDivert receive: {waited}")
            # Settles the operation either way (completed, or cancelled: then it reports failure and nothing).
            if not kernel32.GetOverlappedResult(raw, ctypes.byref(overlapped), ctypes.byref(received), True):
                self.count, self.offsets = 0, [0]
                return 0
        count = address_bytes.value // ADDRESS_SIZE
        self.offsets = packet_offsets(self.buffer, count, received.value)
        self.count = count
        return count

    def send(self, handle: Any, first: int, stop: int, offsets: list[int]) -> None:
        """Re-inject packets ``first`` to ``stop - 1`` (laid out by ``offsets``) with ``WinDivertSendEx``."""
        from pydivert import windivert_dll

        start = offsets[first]
        sent = ctypes.c_uint(0)
        try:
            windivert_dll.WinDivertSendEx(_raw(handle), ctypes.addressof(self.buffer_c) + start,
                                          offsets[stop] - start, ctypes.byref(sent), 0,
                                          ctypes.addressof(self.addresses_c) + first * ADDRESS_SIZE,
                                          (stop - first) * ADDRESS_SIZE, None)
        except OSError as exc:  # the packets are lost, as a failed send of one is: TCP sends them again
            logger.debug("re-injecting %d packets failed: %s", stop - first, exc)


class WinDivertPacketBatch:
    """The :class:`~oisp.interception._backend.PacketBatch` of the Windows backend (untested: see the module's
    doc). :meth:`receive` takes the next batch the NETWORK handle's reader thread has filled; the batch taken
    before goes back to that thread for refilling."""

    def __init__(self, poller: _ThreadPoller) -> None:
        self._poller = poller
        self._current: _Filled | None = None
        self._current_handle: Any = None
        self.view = memoryview(b"")
        self.addresses = memoryview(b"")
        self.offsets: list[int] = [0]

    def receive(self, handle: Any) -> int:
        """Take the packets waiting on ``handle`` without waiting; how many (0: none)."""
        self._release()
        filled = self._poller.take_filled(handle)
        if filled is None:
            return 0
        self._current, self._current_handle = filled, handle
        self.view, self.addresses, self.offsets = filled.view, filled.addresses, filled.offsets
        return filled.count

    def send(self, handle: Any, first: int, stop: int) -> None:
        """Re-inject packets ``first`` to ``stop - 1`` of the batch taken last (as :attr:`offsets` lay them out
        now: the interceptor may have merged packets and moved the rest down)."""
        if self._current is not None and first < stop:
            self._current.send(handle, first, stop, self.offsets)

    def _release(self) -> None:
        if self._current is not None:
            self._poller.give_back(self._current_handle, self._current)
            self._current = self._current_handle = None


class _ThreadPoller:
    """One reader thread per handle feeding a bounded queue; ``wait`` blocks on a shared condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[int, collections.deque[Any]] = {}
        self._handles: dict[int, Any] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._stop: dict[int, threading.Event] = {}
        #: Set by :meth:`WindowsBackend.packet_batch`: NETWORK diversion handles are then read in batches.
        self.batching = False
        self._free: dict[int, collections.deque[_Filled]] = {}

    def add(self, handle: Any) -> None:
        key = id(handle)
        self._queues[key] = collections.deque()
        self._handles[key] = handle
        stop = self._stop[key] = threading.Event()
        # The NETWORK diversion (flags 0: neither sniffing nor receive-only, unlike the DNS sniffer) is read a
        # batch at a time when the interceptor batches.
        batched = self.batching and int(getattr(handle, "layer", -1)) == _LAYER_NETWORK \
            and int(getattr(handle, "flags", -1)) == 0
        if batched:
            self._free[key] = collections.deque(_Filled(256, 1 << 20) for _ in range(_BUFFERS_PER_HANDLE))
        thread = threading.Thread(target=self._read_batches if batched else self._read, args=(handle, stop),
                                  name="oisp-windivert-reader", daemon=True)
        self._threads[key] = thread
        thread.start()

    def _read_batches(self, handle: Any, stop: threading.Event) -> None:
        from pydivert import windivert_dll

        key = id(handle)
        event = windivert_dll.CreateEventW(None, False, False, None)
        try:
            while not stop.is_set():
                with self._cond:
                    free = self._free.get(key)
                    while free is not None and not free and not stop.is_set():
                        self._cond.wait(_READ_TIMEOUT)  # both buffers are with the interceptor
                    if free is None or stop.is_set():
                        return
                    filled = free.popleft()
                try:
                    count = filled.fill(handle, event, _READ_TIMEOUT)
                except OSError:
                    return
                with self._cond:
                    if count and key in self._queues:
                        self._queues[key].append(filled)
                        self._cond.notify_all()
                    elif key in self._free:
                        self._free[key].append(filled)
        finally:
            windivert_dll.CloseHandle(event)

    def take_filled(self, handle: Any) -> _Filled | None:
        """The next batch the reader of ``handle`` filled, if any (the interceptor's thread)."""
        with self._cond:
            queue = self._queues.get(id(handle))
            if not queue or not isinstance(queue[0], _Filled):
                return None
            filled: _Filled = queue.popleft()
            return filled

    def give_back(self, handle: Any, filled: _Filled) -> None:
        """``filled`` was re-injected: its reader may fill it again."""
        with self._cond:
            free = self._free.get(id(handle))
            if free is not None:
                free.append(filled)
                self._cond.notify_all()

    def _read(self, handle: Any, stop: threading.Event) -> None:
        queue = self._queues[id(handle)]
        while not stop.is_set():
            try:
                packet = handle.recv(timeout=0.2)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                if len(queue) < _MAX_QUEUED:
                    queue.append(packet)
                else:  # the interceptor is not keeping up: re-inject rather than hold traffic
                    try:
                        handle.send(packet)
                    except OSError:
                        pass
                self._cond.notify_all()

    def remove(self, handle: Any) -> None:
        key = id(handle)
        if key in self._stop:
            self._stop.pop(key).set()
            self._threads.pop(key).join(timeout=2)
            with self._cond:
                self._handles.pop(key, None)
                self._queues.pop(key, None)
                self._free.pop(key, None)
                self._cond.notify_all()

    def wait(self, timeout: float) -> list[Any]:
        with self._cond:
            if not any(self._queues.values()):
                self._cond.wait(timeout)
            return [self._handles[k] for k, q in self._queues.items() if q]

    def recv_nowait(self, handle: Any) -> Any | None:
        with self._cond:
            queue = self._queues.get(id(handle))
            if not queue or isinstance(queue[0], _Filled):  # batches are taken with take_filled
                return None
            return queue.popleft()

    def close(self) -> None:
        for handle in list(self._handles.values()):
            self.remove(handle)


class WindowsBackend:
    """WinDivert (the driver is installed by pydivert on first open; needs Administrator)."""

    uses_socket_marks = False

    def prepare(self, *, mount_bpffs: bool) -> None:
        """Nothing to mount; WinDivert removes a dead process's filters with its handle."""

    def open(self, filter: str, layer: Any, flags: Any, *, interfaces: Sequence[str] | None = None,
             priority: int = 0) -> Any:
        """Open a WinDivert handle (interfaces cannot be chosen per handle on Windows: filter on them)."""
        from pydivert import Divert, Flag, Layer

        handle = Divert(filter, layer=Layer(layer), priority=priority, flags=Flag(flags))
        try:
            handle.open()
        except OSError as exc:
            raise InterceptionError(f"cannot open WinDivert ({filter!r}): {exc}; run as Administrator") from exc
        return handle

    def shutdown_recv(self, handle: Any) -> None:
        """WinDivertShutdown(RECV) where pydivert offers it."""
        shutdown = getattr(handle, "shutdown", None)
        if shutdown is not None:
            shutdown(_SHUTDOWN_RECV)

    def __init__(self) -> None:
        self._poller: _ThreadPoller | None = None

    def packet_batch(self) -> WinDivertPacketBatch | None:
        """Batched receive and re-injection of the NETWORK diversion through the last poller made (untested)."""
        if self._poller is None:
            return None
        self._poller.batching = True
        return WinDivertPacketBatch(self._poller)

    def poller(self) -> _ThreadPoller:
        """A poller with one reader thread per handle (batched for the NETWORK diversion, see the module)."""
        self._poller = _ThreadPoller()
        return self._poller

    def listener_alive(self, port: int) -> bool:
        """True when some process listens on TCP ``port``."""
        import psutil

        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.net_connections(kind="tcp"))

    def interface_name(self, ifindex: int) -> str | None:
        """The interface name for ``ifindex``."""
        try:
            return socket.if_indextoname(ifindex)
        except OSError:
            return None

    def loopback_interfaces(self) -> list[str]:
        """None to choose: WinDivert flags loopback packets instead of using an interface."""
        return []

    def mark_upstream_socket(self, sock: socket.socket) -> None:
        """No-op: the proxy's own flows are excluded by process id."""
