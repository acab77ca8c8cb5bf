"""One client connection of the proxy: the thin anyio driver around :class:`~oisp.proxy.core.ConnectionCore`.

:class:`Connection` learns where the client was going (the explicit proxy request, the diverted connection's
original destination, or the reverse target), starts naming its process, then runs the core: it performs each
command the core gives (reads, connects through the :class:`~oisp.proxy.service.ProxyServices`, handshakes,
relays, reports) and feeds back what happened. It holds the connection's streams and nothing else: every
decision is the core's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream

from oisp.attribution import Attribution, ClientSocket
from oisp.contracts import (
    AttributionSource,
    Destination,
    OriginalDestinationSource,
    diverted_client_of,
    recall_of,
)
from oisp.errors import ProtocolError
from oisp.proxy import core
from oisp.proxy.explicit import parse_proxy_request
from oisp.proxy.forward import serve_forward
from oisp.proxy.loop import loop_response
from oisp.proxy.net import PrefixedStream
from oisp.proxy.relay import RelayResult, relay
from oisp.proxy.reverse import serve_reverse
from oisp.proxy.service import NET_ERRORS, ProxyServices, TlsUpstream, UpstreamFailure
from oisp.proxy.tls_stream import TlsStream
from oisp.proxy.upstream import UpstreamTarget
from oisp.ratelog import Throttled

__all__ = ["Connection", "PendingAttribution"]

logger = logging.getLogger("oisp.proxy.server")

_ATTRIBUTION_LOG = Throttled(logger, 60.0)


class PendingAttribution:
    """The process behind a connection, being looked up.

    An attributor with a ``recall`` method (:class:`~oisp.contracts.RecallingAttributionSource`) is first asked
    on the event loop, which answers in a tenth of a millisecond for a client seen before; only when that has no
    answer does the full lookup run, in a worker thread (it may search every process).
    """

    #: Longest wait for an answer; a connection is never held longer for attribution.
    TIMEOUT = 2.0

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Attribution | None = None

    async def run(self, attributor: AttributionSource, client: tuple[str, int], local: tuple[str, int],
                  pid_hint: int | None, original: ClientSocket | None) -> None:
        # The client's own socket is passed only when known, so a plain three-argument attributor still works.
        extra: dict[str, Any] = {"original": original} if original is not None else {}
        try:
            recall = recall_of(attributor)
            known: Attribution | None = recall(client, local, pid_hint, **extra) if recall is not None else None
            if known is not None:
                self.value = known
            else:
                self.value = await anyio.to_thread.run_sync(functools.partial(attributor, client, local, pid_hint,
                                                                              **extra))
        except OSError as exc:  # out of file descriptors, mostly: no traceback, at most once a minute
            _ATTRIBUTION_LOG.log(logging.WARNING, "process attribution failed for %s:%d: %s", *client, exc)
        except Exception:
            logger.exception("process attribution failed for %s:%d", *client)
        finally:
            self.done.set()

    async def get(self) -> Attribution | None:
        with anyio.move_on_after(self.TIMEOUT):
            await self.done.wait()
        return self.value


#: Starts naming a connection's process: (client, local, pid hint, the client's own socket) -> pending answer.
StartAttribution = Callable[[tuple[str, int], tuple[str, int], int | None, ClientSocket | None], PendingAttribution]


def client_socket(original: Destination) -> ClientSocket | None:
    """The client's own socket of a diverted connection, from the diverter's answer (None when the answer does
    not say where the client is: see :class:`~oisp.contracts.DivertedDestination`)."""
    diverted = diverted_client_of(original)
    if diverted is None:
        return None
    client, namespace = diverted
    return ClientSocket(local=client, remote=(str(original.ip), int(original.port)), namespace=namespace)


class Connection:
    """One accepted client connection, from its first byte to its end."""

    def __init__(self, services: ProxyServices, policy: core.RoutingPolicy, client: SocketStream, *,
                 connection_id: str, client_addr: tuple[str, int], local_addr: tuple[str, int],
                 attribute: StartAttribution) -> None:
        self.services = services
        self.config = services.config
        self.policy = policy
        self.client = client
        self.connection_id = connection_id
        self.client_addr = client_addr
        self.local_addr = local_addr
        self._attribute = attribute
        self.pending: PendingAttribution | None = None
        self._started = 0.0
        self._target: UpstreamTarget | None = None
        self._upstream: ByteStream | None = None
        self._upstream_prefix = b""
        self._downstream: TlsStream | None = None

    # the modes' fronts ------------------------------------------------------------------------------------
    async def explicit(self) -> None:
        """An explicit-proxy client: a CONNECT (tunnel) or absolute-form plain-HTTP requests (forwarded)."""
        buffer = b""
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                while (request := parse_proxy_request(buffer)) is None:
                    buffer += await self.client.receive()
        except ProtocolError as exc:
            logger.info("connection %s: bad proxy request: %s", self.connection_id, exc)
            await _send_quietly(self.client,
                                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        except (TimeoutError, anyio.EndOfStream, *NET_ERRORS):
            return
        if await self.services.targets_self(request.host, request.port, self.connection_id, self.client_addr):
            await _send_quietly(self.client, loop_response(f"{request.host}:{request.port}"))
            return
        if request.tunnel:
            try:
                await self.client.send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            except NET_ERRORS:
                return  # the client left
            self.pending = self._attribute(self.client_addr, self.local_addr, None, None)
            await self.route(request.host, request.port, initial=buffer[request.head_length:])
        else:
            who = await self._attribute(self.client_addr, self.local_addr, None, None).get()
            await serve_forward(self, buffer, who)

    async def transparent(self, lookup: OriginalDestinationSource | None) -> None:
        """A diverted client: its original destination comes from ``lookup`` (the interceptor)."""
        try:
            original = lookup.original_destination(self.client_addr, self.local_addr) if lookup is not None else None
        except Exception:
            logger.exception("connection %s: original-destination lookup failed", self.connection_id)
            original = None
        if original is None:
            logger.warning("connection %s from %s:%d: no original destination known; closing",
                           self.connection_id, *self.client_addr)
            return
        pid_hint = getattr(original, "pid", None)  # in the contract; tolerated missing, as it always was
        self.pending = self._attribute(self.client_addr, self.local_addr, pid_hint, client_socket(original))
        await self.route(str(original.ip), int(original.port), pid_hint=pid_hint)

    async def reverse(self) -> None:
        """A reverse-proxy client: plain HTTP for the one configured upstream."""
        who = await self._attribute(self.client_addr, self.local_addr, None, None).get()
        await serve_reverse(self, who)

    # the core's driver ------------------------------------------------------------------------------------
    async def route(self, host: str, port: int, *, initial: bytes = b"", pid_hint: int | None = None) -> None:
        """Run the :class:`~oisp.proxy.core.ConnectionCore` for a connection to ``host:port``."""
        connection = core.ConnectionCore(self.policy, connection_id=self.connection_id,
                                         client_addr=self.client_addr, host=host, port=port, pid_hint=pid_hint,
                                         initial=initial)
        self._started = anyio.current_time()
        commands = deque(connection.start())
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                while isinstance(commands[0], core.ReadClient):  # reading the ClientHello: the only command
                    commands.popleft()
                    commands.extend(connection.handle(await self._read()))
        except TimeoutError:
            commands = deque(connection.handle(core.ClientSilent()))
        async with contextlib.AsyncExitStack() as streams:
            while commands:
                command = commands.popleft()
                if isinstance(command, core.Close):
                    return
                event = await self._perform(command, streams)
                if event is not None:
                    commands.extend(connection.handle(event))

    async def _read(self) -> core.Event:
        try:
            return core.ClientData(await self.client.receive())
        except (anyio.EndOfStream, *NET_ERRORS):
            return core.ClientGone()

    async def _perform(self, command: core.Command, streams: contextlib.AsyncExitStack) -> core.Event | None:
        if isinstance(command, core.AwaitAttribution):
            return core.Attributed(await self.pending.get() if self.pending is not None else None)
        if isinstance(command, core.Report):
            self.services.report(command.report)
            return None
        if isinstance(command, core.SendClient):
            await _send_quietly(self.client, command.data)
            return None
        if isinstance(command, core.Pinned):
            self.services.pinned(command.pair)
            return None
        if isinstance(command, core.ConnectTcp):
            tcp = await self.services.connect(command.host, command.port, self.connection_id, self.client_addr)
            if isinstance(tcp, UpstreamFailure):
                return _failed(tcp)
            self._upstream = await streams.enter_async_context(tcp.stream)
            return core.UpstreamReady(tcp.address, tcp.connect_ms)
        if isinstance(command, core.OpenTls):
            return await self._open_tls(command, streams)
        if isinstance(command, core.HandshakeClient):
            return await self._handshake_client(command)
        if isinstance(command, core.Relay):
            return await self._relay(command)
        raise AssertionError(f"unknown command {command!r}")

    async def _open_tls(self, command: core.OpenTls, streams: contextlib.AsyncExitStack) -> core.Event:
        context = self.services.upstream_context(command.alpn_offer)
        self._target = target = UpstreamTarget(command.server_hostname, command.connect_host, command.port,
                                               command.alpn_offer, context)
        opened = await self.services.upstream_for(target, self.connection_id, self.client_addr)
        if isinstance(opened, UpstreamFailure):
            return _failed(opened)
        upstream: TlsUpstream = opened
        self._upstream = await streams.enter_async_context(upstream.stream)
        self._upstream_prefix = upstream.prefix
        der = upstream.stream.peer_certificate_der()
        return core.UpstreamReady(upstream.address, upstream.connect_ms, preconnected=upstream.preconnected,
                                  alpn=upstream.stream.alpn, tls_version=upstream.stream.version,
                                  cipher=upstream.stream.cipher,
                                  certificate=self.services.certificate_summary(der) if der else None)

    async def _handshake_client(self, command: core.HandshakeClient) -> core.Event:
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                context = self.policy.ca.server_context(command.name, list(command.alpn) if command.alpn else None)
                downstream = await self.services.network.tls_server(self.client, context,
                                                                    initial_data=command.client_hello)
        except (ssl.SSLError, anyio.EndOfStream, TimeoutError, *NET_ERRORS) as exc:
            return core.ClientHandshakeFailed(str(exc), tls_alert=isinstance(exc, ssl.SSLError))
        self._downstream = downstream
        return core.ClientHandshakeDone(downstream.alpn, downstream.version)

    async def _relay(self, command: core.Relay) -> core.Event:
        upstream = self._upstream
        assert upstream is not None
        silent_deadline = self._started + self.config.silent_lifetime if command.silent else None
        if command.kind is core.RelayKind.RAW:
            if command.prefix:
                try:
                    await upstream.send(command.prefix)
                except NET_ERRORS as exc:
                    return core.RelayEnded(0, 0, None, str(exc))
            result = await relay(self.client, upstream, silent_deadline=silent_deadline)
        elif command.kind is core.RelayKind.PLAIN:
            assert command.info is not None
            result = await self.services.relay_decoded(self.client, upstream, command.prefix, command.info,
                                                       command.alpn, silent_deadline)
        else:
            assert command.info is not None and self._downstream is not None and self._target is not None
            relay_ended = anyio.Event()
            self.services.preconnect(self._target, relay_ended)
            relayed: ByteStream = PrefixedStream(upstream, self._upstream_prefix) if self._upstream_prefix \
                else upstream
            result = RelayResult(error="relay cancelled")
            try:
                result = await self.services.relay_decoded(self._downstream, relayed, b"", command.info,
                                                           command.alpn)
            finally:
                relay_ended.set()
        return core.RelayEnded(result.bytes_from_client, result.bytes_from_server, result.first_eof, result.error)


def _failed(failure: UpstreamFailure) -> core.UpstreamFailed:
    return core.UpstreamFailed(failure.decision, failure.error, address=failure.address,
                               connect_ms=failure.connect_ms, logged=failure.logged)


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (*NET_ERRORS, anyio.EndOfStream):
        pass
