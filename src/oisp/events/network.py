"""Payloads of the ``network.*`` events: connections and DNS."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field

__all__ = ["CertificateInfo", "DnsAnswer", "Endpoint", "NetworkConnect", "NetworkDns", "TlsInfo"]


@attrs.frozen(kw_only=True)
class Endpoint(Record):
    """One end of a connection."""

    ip: str | None = None
    port: int | None = None
    domain: str | None = None
    is_private: bool | None = None
    geo: dict[str, Any] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class CertificateInfo(Record):
    """The server certificate a TLS connection presented."""

    subject: str | None = None
    issuer: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    fingerprint_sha256: str | None = None
    san: list[str] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class TlsInfo(Record):
    """The TLS parameters of a connection."""

    version: str | None = None
    cipher_suite: str | None = None
    sni: str | None = None
    alpn: str | None = None
    certificate: CertificateInfo | None = None
    ja3_fingerprint: str | None = None
    ja3s_fingerprint: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class NetworkConnect(Record):
    """``network.connect``: an outbound connection and what happened to it."""

    dest: Endpoint
    src: Endpoint | None = None
    protocol: str | None = None
    success: bool | None = None
    error: str | None = None
    latency_ms: float | None = None
    tls: TlsInfo | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class DnsAnswer(Record):
    """One answer record of a DNS response."""

    type: str | None = None
    value: str | None = None
    ttl: int | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class NetworkDns(Record):
    """``network.dns``: a DNS query and its answers."""

    query_name: str
    query_type: str
    response_code: str | None = None
    answers: list[DnsAnswer] | None = None
    resolver: str | None = None
    latency_ms: float | None = None
    extra: dict[str, Any] = extra_field()
