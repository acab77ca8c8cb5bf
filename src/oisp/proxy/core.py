"""The proxy's decisions for one connection, sans-io: events in, commands out.

:class:`ConnectionCore` starts once the destination of a client connection is known (a CONNECT target or a
diverted connection's original destination) and decides everything after that: read the client's first bytes
until a ClientHello is complete (or it is no TLS), pass through what is not an AI endpoint or belongs to a client
that pins certificates, decode plain HTTP to local AI servers, and intercept TLS to AI endpoints (upstream first,
then the client's handshake with a leaf that selects exactly the upstream's ALPN). It owns the connection's
:class:`~oisp.proxy.report.ConnectionReport` and is the only place that changes it.

It opens no socket and never awaits: the driver (:mod:`oisp.proxy.connection`) performs each command
(:class:`ReadClient`, :class:`ConnectTcp`, :class:`OpenTls`, :class:`HandshakeClient`, :class:`Relay`, ...) and
feeds back what happened (:class:`ClientData`, :class:`UpstreamReady`, :class:`ClientHandshakeDone`, ...), so
the decisions can be tested by feeding events (``tests/proxy/test_core_transcript.py``).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Callable

import attrs

from oisp.attribution import Attribution
from oisp.contracts import ClientHelloInfo, LeafIssuer
from oisp.endpoints import EndpointTable
from oisp.errors import CertificateError, ProtocolError
from oisp.hookspecs import EndpointSpec
from oisp.http.exchange import ConnectionInfo
from oisp.proxy.pinning import PinnedClients, ProcessKey
from oisp.proxy.report import ConnectionReport, Decision, UpstreamCertificate

__all__ = [
    "HANDSHAKE_FAILURE_ALERT",
    "Attributed",
    "AwaitAttribution",
    "ClientData",
    "ClientGone",
    "ClientHandshakeDone",
    "ClientHandshakeFailed",
    "ClientSilent",
    "Close",
    "Command",
    "ConnectTcp",
    "ConnectionCore",
    "Event",
    "HandshakeClient",
    "OpenTls",
    "Pinned",
    "ReadClient",
    "Relay",
    "RelayEnded",
    "RelayKind",
    "Report",
    "RoutingPolicy",
    "SendClient",
    "UpstreamFailed",
    "UpstreamReady",
    "looks_like_pinning",
]

#: The core logs under the proxy's logger name, as the proxy always has.
logger = logging.getLogger("oisp.proxy.server")

#: A fatal TLS alert (handshake_failure) sent to a client whose upstream could not be trusted or reached.
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
#: What an HTTP client gets when its plain-HTTP upstream cannot be reached.
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
#: The TLS alerts (as OpenSSL names them) by which a client says it refuses oisp's certificate: the only evidence
#: of pinning. An EOF or a reset during or right after the handshake is not: any process can do that.
PIN_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE")
#: Most bytes read while waiting for a complete ClientHello.
MAX_CLIENT_HELLO = 64 * 1024


def looks_like_pinning(error: str, *, tls_alert: bool) -> bool:
    """A handshake that the client broke off with an alert about our certificate (not an EOF or a reset).
    ``tls_alert``: the failure was a TLS error (an ``ssl.SSLError``), ``error`` its text."""
    text = error.upper()
    return tls_alert and any(alert in text for alert in PIN_ALERTS)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@attrs.define
class RoutingPolicy:
    """The proxy-wide, I/O-free knowledge a connection's decisions use: which hosts are AI endpoints, which
    clients pin certificates, whether the CA may vouch for a host, and how a ClientHello is parsed."""

    endpoints: EndpointTable
    pinned: PinnedClients
    ca: LeafIssuer
    parse_client_hello: Callable[[bytes], ClientHelloInfo | None]
    mode: str
    #: How long a connection on which neither side said anything lives (``ProxyConfig.silent_lifetime``).
    silent_lifetime: float = 300.0

    def can_vouch_for(self, name: str) -> CertificateError | None:
        """None when the CA can issue a leaf for ``name`` (cached), else why not (a name-constrained CA)."""
        try:
            self.ca.leaf_for(name)
        except CertificateError as exc:
            return exc
        return None


# events (what happened) ------------------------------------------------------------------------------------
@attrs.define
class ClientData:
    """Bytes arrived from the client."""

    data: bytes


@attrs.define
class ClientSilent:
    """The client sent no complete ClientHello within the handshake timeout."""


@attrs.define
class ClientGone:
    """The client closed (or the connection broke) before its first bytes were classified."""


@attrs.define
class Attributed:
    """The process behind the connection is known (None: not found, or not in time)."""

    who: Attribution | None


@attrs.define
class UpstreamReady:
    """The upstream connection is up (for :class:`OpenTls`: verified, with its TLS facts)."""

    address: tuple[str, int] | None
    connect_ms: float | None
    preconnected: bool = False
    alpn: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    certificate: UpstreamCertificate | None = None


@attrs.define
class UpstreamFailed:
    """No upstream connection: the decision this makes and why. ``address``/``connect_ms`` are set when TCP
    connected and the TLS handshake failed; ``logged`` when the failure was logged already."""

    decision: Decision
    error: str
    address: tuple[str, int] | None = None
    connect_ms: float | None = None
    logged: bool = False


@attrs.define
class ClientHandshakeDone:
    """The client accepted oisp's leaf; what was negotiated with it."""

    alpn: str | None
    tls_version: str | None


