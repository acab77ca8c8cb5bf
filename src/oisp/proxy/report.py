"""What the proxy reports about each connection (its observer's contract, :class:`ProxyObserver`, is in
:mod:`oisp.contracts`)."""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING

import attrs

from oisp.contracts import ProxyObserver

if TYPE_CHECKING:
    from oisp.attribution import Attribution
    from oisp.events import Actor, App, ProcessInfo

__all__ = ["ConnectionReport", "Decision", "ProxyObserver", "UpstreamCertificate"]


class Decision(enum.StrEnum):
    """What the proxy did with a connection."""

    #: TLS terminated on both sides, traffic decoded.
    INTERCEPTED = "intercepted"
    #: Plain HTTP to an AI endpoint (Ollama, LM Studio), decoded.
    PLAIN_HTTP = "plain_http"
    #: Not an AI endpoint: relayed as raw bytes, untouched.
    PASSTHROUGH = "passthrough"
    #: An AI endpoint, but the client pins certificates: relayed untouched.
    PINNED_PASSTHROUGH = "pinned_passthrough"
    #: The client rejected oisp's certificate during this connection (it will be passed through next time).
    CLIENT_REJECTED_CERTIFICATE = "client_rejected_certificate"
    #: The upstream's certificate failed verification: the client got a TLS alert, no data was sent.
    UPSTREAM_VERIFICATION_FAILED = "upstream_verification_failed"
    #: The upstream could not be reached or its TLS handshake failed.
    UPSTREAM_FAILED = "upstream_failed"
    #: QUIC (UDP) to an AI endpoint, dropped by the transparent mode's interceptor so that the client falls back
    #: to TCP (:mod:`oisp.interception.quic`).
    QUIC_BLOCKED = "quic_blocked"


@attrs.frozen
class UpstreamCertificate:
    """The upstream server's certificate, as presented to the proxy."""

    subject: str
    issuer: str
    fingerprint_sha256: str
    not_before: str
    not_after: str
    san: tuple[str, ...]

    @classmethod
    def from_der(cls, der: bytes) -> UpstreamCertificate:
        """Summarize a DER certificate."""
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        try:
            san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            san = tuple(str(v) for v in san_ext.get_values_for_type(x509.DNSName)) + tuple(
                str(v) for v in san_ext.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            san = ()
        return cls(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_before=cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            san=san,
        )


@attrs.define
class ConnectionReport:
    """One client connection: where it went, what the proxy decided, and how the upstream side went."""

    connection_id: str
    mode: str
    client_addr: tuple[str, int]
    #: The destination as the client named it: SNI or CONNECT host (a name), else the original IP.
    target_host: str
    target_port: int
    decision: Decision
    success: bool
    error: str | None = None
    #: The address actually connected to upstream.
    upstream_addr: tuple[str, int] | None = None
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    upstream_certificate: UpstreamCertificate | None = None
    connect_ms: float | None = None
    provider: str | None = None
    process: ProcessInfo | None = None
    actor: Actor | None = None
    app: App | None = None
    #: Process id the interceptor saw for the connection (FLOW/SOCKET layer), if any.
    pid_hint: int | None = None
    #: How the process's pid was found (an :class:`oisp.attribution.PidSource` value), None without a process.
    pid_source: str | None = None
    #: The upstream connection was a spare opened in advance (preconnect); ``connect_ms`` is its connect time.
    preconnected: bool = False
    #: The transport: ``tcp``, or ``udp`` for a QUIC attempt.
    protocol: str = "tcp"

    def connected(self, address: tuple[str, int] | None, connect_ms: float | None) -> None:
        """The upstream connection was made: to ``address``, in ``connect_ms``."""
        self.upstream_addr, self.connect_ms = address, connect_ms

    def failed(self, decision: Decision, error: str, *, address: tuple[str, int] | None = None,
               connect_ms: float | None = None) -> None:
        """The connection failed with ``decision`` for ``error`` (``address``/``connect_ms``: the upstream was
        reached over TCP before it failed)."""
        self.decision, self.success, self.error = decision, False, error
        if address is not None:
            self.upstream_addr, self.connect_ms = address, connect_ms

    def attach(self, who: Attribution | None) -> None:
        """Put the process, actor and app, and how the pid was found, into the report."""
        if who is not None:
            self.process, self.actor, self.app = who.process, who.actor, who.app
            self.pid_source = str(who.pid_source) if who.pid_source is not None else None
