"""What every proxy mode receives from the proxy: the :class:`ProxyServices`.

The upstream side (TCP connects through the network backend, verified TLS handshakes with session resumption,
spare connections opened ahead of need, the loop check against the proxy's own addresses), reporting to the
observer, the certificate summary, and the copy feed of a decoded connection. Explicit, transparent, reverse and
forwarding connections all use this one service; none of them reaches into :class:`~oisp.proxy.server.MitmProxy`.

Outcomes are values (:class:`TcpUpstream`, :class:`TlsUpstream`, :class:`UpstreamFailure`); the caller puts
them into its report (:meth:`ConnectionReport.connected`, :meth:`ConnectionReport.failed`).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio
import attrs
from anyio.abc import ByteStream, SocketAttribute, SocketStream

from oisp.contracts import DecoderFactory, FeedOpener, NetworkBackend, ProxyObserver, feed_opener_of
from oisp.http.exchange import ConnectionInfo
from oisp.proxy.body_skip import skipping
from oisp.proxy.config import ProxyConfig
from oisp.proxy.loop import SelfAddresses
from oisp.proxy.net import SocketHook, connect_tcp, describe
from oisp.proxy.relay import CopyFeed, DecodeFeed, RelayResult, relay
from oisp.proxy.report import ConnectionReport, Decision, UpstreamCertificate
from oisp.proxy.tls_stream import TlsStream
from oisp.proxy.upstream import MAX_SPARE_BUFFER, PRECONNECT_DELAY, Spare, UpstreamSessions, UpstreamTarget
from oisp.ratelog import Throttled

__all__ = [
    "NET_ERRORS",
    "AnyioNetwork",
    "ProxyServices",
    "TcpUpstream",
    "TlsUpstream",
    "UpstreamFailure",
    "address_of",
]

logger = logging.getLogger("oisp.proxy.server")

#: What a network stream raises when the peer or the network goes away.
NET_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def address_of(stream: SocketStream, attribute: object) -> tuple[str, int]:
    """A socket stream's address (``SocketAttribute.remote_address`` or ``local_address``) as (host, port)."""
    try:
        address = stream.extra(attribute)
    except Exception:
        return ("", 0)
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else (str(address), 0)


class AnyioNetwork:
    """The default :class:`~oisp.contracts.NetworkBackend`: real sockets, through anyio."""

    async def connect_tcp(self, host: str, port: int, *, before_connect: SocketHook | None,
                          timeout: float) -> SocketStream:
        return await connect_tcp(host, port, before_connect=before_connect, timeout=timeout)

    async def tls_client(self, stream: SocketStream, context: ssl.SSLContext, *, server_hostname: str,
                         session: ssl.SSLSession | None = None) -> TlsStream:
        return await TlsStream.handshake(stream, context, server_side=False, server_hostname=server_hostname,
                                         session=session)

    async def tls_server(self, stream: ByteStream, context: ssl.SSLContext, *, initial_data: bytes) -> TlsStream:
        return await TlsStream.handshake(stream, context, server_side=True, initial_data=initial_data)


@attrs.frozen
class UpstreamFailure:
    """Why no upstream connection was made: the decision it makes for the connection and the error.
    ``logged``: the failure was logged already (a failed TCP connect)."""

    decision: Decision
    error: str
    logged: bool = False
    #: The upstream address and connect time when TCP connected and what came after failed.
    address: tuple[str, int] | None = None
    connect_ms: float | None = None


@attrs.frozen
class TcpUpstream:
    """A connected TCP upstream, its address and how long the connect took."""

    stream: SocketStream
    address: tuple[str, int]
    connect_ms: float


@attrs.frozen
class TlsUpstream:
    """A verified TLS upstream; ``preconnected`` when it was a spare opened ahead of need, ``prefix`` what that
    spare had received unasked (to be relayed to the client first)."""

    stream: TlsStream
    address: tuple[str, int] | None
    connect_ms: float | None
    preconnected: bool = False
    prefix: bytes = b""


