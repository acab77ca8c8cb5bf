"""The proxy's per-connection decisions, as transcripts: events in, commands out (no sockets, no event loop).

:class:`oisp.proxy.core.ConnectionCore` is fed what happened and must answer with exactly the commands listed,
in order. The ClientHellos are real (made by Python's own TLS client over memory BIOs), the endpoint table,
the pinning memory and the certificate authority are the real ones; only the network is absent: the
transcript plays its part. The real-socket suite beside this file checks the driver does what the commands say.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from oisp.attribution import Attribution, PidSource
from oisp.endpoints import EndpointTable
from oisp.errors import ProtocolError
from oisp.events import ProcessInfo
from oisp.hookspecs import EndpointSpec
from oisp.proxy import core
from oisp.proxy.core import (
    Attributed,
    AwaitAttribution,
    ClientData,
    ClientGone,
    ClientHandshakeDone,
    ClientHandshakeFailed,
    ClientSilent,
    Close,
    ConnectTcp,
    HandshakeClient,
    OpenTls,
    Pinned,
    ReadClient,
    Relay,
    RelayEnded,
    RelayKind,
    Report,
    SendClient,
    UpstreamFailed,
    UpstreamReady,
)
from oisp.proxy.pinning import PinnedClients
from oisp.proxy.report import Decision
from oisp.tls import CertificateAuthority
from oisp.tls.clienthello import parse_client_hello

ENDPOINTS = EndpointTable([EndpointSpec("openai", "api.openai.com"),
                           EndpointSpec("ollama", "localhost", 11434, tls=False)])
CLIENT = ("127.0.0.1", 50000)
AGENT = Attribution(ProcessInfo(pid=4242, exe="/usr/bin/agent", cmdline="agent --run", start_time="2026-12-07"),
                    pid_source=PidSource.SOCK_DIAG)


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello, as Python's TLS client writes it."""
    context = ssl.create_default_context()
    if sni is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# the transcript ------------------------------------------------------------------------------------------------
@attrs.frozen
class Like:
    """An expected command given by its type and the fields that matter (``report__decision`` reaches into a
    :class:`Report`'s report)."""

    kind: type
    fields: dict[str, Any] = attrs.field(factory=dict)

    def matches(self, command: object) -> bool:
        if not isinstance(command, self.kind):
            return False
        for path, expected in self.fields.items():
            value: Any = command
            for name in path.split("__"):
                value = getattr(value, name)
            if value != expected:
                return False
        return True

    def __repr__(self) -> str:
        return f"{self.kind.__name__}~{self.fields}"


def like(command_type: type, /, **fields: Any) -> Like:
    return Like(command_type, fields)


class Transcript:
    """A playbook for one :class:`~oisp.proxy.core.ConnectionCore`: ``t >> event << command << command ...``
    lists what happens and what the core must answer; ``t.check()`` (or ``assert t``) plays it and says where it
    first differs. Starting the core is the first step (``t << ReadClient()`` before any event)."""

    def __init__(self, connection: core.ConnectionCore) -> None:
        self.core = connection
        self.steps: list[tuple[core.Event | None, list[object]]] = [(None, [])]

    def __rshift__(self, event: core.Event) -> Transcript:
        self.steps.append((event, []))
        return self

    def __lshift__(self, command: object) -> Transcript:
        self.steps[-1][1].append(command)
        return self

    def check(self) -> None:
        for number, (event, expected) in enumerate(self.steps):
            actual = self.core.start() if event is None else self.core.handle(event)
            ok = len(actual) == len(expected) and all(
                e.matches(a) if isinstance(e, Like) else e == a for e, a in zip(expected, actual, strict=True))
            step = type(event).__name__ if event is not None else "start"
            assert ok, f"step {number} ({step}):\n  expected {expected}\n  got      {actual}"

    def __bool__(self) -> bool:
        self.check()
        return True


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pinned() -> PinnedClients:
    return PinnedClients(300.0, clock=Clock())


def connection(ca: Any, pinned: PinnedClients, host: str = "api.openai.com", port: int = 443, *,
               initial: bytes = b"", mode: str = "explicit", pid_hint: int | None = None,
               parse: Callable[[bytes], Any] = parse_client_hello) -> core.ConnectionCore:
    policy = core.RoutingPolicy(ENDPOINTS, pinned, ca, parse, mode, silent_lifetime=30.0)
    return core.ConnectionCore(policy, connection_id="c1", client_addr=CLIENT, host=host, port=port,
                               pid_hint=pid_hint, initial=initial)


