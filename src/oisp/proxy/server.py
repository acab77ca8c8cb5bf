"""The TLS-intercepting proxy.

Per client connection: learn where it was going (CONNECT, original destination, or the reverse target), read
the TLS ClientHello without answering it, and decide. Not an AI endpoint, or a client known to pin
certificates: relay the raw bytes untouched. An AI endpoint: connect upstream first, offering the client's
ALPN list and verifying the upstream certificate; only then finish the client's handshake with a leaf for its
SNI that selects exactly the upstream's ALPN. Then relay bytes both ways, verbatim, and decode a copy.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import attrs
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskStatus

from oisp.attribution import Attribution, ClientSocket
from oisp.endpoints import EndpointTable
from oisp.errors import CertificateError, ProtocolError
from oisp.hookspecs import EndpointSpec
from oisp.http.exchange import ConnectionInfo
from oisp.proxy.config import ProxyConfig, ProxyMode
from oisp.proxy.explicit import parse_proxy_request
from oisp.proxy.forward import serve_forward
from oisp.proxy.loop import SelfAddresses, loop_response
from oisp.proxy.net import PrefixedStream, SocketHook, connect_tcp, create_listener, describe
from oisp.proxy.pinning import PinnedClients, ProcessKey
from oisp.proxy.relay import CopyFeed, DecodeFeed, PassiveDecoderLike, RelayResult, relay
from oisp.proxy.report import ConnectionReport, Decision, ProxyObserver, UpstreamCertificate
from oisp.proxy.tls_stream import TlsStream
from oisp.proxy.upstream import MAX_SPARE_BUFFER, PRECONNECT_DELAY, Spare, UpstreamSessions, UpstreamTarget
from oisp.ratelog import Throttled

__all__ = ["Attributor", "DecoderFactory", "MitmProxy", "OriginalDestinationLookup", "ProxyStats"]

logger = logging.getLogger(__name__)

#: A fatal TLS alert (handshake_failure) sent to a client whose upstream could not be trusted or reached.
_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
#: The TLS alerts (as OpenSSL names them) by which a client says it refuses oisp's certificate: the only evidence
#: of pinning. An EOF or a reset during or right after the handshake is not: any process can do that.
_PIN_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE")
_MAX_CLIENT_HELLO = 64 * 1024
#: Shortest and longest wait after a failed accept (out of descriptors): doubled at each failure in a row.
_ACCEPT_BACKOFF = (0.01, 1.0)
_ids = itertools.count(1)
#: Distinguishes this process's connection ids (and so request ids) from those of earlier runs.
_RUN = secrets.token_hex(3)


class _ClientHello(Protocol):
    @property
    def sni(self) -> str | None: ...

    @property
    def alpn_protocols(self) -> tuple[str, ...]: ...


class _CertificateAuthority(Protocol):
    def leaf_for(self, host: str) -> Any: ...

    def server_context(self, host: str, alpn: Sequence[str] | None) -> ssl.SSLContext: ...


class _OriginalDestination(Protocol):
    ip: str
    port: int
    pid: int | None


class OriginalDestinationLookup(Protocol):
    """Answers "where was this diverted connection going?" (transparent mode; see oisp.interception)."""

    def original_destination(self, client: tuple[str, int], local: tuple[str, int]) -> Any: ...


class Attributor(Protocol):
    """Names the process behind a connection: (client address, local address, pid hint) as the proxy sees
    them, and for a diverted connection the client's own socket (``original``) -> attribution or None."""

    def __call__(self, client: tuple[str, int], local: tuple[str, int], pid_hint: int | None, /, *,
                 original: ClientSocket | None = None) -> Attribution | None: ...


#: Builds the passive decoder of a connection: (alpn, connection, listener, body_cap) -> decoder.
DecoderFactory = Callable[..., PassiveDecoderLike]


@attrs.define
class ProxyStats:
    """Counters of the proxy."""

    connections: int = 0
    active: int = 0
    decisions: dict[str, int] = attrs.field(factory=dict)
    errors: int = 0
    #: Each (host, process) pair pinned during the run, as "host by exe[pid]" (at most 100).
    pinned: list[str] = attrs.field(factory=list)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addr(stream: SocketStream, attribute: Any) -> tuple[str, int]:
    try:
        address = stream.extra(attribute)
    except Exception:
        return ("", 0)
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else (str(address), 0)