@attrs.define
class ClientHandshakeFailed:
    """The client's handshake failed; ``tls_alert`` when it was a TLS error (which may be pinning evidence)."""

    error: str
    tls_alert: bool


@attrs.define
class RelayEnded:
    """The relay commanded by :class:`Relay` ended."""

    bytes_from_client: int
    bytes_from_server: int
    first_eof: str | None
    error: str | None


Event = (ClientData | ClientSilent | ClientGone | Attributed | UpstreamReady | UpstreamFailed | ClientHandshakeDone
         | ClientHandshakeFailed | RelayEnded)


# commands (what to do) -------------------------------------------------------------------------------------
@attrs.define
class ReadClient:
    """Read more from the client (within the handshake timeout): answer :class:`ClientData`,
    :class:`ClientSilent` or :class:`ClientGone`."""


@attrs.define
class AwaitAttribution:
    """Wait (boundedly) for the process behind the connection: answer :class:`Attributed`."""


@attrs.define
class ConnectTcp:
    """Connect to ``host:port`` over TCP: answer :class:`UpstreamReady` or :class:`UpstreamFailed`."""

    host: str
    port: int


@attrs.define
class OpenTls:
    """Get a verified TLS upstream (a spare one, or a new one) offering the client's ALPN list: answer
    :class:`UpstreamReady` or :class:`UpstreamFailed`."""

    server_hostname: str
    connect_host: str
    port: int
    alpn_offer: tuple[str, ...]


@attrs.define
class HandshakeClient:
    """Finish the client's TLS handshake with a leaf for ``name`` that selects exactly ``alpn`` (None: no
    ALPN), ``client_hello`` being the bytes read already: answer :class:`ClientHandshakeDone` or
    :class:`ClientHandshakeFailed`."""

    name: str
    alpn: tuple[str, ...] | None
    client_hello: bytes


@attrs.define
class SendClient:
    """Send ``data`` to the client, ignoring a client that left."""

    data: bytes


@attrs.define
class Report:
    """Report the connection (count its decision, tell the observer)."""

    report: ConnectionReport


@attrs.define
class Pinned:
    """A (host, process) pair was just pinned: note it in the proxy's statistics."""

    pair: str


class RelayKind(enum.Enum):
    """What a :class:`Relay` relays."""

    #: Raw bytes, nothing decoded (``prefix`` first, to the upstream).
    RAW = "raw"
    #: Plain HTTP, a copy decoded when ``alpn`` is set.
    PLAIN = "plain"
    #: The intercepted TLS connection (client side: the finished handshake; upstream: the TLS upstream).
    INTERCEPTED = "intercepted"


@attrs.define
class Relay:
    """Relay both ways until the connection ends: answer :class:`RelayEnded`. ``silent``: the connection ends
    if neither side says anything within the silent lifetime (counted from the first read)."""

    kind: RelayKind
    prefix: bytes = b""
    info: ConnectionInfo | None = None
    alpn: str | None = None
    silent: bool = False


@attrs.define
class Close:
    """The connection is done: close it."""


Command = (ReadClient | AwaitAttribution | ConnectTcp | OpenTls | HandshakeClient | SendClient | Report | Pinned
           | Relay | Close)


# The commands without fields are made once (events and commands are plain attrs classes, not frozen ones, whose
# construction costs three times as much; treat them as immutable).
_READ_CLIENT = ReadClient()
_AWAIT_ATTRIBUTION = AwaitAttribution()
_CLOSE = Close()


