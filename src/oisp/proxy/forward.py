"""Explicit mode's plain-HTTP forwarding (``HTTP_PROXY``): what a proxy owes an origin server.

A client that uses oisp as its HTTP proxy sends absolute-form requests (``POST http://localhost:11434/api/chat``).
An origin server must get the origin form (``POST /api/chat``), a ``Host`` taken from the target, and none of the
headers meant for the proxy hop (``Proxy-Connection``, ``Proxy-Authorization`` and whatever ``Connection`` names)
(RFC 9112 §3.2, RFC 9110 §7.6.1). Everything else passes byte for byte: header order and spelling, bodies,
chunking. One client connection may carry requests for several origins (curl and urllib3 reuse a proxy connection
across hosts): a request for another origin waits until every response from the current one has been delivered,
then goes out on a new upstream connection.

:class:`ForwardRewriter` is the sans-io part: client bytes in, rewritten bytes and request boundaries out.
:func:`serve_forward` is the I/O around it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import attrs
from anyio.abc import ByteStream

from oisp.errors import ProtocolError
from oisp.http.exchange import ConnectionInfo
from oisp.proxy.h1_framing import Framing, MessageFramer, ResponseTracker, header_lines, request_body
from oisp.proxy.loop import loop_response
from oisp.proxy.net import describe
from oisp.proxy.relay import CHUNK, CopyFeed, Direction, RelayResult
from oisp.proxy.report import ConnectionReport, Decision
from oisp.proxy.service import UpstreamFailure

if TYPE_CHECKING:
    from oisp.attribution import Attribution
    from oisp.proxy.connection import Connection

__all__ = ["ForwardRewriter", "ForwardedRequest", "Origin", "serve_forward", "to_origin_form"]

logger = logging.getLogger(__name__)

_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
#: Headers for the proxy hop only, never forwarded.
_PROXY_HOP = frozenset({b"proxy-connection", b"proxy-authorization"})
#: Connection options that are the message's own control data, kept in the forwarded ``Connection`` header.
_CONTROL_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


@attrs.frozen
class Origin:
    """Where a forwarded request goes: the host and port of its target (host lower-cased)."""

    host: str
    port: int


@attrs.frozen
class ForwardedRequest:
    """The start of a forwarded request in :meth:`ForwardRewriter.feed`'s output; its (rewritten) head follows.
    ``origin`` is None for an origin-form request, which goes where the previous one went."""

    method: bytes
    origin: Origin | None


def _absolute_target(target: bytes) -> tuple[Origin, bytes, bytes]:
    """The origin, path and query (empty when the target has no path) and ``Host`` value of an absolute-form
    ``http://`` target."""
    try:
        text = target.decode("ascii")
        url = urlsplit(text)
        port = url.port or 80
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"invalid request target {target[:100]!r}") from None
    if url.scheme.lower() != "http" or not url.hostname:
        raise ProtocolError(f"an explicit proxy forwards http:// targets only, got {target[:100]!r}")
    authority = url.netloc.rpartition("@")[2]  # never the userinfo
    path = url.path
    if url.query:
        path += "?" + url.query
    return Origin(url.hostname.lower(), port), path.encode("ascii"), authority.encode("ascii")


def to_origin_form(head: bytes) -> tuple[bytes, ForwardedRequest, Framing]:
    """Rewrite one request head for the origin server: the rewritten head, the request, and how its body is
    framed (read from the same parse of the head).

    Only the request target, ``Host`` and the hop-by-hop headers change; every other line is kept as it was.
    """
    start, lines = header_lines(head)
    parts = start.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ProtocolError(f"malformed request line {start[:100]!r}")
    method, target, version = parts
    if method.upper() == b"CONNECT":
        raise ProtocolError("CONNECT on a connection that forwards plain HTTP requests")
    if target.startswith(b"/") or target == b"*":
        origin, authority = None, None
    else:
        origin_, path, authority_ = _absolute_target(target)
        origin, authority = origin_, authority_
        if not path.startswith(b"/"):  # RFC 9112 §3.2.4: OPTIONS without a path asks about the server as a whole
            path = (b"*" if method.upper() == b"OPTIONS" else b"/") + path
        target = path

    options: list[bytes] = []
    for line in lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            options += [o.strip() for o in value.split(b",") if o.strip()]
    named = {o.lower() for o in options} - {b"close", b"upgrade"}  # keep-alive names the Keep-Alive header
    kept_options = [o for o in options if o.lower() in _CONTROL_OPTIONS]

    out = [b" ".join((method, target, version))]
    if authority is not None and not any(line.partition(b":")[0].strip().lower() == b"host" for line in lines):
        out.append(b"Host: " + authority)
    dropping = False
    host_done = connection_done = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # an obsolete line folding: belongs to the field above
            if not dropping:
                out.append(line)
            continue
        name = line.partition(b":")[0]
        lname = name.strip().lower()
        dropping = False
        if lname in _PROXY_HOP or lname in named:
            dropping = True
        elif lname == b"host" and authority is not None:
            dropping = True  # folded continuations of the client's value go too
            if not host_done:
                out.append(name + b": " + authority)
                host_done = True
        elif lname == b"connection" and kept_options != options:
            # rebuilt once, with only the message's own control options (none left: no Connection header)
            dropping = True
            if not connection_done and kept_options:
                out.append(name + b": " + b", ".join(kept_options))
            connection_done = True
        else:
            out.append(line)
    return b"\r\n".join(out) + b"\r\n\r\n", ForwardedRequest(method, origin), request_body(method, lines)