class MitmProxy:
    """The TLS-intercepting proxy: relays every byte unchanged and hands copies of AI traffic to ``observer``.

    Start it with ``await task_group.start(proxy.serve)``, which returns the bound address. ``endpoints`` says
    which hosts are AI endpoints (default: every installed provider plugin's, as ``oisp run`` uses). In
    transparent mode, ``original_destinations`` (the interceptor) may be set after ``serve`` has started, since
    the interceptor needs the port it diverts to; until then diverted connections are closed.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        ca: _CertificateAuthority,
        endpoints: EndpointTable | None = None,
        observer: ProxyObserver | None = None,
        decoder_factory: DecoderFactory | None = None,
        original_destinations: OriginalDestinationLookup | None = None,
        attributor: Attributor | None = None,
        before_upstream_connect: SocketHook | None = None,
        parse_client_hello: Callable[[bytes], _ClientHello | None] | None = None,
    ) -> None:
        self.config = config
        self.ca = ca
        if endpoints is None:
            from oisp.plugins import create_plugin_manager

            endpoints = EndpointTable(create_plugin_manager().endpoints())
        self.endpoints = endpoints
        self.observer = observer
        if decoder_factory is None:
            from oisp.http.passive import make_decoder

            decoder_factory = make_decoder
        self._make_decoder = decoder_factory
        if parse_client_hello is None:
            from oisp.tls.clienthello import parse_client_hello as parse

            parse_client_hello = parse
        self._parse_client_hello: Callable[[bytes], _ClientHello | None] = parse_client_hello
        self.original_destinations = original_destinations
        self.attributor = attributor
        self.before_upstream_connect = before_upstream_connect
        self.pinned = PinnedClients(config.pinned_ttl)
        self.stats = ProxyStats()
        self.address: tuple[str, int] | None = None
        #: The proxy's own listening addresses, once it listens: requests addressed there are refused (a loop).
        self._self_addresses: SelfAddresses | None = None
        self._loop_log = Throttled(logger, 60.0)
        self._accept_log = Throttled(logger, 30.0)
        self._listener: SocketListener | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._connections_scope: anyio.CancelScope | None = None
        self._draining = False
        self._drained = anyio.Event()
        self._drain_timeout = 5.0
        self._upstream_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._upstream_sessions = UpstreamSessions()
        self._certificates: OrderedDict[bytes, UpstreamCertificate] = OrderedDict()
        self._spares: dict[UpstreamTarget, Spare] = {}
        self._spares_event: anyio.Event | None = None
        if config.upstream_insecure:
            logger.warning("UPSTREAM CERTIFICATES ARE NOT VERIFIED (upstream_insecure): anyone on the path "
                           "can impersonate AI providers to this machine's apps")
        if config.listens_beyond_loopback:
            logger.warning("the proxy listens on %s, reachable from other machines: anyone who can reach it can "
                           "use it", config.listen_host)

    # lifecycle ----------------------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`shutdown` (or cancellation); reports the bound (host, port) through
        ``task_status``."""
        listener = await create_listener(self.config.listen_host, self.config.listen_port,
                                         max_segment=self.config.listen_max_segment)
        self._listener = listener
        async with listener, anyio.create_task_group() as connections:
            self._connections_scope = connections.cancel_scope
            self._tasks = connections
            bound = listener.extra(SocketAttribute.local_address)
            self.address = (str(bound[0]), int(bound[1]))
            self._self_addresses = SelfAddresses(self.address)
            logger.info("oisp proxy (%s mode) listening on %s:%d", self.config.mode, *self.address)
            task_status.started(self.address)
            backoff = 0.0
            while True:
                try:
                    client = await listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break  # shutdown() closed the listener
                except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                    # Waiting lets connections end and free descriptors; the client waits in the backlog.
                    backoff = min(max(backoff * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                    self._accept_log.log(logging.ERROR, "accepting connections failed (%s: out of file descriptors "
                                         "or memory?); retrying with a backoff of up to %.0f s; %d connection(s) "
                                         "open", exc.strerror or exc, _ACCEPT_BACKOFF[1], self.stats.active)
                    await anyio.sleep(backoff)
                    continue
                if backoff:
                    backoff = 0.0
                    logger.info("accepting connections again (%d failed attempts)", self._accept_log.total)
                    self._accept_log.total = 0
                connections.start_soon(self._handle, client)
            if self.stats.active:
                logger.info("draining %d connection(s) for up to %.1f s", self.stats.active, self._drain_timeout)
                with anyio.move_on_after(self._drain_timeout):
                    await self._drained.wait()
            connections.cancel_scope.cancel()

    async def shutdown(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting; let in-flight connections finish for up to ``drain_timeout`` seconds, then close them.
        :meth:`serve` returns once that is done."""
        self._drain_timeout = drain_timeout
        self._draining = True
        for spare in list(self._spares.values()):
            spare.scope.cancel()  # each closes itself
        if self._listener is not None:
            await self._listener.aclose()

    def _count(self, decision: Decision) -> None:
        self.stats.decisions[decision.value] = self.stats.decisions.get(decision.value, 0) + 1

    def _report(self, report: ConnectionReport) -> None:
        self._count(report.decision)
        if self.observer is not None:
            try:
                self.observer.connection(report)
            except Exception:
                logger.exception("proxy observer failed on connection %s", report.connection_id)

    # per connection -----------------------------------------------------------------------------
    async def _handle(self, client: SocketStream) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        connection_id = f"c{_RUN}.{next(_ids)}"
        client_addr = _addr(client, SocketAttribute.remote_address)
        local_addr = _addr(client, SocketAttribute.local_address)
        try:
            async with client:
                if self.config.mode is ProxyMode.EXPLICIT:
                    await self._explicit(client, connection_id, client_addr, local_addr)
                elif self.config.mode is ProxyMode.TRANSPARENT:
                    await self._transparent(client, connection_id, client_addr, local_addr)
                else:
                    await self._reverse(client, connection_id, client_addr, local_addr)
        except Exception:
            self.stats.errors += 1
            logger.exception("connection %s from %s:%d failed", connection_id, *client_addr)
        finally:
            self.stats.active -= 1
            if self._draining and self.stats.active == 0:
                self._drained.set()

    async def _explicit(self, client: SocketStream, connection_id: str, client_addr: tuple[str, int],
                        local_addr: tuple[str, int]) -> None:
        buffer = b""
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                while (request := parse_proxy_request(buffer)) is None:
                    buffer += await client.receive()
        except ProtocolError as exc:
            logger.info("connection %s: bad proxy request: %s", connection_id, exc)
            await _send_quietly(client, b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        except (TimeoutError, anyio.EndOfStream, *_NET_ERRORS):
            return
        if await self.targets_self(request.host, request.port, connection_id, client_addr):
            await _send_quietly(client, loop_response(f"{request.host}:{request.port}"))
            return
        if request.tunnel:
            try:
                await client.send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            except _NET_ERRORS:
                return  # the client left
            await self._route(client, buffer[request.head_length:], connection_id, client_addr, request.host,
                              request.port, self._attribute(client_addr, local_addr, None), None)
        else:
            who = await self._attribute(client_addr, local_addr, None).get()
            await serve_forward(self, client, buffer, connection_id, client_addr, who, None)

    async def _transparent(self, client: SocketStream, connection_id: str, client_addr: tuple[str, int],
                           local_addr: tuple[str, int]) -> None:
        lookup = self.original_destinations  # may be set after serve() started: the interceptor needs its port
        try:
            original = lookup.original_destination(client_addr, local_addr) if lookup is not None else None
        except Exception:
            logger.exception("connection %s: original-destination lookup failed", connection_id)
            original = None
        if original is None:
            logger.warning("connection %s from %s:%d: no original destination known; closing",
                           connection_id, *client_addr)
            return
        pid_hint = getattr(original, "pid", None)
        who = self._attribute(client_addr, local_addr, pid_hint, _client_socket(original))
        await self._route(client, b"", connection_id, client_addr, str(original.ip), int(original.port), who,
                          pid_hint)

    async def _reverse(self, client: SocketStream, connection_id: str, client_addr: tuple[str, int],
                       local_addr: tuple[str, int]) -> None:
        from oisp.proxy.reverse import serve_reverse

        who = await self._attribute(client_addr, local_addr, None).get()
        await serve_reverse(self, client, connection_id, client_addr, who)

    def _attribute(self, client_addr: tuple[str, int], local_addr: tuple[str, int],
                   pid_hint: int | None, original: ClientSocket | None = None) -> _PendingAttribution:
        """Start naming the connection's process (see :class:`_PendingAttribution`); the proxy reads the
        ClientHello and connects meanwhile, and waits for the answer only where it needs it: for a decision that
        depends on the process (a pinning client), and before reporting the connection. ``original`` is the
        client's own socket of a diverted connection, as the interceptor's NAT table knows it."""
        pending = _PendingAttribution()
        if self.attributor is None or self._tasks is None:
            pending.done.set()
        else:
            self._tasks.start_soon(pending.run, self.attributor, client_addr, local_addr, pid_hint, original)
        return pending

    async def _route(self, client: SocketStream, initial: bytes, connection_id: str, client_addr: tuple[str, int],
                     host: str, port: int, pending: _PendingAttribution, pid_hint: int | None) -> None:
        """Classify the tunnelled/diverted bytes (TLS or not, AI endpoint or not) and handle them."""
        buffer = initial
        hello: _ClientHello | None = None
        silent_deadline: float | None = None
        started = anyio.current_time()
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                if not buffer:
                    buffer = await client.receive()
                while buffer[:1] == b"\x16":
                    try:
                        hello = self._parse_client_hello(buffer)
                    except ProtocolError as exc:
                        logger.info("connection %s: not a usable ClientHello (%s); passing through",
                                    connection_id, exc)
                        break
                    if hello is not None or len(buffer) > _MAX_CLIENT_HELLO:
                        break
                    buffer += await client.receive()
        except TimeoutError:
            logger.info("connection %s: client sent no ClientHello in time; passing through", connection_id)
            if not buffer:  # nothing said yet: if neither side ever says anything, the connection ends
                silent_deadline = started + self.config.silent_lifetime
        except (anyio.EndOfStream, *_NET_ERRORS):
            return
        name = hello.sni if hello is not None and hello.sni else host
        endpoint = self.endpoints.match(name, port)
        report = ConnectionReport(
            connection_id=connection_id, mode=str(self.config.mode), client_addr=client_addr, target_host=name,
            target_port=port, decision=Decision.PASSTHROUGH, success=True, pid_hint=pid_hint,
            provider=endpoint.provider if endpoint else None, sni=hello.sni if hello else None,
        )
        if hello is not None and endpoint is not None and endpoint.tls and not self.pinned.knows(name):
            # No client pins this host, so the process cannot change the decision: intercept, and learn the
            # process while the handshakes run (it is in the report and the events all the same).
            try:
                self.ca.leaf_for(name)  # cached; fails early for a host a name-constrained CA may not vouch for
            except CertificateError:
                pass  # passed through below
            else:
                await self._intercept(client, buffer, hello, name, host, port, endpoint, report, pending)
                return
        report.attach(await pending.get())
        process_key = _process_key(report)
        if hello is None:
            if endpoint is not None and not endpoint.tls:
                await self._plain(client, buffer, connection_id, client_addr, host, port, endpoint, pending,
                                  pid_hint, silent_deadline)
                return
            await self._passthrough(client, buffer, host, port, report, silent_deadline)
            return
        if endpoint is None or not endpoint.tls:
            await self._passthrough(client, buffer, host, port, report)
            return
        if self.pinned.is_pinned(name, process_key):
            report.decision = Decision.PINNED_PASSTHROUGH
            await self._passthrough(client, buffer, host, port, report)
            return
        try:
            self.ca.leaf_for(name)  # cached; fails early for a host a name-constrained CA may not vouch for
        except CertificateError as exc:
            logger.warning("connection %s: no certificate for %s (%s); passing it through untouched",
                           connection_id, name, exc)
            report.error = str(exc)
            await self._passthrough(client, buffer, host, port, report)
            return
        await self._intercept(client, buffer, hello, name, host, port, endpoint, report, pending)

    async def targets_self(self, host: str, port: int, connection_id: str, client_addr: tuple[str, int]) -> bool:
        """Whether ``host:port`` is (where the overrides send it) one of the proxy's own listening addresses:
        forwarding there would loop back to the proxy. Logged at WARNING, at most once a minute."""
        address, address_port = self.config.override_for(host, port)
        if self._self_addresses is None or not await self._self_addresses.targets_self(address, address_port):
            return False
        self._loop_log.log(logging.WARNING, "connection %s from %s:%d: refused a request for %s:%d, oisp's own "
                           "listening address (it would loop back to oisp)", connection_id, *client_addr, host, port)
        return True

    async def _connect_upstream(self, host: str, port: int, report: ConnectionReport) -> SocketStream | None:
        if await self.targets_self(host, port, report.connection_id, report.client_addr):
            report.decision = Decision.UPSTREAM_FAILED
            report.success = False
            report.error = f"refused: {host}:{port} is oisp's own listening address (a loop)"
            return None
        address, address_port = self.config.override_for(host, port)
        started = time.perf_counter()
        try:
            upstream = await connect_tcp(address, address_port, before_connect=self.before_upstream_connect,
                                         timeout=self.config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            report.decision = Decision.UPSTREAM_FAILED
            report.success = False
            report.error = f"connect to {address}:{address_port} failed: {exc}"
            logger.warning("connection %s: %s", report.connection_id, report.error)
            return None
        report.connect_ms = round((time.perf_counter() - started) * 1000, 3)
        report.upstream_addr = _addr(upstream, SocketAttribute.remote_address)
        return upstream

    async def _passthrough(self, client: SocketStream, buffer: bytes, host: str, port: int,
                           report: ConnectionReport, silent_deadline: float | None = None) -> None:
        upstream = await self._connect_upstream(host, port, report)
        self._report(report)
        if upstream is None:
            return
        async with upstream:
            if buffer:
                try:
                    await upstream.send(buffer)
                except _NET_ERRORS:
                    return
            result = await relay(client, upstream, silent_deadline=silent_deadline)
            if silent_deadline is not None and not result.bytes_from_client and not result.bytes_from_server:
                logger.info("connection %s to %s:%d: %s after %.0f s", report.connection_id, host, port, result.error,
                            self.config.silent_lifetime)
    async def _plain(self, client: SocketStream, buffer: bytes, connection_id: str, client_addr: tuple[str, int],
                     host: str, port: int, endpoint: EndpointSpec | None,
                     pending: _PendingAttribution, pid_hint: int | None,
                     silent_deadline: float | None = None) -> None:
        """Plain HTTP: decoded when it goes to an AI endpoint, relayed untouched either way."""
        who = await pending.get()
        report = ConnectionReport(
            connection_id=connection_id, mode=str(self.config.mode), client_addr=client_addr, target_host=host,
            target_port=port, decision=Decision.PLAIN_HTTP if endpoint else Decision.PASSTHROUGH, success=True,
            pid_hint=pid_hint, provider=endpoint.provider if endpoint else None,
        )
        report.attach(who)
        upstream = await self._connect_upstream(host, port, report)
        self._report(report)
        if upstream is None:
            await _send_quietly(client, b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        info = ConnectionInfo(connection_id=connection_id, client_addr=client_addr, server_addr=(host, port),
                              mode=str(self.config.mode), tls=False, provider=endpoint.provider if endpoint else None,
                              **_who(who))
        async with upstream:
            await self._relay_decoded(client, upstream, buffer, info, "http/1.1" if endpoint else None,
                                      silent_deadline)

    async def _relay_decoded(self, client: ByteStream, upstream: ByteStream, client_prefix: bytes,
                             info: ConnectionInfo, alpn: str | None,
                             silent_deadline: float | None = None) -> RelayResult:
        feed = self._feed_for(info, alpn)
        result = RelayResult(error="relay cancelled")
        async with anyio.create_task_group() as tg:
            if feed is not None:
                tg.start_soon(feed.run)
            try:
                if client_prefix:
                    await upstream.send(client_prefix)
                    if feed is not None:
                        feed.push("client", client_prefix, time.monotonic_ns())
                result = await relay(client, upstream, feed, silent_deadline=silent_deadline)
            except _NET_ERRORS as exc:
                result = RelayResult(error=str(exc))
            finally:
                if feed is not None:
                    feed.finish(result.error)
        if result.error and feed is not None:
            logger.debug("connection %s ended with an error: %s", info.connection_id, result.error)
        return result

    def _feed_for(self, info: ConnectionInfo, alpn: str | None) -> CopyFeed | None:
        if self.observer is None or alpn is None:
            return None
        open_feed = getattr(self.observer, "open_feed", None)
        try:
            if open_feed is not None:  # the observer decodes elsewhere (a decoder process)
                feed: CopyFeed | None = open_feed(info, alpn, body_cap=self.config.body_cap)
                return feed
            listener = self.observer.exchange_listener(info)
            if listener is None:
                return None
            decoder = self._make_decoder(alpn, info, listener, body_cap=self.config.body_cap,
                                         max_table_size=self.config.hpack_table_cap)
        except Exception:
            logger.exception("connection %s: could not set up decoding; relaying without it", info.connection_id)
            return None
        return DecodeFeed(decoder, self.config.decode_queue, info.connection_id)

    def _upstream_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = self._upstream_contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.config.upstream_ca is not None:
                context.load_verify_locations(cafile=str(self.config.upstream_ca))
            if self.config.upstream_insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if alpn:
                context.set_alpn_protocols(list(alpn))
            self._upstream_contexts[alpn] = context
        return context

    def _certificate_summary(self, der: bytes) -> UpstreamCertificate | None:
        """The upstream certificate's summary (the same few certificates come back all the time: cached)."""
        summary = self._certificates.get(der)
        if summary is None:
            try:
                summary = UpstreamCertificate.from_der(der)
            except Exception:
                logger.debug("could not summarize the upstream certificate", exc_info=True)
                return None
            self._certificates[der] = summary
            if len(self._certificates) > 256:
                self._certificates.popitem(last=False)
        return summary

    async def _intercept(self, client: SocketStream, client_hello_bytes: bytes, hello: _ClientHello, name: str,
                         host: str, port: int, endpoint: EndpointSpec, report: ConnectionReport,
                         pending: _PendingAttribution) -> None:
        server_hostname = hello.sni or (None if _is_ip(name) else name)
        alpn_offer = tuple(hello.alpn_protocols)
        context = self._upstream_context(alpn_offer)
        target = UpstreamTarget(server_hostname or name, host if _is_ip(host) else name, port, alpn_offer, context)
        spare = await self._take_spare(target)
        if spare is not None:
            upstream, prefix = spare.stream, bytes(spare.buffered)
            assert upstream is not None and spare.report is not None
            report.upstream_addr, report.connect_ms = spare.report.upstream_addr, spare.report.connect_ms
            report.preconnected = True
        else:
            opened = await self._open_upstream(target, report)
            if opened is None:
                if report.decision is Decision.UPSTREAM_VERIFICATION_FAILED:
                    logger.warning("connection %s to %s: %s; the client got a TLS alert and nothing was sent",
                                   report.connection_id, name, report.error)
                elif report.upstream_addr is not None:  # a failed connect was logged already
                    logger.warning("connection %s to %s: %s", report.connection_id, name, report.error)
                report.attach(await pending.get())
                self._report(report)
                await _send_quietly(client, _HANDSHAKE_FAILURE_ALERT)
                return
            upstream, prefix = opened, b""
        async with upstream:
            alpn = upstream.alpn
            report.alpn, report.tls_version, report.cipher = alpn, upstream.version, upstream.cipher
            der = upstream.peer_certificate_der()
            if der:
                report.upstream_certificate = self._certificate_summary(der)
            try:
                with anyio.fail_after(self.config.handshake_timeout):
                    downstream = await TlsStream.handshake(
                        client, self.ca.server_context(name, [alpn] if alpn else None), server_side=True,
                        initial_data=client_hello_bytes)
            except (ssl.SSLError, anyio.EndOfStream, TimeoutError, *_NET_ERRORS) as exc:
                report.attach(await pending.get())
                self._client_rejected(report, name, _process_key(report), f"client aborted the TLS handshake: {exc}",
                                      pinning=_looks_like_pinning(exc))
                return
            report.decision = Decision.INTERCEPTED
            report.attach(await pending.get())
            self._report(report)
            info = ConnectionInfo(
                connection_id=report.connection_id, client_addr=report.client_addr, server_addr=(name, port),
                mode=report.mode, sni=hello.sni, alpn=downstream.alpn, tls_version=downstream.version, tls=True,
                process=report.process, actor=report.actor, app=report.app, provider=endpoint.provider,
            )
            relay_ended = anyio.Event()
            self._preconnect(target, relay_ended)
            relayed: ByteStream = PrefixedStream(upstream, prefix) if prefix else upstream
            try:
                result = await self._relay_decoded(downstream, relayed, b"", info, downstream.alpn or "http/1.1")
            finally:
                relay_ended.set()
            if result.bytes_from_client == 0 and result.first_eof == "client" and result.error is None:
                # Closing right after the handshake is no evidence of pinning (any process can do it), so it
                # changes nothing for later connections.
                logger.info("connection %s: client closed before sending any request to %s",
                            report.connection_id, name)

    async def _open_upstream(self, target: UpstreamTarget, report: ConnectionReport) -> TlsStream | None:
        """Connect to ``target`` and run the upstream TLS handshake (resuming a verified session when one may be),
        filling ``report``'s upstream address and connect time; None on failure, with ``report``'s decision and
        error saying why (a failed TCP connect is logged here, the rest by the caller)."""
        upstream_tcp = await self._connect_upstream(target.connect_host, target.port, report)
        if upstream_tcp is None:
            return None
        session_key = (target.server_hostname, report.upstream_addr, target.alpn_offer)
        session, verified_at = self._upstream_sessions.get(session_key, target.context)
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                upstream = await TlsStream.handshake(upstream_tcp, target.context, server_side=False,
                                                     server_hostname=target.server_hostname, session=session)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await upstream_tcp.aclose()
            raise
        except ssl.SSLCertVerificationError as exc:
            report.decision = Decision.UPSTREAM_VERIFICATION_FAILED
            report.success = False
            report.error = f"upstream certificate verification failed: {exc.verify_message or exc}"
            await upstream_tcp.aclose()
            return None
        except (ssl.SSLError, anyio.EndOfStream, TimeoutError, *_NET_ERRORS) as exc:
            report.decision = Decision.UPSTREAM_FAILED
            report.success = False
            report.error = f"upstream TLS handshake failed: {describe(exc)}"
            await upstream_tcp.aclose()
            return None
        # A resumed session was verified (for this name, with this context) when it was first established; the
        # certificate it reports is the one verified then.
        if not upstream.resumed or verified_at is None:
            verified_at = None  # a full handshake: the certificate was verified just now
        self._upstream_sessions.put(session_key, target.context, upstream.ssl_object,
                                    resumed=verified_at is not None,
                                    verified_at=time.monotonic() if verified_at is None else verified_at)
        return upstream

    # preconnect ---------------------------------------------------------------------------------
    def _preconnect(self, target: UpstreamTarget, prompted_by: anyio.Event) -> None:
        """Open a spare upstream connection for ``target`` in the background, unless there is one (ready or
        being made), preconnect is off, or the proxy is shutting down. It is opened once the connection that
        prompted it (``prompted_by`` is set when it ends) has ended or run for :data:`PRECONNECT_DELAY`,
        whichever comes first, so it never competes with that connection's first round trip."""
        if (self.config.preconnect_idle <= 0 or self._draining or self._tasks is None
                or target in self._spares):
            return
        spare = Spare()
        self._spares[target] = spare
        self._tasks.start_soon(self._keep_spare, target, spare, prompted_by)

    async def _keep_spare(self, target: UpstreamTarget, spare: Spare, prompted_by: anyio.Event) -> None:
        """Make the spare connection, then hold it for up to ``preconnect_idle`` seconds: until a client
        connection takes it (which cancels the wait), the server closes it, or it expires (then it is closed).

        While waiting, it reads what the server sends unasked (TLS 1.3 session tickets are consumed by TLS; an
        HTTP/2 server's SETTINGS are plaintext, kept and relayed to the client first, as they would have been on
        a fresh connection); EOF, close_notify or an error mark it dead.
        """
        stream: TlsStream | None = None
        try:
            with spare.scope:
                with anyio.move_on_after(PRECONNECT_DELAY):
                    await prompted_by.wait()
                if self._draining:
                    return
                report = ConnectionReport(connection_id="preconnect", mode=str(self.config.mode),
                                          client_addr=("", 0), target_host=target.server_hostname,
                                          target_port=target.port, decision=Decision.INTERCEPTED, success=True)
                stream = await self._open_upstream(target, report)
                if stream is None:
                    logger.info("preconnect to %s failed: %s", target.server_hostname, report.error)
                    return
                spare.stream, spare.report = stream, report
                spare.scope.deadline = anyio.current_time() + self.config.preconnect_idle
                self._spares_changed()
                while len(spare.buffered) <= MAX_SPARE_BUFFER:
                    spare.buffered += await stream.receive()
                spare.dead = True  # a server that talks this much unasked is not one to hand a client
        except (anyio.EndOfStream, *_NET_ERRORS):
            spare.dead = True
            logger.debug("a spare connection to %s was closed by the server", target.server_hostname)
        finally:
            spare.closing = True
            if self._spares.get(target) is spare:
                del self._spares[target]
            if stream is not None and not spare.taken:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            spare.released.set()
            self._spares_changed()

    async def _take_spare(self, target: UpstreamTarget) -> Spare | None:
        """The ready spare connection for ``target``, if there is one and it is still alive (the server has not
        closed it); it is then this caller's to use and close."""
        spare = self._spares.get(target)
        if spare is None or spare.stream is None or spare.closing:
            return None
        del self._spares[target]
        spare.taken = True
        spare.scope.cancel()
        await spare.released.wait()  # its keeper stopped reading (at once: it was waiting for data)
        if spare.dead:
            assert spare.stream is not None
            with anyio.CancelScope(shield=True):
                await spare.stream.aclose()
            return None
        return spare

    def _spares_changed(self) -> None:
        """Wake whoever waits for the set of spare connections to change (tests)."""
        if self._spares_event is not None:
            self._spares_event.set()
            self._spares_event = None

    async def wait_spares_changed(self) -> None:
        """Wait until a spare upstream connection becomes ready or goes away."""
        if self._spares_event is None:
            self._spares_event = anyio.Event()
        await self._spares_event.wait()

    def _client_rejected(self, report: ConnectionReport, name: str, process_key: ProcessKey | None, error: str,
                         *, pinning: bool) -> None:
        report.decision = Decision.CLIENT_REJECTED_CERTIFICATE
        report.success = False
        report.error = error
        if pinning and self.pinned.evidence(name, process_key):
            assert process_key is not None
            pair = f"{name} by {process_key.label()}"
            if len(self.stats.pinned) < 100:
                self.stats.pinned.append(pair)
            logger.warning("connection %s: %s; pinned: %s's connections to %s are passed through UNINSPECTED for "
                           "%.0f s (%s)", report.connection_id, error, process_key.label(), name, self.pinned.ttl,
                           process_key.cmdline[:200])
        elif pinning:
            logger.info("connection %s: %s (evidence of pinning, %s)", report.connection_id, error,
                        "process unknown: never pinned" if process_key is None else "not pinned yet")
        else:
            logger.info("connection %s: %s", report.connection_id, error)
        self._report(report)


_NET_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_ATTRIBUTION_LOG = Throttled(logger, 60.0)


class _PendingAttribution:
    """The process behind a connection, being looked up.

    An attributor with a ``recall`` method (:meth:`oisp.attribution.Attributor.recall`) is first asked on the
    event loop, which answers in a tenth of a millisecond for a client seen before; only when that has no
    answer does the full lookup run, in a worker thread (it may search every process).
    """

    #: Longest wait for an answer; a connection is never held longer for attribution.
    TIMEOUT = 2.0

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Attribution | None = None

    async def run(self, attributor: Attributor, client: tuple[str, int], local: tuple[str, int],
                  pid_hint: int | None, original: ClientSocket | None) -> None:
        # The client's own socket is passed only when known, so a plain three-argument attributor still works.
        extra: dict[str, Any] = {"original": original} if original is not None else {}
        try:
            recall = getattr(attributor, "recall", None)
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


def _client_socket(original: Any) -> ClientSocket | None:
    """The client's own socket of a diverted connection, from the interceptor's answer (None when the answer
    does not say where the client is)."""
    client = getattr(original, "client", None)
    if client is None:
        return None
    return ClientSocket(local=(str(client[0]), int(client[1])), remote=(str(original.ip), int(original.port)),
                        namespace=getattr(original, "netns", None))


def _process_key(report: ConnectionReport) -> ProcessKey | None:
    """What pinned clients are remembered by: the process (executable, command line, pid and start time); None
    when that is not known (such a client is never pinned)."""
    process = report.process
    if process is None or process.pid is None or not process.exe:
        return None
    return ProcessKey(process.exe, process.cmdline or "", process.pid, process.start_time)


def _who(who: Attribution | None) -> dict[str, Any]:
    """The process, actor and app fields of a report or connection info."""
    if who is None:
        return {}
    return {"process": who.process, "actor": who.actor, "app": who.app}


def _looks_like_pinning(exc: BaseException) -> bool:
    """A handshake that the client broke off with an alert about our certificate (not an EOF or a reset)."""
    text = str(exc).upper()
    return isinstance(exc, ssl.SSLError) and any(alert in text for alert in _PIN_ALERTS)


async def _send_quietly(stream: ByteStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (*_NET_ERRORS, anyio.EndOfStream):
        pass
