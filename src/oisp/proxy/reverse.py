"""Reverse mode: oisp listens as ``https://api.openai.com`` would, for apps pointed at it with a base URL.

The client speaks plain HTTP/1.1 to oisp (no CA needed on the client); oisp forwards to the one configured
upstream over TLS. Only the request head's ``Host`` (and a base path, if the target URL has one) is rewritten;
bodies, chunking and everything else pass byte for byte, and responses are relayed untouched.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
from anyio.abc import ByteStream

from oisp.attribution import Attribution
from oisp.errors import ConfigurationError, ProtocolError
from oisp.http.exchange import ConnectionInfo
from oisp.proxy.h1_framing import MessageFramer, header_lines, request_body
from oisp.proxy.relay import RelayResult, relay
from oisp.proxy.report import ConnectionReport, Decision
from oisp.proxy.service import UpstreamFailure

if TYPE_CHECKING:
    from oisp.proxy.connection import Connection

__all__ = ["RequestRewriter", "ReverseTarget", "serve_reverse"]

logger = logging.getLogger(__name__)


class ReverseTarget:
    """The upstream a reverse proxy stands in for, parsed from its URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError(f"proxy.reverse_target: {url!r} must be an http:// or https:// URL")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default = 443 if self.tls else 80
        self.authority = self.host if self.port == default else f"{self.host}:{self.port}"
        self.base_path = parts.path.rstrip("/")


class RequestRewriter:
    """Sans-io: rewrites the ``Host`` header (and prefixes a base path) of each request in a client's byte
    stream, passing bodies through byte for byte (Content-Length and chunked framing are followed, not
    re-encoded). After an Upgrade or CONNECT request everything passes untouched."""

    def __init__(self, authority: str, base_path: str = "") -> None:
        self.authority = authority.encode("ascii")
        self.base_path = base_path.encode("ascii")
        self._framer = MessageFramer()

    def feed(self, data: bytes) -> bytes:
        """The bytes to send upstream for ``data`` (may hold back an incomplete head or chunk-size line)."""
        out = bytearray()
        for kind, piece in self._framer.feed(data):
            out += self._rewrite_head(piece) if kind == "head" else piece
        return bytes(out)

    def _rewrite_head(self, head: bytes) -> bytes:
        start, lines = header_lines(head)
        request_line = start.split(b" ")
        if len(request_line) != 3:
            raise ProtocolError(f"malformed request line {start[:100]!r}")
        method, target, version = request_line
        if self.base_path and target.startswith(b"/"):
            target = self.base_path + target
        out = [b" ".join((method, target, version))]
        for line in lines:
            name = line.partition(b":")[0]
            out.append(name + b": " + self.authority if name.strip().lower() == b"host" else line)
        self._framer.frame(request_body(method, lines))
        return b"\r\n".join(out) + b"\r\n\r\n"


async def serve_reverse(connection: Connection, who: Attribution | None) -> None:
    """Handle one client connection of a reverse proxy."""
    services, client, connection_id = connection.services, connection.client, connection.connection_id
    client_addr = connection.client_addr
    assert services.config.reverse_target is not None
    target = ReverseTarget(services.config.reverse_target)
    spec = connection.policy.endpoints.match(target.host, target.port)
    report = ConnectionReport(
        connection_id=connection_id, mode="reverse", client_addr=client_addr, target_host=target.host,
        target_port=target.port, decision=Decision.INTERCEPTED if target.tls else Decision.PLAIN_HTTP,
        success=True, provider=spec.provider if spec else None, sni=target.host if target.tls else None,
    )
    report.attach(who)
    connected = await services.connect(target.host, target.port, connection_id, client_addr)
    if isinstance(connected, UpstreamFailure):
        report.failed(connected.decision, connected.error)
        services.report(report)
        await _reply_502(client)
        return
    report.connected(connected.address, connected.connect_ms)
    upstream_tcp = connected.stream
    upstream: ByteStream = upstream_tcp
    if target.tls:
        try:
            with anyio.fail_after(services.config.handshake_timeout):
                tls = await services.network.tls_client(upstream_tcp, services.upstream_context(("http/1.1",)),
                                                        server_hostname=target.host)
        except (ssl.SSLError, anyio.EndOfStream, TimeoutError, anyio.BrokenResourceError, OSError) as exc:
            verification = isinstance(exc, ssl.SSLCertVerificationError)
            report.failed(Decision.UPSTREAM_VERIFICATION_FAILED if verification else Decision.UPSTREAM_FAILED,
                          f"upstream TLS handshake failed: {exc}")
            logger.warning("connection %s to %s: %s", connection_id, target.host, report.error)
            await upstream_tcp.aclose()
            services.report(report)
            await _reply_502(client)
            return
        report.alpn, report.tls_version, report.cipher = tls.alpn, tls.version, tls.cipher
        der = tls.peer_certificate_der()
        if der:
            report.upstream_certificate = services.certificate_summary(der)  # cached; never raises
        upstream = tls
    services.report(report)
    info = ConnectionInfo(connection_id=connection_id, client_addr=client_addr,
                          server_addr=(target.host, target.port), mode="reverse",
                          sni=target.host if target.tls else None, alpn="http/1.1",
                          tls_version=report.tls_version, tls=target.tls, process=report.process, actor=report.actor,
                          app=report.app,
                          provider=spec.provider if spec else None)
    feed = services.feed_for(info, "http/1.1")
    rewriter = RequestRewriter(target.authority, target.base_path)
    async with upstream, anyio.create_task_group() as tg:
        if feed is not None:
            tg.start_soon(feed.run)
        result = RelayResult(error="relay cancelled")
        try:
            result = await relay(client, upstream, feed, rewrite_client=rewriter.feed)
        finally:
            if feed is not None:
                feed.finish(result.error)


async def _reply_502(client: ByteStream) -> None:
    try:
        await client.send(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
