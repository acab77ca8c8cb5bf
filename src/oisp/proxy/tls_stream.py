"""TLS over an anyio byte stream, with control over the first bytes and over close_notify.

anyio's own ``TLSStream`` cannot be handed bytes that were already read from the socket (the proxy reads the
ClientHello *before* it decides to terminate TLS) and closes both directions at once. This one takes the
already-read bytes as ``initial_data``, propagates half-close (close_notify, then TCP FIN) and exposes the
negotiated parameters the events need.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio
from anyio.abc import ByteStream

__all__ = ["TlsStream"]

T = TypeVar("T")

_MAX_READ = 256 * 1024
#: The largest plaintext a TLS record carries. Only a full record (bulk data) is merged with the records queued
#: behind it: smaller ones (a streamed event, a request) go on alone, so interactive traffic is chunked as before.
_FULL_RECORD = 16 * 1024
#: Per thread, the buffer records are decrypted into before they are copied out (filled and emptied without
#: yielding, so every stream of an event loop can share it).
_SCRATCH = threading.local()


class TlsStream(ByteStream):
    """A TLS connection (client or server side) running over another byte stream."""

    def __init__(self, transport: ByteStream, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.transport = transport
        self.ssl_object = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._send_lock = anyio.Lock()
        self._eof_sent = False
        self._transport_eof = False
        self._deferred: ssl.SSLError | None = None

    @classmethod
    async def handshake(
        cls,
        transport: ByteStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial_data: bytes = b"",
        session: ssl.SSLSession | None = None,
    ) -> TlsStream:
        """Run the TLS handshake over ``transport`` and return the established stream.

        ``initial_data`` is fed to TLS before anything is read from ``transport`` (a peeked ClientHello).
        ``session`` (client side) is a session of an earlier connection made with the same ``context`` to
        offer for resumption; the server may accept it or run a full handshake (see :attr:`resumed`).
        Raises ``ssl.SSLError`` (including ``SSLCertVerificationError``) or ``anyio.EndOfStream``.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if initial_data:
            incoming.write(initial_data)
        ssl_object = context.wrap_bio(incoming, outgoing, server_side=server_side,
                                      server_hostname=None if server_side else server_hostname,
                                      session=None if server_side else session)
        stream = cls(transport, ssl_object, incoming, outgoing)
        await stream._retry(ssl_object.do_handshake)
        return stream

    # parameters ---------------------------------------------------------------------------------
    @property
    def alpn(self) -> str | None:
        """The negotiated ALPN protocol, or None."""
        return self.ssl_object.selected_alpn_protocol()

    @property
    def version(self) -> str | None:
        """The TLS version (``TLSv1.3``)."""
        return self.ssl_object.version()

    @property
    def cipher(self) -> str | None:
        """The cipher suite name."""
        cipher = self.ssl_object.cipher()
        return cipher[0] if cipher else None

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session (no certificate was sent or verified in it)."""
        return self.ssl_object.session_reused

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate in DER, if it sent one."""
        return self.ssl_object.getpeercert(binary_form=True)

    # I/O ----------------------------------------------------------------------------------------
    async def _flush(self) -> None:
        # Runs after every TLS read and write, so the common cases stay cheap: with nothing queued and no send in
        # flight there is nothing to wait for, and an uncontended lock is taken without yielding to the event
        # loop (``async with`` would yield first, letting the decoder run before the bytes go out).
        if not self._outgoing.pending and not self._send_lock.locked():
            return
        try:
            self._send_lock.acquire_nowait()
        except anyio.WouldBlock:
            await self._send_lock.acquire()
        try:
            data = self._outgoing.read()
            if data:
                await self.transport.send(data)
        finally:
            self._send_lock.release()

    async def _retry(self, operation: Callable[..., T], *args: Any) -> T:
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                await self._flush()
                if self._transport_eof:
                    raise
                try:
                    data = await self.transport.receive(_MAX_READ)
                except anyio.EndOfStream:
                    self._transport_eof = True
                    self._incoming.write_eof()
                else:
                    self._incoming.write(data)
            else:
                await self._flush()
                return result

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Decrypted bytes; ``anyio.EndOfStream`` after the peer's close_notify or EOF.

        In bulk transfers, records that have already arrived are decrypted together, up to ``max_bytes``: a TLS
        record holds at most 16 KiB, and relaying each one on its own costs a send (and a syscall) per record.
        """
        try:
            if self._deferred is not None:
                error, self._deferred = self._deferred, None
                raise error
            # one record at most (SSL_read never returns more): asking for more would allocate max_bytes each time
            data = await self._retry(self.ssl_object.read, min(max_bytes, _FULL_RECORD))
            if len(data) >= _FULL_RECORD and len(data) < max_bytes and self._incoming.pending:
                data = self._read_buffered(data, max_bytes)
                await self._flush()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
            raise anyio.EndOfStream from None
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc
        if not data:
            raise anyio.EndOfStream
        return data

    def _read_buffered(self, first: bytes, max_bytes: int) -> bytes:
        """``first`` plus whatever the records already in the incoming buffer decrypt to, never waiting.

        The records are decrypted into one reused buffer (a record at a time: that is what OpenSSL returns), and
        copied out once, instead of allocating and joining a ``bytes`` per record."""
        scratch: bytearray | None = getattr(_SCRATCH, "buffer", None)
        if scratch is None or len(scratch) < max_bytes:
            scratch = _SCRATCH.buffer = bytearray(max(max_bytes, _MAX_READ))
        view = memoryview(scratch)
        size = len(first)
        view[:size] = first
        read = self.ssl_object.read
        pending = self._incoming
        try:
            while size < max_bytes and pending.pending:
                try:
                    more = cast(int, read(max_bytes - size, view[size:max_bytes]))  # with a buffer: the count
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLError as exc:
                    self._deferred = exc  # the next receive() reports it, after the bytes that came before it
                    break
                if not more:
                    break
                size += more
            return bytes(view[:size])
        finally:
            view.release()

    async def send(self, item: bytes) -> None:
        """Encrypt and send ``item`` (waits until the transport took it: backpressure)."""
        try:
            self.ssl_object.write(item)
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def send_eof(self) -> None:
        """Send close_notify, then end the transport's sending side (TCP FIN); reading may go on."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.ssl_object.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: our close_notify is queued; the peer's comes later (or never)
        try:
            await self._flush()
            await self.transport.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def aclose(self) -> None:
        """Close the connection (close_notify if not sent yet, then the transport)."""
        if not self._eof_sent:
            self._eof_sent = True
            try:
                self.ssl_object.unwrap()
            except ssl.SSLError:
                pass
            try:
                with anyio.move_on_after(1):
                    await self._flush()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        await self.transport.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.transport.extra_attributes
