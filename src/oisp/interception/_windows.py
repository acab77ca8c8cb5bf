"""The Windows backend: WinDivert through pydivert.

Differences from Linux that the interceptor relies on:

- WinDivert handles are not selectable, so each watched handle gets a reader thread that receives with a
  short timeout and queues what it gets; the poller waits on a shared condition.
- The NETWORK layer carries no process id and there is no socket mark: the proxy's own upstream connections
  are recognised by the SOCKET layer's CONNECT events for the proxy's process id (they carry the local port
  there, and precede the SYN), so :meth:`WindowsBackend.mark_upstream_socket` does nothing.
- A live listener is found with psutil (GetExtendedTcpTable).

This backend is written against the same pydivert API as Linux but is not exercised by the test suite (it
has no Windows machine); the shared NAT core and the process-id exclusion logic are unit-tested.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

from oisp.errors import InterceptionError

__all__ = ["WindowsBackend"]

logger = logging.getLogger(__name__)

_SHUTDOWN_RECV = 1
_MAX_QUEUED = 8192


class _ThreadPoller:
    """One reader thread per handle feeding a bounded queue; ``wait`` blocks on a shared condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[int, collections.deque[Any]] = {}
        self._handles: dict[int, Any] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._stop: dict[int, threading.Event] = {}

    def add(self, handle: Any) -> None:
        key = id(handle)
        self._queues[key] = collections.deque()
        self._handles[key] = handle
        stop = self._stop[key] = threading.Event()
        thread = threading.Thread(target=self._read, args=(handle, stop), name="oisp-windivert-reader",
                                  daemon=True)
        self._threads[key] = thread
        thread.start()

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

    def wait(self, timeout: float) -> list[Any]:
        with self._cond:
            if not any(self._queues.values()):
                self._cond.wait(timeout)
            return [self._handles[k] for k, q in self._queues.items() if q]

    def recv_nowait(self, handle: Any) -> Any | None:
        with self._cond:
            queue = self._queues.get(id(handle))
            return queue.popleft() if queue else None

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

    def packet_batch(self) -> None:
        """No batching here yet: packets go one ``recv``/``send`` at a time (WinDivertRecvEx/SendEx with arrays of
        addresses would batch them as libebpfdivert's ``recv_ex``/``send_ex`` do on Linux)."""
        return None

    def poller(self) -> _ThreadPoller:
        """A poller with one reader thread per handle."""
        return _ThreadPoller()

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