class ForwardRewriter:
    """Sans-io: a client's byte stream to an explicit proxy, rewritten for origin servers.

    :meth:`feed` returns, in order, a :class:`ForwardedRequest` before each request's head, and the bytes to send
    upstream (rewritten heads; bodies and chunking unchanged). After an Upgrade everything passes untouched.
    """

    def __init__(self) -> None:
        self._framer = MessageFramer()

    def feed(self, data: bytes) -> list[bytes | ForwardedRequest]:
        """What to send for ``data`` (incomplete heads and chunk-size lines are held back)."""
        out: list[bytes | ForwardedRequest] = []
        for kind, piece in self._framer.feed(data):
            if kind == "head":
                head, request, framing = to_origin_form(piece)
                self._framer.frame(framing)
                out += (request, head)
            else:
                out.append(piece)
        return out


async def serve_forward(connection: Connection, buffer: bytes, who: Attribution | None) -> None:
    """Forward one client connection's plain-HTTP requests (``buffer`` starts with a complete absolute-form
    head), decoding those that go to AI endpoints; one upstream connection per origin in turn."""
    services, client = connection.services, connection.client
    connection_id, client_addr, mode = connection.connection_id, connection.client_addr, connection.policy.mode
    rewriter = ForwardRewriter()
    try:
        pending: deque[bytes | ForwardedRequest] = deque(rewriter.feed(buffer))
    except ProtocolError as exc:
        logger.info("connection %s: bad proxy request", connection_id)
        logger.debug("connection %s: %s", connection_id, exc)
        await _reply(client, b"400 Bad Request")
        return
    first = pending[0]
    assert isinstance(first, ForwardedRequest) and first.origin is not None
    origin = first.origin
    while True:
        if await services.targets_self(origin.host, origin.port, connection_id, client_addr):
            try:
                await client.send(loop_response(f"{origin.host}:{origin.port}"))
            except _ERRORS:
                pass
            return
        endpoint = connection.policy.endpoints.match(origin.host, origin.port)
        report = ConnectionReport(
            connection_id=connection_id, mode=mode, client_addr=client_addr,
            target_host=origin.host, target_port=origin.port,
            decision=Decision.PLAIN_HTTP if endpoint else Decision.PASSTHROUGH, success=True,
            provider=endpoint.provider if endpoint else None,
        )
        report.attach(who)
        connected = await services.connect(origin.host, origin.port, connection_id, client_addr)
        if isinstance(connected, UpstreamFailure):
            report.failed(connected.decision, connected.error)
            services.report(report)
            await _reply(client, b"502 Bad Gateway")
            return
        report.connected(connected.address, connected.connect_ms)
        services.report(report)
        upstream = connected.stream
        info = ConnectionInfo(connection_id=connection_id, client_addr=client_addr,
                              server_addr=(origin.host, origin.port), mode=mode, tls=False,
                              provider=endpoint.provider if endpoint else None, process=report.process,
                              actor=report.actor, app=report.app)
        feed = services.feed_for(info, "http/1.1" if endpoint else None)
        async with upstream:
            leg = _OriginLeg(client, upstream, rewriter, pending, origin, feed, connection_id)
            next_origin = await leg.run()
        if next_origin is None:
            return
        origin = next_origin