class _State(enum.Enum):
    CLASSIFYING = "classifying"
    DECIDING = "deciding"  # waiting for the process to decide
    PASSTHROUGH_CONNECT = "passthrough-connect"
    PLAIN_CONNECT = "plain-connect"
    UPSTREAM_TLS = "upstream-tls"
    UPSTREAM_FAILED = "upstream-failed"  # waiting for the process to report the failure
    CLIENT_HANDSHAKE = "client-handshake"
    CLIENT_REJECTED = "client-rejected"  # waiting for the process to report the rejection
    INTERCEPTED = "intercepted"  # waiting for the process to report and relay
    RELAYING = "relaying"
    DONE = "done"


class ConnectionCore:
    """One connection's decisions from the moment its destination is known (see the module's docstring).

    ``host``/``port``: the destination as the client named it (CONNECT) or as it was diverted (an address);
    ``initial``: client bytes read already (after a CONNECT head). Call :meth:`start`, then :meth:`handle` with
    each event its commands ask for; the last command of a connection is :class:`Close`.
    """

    def __init__(self, policy: RoutingPolicy, *, connection_id: str, client_addr: tuple[str, int], host: str,
                 port: int, pid_hint: int | None = None, initial: bytes = b"") -> None:
        self.policy = policy
        self.connection_id = connection_id
        self.client_addr = client_addr
        self.host, self.port, self.pid_hint = host, port, pid_hint
        self.buffer = initial
        self.hello: ClientHelloInfo | None = None
        self.name = host
        self.endpoint: EndpointSpec | None = None
        self.silent = False
        self.report: ConnectionReport | None = None
        self.state = _State.CLASSIFYING
        self._rejection: ClientHandshakeFailed | None = None
        self._downstream: ClientHandshakeDone | None = None
        self._raw = False

    # driving ----------------------------------------------------------------------------------------------
    def start(self) -> list[Command]:
        """The first commands."""
        if not self.buffer:
            return [_READ_CLIENT]
        return self._classify()

    def handle(self, event: Event) -> list[Command]:
        """The commands that follow ``event``."""
        state = self.state
        if state is _State.CLASSIFYING:
            if isinstance(event, ClientData):
                self.buffer += event.data
                return self._classify()
            if isinstance(event, ClientSilent):
                logger.info("connection %s: client sent no ClientHello in time; passing through", self.connection_id)
                # Nothing said yet: if neither side ever says anything, the connection ends.
                self.silent = not self.buffer
                return self._route()
            if isinstance(event, ClientGone):
                return self._close()
        elif isinstance(event, Attributed):
            return self._attributed(event.who)
        elif state is _State.PASSTHROUGH_CONNECT or state is _State.PLAIN_CONNECT:
            if isinstance(event, (UpstreamReady, UpstreamFailed)):
                return self._connected(event)
        elif state is _State.UPSTREAM_TLS:
            if isinstance(event, UpstreamFailed):
                return self._upstream_tls_failed(event)
            if isinstance(event, UpstreamReady):
                return self._upstream_tls_ready(event)
        elif state is _State.CLIENT_HANDSHAKE:
            if isinstance(event, ClientHandshakeDone):
                self._downstream = event
                self.report_().decision = Decision.INTERCEPTED
                return self._await_attribution(_State.INTERCEPTED)
            if isinstance(event, ClientHandshakeFailed):
                self._rejection = event
                return self._await_attribution(_State.CLIENT_REJECTED)
        elif state is _State.RELAYING and isinstance(event, RelayEnded):
            return self._relay_ended(event)
        raise ProtocolError(f"connection {self.connection_id}: unexpected {type(event).__name__} while "
                            f"{state.value}")

    def report_(self) -> ConnectionReport:
        """The connection's report (once its first bytes are classified)."""
        assert self.report is not None
        return self.report

    # classification ---------------------------------------------------------------------------------------
    def _classify(self) -> list[Command]:
        while self.buffer[:1] == b"\x16":
            try:
                self.hello = self.policy.parse_client_hello(self.buffer)
            except ProtocolError as exc:
                logger.info("connection %s: not a usable ClientHello (%s); passing through", self.connection_id, exc)
                break
            if self.hello is not None or len(self.buffer) > MAX_CLIENT_HELLO:
                break
            return [_READ_CLIENT]
        return self._route()

    def _route(self) -> list[Command]:
        hello = self.hello
        self.name = name = hello.sni if hello is not None and hello.sni else self.host
        self.endpoint = endpoint = self.policy.endpoints.match(name, self.port)
        self.report = ConnectionReport(
            connection_id=self.connection_id, mode=self.policy.mode, client_addr=self.client_addr, target_host=name,
            target_port=self.port, decision=Decision.PASSTHROUGH, success=True, pid_hint=self.pid_hint,
            provider=endpoint.provider if endpoint else None, sni=hello.sni if hello else None,
        )
        if (hello is not None and endpoint is not None and endpoint.tls and not self.policy.pinned.knows(name)
                and self.policy.can_vouch_for(name) is None):
            # No client pins this host, so the process cannot change the decision: intercept, and learn the
            # process while the handshakes run (it is in the report and the events all the same). A host the CA
            # may not vouch for is passed through below.
            return self._intercept()
        return self._await_attribution(_State.DECIDING)

    def _decide(self) -> list[Command]:
        report, hello, endpoint, name = self.report_(), self.hello, self.endpoint, self.name
        if hello is None:
            if endpoint is not None and not endpoint.tls:
                report.decision = Decision.PLAIN_HTTP
                self.state = _State.PLAIN_CONNECT
                return [ConnectTcp(self.host, self.port)]
            return self._passthrough()
        if endpoint is None or not endpoint.tls:
            return self._passthrough()
        if self.policy.pinned.is_pinned(name, self.process_key()):
            report.decision = Decision.PINNED_PASSTHROUGH
            return self._passthrough()
        refused = self.policy.can_vouch_for(name)
        if refused is not None:
            logger.warning("connection %s: no certificate for %s (%s); passing it through untouched",
                           self.connection_id, name, refused)
            report.error = str(refused)
            return self._passthrough()
        return self._intercept()

    def process_key(self) -> ProcessKey | None:
        """What pinned clients are remembered by: the process (executable, command line, pid and start time);
        None when that is not known (such a client is never pinned)."""
        process = self.report_().process
        if process is None or process.pid is None or not process.exe:
            return None
        return ProcessKey(process.exe, process.cmdline or "", process.pid, process.start_time)

    # attribution ------------------------------------------------------------------------------------------
    def _await_attribution(self, then: _State) -> list[Command]:
        self.state = then
        return [_AWAIT_ATTRIBUTION]

    def _attributed(self, who: Attribution | None) -> list[Command]:
        state = self.state
        if state is _State.DECIDING:
            self.report_().attach(who)
            return self._decide()
        if state is _State.UPSTREAM_FAILED:
            self.report_().attach(who)
            return [Report(self.report_()), SendClient(HANDSHAKE_FAILURE_ALERT), *self._close()]
        if state is _State.CLIENT_REJECTED:
            self.report_().attach(who)
            return self._client_rejected()
        if state is _State.INTERCEPTED:
            return self._relay_intercepted(who)
        raise ProtocolError(f"connection {self.connection_id}: unexpected attribution while {state.value}")

    # passthrough and plain HTTP ---------------------------------------------------------------------------
    def _passthrough(self) -> list[Command]:
        self.state = _State.PASSTHROUGH_CONNECT
        return [ConnectTcp(self.host, self.port)]

    def _connected(self, event: UpstreamReady | UpstreamFailed) -> list[Command]:
        report = self.report_()
        if isinstance(event, UpstreamFailed):
            report.failed(event.decision, event.error, address=event.address, connect_ms=event.connect_ms)
            if self.state is _State.PLAIN_CONNECT:
                return [Report(report), SendClient(BAD_GATEWAY), *self._close()]
            return [Report(report), *self._close()]
        report.connected(event.address, event.connect_ms)
        plain = self.state is _State.PLAIN_CONNECT
        self.state = _State.RELAYING
        if not plain:
            self._raw = True
            return [Report(report), Relay(RelayKind.RAW, self.buffer, silent=self.silent)]
        info = ConnectionInfo(connection_id=self.connection_id, client_addr=self.client_addr,
                              server_addr=(self.host, self.port), mode=self.policy.mode, tls=False,
                              provider=self.endpoint.provider if self.endpoint else None, process=report.process,
                              actor=report.actor, app=report.app)
        return [Report(report), Relay(RelayKind.PLAIN, self.buffer, info=info,
                                      alpn="http/1.1" if self.endpoint else None, silent=self.silent)]

    # interception -----------------------------------------------------------------------------------------
    def _intercept(self) -> list[Command]:
        hello, name, host = self.hello, self.name, self.host
        assert hello is not None
        server_hostname = hello.sni or (None if _is_ip(name) else name)
        self.state = _State.UPSTREAM_TLS
        return [OpenTls(server_hostname or name, host if _is_ip(host) else name, self.port,
                        tuple(hello.alpn_protocols))]

    def _upstream_tls_failed(self, event: UpstreamFailed) -> list[Command]:
        report = self.report_()
        report.failed(event.decision, event.error, address=event.address, connect_ms=event.connect_ms)
        if report.decision is Decision.UPSTREAM_VERIFICATION_FAILED:
            logger.warning("connection %s to %s: %s; the client got a TLS alert and nothing was sent",
                           self.connection_id, self.name, report.error)
        elif report.upstream_addr is not None:  # a failed connect was logged already
            logger.warning("connection %s to %s: %s", self.connection_id, self.name, report.error)
        return self._await_attribution(_State.UPSTREAM_FAILED)

    def _upstream_tls_ready(self, event: UpstreamReady) -> list[Command]:
        report = self.report_()
        report.connected(event.address, event.connect_ms)
        report.preconnected = event.preconnected
        report.alpn, report.tls_version, report.cipher = event.alpn, event.tls_version, event.cipher
        if event.certificate is not None:
            report.upstream_certificate = event.certificate
        self.state = _State.CLIENT_HANDSHAKE
        return [HandshakeClient(self.name, (event.alpn,) if event.alpn else None, self.buffer)]

    def _client_rejected(self) -> list[Command]:
        rejection, report, name = self._rejection, self.report_(), self.name
        assert rejection is not None
        error = f"client aborted the TLS handshake: {rejection.error}"
        pinning = looks_like_pinning(rejection.error, tls_alert=rejection.tls_alert)
        report.failed(Decision.CLIENT_REJECTED_CERTIFICATE, error)
        process_key = self.process_key()
        commands: list[Command] = []
        if pinning and self.policy.pinned.evidence(name, process_key):
            assert process_key is not None
            commands.append(Pinned(f"{name} by {process_key.label()}"))
            logger.warning("connection %s: %s; pinned: %s's connections to %s are passed through UNINSPECTED for "
                           "%.0f s (%s)", self.connection_id, error, process_key.label(), name,
                           self.policy.pinned.ttl, process_key.cmdline[:200])
        elif pinning:
            logger.info("connection %s: %s (evidence of pinning, %s)", self.connection_id, error,
                        "process unknown: never pinned" if process_key is None else "not pinned yet")
        else:
            logger.info("connection %s: %s", self.connection_id, error)
        return [*commands, Report(report), *self._close()]

    def _relay_intercepted(self, who: Attribution | None) -> list[Command]:
        report, downstream, hello = self.report_(), self._downstream, self.hello
        assert downstream is not None and hello is not None and self.endpoint is not None
        report.attach(who)
        info = ConnectionInfo(
            connection_id=self.connection_id, client_addr=self.client_addr, server_addr=(self.name, self.port),
            mode=self.policy.mode, sni=hello.sni, alpn=downstream.alpn, tls_version=downstream.tls_version,
            tls=True, process=report.process, actor=report.actor, app=report.app, provider=self.endpoint.provider,
        )
        self.state = _State.RELAYING
        return [Report(report), Relay(RelayKind.INTERCEPTED, info=info, alpn=downstream.alpn or "http/1.1")]

    # the end ----------------------------------------------------------------------------------------------
    def _relay_ended(self, event: RelayEnded) -> list[Command]:
        if self._downstream is not None:
            if event.bytes_from_client == 0 and event.first_eof == "client" and event.error is None:
                # Closing right after the handshake is no evidence of pinning (any process can do it), so it
                # changes nothing for later connections.
                logger.info("connection %s: client closed before sending any request to %s", self.connection_id,
                            self.name)
        elif self._raw and self.silent and not event.bytes_from_client and not event.bytes_from_server:
            logger.info("connection %s to %s:%d: %s after %.0f s", self.connection_id, self.host, self.port,
                        event.error, self.policy.silent_lifetime)
        return self._close()

    def _close(self) -> list[Command]:
        self.state = _State.DONE
        return [_CLOSE]
