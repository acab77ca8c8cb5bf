"""Byte-faithful relaying between two streams, with a copy for the passive decoder.

Each direction is one loop: read, queue a copy for the decoder, send on (waiting until the other side took it,
which is the backpressure). The feed never blocks the relay: when the decoder falls behind by more
than its queue, decoding of that connection stops (the exchange is marked partial) and the relay goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal, Protocol

import anyio
import attrs
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from oisp.errors import ProtocolError
from oisp.proxy.net import describe

__all__ = ["CopyDispatcher", "CopyFeed", "DecodeFeed", "PassiveDecoderLike", "RelayResult", "SkipFeed", "relay"]

logger = logging.getLogger(__name__)

#: The most a relay reads at once: with TLS, the records already received are decrypted together up to this much
#: (a bulk transfer then costs a send, a decoder copy and an event-loop turn per 256 KiB, not per 16 KiB record).
#: Reads never wait to fill it: whatever has arrived goes on at once.
CHUNK = 256 * 1024
Direction = Literal["client", "server"]
_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class PassiveDecoderLike(Protocol):
    """What the relay needs of a passive decoder (see :mod:`oisp.http`)."""

    def feed_client(self, data: bytes, now_ns: int | None = None) -> None: ...

    def feed_server(self, data: bytes, now_ns: int | None = None) -> None: ...

    def client_closed(self, now_ns: int | None = None) -> None: ...

    def server_closed(self, now_ns: int | None = None) -> None: ...

    def abort(self, reason: str) -> None: ...


#: (direction, a copy | None at that direction's end | a count of body bytes skipped, when it was read)
_Item = tuple[Direction, bytes | int | None, int]


class CopyFeed(Protocol):
    """Where the relay puts its copies: an in-process :class:`DecodeFeed`, or a feed into a separate decoder
    process (:mod:`oisp.decoder_process`). ``push`` must never block."""

    def push(self, direction: Direction, data: bytes | None, now_ns: int) -> None: ...

    def finish(self, reason: str | None = None) -> None: ...

    async def run(self) -> None: ...


class SkipFeed(CopyFeed, Protocol):
    """A feed that can also pass on "``count`` body bytes went by here, not copied" (see
    :mod:`oisp.proxy.body_skip`); ``skip`` must never block either."""

    def skip(self, direction: Direction, count: int, now_ns: int) -> None: ...


class CopyDispatcher:
    """Hands one connection's copies to its passive decoder, in order; a failing decoder stops decoding (logged
    once), never the caller. Shared by the in-process feed and the decoder process."""

    def __init__(self, decoder: PassiveDecoderLike, connection_id: str) -> None:
        self.decoder = decoder
        self.connection_id = connection_id
        self.failure: str | None = None
        self._broken = False

    def dispatch(self, direction: Direction, data: bytes | None, now_ns: int) -> None:
        """One copy (``None`` data: that direction ended)."""
        if self._broken:
            return
        decoder = self.decoder
        try:
            if direction == "client":
                decoder.client_closed(now_ns) if data is None else decoder.feed_client(data, now_ns)
            else:
                decoder.server_closed(now_ns) if data is None else decoder.feed_server(data, now_ns)
        except Exception:
            self._broken = True
            self.failure = self.failure or "decoder error"
            logger.exception("connection %s: decoder failed; decoding stopped", self.connection_id)

    def skip(self, direction: Direction, count: int, now_ns: int) -> None:
        """``count`` body bytes went by that were not copied (the decoder counts them without seeing them)."""
        if self._broken:
            return
        skip = getattr(self.decoder, "skip_client" if direction == "client" else "skip_server", None)
        try:
            if skip is None:
                raise TypeError(f"{type(self.decoder).__name__} cannot skip body bytes")
            skip(count, now_ns)
        except Exception:
            self._broken = True
            self.failure = self.failure or "decoder error"
            logger.exception("connection %s: decoder failed; decoding stopped", self.connection_id)

    def close(self, reason: str | None = None) -> None:
        """No more copies: end whatever is still open (nothing, after a clean close); ``reason`` (else the
        decoder's own failure) says why it was cut short."""
        try:
            self.decoder.abort(reason or self.failure or "connection closed before the exchange completed")
        except Exception:
            logger.exception("connection %s: decoder abort failed", self.connection_id)


class DecodeFeed:
    """A bounded queue of copies between the relay and one connection's decoder, in the proxy's event loop."""

    def __init__(self, decoder: PassiveDecoderLike, capacity: int, connection_id: str) -> None:
        self.decoder = decoder
        self.connection_id = connection_id
        self._send: MemoryObjectSendStream[_Item]
        self._receive: MemoryObjectReceiveStream[_Item]
        self._send, self._receive = anyio.create_memory_object_stream[_Item](capacity)
        self.failure: str | None = None

    def push(self, direction: Direction, data: bytes | None, now_ns: int) -> None:
        """Queue a copy (``None`` data means that direction ended); never blocks."""
        self._put((direction, data, now_ns))

    def _put(self, item: _Item) -> None:
        if self.failure is not None:
            return
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            self.failure = "decoder fell behind the relay; decoding of this connection stopped"
            logger.warning("connection %s: %s", self.connection_id, self.failure)
            self._send.close()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def skip(self, direction: Direction, count: int, now_ns: int) -> None:
        """Queue a count of body bytes that went by uncopied (see :mod:`oisp.proxy.body_skip`); never blocks."""
        self._put((direction, count, now_ns))

    def finish(self, reason: str | None = None) -> None:
        """No more copies; ``reason`` marks an abnormal end (reset, error)."""
        if reason and self.failure is None:
            self.failure = reason
        self._send.close()

    async def run(self) -> None:
        """Feed the decoder until :meth:`finish`; decoder errors stop decoding, never the relay."""
        dispatcher = CopyDispatcher(self.decoder, self.connection_id)
        async with self._receive:
            async for direction, data, now_ns in self._receive:
                if isinstance(data, int):
                    dispatcher.skip(direction, data, now_ns)
                else:
                    dispatcher.dispatch(direction, data, now_ns)
                if dispatcher.failure is not None and self.failure is None:
                    self.failure = dispatcher.failure
        dispatcher.close(self.failure)


@attrs.define
class RelayResult:
    """How a relayed connection ended."""

    bytes_from_client: int = 0
    bytes_from_server: int = 0
    #: Which side ended first with EOF, if any.
    first_eof: Direction | None = None
    error: str | None = None


async def relay(client: ByteStream, server: ByteStream, feed: CopyFeed | None = None, *,
                rewrite_client: Callable[[bytes], bytes] | None = None,
                silent_deadline: float | None = None) -> RelayResult:
    """Relay both directions until both have ended (EOF propagated as half-close) or one fails.

    ``rewrite_client`` transforms the client's bytes before they go on (reverse mode rewrites request heads);
    it may hold bytes back and raise ``ProtocolError`` on input it cannot follow, which ends the connection.

    ``silent_deadline`` (``anyio.current_time()`` based): the connection is closed then unless a byte has been
    received from either side by that time.
    """
    result = RelayResult()
    silence = anyio.CancelScope(deadline=math.inf if silent_deadline is None else silent_deadline)

    async def pump(src: ByteStream, dst: ByteStream, direction: Direction, scope: anyio.CancelScope) -> None:
        rewrite = rewrite_client if direction == "client" else None
        while True:
            try:
                data = await src.receive(CHUNK)
            except anyio.EndOfStream:
                break
            except _ERRORS as exc:
                result.error = result.error or f"{direction} side: {describe(exc)}"
                scope.cancel()
                return
            silence.deadline = math.inf
            if rewrite is not None:
                try:
                    data = rewrite(data)
                except ProtocolError as exc:
                    result.error = result.error or f"client sent malformed HTTP: {exc}"
                    # the message quotes the client's bytes (a URL can hold a key): only at DEBUG
                    logger.info("relay: client sent malformed HTTP; connection closed")
                    logger.debug("relay: %s", result.error)
                    scope.cancel()
                    return
                if not data:
                    continue
            if feed is not None:
                # The copy is queued before the bytes go on, so the decoder never sees an answer before the
                # bytes that caused it. Queuing never waits.
                feed.push(direction, data, time.monotonic_ns())
            try:
                await dst.send(data)
            except _ERRORS as exc:
                other = "server" if direction == "client" else "client"
                result.error = result.error or f"{other} side: {describe(exc)}"
                scope.cancel()
                return
            if direction == "client":
                result.bytes_from_client += len(data)
            else:
                result.bytes_from_server += len(data)
        if result.first_eof is None:
            result.first_eof = direction
        if feed is not None:
            feed.push(direction, None, time.monotonic_ns())
        try:
            await dst.send_eof()
        except (*_ERRORS, NotImplementedError):
            pass

    with silence:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, client, server, "client", tg.cancel_scope)
            tg.start_soon(pump, server, client, "server", tg.cancel_scope)
    if silence.cancelled_caught:
        result.error = result.error or "neither side sent anything; closed"
    return result