class ProxyServices:
    """The upstream connections, reporting, certificate summaries and copy feeds every mode uses."""

    def __init__(self, config: ProxyConfig, *, observer: ProxyObserver | None, decoder_factory: DecoderFactory,
                 before_upstream_connect: SocketHook | None, network: NetworkBackend | None = None,
                 on_report: Callable[[ConnectionReport], None] | None = None,
                 on_pinned: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.observer = observer
        self.make_decoder = decoder_factory
        self.before_upstream_connect = before_upstream_connect
        self.network: NetworkBackend = network if network is not None else AnyioNetwork()
        self._on_report = on_report
        self._on_pinned = on_pinned
        #: The proxy's own listening addresses, once it listens: requests addressed there are refused (a loop).
        self.self_addresses: SelfAddresses | None = None
        self._loop_log = Throttled(logger, 60.0)
        self.upstream_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.sessions = UpstreamSessions()
        self._certificates: OrderedDict[bytes, UpstreamCertificate] = OrderedDict()
        self.spares: dict[UpstreamTarget, Spare] = {}
        self._spares_event: anyio.Event | None = None
        #: Where spare connections are kept (the proxy's connection task group), once it serves.
        self.tasks: anyio.abc.TaskGroup | None = None
        self.draining = False

    @property
    def observer(self) -> ProxyObserver | None:
        """Who receives reports and decoded exchanges."""
        return self._observer

    @observer.setter
    def observer(self, observer: ProxyObserver | None) -> None:
        self._observer = observer
        self._feed_opener: FeedOpener | None = feed_opener_of(observer) if observer is not None else None

    # reporting --------------------------------------------------------------------------------------------
    def report(self, report: ConnectionReport) -> None:
        """Count the connection's decision and tell the observer (whose failure is logged, never raised)."""
        if self._on_report is not None:
            self._on_report(report)
        if self._observer is not None:
            try:
                self._observer.connection(report)
            except Exception:
                logger.exception("proxy observer failed on connection %s", report.connection_id)

    def pinned(self, pair: str) -> None:
        """A (host, process) pair was just pinned (``"host by exe[pid]"``)."""
        if self._on_pinned is not None:
            self._on_pinned(pair)

    def certificate_summary(self, der: bytes) -> UpstreamCertificate | None:
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

    # decoding ---------------------------------------------------------------------------------------------
    def feed_for(self, info: ConnectionInfo, alpn: str | None) -> CopyFeed | None:
        """The copy feed of a decoded connection (None: not decoded, or decoding could not be set up)."""
        if self._observer is None or alpn is None:
            return None
        try:
            if self._feed_opener is not None:  # the observer decodes elsewhere (a decoder process)
                return skipping(self._feed_opener.open_feed(info, alpn, body_cap=self.config.body_cap), alpn,
                                self.config.body_cap)
            listener = self._observer.exchange_listener(info)
            if listener is None:
                return None
            decoder = self.make_decoder(alpn, info, listener, body_cap=self.config.body_cap,
                                        max_table_size=self.config.hpack_table_cap)
        except Exception:
            logger.exception("connection %s: could not set up decoding; relaying without it", info.connection_id)
            return None
        return skipping(DecodeFeed(decoder, self.config.decode_queue, info.connection_id), alpn, self.config.body_cap)

    async def relay_decoded(self, client: ByteStream, upstream: ByteStream, client_prefix: bytes,
                            info: ConnectionInfo, alpn: str | None,
                            silent_deadline: float | None = None) -> RelayResult:
        """Relay both ways (``client_prefix`` first, to the upstream), decoding a copy when ``alpn`` is set."""
        feed = self.feed_for(info, alpn)
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
            except NET_ERRORS as exc:
                result = RelayResult(error=str(exc))
            finally:
                if feed is not None:
                    feed.finish(result.error)
        if result.error and feed is not None:
            logger.debug("connection %s ended with an error: %s", info.connection_id, result.error)
        return result

    # upstream ---------------------------------------------------------------------------------------------
    async def targets_self(self, host: str, port: int, connection_id: str, client_addr: tuple[str, int]) -> bool:
        """Whether ``host:port`` is (where the overrides send it) one of the proxy's own listening addresses:
        forwarding there would loop back to the proxy. Logged at WARNING, at most once a minute."""
        address, address_port = self.config.override_for(host, port)
        if self.self_addresses is None or not await self.self_addresses.targets_self(address, address_port):
            return False
        self._loop_log.log(logging.WARNING, "connection %s from %s:%d: refused a request for %s:%d, oisp's own "
                           "listening address (it would loop back to oisp)", connection_id, *client_addr, host, port)
        return True

    async def connect(self, host: str, port: int, connection_id: str,
                      client_addr: tuple[str, int]) -> TcpUpstream | UpstreamFailure:
        """A TCP connection to ``host:port`` (where the overrides send it); a refused loop or a failed connect
        is an :class:`UpstreamFailure` (the failed connect logged at WARNING)."""
        if await self.targets_self(host, port, connection_id, client_addr):
            return UpstreamFailure(Decision.UPSTREAM_FAILED,
                                   f"refused: {host}:{port} is oisp's own listening address (a loop)")
        address, address_port = self.config.override_for(host, port)
        started = time.perf_counter()
        try:
            upstream = await self.network.connect_tcp(address, address_port,
                                                      before_connect=self.before_upstream_connect,
                                                      timeout=self.config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            error = f"connect to {address}:{address_port} failed: {exc}"
            logger.warning("connection %s: %s", connection_id, error)
            return UpstreamFailure(Decision.UPSTREAM_FAILED, error, logged=True)
        return TcpUpstream(upstream, address_of(upstream, SocketAttribute.remote_address),
                           round((time.perf_counter() - started) * 1000, 3))

    def upstream_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The client context for upstream handshakes offering ``alpn`` (one per offer, kept: sessions are
        resumed only with the same context)."""
        context = self.upstream_contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.config.upstream_ca is not None:
                context.load_verify_locations(cafile=str(self.config.upstream_ca))
            if self.config.upstream_insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if alpn:
                context.set_alpn_protocols(list(alpn))
            self.upstream_contexts[alpn] = context
        return context

    async def upstream_for(self, target: UpstreamTarget, connection_id: str,
                           client_addr: tuple[str, int]) -> TlsUpstream | UpstreamFailure:
        """A verified TLS connection for ``target``: a ready spare when there is one, else a new one."""
        spare = await self._take_spare(target)
        if spare is not None:
            assert spare.stream is not None and spare.report is not None
            return TlsUpstream(spare.stream, spare.report.upstream_addr, spare.report.connect_ms,
                               preconnected=True, prefix=bytes(spare.buffered))
        return await self.open_tls(target, connection_id, client_addr)

    async def open_tls(self, target: UpstreamTarget, connection_id: str,
                       client_addr: tuple[str, int]) -> TlsUpstream | UpstreamFailure:
        """Connect to ``target`` and run the upstream TLS handshake (resuming a verified session when one may
        be)."""
        tcp = await self.connect(target.connect_host, target.port, connection_id, client_addr)
        if isinstance(tcp, UpstreamFailure):
            return tcp
        session_key = (target.server_hostname, tcp.address, target.alpn_offer)
        session, verified_at = self.sessions.get(session_key, target.context)
        try:
            with anyio.fail_after(self.config.handshake_timeout):
                upstream = await self.network.tls_client(tcp.stream, target.context,
                                                         server_hostname=target.server_hostname, session=session)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await tcp.stream.aclose()
            raise
        except ssl.SSLCertVerificationError as exc:
            await tcp.stream.aclose()
            return UpstreamFailure(Decision.UPSTREAM_VERIFICATION_FAILED,
                                   f"upstream certificate verification failed: {exc.verify_message or exc}",
                                   address=tcp.address, connect_ms=tcp.connect_ms)
        except (ssl.SSLError, anyio.EndOfStream, TimeoutError, *NET_ERRORS) as exc:
            await tcp.stream.aclose()
            return UpstreamFailure(Decision.UPSTREAM_FAILED, f"upstream TLS handshake failed: {describe(exc)}",
                                   address=tcp.address, connect_ms=tcp.connect_ms)
        # A resumed session was verified (for this name, with this context) when it was first established; the
        # certificate it reports is the one verified then.
        if not upstream.resumed or verified_at is None:
            verified_at = None  # a full handshake: the certificate was verified just now
        self.sessions.put(session_key, target.context, upstream.ssl_object, resumed=verified_at is not None,
                          verified_at=time.monotonic() if verified_at is None else verified_at)
        return TlsUpstream(upstream, tcp.address, tcp.connect_ms)

    # spare connections (preconnect) -------------------------------------------------------------------------
    def preconnect(self, target: UpstreamTarget, prompted_by: anyio.Event) -> None:
        """Open a spare upstream connection for ``target`` in the background, unless there is one (ready or
        being made), preconnect is off, or the proxy is shutting down. It is opened once the connection that
        prompted it (``prompted_by`` is set when it ends) has ended or run for :data:`PRECONNECT_DELAY`,
        whichever comes first, so it never competes with that connection's first round trip."""
        if (self.config.preconnect_idle <= 0 or self.draining or self.tasks is None
                or target in self.spares):
            return
        spare = Spare()
        self.spares[target] = spare
        self.tasks.start_soon(self._keep_spare, target, spare, prompted_by)

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
                if self.draining:
                    return
                spare.opening = True
                opened = await self.open_tls(target, "preconnect", ("", 0))
                if isinstance(opened, UpstreamFailure):
                    logger.info("preconnect to %s failed: %s", target.server_hostname, opened.error)
                    return
                stream = opened.stream
                spare.stream = stream
                spare.report = ConnectionReport(connection_id="preconnect", mode=str(self.config.mode),
                                                client_addr=("", 0), target_host=target.server_hostname,
                                                target_port=target.port, decision=Decision.INTERCEPTED, success=True,
                                                upstream_addr=opened.address, connect_ms=opened.connect_ms)
                spare.scope.deadline = anyio.current_time() + self.config.preconnect_idle
                spare.settled.set()
                self._spares_changed()
                while len(spare.buffered) <= MAX_SPARE_BUFFER:
                    spare.buffered += await stream.receive()
                spare.dead = True  # a server that talks this much unasked is not one to hand a client
        except (anyio.EndOfStream, *NET_ERRORS):
            spare.dead = True
            logger.debug("a spare connection to %s was closed by the server", target.server_hostname)
        finally:
            spare.closing = True
            if self.spares.get(target) is spare:
                del self.spares[target]
            if stream is not None and not spare.taken:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            spare.released.set()
            spare.settled.set()
            self._spares_changed()

    async def _take_spare(self, target: UpstreamTarget) -> Spare | None:
        """The spare connection for ``target``, if there is one and it is still alive (the server has not
        closed it); it is then this caller's to use and close.

        A spare whose handshake is under way is waited for: it is further along than a connection this caller
        would start, which would also compete with it for the CPU (on a sequence of new connections, each one
        arriving while the spare prompted by the one before is still being made, that second handshake in
        series was most of what a cold request cost). A spare still waiting for the connection that prompted it
        to end is not: that connection may last long, and the caller opens its own. Nor is one that another
        caller waits for already: in a burst of new connections, one of them gets it, the others open their own
        at once."""
        spare = self.spares.get(target)
        if spare is None or spare.closing:
            return None
        if spare.stream is None:
            if not spare.opening or spare.waiting:
                return None
            spare.waiting += 1
            self._spares_changed()
            try:
                await spare.settled.wait()
            finally:
                spare.waiting -= 1
            if spare.stream is None or spare.closing or self.spares.get(target) is not spare:
                return None  # it failed (the caller's own attempt reports why), or another caller took it
        del self.spares[target]
        spare.taken = True
        spare.scope.cancel()
        await spare.released.wait()  # its keeper stopped reading (at once: it was waiting for data)
        if spare.dead:
            assert spare.stream is not None
            with anyio.CancelScope(shield=True):
                await spare.stream.aclose()
            return None
        return spare

    def close_spares(self) -> None:
        """Stop keeping spare connections (each closes itself)."""
        for spare in list(self.spares.values()):
            spare.scope.cancel()

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
