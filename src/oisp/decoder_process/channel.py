"""One end of the socket pair between the proxy and its decoder process: frames out without ever blocking the
caller (a bounded buffer behind the kernel's), frames in as they arrive."""

from __future__ import annotations

import collections
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterable

import anyio

from oisp.decoder_process.wire import FrameReader, Kind, header

__all__ = ["FrameChannel"]

logger = logging.getLogger(__name__)

_wait_readable = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable
_wait_writable = getattr(anyio, "wait_writable", None) or anyio.wait_socket_writable
#: With ``coalesce``, frames are sent at once when this many bytes wait, else after ``coalesce`` seconds.
COALESCE_BYTES = 256 * 1024
#: At most this many buffers per sendmsg() call (IOV_MAX is 1024 on Linux).
_IOV = 512
#: Kernel buffer asked for on each end (the kernel may grant less); it absorbs bursts before ours fills up.
SOCKET_BUFFER = 4 * 1024 * 1024
Frame = tuple[Kind, int, int, bytes]


def _sendv(sock: socket.socket, parts: list[bytes | memoryview]) -> int:
    """Send buffers in one system call where the platform has ``sendmsg`` (not Windows)."""
    if sys.platform != "win32":
        return sock.sendmsg(parts)
    return sock.send(b"".join(parts))


class FrameChannel:
    """Writes and reads frames on a connected, non-blocking stream socket.

    :meth:`send` never blocks: frames wait in a buffer that a writer task (:meth:`run_writer`, which must be
    running) hands to the kernel as soon as the event loop gets to it, and again whenever the socket is
    writable after it was full. ``limit`` bounds that buffer: a frame that would exceed it is refused (``send``
    returns False) unless it is forced (small control frames).
    """

    def __init__(self, sock: socket.socket, *, limit: int | None = None, coalesce: float = 0.0) -> None:
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        self.sock = sock
        self.limit = limit
        self._pending: collections.deque[bytes | memoryview] = collections.deque()
        self.buffered = 0
        #: The most bytes ever waiting in the buffer.
        self.peak_buffered = 0
        self.bytes_sent = 0
        #: Bytes handed to the kernel so far (frames are handed over in the order they were queued).
        self.bytes_flushed = 0
        #: Why the channel can no longer send (the other end is gone), if it cannot.
        self.broken: str | None = None
        self._wake = anyio.Event()
        self._closing = False
        self._drained = anyio.Event()
        self.coalesce = coalesce
        self._urgent = anyio.Event()
        self._flushed = anyio.Event()

    # sending ------------------------------------------------------------------------------------
    def send(self, kind: Kind, channel: int, payload: bytes = b"", timestamp: int = 0, *, force: bool = False) -> bool:
        """Queue one frame; False when it was refused (buffer limit reached, or the channel is broken).

        Nothing is written here: the writer task sends what is queued once the caller yields to the event loop
        (after ``coalesce`` seconds, or at once when much is waiting), so the relay's own send goes first and
        many copies wake the other process once.
        """
        if self.broken is not None or self._closing:
            return False
        head = header(kind, channel, len(payload), timestamp)
        size = len(head) + len(payload)
        if not force and self.limit is not None and self.buffered + size > self.limit:
            return False
        self.bytes_sent += size
        self._queue(head, payload)
        return True

    def _queue(self, head: bytes, payload: bytes | memoryview) -> None:
        for part in (head, payload):
            if part:
                self._pending.append(part)
                self.buffered += len(part)
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        self._wake.set()
        if self.buffered >= COALESCE_BYTES:
            self._urgent.set()

    def mark_broken(self, reason: str, *, log: bool = True) -> None:
        """The other end is gone: refuse every frame from now on, drop what is buffered (logged once)."""
        if self.broken is None:
            self.broken = reason
            if log:
                logger.error("%s", reason)
        self._pending.clear()
        self.buffered = 0
        self._wake.set()
        self._flushed.set()

    async def run_writer(self) -> None:
        """Send what is queued whenever the event loop gets to it (and, when the socket is full, once it can take
        more); returns after :meth:`close_sending` once all is sent (or the channel broke)."""
        pending = self._pending
        try:
            while True:
                if not pending:
                    if self._closing or self.broken is not None:
                        return
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                if self.coalesce and self.buffered < COALESCE_BYTES and not self._closing:
                    self._urgent = anyio.Event()
                    with anyio.move_on_after(self.coalesce):
                        await self._urgent.wait()
                self._flush_some()
                while pending and self.broken is None:  # the kernel's buffer is full: no coalescing wait now
                    await _wait_writable(self.sock)
                    self._flush_some()
        finally:
            self._drained.set()

    def _flush_some(self) -> None:
        pending = self._pending
        while pending:
            parts = [pending[i] for i in range(min(len(pending), _IOV))]
            try:
                sent = _sendv(self.sock, parts)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.mark_broken(f"sending to the decoder process failed: {exc}")
                return
            self.buffered -= sent
            self.bytes_flushed += sent
            self._flushed.set()
            while sent:
                first = pending[0]
                if sent >= len(first):
                    sent -= len(first)
                    pending.popleft()
                else:
                    pending[0] = memoryview(first)[sent:]
                    sent = 0

    async def wait_buffered_below(self, limit: int) -> None:
        """Wait until at most ``limit`` bytes wait in the buffer (or the channel broke): a sender that can wait
        (a decoder process forwarding its events) keeps its buffer bounded this way."""
        while self.buffered > limit and self.broken is None:
            if self._flushed.is_set():  # one event for every waiter: a new one would strand those waiting already
                self._flushed = anyio.Event()
            await self._flushed.wait()

    async def close_sending(self) -> None:
        """Send what is buffered, then signal the end of the stream (the other end reads EOF)."""
        self._closing = True
        self._wake.set()
        self._urgent.set()
        await self._drained.wait()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # receiving ----------------------------------------------------------------------------------
    async def frames(self, chunk: int = 1024 * 1024) -> AsyncIterator[Iterable[Frame]]:
        """Batches of received frames, as they arrive; ends at EOF (or when the socket fails)."""
        reader = FrameReader()
        while True:
            await _wait_readable(self.sock)
            try:
                data = self.sock.recv(chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                logger.debug("decoder channel: receive failed: %s", exc)
                data = b""
            if not data:
                if reader.pending:
                    logger.error("decoder channel: the stream ended inside a frame (%d bytes)", reader.pending)
                return
            yield reader.feed(data)