TLS_UP = UpstreamReady(("10.0.0.1", 443), 1.5, alpn="h2", tls_version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")


# interception ----------------------------------------------------------------------------------------------
def test_an_ai_endpoint_is_intercepted_upstream_first_with_the_clients_alpn_and_its_choice(
        ca: CertificateAuthority, pinned: PinnedClients) -> None:
    hello = client_hello("api.openai.com", ["h2", "http/1.1"])
    t = Transcript(connection(ca, pinned))
    t << ReadClient()
    # Nobody pins this host: no need to wait for the process before deciding.
    t >> ClientData(hello) << OpenTls("api.openai.com", "api.openai.com", 443, ("h2", "http/1.1"))
    t >> TLS_UP << HandshakeClient("api.openai.com", ("h2",), hello)
    t >> ClientHandshakeDone("h2", "TLSv1.3") << AwaitAttribution()
    t >> Attributed(AGENT)
    t << like(Report, report__decision=Decision.INTERCEPTED, report__success=True, report__alpn="h2",
              report__upstream_addr=("10.0.0.1", 443), report__connect_ms=1.5, report__sni="api.openai.com",
              report__provider="openai", report__process=AGENT.process, report__pid_source="sock_diag")
    t << like(Relay, kind=RelayKind.INTERCEPTED, alpn="h2", info__sni="api.openai.com", info__tls=True,
              info__server_addr=("api.openai.com", 443), info__provider="openai", info__process=AGENT.process)
    t >> RelayEnded(100, 200, "client", None) << Close()
    assert t


def test_a_client_hello_in_pieces_is_read_to_its_end(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    hello = client_hello("api.openai.com", ["http/1.1"])
    t = Transcript(connection(ca, pinned))
    t << ReadClient()
    t >> ClientData(hello[:5]) << ReadClient()
    t >> ClientData(hello[5:40]) << ReadClient()
    t >> ClientData(hello[40:]) << like(OpenTls, alpn_offer=("http/1.1",))
    assert t


def test_a_tunnel_that_came_with_its_client_hello_needs_no_read(ca: CertificateAuthority,
                                                                 pinned: PinnedClients) -> None:
    hello = client_hello("api.openai.com")
    t = Transcript(connection(ca, pinned, initial=hello))
    t << OpenTls("api.openai.com", "api.openai.com", 443, ())
    # No ALPN upstream: none offered to the client either.
    t >> attrs.evolve(TLS_UP, alpn=None) << HandshakeClient("api.openai.com", None, hello)
    assert t


def test_a_diverted_connection_connects_to_its_original_address(ca: CertificateAuthority,
                                                                 pinned: PinnedClients) -> None:
    hello = client_hello("api.openai.com", ["h2"])
    t = Transcript(connection(ca, pinned, "162.159.140.245", mode="transparent", pid_hint=4242))
    t << ReadClient()
    t >> ClientData(hello) << OpenTls("api.openai.com", "162.159.140.245", 443, ("h2",))
    t >> TLS_UP << like(HandshakeClient, name="api.openai.com")
    t >> ClientHandshakeDone("h2", "TLSv1.3") << AwaitAttribution()
    t >> Attributed(None) << like(Report, report__mode="transparent", report__pid_hint=4242,
                                  report__process=None) << like(Relay, kind=RelayKind.INTERCEPTED)
    assert t


def test_an_untrusted_upstream_gets_the_client_an_alert_and_nothing_else(
        ca: CertificateAuthority, pinned: PinnedClients, caplog: pytest.LogCaptureFixture) -> None:
    failure = UpstreamFailed(Decision.UPSTREAM_VERIFICATION_FAILED, "upstream certificate verification failed: "
                             "self-signed certificate", address=("10.0.0.1", 443), connect_ms=0.8)
    t = Transcript(connection(ca, pinned, initial=client_hello("api.openai.com")))
    t << like(OpenTls)
    t >> failure << AwaitAttribution()
    t >> Attributed(AGENT)
    t << like(Report, report__decision=Decision.UPSTREAM_VERIFICATION_FAILED, report__success=False,
              report__error=failure.error, report__upstream_addr=("10.0.0.1", 443), report__process=AGENT.process)
    t << SendClient(core.HANDSHAKE_FAILURE_ALERT) << Close()
    with caplog.at_level(logging.WARNING, logger="oisp.proxy.server"):
        assert t
    assert "the client got a TLS alert and nothing was sent" in caplog.text


def test_a_failed_connect_is_not_logged_twice(ca: CertificateAuthority, pinned: PinnedClients,
                                              caplog: pytest.LogCaptureFixture) -> None:
    t = Transcript(connection(ca, pinned, initial=client_hello("api.openai.com")))
    t << like(OpenTls)
    t >> UpstreamFailed(Decision.UPSTREAM_FAILED, "connect to 10.0.0.1:443 failed: refused", logged=True)
    t << AwaitAttribution()
    t >> Attributed(None) << like(Report, report__decision=Decision.UPSTREAM_FAILED, report__upstream_addr=None)
    t << SendClient(core.HANDSHAKE_FAILURE_ALERT) << Close()
    with caplog.at_level(logging.WARNING, logger="oisp.proxy.server"):
        assert t
    assert not caplog.records  # the service logged the connect failure


# pinning ---------------------------------------------------------------------------------------------------
def _rejected(ca: Any, pinned: PinnedClients, error: str, *, tls_alert: bool = True,
              who: Attribution | None = AGENT) -> list[core.Command]:
    connection_ = connection(ca, pinned, initial=client_hello("api.openai.com"))
    connection_.start()
    connection_.handle(TLS_UP)
    assert connection_.handle(ClientHandshakeFailed(error, tls_alert=tls_alert)) == [AwaitAttribution()]
    return connection_.handle(Attributed(who))


ALERT = "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)"


def test_a_client_that_refuses_oisps_certificate_twice_is_pinned_then_passed_through(
        ca: CertificateAuthority, pinned: PinnedClients) -> None:
    first = _rejected(ca, pinned, ALERT)
    assert [type(c) for c in first] == [Report, Close]  # one piece of evidence: not pinned yet
    report = first[0]
    assert isinstance(report, Report)
    assert report.report.decision is Decision.CLIENT_REJECTED_CERTIFICATE
    assert report.report.error == f"client aborted the TLS handshake: {ALERT}"
    second = _rejected(ca, pinned, ALERT)
    assert second[0] == Pinned("api.openai.com by agent[4242]")
    assert [type(c) for c in second[1:]] == [Report, Close]

    # The next connection of that process: pinned, so it waits for the process, then passes through untouched.
    hello = client_hello("api.openai.com")
    t = Transcript(connection(ca, pinned, initial=hello))
    t << AwaitAttribution()
    t >> Attributed(AGENT) << ConnectTcp("api.openai.com", 443)
    t >> UpstreamReady(("10.0.0.1", 443), 2.0)
    t << like(Report, report__decision=Decision.PINNED_PASSTHROUGH, report__success=True)
    t << Relay(RelayKind.RAW, hello)
    t >> RelayEnded(10, 10, "server", None) << Close()
    assert t

    # Another process is not pinned: it is intercepted.
    other = Attribution(ProcessInfo(pid=7, exe="/usr/bin/curl", cmdline="curl", start_time="x"))
    t = Transcript(connection(ca, pinned, initial=hello))
    t << AwaitAttribution()
    t >> Attributed(other) << like(OpenTls)
    assert t


@pytest.mark.parametrize(("error", "tls_alert"), [
    ("EOF occurred in violation of protocol", False),  # any process can hang up: no evidence
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", True),  # a TLS error, but not about the certificate
])
def test_only_an_alert_about_the_certificate_is_evidence_of_pinning(
        ca: CertificateAuthority, pinned: PinnedClients, error: str, tls_alert: bool) -> None:
    for _ in range(3):
        commands = _rejected(ca, pinned, error, tls_alert=tls_alert)
        assert not any(isinstance(c, Pinned) for c in commands)
    assert not pinned.pinned()


def test_a_client_whose_process_is_unknown_is_never_pinned(ca: CertificateAuthority,
                                                            pinned: PinnedClients) -> None:
    for _ in range(3):
        commands = _rejected(ca, pinned, ALERT, who=None)
        assert [type(c) for c in commands] == [Report, Close]
    assert not pinned.pinned()


# passthrough and plain HTTP ----------------------------------------------------------------------------------
def test_a_host_that_is_no_ai_endpoint_is_passed_through_with_its_client_hello(ca: CertificateAuthority,
                                                                                pinned: PinnedClients) -> None:
    hello = client_hello("example.com")
    t = Transcript(connection(ca, pinned, "example.com"))
    t << ReadClient()
    t >> ClientData(hello) << AwaitAttribution()
    t >> Attributed(AGENT) << ConnectTcp("example.com", 443)
    t >> UpstreamReady(("93.184.215.14", 443), 3.0)
    t << like(Report, report__decision=Decision.PASSTHROUGH, report__sni="example.com", report__provider=None,
              report__upstream_addr=("93.184.215.14", 443), report__process=AGENT.process)
    t << Relay(RelayKind.RAW, hello)
    assert t


def test_a_host_the_ca_may_not_vouch_for_is_passed_through(tmp_path: Path, pinned: PinnedClients,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    constrained = CertificateAuthority.load_or_create(tmp_path / "nc", permitted_domains=["anthropic.com"])
    hello = client_hello("api.openai.com")
    t = Transcript(connection(constrained, pinned, initial=hello))
    t << AwaitAttribution()
    t >> Attributed(None) << ConnectTcp("api.openai.com", 443)
    t >> UpstreamReady(("10.0.0.1", 443), 1.0)
    t << like(Report, report__decision=Decision.PASSTHROUGH, report__provider="openai")
    t << Relay(RelayKind.RAW, hello)
    with caplog.at_level(logging.WARNING, logger="oisp.proxy.server"):
        assert t
    assert "no certificate for api.openai.com" in caplog.text
    assert t.core.report_().error is not None


def test_plain_http_to_a_local_ai_server_is_decoded(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    request = b"POST /api/chat HTTP/1.1\r\nHost: localhost:11434\r\n\r\n"
    t = Transcript(connection(ca, pinned, "localhost", 11434, initial=request))
    t << AwaitAttribution()
    t >> Attributed(AGENT) << ConnectTcp("localhost", 11434)
    t >> UpstreamReady(("127.0.0.1", 11434), 0.2)
    t << like(Report, report__decision=Decision.PLAIN_HTTP, report__provider="ollama", report__sni=None)
    t << like(Relay, kind=RelayKind.PLAIN, prefix=request, alpn="http/1.1", info__tls=False,
              info__server_addr=("localhost", 11434), info__provider="ollama", info__process=AGENT.process)
    assert t


def test_plain_http_whose_upstream_is_down_gets_a_502(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    t = Transcript(connection(ca, pinned, "localhost", 11434, initial=b"GET / HTTP/1.1\r\n\r\n"))
    t << AwaitAttribution()
    t >> Attributed(None) << ConnectTcp("localhost", 11434)
    t >> UpstreamFailed(Decision.UPSTREAM_FAILED, "connect to localhost:11434 failed: refused", logged=True)
    t << like(Report, report__decision=Decision.UPSTREAM_FAILED, report__success=False)
    t << SendClient(core.BAD_GATEWAY) << Close()
    assert t


def test_a_passthrough_whose_upstream_is_down_is_reported_and_closed(ca: CertificateAuthority,
                                                                     pinned: PinnedClients) -> None:
    t = Transcript(connection(ca, pinned, "example.com", initial=client_hello("example.com")))
    t << AwaitAttribution()
    t >> Attributed(None) << like(ConnectTcp)
    t >> UpstreamFailed(Decision.UPSTREAM_FAILED, "refused: example.com:443 is oisp's own listening address")
    t << like(Report, report__decision=Decision.UPSTREAM_FAILED) << Close()
    assert t


def test_a_silent_client_is_passed_through_with_a_lifetime(ca: CertificateAuthority, pinned: PinnedClients,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    t = Transcript(connection(ca, pinned, "example.com", 5432))
    t << ReadClient()
    t >> ClientSilent() << AwaitAttribution()  # nothing said in the handshake timeout
    t >> Attributed(None) << ConnectTcp("example.com", 5432)
    t >> UpstreamReady(("10.0.0.9", 5432), 1.0) << like(Report) << Relay(RelayKind.RAW, b"", silent=True)
    t >> RelayEnded(0, 0, None, "silent connection closed") << Close()
    with caplog.at_level(logging.INFO, logger="oisp.proxy.server"):
        assert t
    assert "silent connection closed after 30 s" in caplog.text


def test_a_client_that_spoke_first_gets_no_lifetime(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    t = Transcript(connection(ca, pinned, "example.com", 22))
    t << ReadClient()
    t >> ClientData(b"SSH-2.0-OpenSSH_9.6\r\n") << AwaitAttribution()
    t >> Attributed(None) << ConnectTcp("example.com", 22)
    t >> UpstreamReady(("10.0.0.9", 22), 1.0) << like(Report) << Relay(RelayKind.RAW, b"SSH-2.0-OpenSSH_9.6\r\n")
    assert t


def test_a_broken_client_hello_is_passed_through(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    def refuse(data: bytes) -> None:
        raise ProtocolError("not a ClientHello")

    garbage = b"\x16\x03\x01\x00\x05hello"
    t = Transcript(connection(ca, pinned, initial=garbage, parse=refuse))
    t << AwaitAttribution()
    t >> Attributed(None) << ConnectTcp("api.openai.com", 443)
    t >> UpstreamReady(None, None) << like(Report, report__decision=Decision.PASSTHROUGH, report__sni=None)
    t << Relay(RelayKind.RAW, garbage)
    assert t


def test_a_client_that_leaves_before_its_client_hello_is_closed_unreported(ca: CertificateAuthority,
                                                                          pinned: PinnedClients) -> None:
    t = Transcript(connection(ca, pinned))
    t << ReadClient()
    t >> ClientData(client_hello("api.openai.com")[:10]) << ReadClient()
    t >> ClientGone() << Close()
    assert t
    assert t.core.report is None


def test_an_event_out_of_turn_is_an_error(ca: CertificateAuthority, pinned: PinnedClients) -> None:
    connection_ = connection(ca, pinned)
    connection_.start()
    with pytest.raises(ProtocolError, match="unexpected ClientHandshakeDone"):
        connection_.handle(ClientHandshakeDone("h2", "TLSv1.3"))
