"""The platform seam: what the interceptor needs from the packet-diversion layer, and which implementation runs.

This is the only module of the interception package that looks at ``sys.platform``. The Linux backend
(``_linux``) drives pydivert's eBPF implementation; the Windows backend (``_windows``) drives WinDivert. Both
speak the same filter language and hand out the same packets and FLOW/SOCKET events; they differ in how
handles are waited on, how the proxy's own upstream connections are kept out of the diversion (a socket mark
on Linux, process-id exclusion on Windows), how a live listener is detected, and what needs preparing.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["ADDRESS_SIZE", "Backend", "PacketBatch", "Poller", "current_backend", "packet_offsets"]

#: Bytes of one WINDIVERT_ADDRESS (the same layout on both backends).
ADDRESS_SIZE = 80


class Poller(Protocol):
    """Waits until one of several open divert handles may have something to receive."""

    def add(self, handle: Any) -> None:
        """Watch ``handle``."""

    def remove(self, handle: Any) -> None:
        """Stop watching ``handle`` (before it is closed)."""

    def wait(self, timeout: float) -> list[Any]:
        """The handles that may be readable, after at most ``timeout`` seconds (empty on timeout)."""

    def recv_nowait(self, handle: Any) -> Any | None:
        """One packet or event from ``handle`` if one is ready, else None; never blocks."""

    def close(self) -> None:
        """Release what the poller holds."""


class PacketBatch(Protocol):
    """Packets received from a NETWORK handle in one call and rewritten in place before going back in one call.

    Packet ``i`` is ``view[offsets[i]:offsets[i + 1]]``; its address (WINDIVERT_ADDRESS layout, 80 bytes) is
    ``addresses[80 * i:80 * (i + 1)]``, and editing it there changes how the packet is re-injected.
    """

    view: memoryview
    addresses: memoryview
    offsets: list[int]

    def receive(self, handle: Any) -> int:
        """Take the packets waiting on ``handle`` without waiting; how many (0: none)."""

    def send(self, handle: Any, first: int, stop: int) -> None:
        """Re-inject packets ``first`` to ``stop - 1``."""


def packet_offsets(buffer: bytearray, count: int, received: int) -> list[int]:
    """Where each of ``count`` IP packets lying back to back in ``buffer`` starts (and, last, where the final one
    ends), from the lengths in their headers; raises OSError (EPROTO) when they do not add up to ``received``."""
    offsets, offset = [0], 0
    for _ in range(count):
        if offset + 6 > received:
            break
        if buffer[offset] >> 4 == 4:
            offset += buffer[offset + 2] << 8 | buffer[offset + 3]
        else:
            offset += 40 + (buffer[offset + 4] << 8 | buffer[offset + 5])
        offsets.append(offset)
    if offset != received or len(offsets) != count + 1:
        import errno

        raise OSError(errno.EPROTO, f"{count} packets of {offset} bytes by their headers, {received} received")
    return offsets


class Backend(Protocol):
    """One platform's diversion layer."""

    #: True when upstream sockets are excluded by a socket mark (no process-id exclusion needed).
    uses_socket_marks: bool

    def prepare(self, *, mount_bpffs: bool) -> None:
        """Get ready to open handles, cleaning up what a crashed earlier run left behind."""

    def open(self, filter: str, layer: Any, flags: Any, *, interfaces: Sequence[str] | None = None,
             priority: int = 0) -> Any:
        """An open pydivert handle."""

    def shutdown_recv(self, handle: Any) -> None:
        """Stop ``handle`` from capturing more (what it already captured can still be received)."""

    def packet_batch(self) -> PacketBatch | None:
        """A reusable batch for receiving and re-injecting NETWORK packets many at a time, if the platform's
        library offers it (else packets go one at a time through the poller)."""

    def poller(self) -> Poller:
        """A new :class:`Poller`."""

    def listener_alive(self, port: int) -> bool:
        """True when a TCP socket of this machine (this network namespace) listens on ``port``."""

    def interface_name(self, ifindex: int) -> str | None:
        """The name of the interface with index ``ifindex``, or None."""

    def loopback_interfaces(self) -> list[str]:
        """The names of the loopback interfaces (found by their flags, never assumed)."""

    def mark_upstream_socket(self, sock: socket.socket) -> None:
        """Exclude ``sock`` (not yet connected) from diversion, where the platform does it per socket."""


def current_backend() -> Backend:
    """The backend of this platform; raises InterceptionError where there is none."""
    if sys.platform.startswith("linux"):
        from oisp.interception._linux import LinuxBackend

        return LinuxBackend()
    if sys.platform == "win32":
        from oisp.interception._windows import WindowsBackend

        return WindowsBackend()
    from oisp.errors import InterceptionError

    raise InterceptionError(f"transparent interception is not available on {sys.platform}: use explicit mode "
                            "(HTTPS_PROXY) instead")


def mark_upstream_socket(sock: socket.socket) -> None:
    """Keep the proxy's upstream socket ``sock`` out of the diversion; call it before ``connect``.

    On Linux it sets ``SO_MARK`` (needs CAP_NET_ADMIN, which interception needs anyway); on Windows it is a
    no-op, because the interceptor recognises the proxy's own connections by process id there.
    """
    if sys.platform.startswith("linux"):
        from oisp.interception._linux import set_socket_mark

        set_socket_mark(sock)