class _OriginLeg:
    """One origin's part of a forwarding connection: relays both ways until the connection ends, or until a request
    for another origin has waited for every response of this one (then :meth:`run` returns that origin)."""

    def __init__(self, client: ByteStream, upstream: ByteStream, rewriter: ForwardRewriter,
                 pending: deque[bytes | ForwardedRequest], origin: Origin, feed: CopyFeed | None,
                 connection_id: str) -> None:
        self.client, self.upstream, self.rewriter = client, upstream, rewriter
        self.pending, self.origin, self.feed = pending, origin, feed
        self.connection_id = connection_id
        self.tracker: ResponseTracker | None = ResponseTracker()
        self.result = RelayResult()
        self.next_origin: Origin | None = None
        self.server_ended = False
        #: Set when a request for another origin waits and the responses are done (or can no longer be).
        self._switch_ready: anyio.Event | None = None

    async def run(self) -> Origin | None:
        async with anyio.create_task_group() as tg:
            if self.feed is not None:
                tg.start_soon(self.feed.run)
            try:
                async with anyio.create_task_group() as relay:
                    relay.start_soon(self._client_side, relay.cancel_scope)
                    relay.start_soon(self._server_side, relay.cancel_scope)
            finally:
                if self.feed is not None:
                    self.feed.finish(None if self.next_origin is not None else self.result.error)
        if self.result.error:
            logger.debug("connection %s ended with an error: %s", self.connection_id, self.result.error)
        return self.next_origin

    def _push(self, direction: Direction, data: bytes | None) -> None:
        if self.feed is not None:
            self.feed.push(direction, data, time.monotonic_ns())

    def _fail(self, message: str, scope: anyio.CancelScope) -> None:
        self.result.error = self.result.error or message
        scope.cancel()

    async def _client_side(self, scope: anyio.CancelScope) -> None:
        pending = self.pending
        while True:
            while pending:
                item = pending[0]
                if isinstance(item, ForwardedRequest):
                    if item.origin is not None and item.origin != self.origin:
                        await self._switch_to(item.origin, scope)
                        return
                    if self.tracker is not None:
                        self.tracker.request_sent(item.method)
                    pending.popleft()
                    continue
                pending.popleft()
                self._push("client", item)
                try:
                    await self.upstream.send(item)
                except _ERRORS as exc:
                    self._fail(f"server side: {describe(exc)}", scope)
                    return
                self.result.bytes_from_client += len(item)
            try:
                data = await self.client.receive(CHUNK)
            except anyio.EndOfStream:
                break
            except _ERRORS as exc:
                self._fail(f"client side: {describe(exc)}", scope)
                return
            try:
                pending.extend(self.rewriter.feed(data))
            except ProtocolError as exc:
                logger.info("connection %s: client sent malformed HTTP; connection closed", self.connection_id)
                logger.debug("connection %s: %s", self.connection_id, exc)  # may quote a URL: DEBUG only
                self._fail(f"client sent malformed HTTP: {exc}", scope)
                return
        self._push("client", None)
        if self.result.first_eof is None:
            self.result.first_eof = "client"
        try:
            await self.upstream.send_eof()
        except (*_ERRORS, NotImplementedError):
            pass

    async def _switch_to(self, origin: Origin, scope: anyio.CancelScope) -> None:
        """Wait until every response of this origin has reached the client, then end this leg for ``origin``."""
        if not self._responses_done():
            self._switch_ready = anyio.Event()
            await self._switch_ready.wait()
        if self.server_ended or not self._responses_done():
            # The responses cannot be delimited, or the server closed the connection (and with it the client's):
            # the waiting request cannot be answered on this connection.
            logger.info("connection %s: a request for another origin could not follow the responses of %s:%d; "
                        "connection closed", self.connection_id, self.origin.host, self.origin.port)
            self._fail("request for another origin after responses that ended the connection", scope)
            return
        self.next_origin = origin
        scope.cancel()  # the server side is waiting for bytes that will not come

    def _responses_done(self) -> bool:
        return self.tracker is not None and self.tracker.idle

    async def _server_side(self, scope: anyio.CancelScope) -> None:
        while True:
            try:
                data = await self.upstream.receive(CHUNK)
            except anyio.EndOfStream:
                break
            except _ERRORS as exc:
                self._fail(f"server side: {describe(exc)}", scope)
                return
            self._push("server", data)
            try:
                await self.client.send(data)
            except _ERRORS as exc:
                self._fail(f"client side: {describe(exc)}", scope)
                return
            self.result.bytes_from_server += len(data)
            tracker = self.tracker
            if tracker is not None:  # fed once the bytes were delivered: idle means the client has it all
                try:
                    tracker.feed(data)
                except ProtocolError as exc:
                    logger.debug("connection %s: responses cannot be followed (%s)", self.connection_id, exc)
                    self.tracker = None  # relaying goes on; only a change of origin is no longer possible
            if self._switch_ready is not None and (self.tracker is None or self.tracker.idle):
                self._switch_ready.set()
        self.server_ended = True
        self._push("server", None)
        if self.result.first_eof is None:
            self.result.first_eof = "server"
        try:
            await self.client.send_eof()
        except (*_ERRORS, NotImplementedError):
            pass
        if self._switch_ready is not None:
            self._switch_ready.set()  # nothing more will come: a waiting change of origin gives up


async def _reply(client: ByteStream, status: bytes) -> None:
    try:
        await client.send(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    except _ERRORS:
        pass
