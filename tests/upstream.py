"""A real TLS upstream for tests: HTTP/1.1 (h11) and HTTP/2 (h2) on one port, chosen by ALPN.

It answers with a handler (``Request -> Response``) and records the exact plaintext bytes each connection
received and sent, so tests can prove the proxy relays byte for byte.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
from anyio.abc import SocketStream, TaskStatus

from oisp.proxy.tls_stream import TlsStream


@attrs.define
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@attrs.define
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = attrs.field(factory=lambda: [("content-type", "application/json")])
    #: Bytes, or an async iterator of chunks (sent as they come: streaming).
    body: bytes | Callable[[], AsyncIterator[bytes]] = b"{}"
    #: Abort the connection (TCP close / RST_STREAM) after sending this many body chunks.
    abort_after_chunks: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


class WsPeer:
    """The server end of a WebSocket on the upstream (websockets' sans-io ``ServerProtocol`` over the recorded
    stream). ``segment`` sends the bytes in pieces of that size (each its own TLS record), to split frames."""

    def __init__(self, stream: _RecordingStream, protocol: Any, pending: bytes, segment: int | None) -> None:
        self.stream = stream
        self.protocol = protocol
        self.segment = segment
        self._frames: list[Any] = []
        self._eof = False
        if pending:
            protocol.receive_data(pending)

    async def flush(self) -> None:
        for data in self.protocol.data_to_send():
            step = self.segment or len(data) or 1
            for i in range(0, len(data), step):
                await self.stream.send(data[i:i + step])

    async def recv(self) -> str | bytes | None:
        """The next text or binary message (fragments joined; control frames answered), None at the close."""
        from websockets.frames import Opcode

        parts: list[bytes] = []
        opcode = None
        while True:
            self._frames += self.protocol.events_received()
            await self.flush()  # pongs and the close answer
            while self._frames:
                frame = self._frames.pop(0)
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    opcode, parts = frame.opcode, [frame.data]
                elif frame.opcode == Opcode.CONT:
                    parts.append(frame.data)
                else:
                    if frame.opcode == Opcode.CLOSE:
                        self._eof = True
                    continue
                if frame.fin:
                    data = b"".join(parts)
                    return data.decode() if opcode == Opcode.TEXT else data
            if self._eof:
                return None
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
            self.protocol.receive_data(data)

    async def send_text(self, text: str, *, fragments: int = 1) -> None:
        """Send one text message, in ``fragments`` frames."""
        data = text.encode()
        size = max(1, -(-len(data) // fragments))
        pieces = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        for index, piece in enumerate(pieces):
            fin = index == len(pieces) - 1
            if index == 0:
                self.protocol.send_text(piece, fin=fin)
            else:
                self.protocol.send_continuation(piece, fin=fin)
        await self.flush()

    async def send_json(self, value: Any, *, fragments: int = 1) -> None:
        import json

        await self.send_text(json.dumps(value), fragments=fragments)


#: Serves one WebSocket after the upstream accepted the upgrade.
WsHandler = Callable[[Request, WsPeer], Awaitable[None]]


async def json_ok(request: Request) -> Response:
    return Response(body=b'{"ok": true, "path": "' + request.target.encode() + b'"}')


@attrs.define
class Recording:
    alpn: str | None = None
    received: bytearray = attrs.field(factory=bytearray)
    sent: bytearray = attrs.field(factory=bytearray)
    requests: list[Request] = attrs.field(factory=list)


class _RecordingStream:
    def __init__(self, stream: Any, recording: Recording) -> None:
        self.stream = stream
        self.recording = recording

    async def receive(self) -> bytes:
        data: bytes = await self.stream.receive(65536)
        self.recording.received += data
        return data

    async def send(self, data: bytes) -> None:
        if data:
            self.recording.sent += data
            await self.stream.send(data)


_HOP_BY_HOP_FOR_PROXIES = ("proxy-connection", "proxy-authorization")


def strict_origin_violation(req: Request) -> str | None:
    """Why a strict origin server (Express, most Python frameworks) would refuse ``req``: an origin server takes
    origin-form targets only, exactly one Host, and never sees headers meant for a proxy (RFC 9112 §3.2)."""
    if not (req.target.startswith("/") or (req.method == "OPTIONS" and req.target == "*")):
        return f"request target {req.target!r} is not in origin form"
    hosts = [v for k, v in req.headers if k.lower() == "host"]
    if len(hosts) != 1:
        return f"{len(hosts)} Host headers"
    leaked = [k for k, _ in req.headers if k.lower() in _HOP_BY_HOP_FOR_PROXIES]
    if leaked:
        return f"proxy-hop headers reached the origin: {leaked}"
    return None


class Upstream:
    def __init__(self, context: ssl.SSLContext | None, handler: Handler = json_ok, *, strict: bool = False) -> None:
        """``context`` None serves plain HTTP/1.1 (like Ollama). ``strict`` answers 400 to requests an origin
        server must not get (see :func:`strict_origin_violation`), and records them in :attr:`refused`."""
        self.context = context
        self.handler = handler
        self.strict = strict
        self.refused: list[tuple[Request, str]] = []
        self.connections: list[Recording] = []
        self.port = 0
        #: Set to serve WebSocket upgrades (HTTP/1.1): the handler talks to the client through a WsPeer.
        self.websocket: WsHandler | None = None
        #: permessage-deflate offered by the client is accepted when True.
        self.websocket_compression = True
        #: Send the WebSocket's bytes in pieces of this size.
        self.websocket_segment: int | None = None

    async def serve(self, host: str | None = "127.0.0.1", port: int = 0, *,
                    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._connection)

    async def _connection(self, client: SocketStream) -> None:
        recording = Recording()
        self.connections.append(recording)
        async with client:
            if self.context is None:
                stream = _RecordingStream(client, recording)
                try:
                    await self._serve_h1(stream, recording)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                        h11.RemoteProtocolError):
                    pass
                return
            try:
                tls = await TlsStream.handshake(client, self.context, server_side=True)
            except (ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            recording.alpn = tls.alpn
            stream = _RecordingStream(tls, recording)
            # except*: the h2 path runs its responses in a task group, so a peer that resets the connection
            # (curl closing with unread data does) surfaces as an ExceptionGroup, which a plain except misses
            # and which would then end listener.serve(): the whole server, refusing every later connection.
            try:
                if tls.alpn == "h2":
                    await self._serve_h2(stream, recording)
                else:
                    await self._serve_h1(stream, recording)
            except* (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the peer went away; only this connection ends
            except* (h11.RemoteProtocolError, h2.exceptions.ProtocolError):
                pass  # a test sent malformed traffic on purpose; the server only drops that connection
            finally:
                with anyio.CancelScope(shield=True):
                    await tls.aclose()

    # HTTP/1.1 -------------------------------------------------------------------------------------
    async def _serve_h1(self, stream: _RecordingStream, recording: Recording) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive())
                    except anyio.EndOfStream:
                        conn.receive_data(b"")
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert request is not None
            req = Request(request.method.decode(), request.target.decode(),
                          [(k.decode(), v.decode()) for k, v in request.headers.raw_items()], bytes(body),
                          "1.1")
            recording.requests.append(req)
            if self.websocket is not None and "websocket" in (req.header("upgrade") or "").lower():
                await self._serve_websocket(stream, req, conn.trailing_data[0])
                return
            violation = strict_origin_violation(req) if self.strict else None
            if violation is not None:
                self.refused.append((req, violation))
                response = Response(status=400, headers=[("content-type", "text/plain")], body=violation.encode())
            else:
                response = await self.handler(req)
            streaming = not isinstance(response.body, bytes)
            headers = list(response.headers)
            if isinstance(response.body, bytes):
                headers.append(("content-length", str(len(response.body))))
            await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers)))
            if isinstance(response.body, bytes):
                await stream.send(conn.send(h11.Data(data=response.body)))
            else:
                sent = 0
                async for chunk in response.body():
                    await stream.send(conn.send(h11.Data(data=chunk)))
                    sent += 1
                    if response.abort_after_chunks is not None and sent >= response.abort_after_chunks:
                        return
            del streaming
            await stream.send(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _serve_websocket(self, stream: _RecordingStream, req: Request, pending: bytes) -> None:
        from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
        from websockets.server import ServerProtocol

        assert self.websocket is not None
        extensions = [ServerPerMessageDeflateFactory()] if self.websocket_compression else []
        protocol = ServerProtocol(extensions=extensions, max_size=None)
        # The protocol parses the request itself (h11 read it already: it is written again for the protocol).
        head = f"{req.method} {req.target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in req.headers)
        protocol.receive_data(head.encode() + b"\r\n")
        (ws_request,) = protocol.events_received()
        protocol.send_response(protocol.accept(ws_request))
        peer = WsPeer(stream, protocol, pending, self.websocket_segment)
        await peer.flush()
        await self.websocket(req, peer)
        await peer.flush()

    # HTTP/2 ---------------------------------------------------------------------------------------
    async def _serve_h2(self, stream: _RecordingStream, recording: Recording) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        await stream.send(conn.data_to_send())
        pending: dict[int, dict[str, Any]] = {}
        window_changed = anyio.Event()
        send_lock = anyio.Lock()

        async def flush() -> None:
            async with send_lock:
                await stream.send(conn.data_to_send())

        async def respond(stream_id: int, req: Request) -> None:
            nonlocal window_changed
            response = await self.handler(req)
            headers = [(":status", str(response.status)), *response.headers]
            if isinstance(response.body, bytes):
                headers.append(("content-length", str(len(response.body))))
            conn.send_headers(stream_id, headers)
            await flush()

            async def send_data(data: bytes) -> None:
                nonlocal window_changed
                while data:
                    window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                    if window <= 0:
                        window_changed = anyio.Event()
                        await window_changed.wait()
                        continue
                    conn.send_data(stream_id, data[:window])
                    data = data[window:]
                    await flush()

            if isinstance(response.body, bytes):
                await send_data(response.body)
            else:
                sent = 0
                async for chunk in response.body():
                    await send_data(chunk)
                    sent += 1
                    if response.abort_after_chunks is not None and sent >= response.abort_after_chunks:
                        conn.reset_stream(stream_id, error_code=2)
                        await flush()
                        return
            conn.end_stream(stream_id)
            await flush()

        async with anyio.create_task_group() as tg:
            while True:
                try:
                    data = await stream.receive()
                except anyio.EndOfStream:
                    tg.cancel_scope.cancel()
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        pending[event.stream_id] = {"headers": event.headers, "body": bytearray()}
                    elif isinstance(event, h2.events.DataReceived):
                        pending[event.stream_id]["body"] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        item = pending.pop(event.stream_id)
                        hdrs = dict(item["headers"])
                        req = Request(hdrs[":method"], hdrs[":path"],
                                      [(k, v) for k, v in item["headers"] if not k.startswith(":")],
                                      bytes(item["body"]), "2")
                        recording.requests.append(req)
                        tg.start_soon(respond, event.stream_id, req)
                    elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        window_changed.set()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        tg.cancel_scope.cancel()
                        return
                await flush()


def server_context(cert: Any, alpn: Sequence[str] = ("h2", "http/1.1")) -> ssl.SSLContext:
    """A server SSLContext for a trustme leaf certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    context.set_alpn_protocols(list(alpn))
    return context
