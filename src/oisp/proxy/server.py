"""The TLS-intercepting proxy.

Per client connection: learn where it was going (CONNECT, original destination, or the reverse target), read
the TLS ClientHello without answering it, and decide. Not an AI endpoint, or a client known to pin
certificates: relay the raw bytes untouched. An AI endpoint: connect upstream first, offering the client's
ALPN list and verifying the upstream certificate; only then finish the client's handshake with a leaf for its
SNI that selects exactly the upstream's ALPN. Then relay bytes both ways, verbatim, and decode a copy.

This module is the lifecycle (listen, accept, drain) and the proxy-wide state. Each accepted connection is a
:class:`~oisp.proxy.connection.Connection`, the thin driver of the sans-io :class:`~oisp.proxy.core.ConnectionCore`
that makes its decisions; every mode uses the same :class:`~oisp.proxy.service.ProxyServices` for upstream
connections, reporting, certificate summaries and copy feeds. The contracts with the other parts are in
:mod:`oisp.contracts`.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import ssl
from collections.abc import Callable

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

from oisp.attribution import ClientSocket
from oisp.contracts import (
    AttributionSource,
    ClientHelloInfo,
    DecoderFactory,
    LeafIssuer,
    NetworkBackend,
    OriginalDestinationSource,
    ProxyObserver,
)
from oisp.endpoints import EndpointTable
from oisp.proxy.config import ProxyConfig, ProxyMode
from oisp.proxy.connection import Connection, PendingAttribution
from oisp.proxy.core import RoutingPolicy
from oisp.proxy.loop import SelfAddresses
from oisp.proxy.net import SocketHook, create_listener
from oisp.proxy.pinning import PinnedClients
from oisp.proxy.report import ConnectionReport
from oisp.proxy.service import ProxyServices, address_of
from oisp.proxy.upstream import Spare, UpstreamTarget
from oisp.ratelog import Throttled

__all__ = ["Attributor", "DecoderFactory", "MitmProxy", "OriginalDestinationLookup", "ProxyStats"]

logger = logging.getLogger(__name__)

#: Shortest and longest wait after a failed accept (out of descriptors): doubled at each failure in a row.
_ACCEPT_BACKOFF = (0.01, 1.0)
_ids = itertools.count(1)
#: Distinguishes this process's connection ids (and so request ids) from those of earlier runs.
_RUN = secrets.token_hex(3)

#: The original-destination lookup the proxy takes: the one contract,
#: :class:`oisp.contracts.OriginalDestinationSource`.
OriginalDestinationLookup = OriginalDestinationSource
#: The attributor the proxy takes (:class:`oisp.contracts.AttributionSource`).
Attributor = AttributionSource


@attrs.define
class ProxyStats:
    """Counters of the proxy."""

    connections: int = 0
    active: int = 0
    decisions: dict[str, int] = attrs.field(factory=dict)
    errors: int = 0
    #: Each (host, process) pair pinned during the run, as "host by exe[pid]" (at most 100).
    pinned: list[str] = attrs.field(factory=list)


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
        ca: LeafIssuer,
        endpoints: EndpointTable | None = None,
        observer: ProxyObserver | None = None,
        decoder_factory: DecoderFactory | None = None,
        original_destinations: OriginalDestinationSource | None = None,
        attributor: AttributionSource | None = None,
        before_upstream_connect: SocketHook | None = None,
        parse_client_hello: Callable[[bytes], ClientHelloInfo | None] | None = None,
        network: NetworkBackend | None = None,
    ) -> None:
        if endpoints is None:
            from oisp.plugins import create_plugin_manager

            endpoints = EndpointTable(create_plugin_manager().endpoints())
        if decoder_factory is None:
            from oisp.http.passive import make_decoder

            decoder_factory = make_decoder
        if parse_client_hello is None:
            from oisp.tls.clienthello import parse_client_hello as parse

            parse_client_hello = parse
        self.pinned = PinnedClients(config.pinned_ttl)
        #: What each connection's decisions use (:class:`~oisp.proxy.core.ConnectionCore`).
        self.policy = RoutingPolicy(endpoints, self.pinned, ca, parse_client_hello, str(config.mode),
                                    config.silent_lifetime)
        #: What every mode receives: upstream connections, reporting, certificate summaries, copy feeds.
        self.services = ProxyServices(config, observer=observer, decoder_factory=decoder_factory,
                                      before_upstream_connect=before_upstream_connect, network=network,
                                      on_report=self._count, on_pinned=self._note_pinned)
        self.original_destinations = original_destinations
        self.attributor = attributor
        self.stats = ProxyStats()
        self.address: tuple[str, int] | None = None
        self._accept_log = Throttled(logger, 30.0)
        self._listener: SocketListener | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._connections_scope: anyio.CancelScope | None = None
        self._draining = False
        self._drained = anyio.Event()
        self._drain_timeout = 5.0
        if config.upstream_insecure:
            logger.warning("UPSTREAM CERTIFICATES ARE NOT VERIFIED (upstream_insecure): anyone on the path "
                           "can impersonate AI providers to this machine's apps")
        if config.listens_beyond_loopback:
            logger.warning("the proxy listens on %s, reachable from other machines: anyone who can reach it can "
                           "use it", config.listen_host)

    # the parts, as attributes -------------------------------------------------------------------
    @property
    def config(self) -> ProxyConfig:
        """The proxy's settings (may be replaced between connections)."""
        return self.services.config

    @config.setter
    def config(self, config: ProxyConfig) -> None:
        self.services.config = config
        self.policy.mode, self.policy.silent_lifetime = str(config.mode), config.silent_lifetime

    @property
    def ca(self) -> LeafIssuer:
        """The certificate authority that issues the leaves clients see."""
        return self.policy.ca

    @ca.setter
    def ca(self, ca: LeafIssuer) -> None:
        self.policy.ca = ca

    @property
    def endpoints(self) -> EndpointTable:
        """Which hosts are AI endpoints."""
        return self.policy.endpoints

    @endpoints.setter
    def endpoints(self, endpoints: EndpointTable) -> None:
        self.policy.endpoints = endpoints

    @property
    def observer(self) -> ProxyObserver | None:
        """Who receives connection reports and decoded exchanges."""
        return self.services.observer

    @observer.setter
    def observer(self, observer: ProxyObserver | None) -> None:
        self.services.observer = observer

    @property
    def before_upstream_connect(self) -> SocketHook | None:
        """Run on each upstream socket before it connects (the interceptor marks them so it lets them pass)."""
        return self.services.before_upstream_connect

    @before_upstream_connect.setter
    def before_upstream_connect(self, hook: SocketHook | None) -> None:
        self.services.before_upstream_connect = hook

    @property
    def _upstream_contexts(self) -> dict[tuple[str, ...], ssl.SSLContext]:
        return self.services.upstream_contexts

    @property
    def _spares(self) -> dict[UpstreamTarget, Spare]:
        return self.services.spares

    # lifecycle ----------------------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`shutdown` (or cancellation); reports the bound (host, port) through
        ``task_status``."""
        listener = await create_listener(self.config.listen_host, self.config.listen_port,
                                         max_segment=self.config.listen_max_segment)
        self._listener = listener
        async with listener, anyio.create_task_group() as connections:
            self._connections_scope = connections.cancel_scope
            self._tasks = self.services.tasks = connections
            bound = listener.extra(SocketAttribute.local_address)
            self.address = (str(bound[0]), int(bound[1]))
            self.services.self_addresses = SelfAddresses(self.address)
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
        self._draining = self.services.draining = True
        self.services.close_spares()
        if self._listener is not None:
            await self._listener.aclose()

    async def wait_spares_changed(self) -> None:
        """Wait until a spare upstream connection becomes ready or goes away."""
        await self.services.wait_spares_changed()

    async def targets_self(self, host: str, port: int, connection_id: str, client_addr: tuple[str, int]) -> bool:
        """Whether ``host:port`` is (where the overrides send it) one of the proxy's own listening addresses:
        forwarding there would loop back to the proxy. Logged at WARNING, at most once a minute."""
        return await self.services.targets_self(host, port, connection_id, client_addr)

    def _count(self, report: ConnectionReport) -> None:
        decision = report.decision.value
        self.stats.decisions[decision] = self.stats.decisions.get(decision, 0) + 1

    def _note_pinned(self, pair: str) -> None:
        if len(self.stats.pinned) < 100:
            self.stats.pinned.append(pair)

    # per connection -----------------------------------------------------------------------------
    async def _handle(self, client: SocketStream) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        connection_id = f"c{_RUN}.{next(_ids)}"
        client_addr = address_of(client, SocketAttribute.remote_address)
        connection = Connection(self.services, self.policy, client, connection_id=connection_id,
                                client_addr=client_addr,
                                local_addr=address_of(client, SocketAttribute.local_address),
                                attribute=self._attribute)
        try:
            async with client:
                if self.config.mode is ProxyMode.EXPLICIT:
                    await connection.explicit()
                elif self.config.mode is ProxyMode.TRANSPARENT:
                    # May be set after serve() started: the interceptor needs its port.
                    await connection.transparent(self.original_destinations)
                else:
                    await connection.reverse()
        except Exception:
            self.stats.errors += 1
            logger.exception("connection %s from %s:%d failed", connection_id, *client_addr)
        finally:
            self.stats.active -= 1
            if self._draining and self.stats.active == 0:
                self._drained.set()

    def _attribute(self, client_addr: tuple[str, int], local_addr: tuple[str, int], pid_hint: int | None,
                   original: ClientSocket | None = None) -> PendingAttribution:
        """Start naming the connection's process (see :class:`~oisp.proxy.connection.PendingAttribution`); the
        proxy reads the ClientHello and connects meanwhile, and waits for the answer only where it needs it: for
        a decision that depends on the process (a pinning client), and before reporting the connection.
        ``original`` is the client's own socket of a diverted connection, as the interceptor's NAT table knows
        it."""
        pending = PendingAttribution()
        if self.attributor is None or self._tasks is None:
            pending.done.set()
        else:
            self._tasks.start_soon(pending.run, self.attributor, client_addr, local_addr, pid_hint, original)
        return pending
