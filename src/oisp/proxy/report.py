"""What the proxy reports about each connection and where it sends exchanges: the :class:`ProxyObserver`."""

from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from oisp.attribution import Attribution
    from oisp.events import Actor, App, ProcessInfo
    from oisp.http.exchange import ConnectionInfo, ExchangeListener

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

    def attach(self, who: Attribution | None) -> None:
        """Put the process, actor and app, and how the pid was found, into the report."""
        if who is not None:
            self.process, self.actor, self.app = who.process, who.actor, who.app
            self.pid_source = str(who.pid_source) if who.pid_source is not None else None


class ProxyObserver(Protocol):
    """Receives what the proxy learns. Calls happen in the proxy's event loop and must return quickly.

    An observer that decodes somewhere else (:class:`oisp.decoder_process.DecoderProcess`) may also define
    ``open_feed(connection, alpn, *, body_cap) -> CopyFeed | None``: the proxy then hands it the raw copies of
    each decoded connection (see :class:`oisp.proxy.relay.CopyFeed`) instead of asking for a listener.
    """

    def connection(self, report: ConnectionReport) -> None:
        """A connection's decision was made (once per client connection)."""

    def exchange_listener(self, connection: ConnectionInfo) -> ExchangeListener | None:
        """The listener for this decoded connection's exchanges, or None to skip decoding."""
