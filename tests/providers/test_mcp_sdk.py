"""MCP end to end: the official ``mcp`` SDK's client against its server (``MCPServer``, formerly FastMCP, under
uvicorn with TLS) through the proxy, over Streamable HTTP (the 2025 handshake era and the stateless 2026 protocol)
and HTTP+SSE. The relay stays byte-faithful: the bytes of every request body and response body are the same on
the client's side and on the server's."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.oisp_schema import SchemaValidator, needs_spec
from tests.stack import Stack, running_stack

from oisp.events import Event
from oisp.hookspecs import EndpointSpec
from oisp.proxy import UpstreamOverride

pytest.importorskip("mcp")
httpx2 = pytest.importorskip("httpx2")
uvicorn = pytest.importorskip("uvicorn")

from mcp import Client  # noqa: E402
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402
from mcp.server.transport_security import TransportSecuritySettings  # noqa: E402

HOST = "mcp.acme.example"
SECRET = "sk-proj-" + "Q" * 48


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


def build_server() -> MCPServer:
    server = MCPServer("acme-tools", version="3.1.4")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool()
    def read_file(path: str) -> str:
        """Read a file of the project."""
        return f"contents of {path}: OPENAI_API_KEY={SECRET}"

    @server.tool()
    def fail(reason: str) -> str:
        """Always fails."""
        raise ValueError(reason)

    @server.resource("config://app")
    def app_config() -> str:
        return "debug = true"

    return server


class Wire:
    """What crossed on each side, by request number: (method, target, request body, response body)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, list[Any]] = {}
        #: Responses read to their end (a client may close a stream, or leave a last body unread, as it exits).
        self.complete: set[str] = set()

    def request(self, number: str, method: str, target: str, body: bytes) -> None:
        self.exchanges[number] = [method, target, body, bytearray()]

    def response(self, number: str, data: bytes) -> None:
        self.exchanges[number][3] += data


class RecordingApp:
    """ASGI middleware: the request and response body bytes the server application really got and sent."""

    def __init__(self, app: Any, wire: Wire) -> None:
        self.app = app
        self.wire = wire

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        number = dict(scope["headers"]).get(b"x-test-number", b"?").decode()
        target = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        self.wire.request(number, scope["method"], target, b"")

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.wire.exchanges[number][2] += message.get("body", b"")
            return message

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                self.wire.response(number, message.get("body", b""))
            await send(message)

        await self.app(scope, recording_receive, recording_send)


class _Tee(httpx2.AsyncByteStream):  # type: ignore[misc]
    def __init__(self, inner: Any, wire: Wire, number: str) -> None:
        self.inner, self.wire, self.number = inner, wire, number

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.wire.response(self.number, chunk)
            yield chunk
        self.wire.complete.add(self.number)

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingTransport(httpx2.AsyncBaseTransport):  # type: ignore[misc]
    """The client's side: numbers each request (a header the server's recorder reads) and tees the bodies."""

    def __init__(self, inner: Any, wire: Wire) -> None:
        self.inner = inner
        self.wire = wire
        self.count = 0

    async def handle_async_request(self, request: Any) -> Any:
        self.count += 1
        number = str(self.count)
        request.headers["x-test-number"] = number
        body = await request.aread()
        self.wire.request(number, request.method, request.url.raw_path.decode(), body)
        response = await self.inner.handle_async_request(request)
        response.stream = _Tee(response.stream, self.wire, number)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def mcp_stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[tuple[Stack, Wire]]:
    cert = test_ca.issue_cert(HOST)
    pem = tmp_path / "mcp-server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # listening before uvicorn serves: clients queue, no waiting for startup
    port = sock.getsockname()[1]
    server_wire = Wire()
    server = build_server()

    def app() -> Any:
        security = TransportSecuritySettings(allowed_hosts=[HOST], allowed_origins=[f"https://{HOST}"])
        streamable = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=HOST)
        legacy = server.sse_app(transport_security=security, host=HOST)
        paths = {"/sse", "/messages", "/messages/"}

        async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await streamable(scope, receive, send)
                return
            target = legacy if scope.get("path") in paths else streamable
            await target(scope, receive, send)
        return RecordingApp(route, server_wire)

    config = uvicorn.Config(app(), ssl_certfile=str(pem), ssl_keyfile=str(pem), log_level="warning",
                            lifespan="on")
    uv = uvicorn.Server(config)
    uv.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    with running_stack(tmp_path, test_ca, endpoints=(EndpointSpec("mcp", HOST),),
                       extra_overrides=(UpstreamOverride(HOST, 443, "127.0.0.1", port),)) as stack:
        future = stack.portal.start_task_soon(lambda: uv.serve(sockets=[sock]))
        try:
            yield stack, server_wire
        finally:
            uv.should_exit = uv.force_exit = True  # the proxy keeps idle upstream connections open
            future.result(timeout=15)
            sock.close()


def _client(stack: Stack, wire: Wire, *_: Any, **__: Any) -> Any:
    context = ssl.create_default_context(cafile=stack.ca_file)
    inner = httpx2.AsyncHTTPTransport(proxy=stack.proxy_url, verify=context, trust_env=False)
    return httpx2.AsyncClient(transport=RecordingTransport(inner, wire), timeout=30, trust_env=False)


async def _session(client: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
    out["add"] = await client.call_tool("add", {"a": 2, "b": 3})
    out["read"] = await client.call_tool("read_file", {"path": "/srv/app/.env"})
    out["fail"] = await client.call_tool("fail", {"reason": "disk on fire"})
    out["resource"] = await client.read_resource("config://app")
    return out


def _by_call(events: list[Event], event_type: str) -> dict[str, Event]:
    return {e.data.tool.name: e for e in events if e.event_type == event_type}


def _check_tool_events(events: list[Event], *, server_name: str = "acme-tools") -> None:
    calls = _by_call(events, "agent.tool_call")
    results = _by_call(events, "agent.tool_result")
    assert set(calls) == {"add", "read_file", "fail"} and set(results) == set(calls)
    for name, call in calls.items():
        assert call.data.tool.provider == "mcp" and call.data.tool.server == server_name
        assert call.attrs["mcp.method.name"] == "tools/call"
        result = results[name]
        assert result.data.call_id == call.data.call_id  # linked by the JSON-RPC id
        assert result.attrs["jsonrpc.request.id"] == call.attrs["jsonrpc.request.id"]
        assert result.related_events is not None and result.related_events[0].event_id == call.event_id
        assert result.data.result_size_bytes and result.data.result_size_bytes > 0
    assert calls["add"].data.arguments == {"a": 2, "b": 3}
    assert calls["add"].data.tool.description == "Add two numbers."
    assert calls["read_file"].data.tool.type == "file_read"
    assert results["add"].data.success is True and results["add"].data.result == "5"
    assert results["add"].data.extra["structured_content"] == {"result": 5}
    assert results["fail"].data.success is False and results["fail"].data.error is not None
    assert "contents of /srv/app/.env" in str(results["read_file"].data.result)
    text = "\n".join(e.to_json() for e in events)
    assert SECRET not in text  # the tool's content is redacted like any other


def _check_bytes(client_wire: Wire, server_wire: Wire) -> None:
    assert client_wire.exchanges and set(client_wire.exchanges) == set(server_wire.exchanges)
    for number, (method, target, body, answer) in client_wire.exchanges.items():
        s_method, s_target, s_body, s_answer = server_wire.exchanges[number]
        assert (method, target) == (s_method, s_target)
        assert bytes(body) == bytes(s_body), f"request {number} ({method} {target}) changed on the way"
        if number in client_wire.complete:
            assert bytes(answer) == bytes(s_answer), f"response {number} ({method} {target}) changed on the way"
        else:  # what the client read of a response it did not finish is the start of what the server sent
            assert bytes(s_answer).startswith(bytes(answer)), f"response {number} ({method} {target}) changed"
    unread = [n for n, (_, _, _, answer) in client_wire.exchanges.items()
              if server_wire.exchanges[n][3] and not answer]
    assert len(unread) <= 1  # only a last body the client left as it exited


def _validate(events: list[Event]) -> None:
    validator = SchemaValidator()
    for event in events:
        validator.assert_valid(json.loads(event.to_json()))


@needs_spec
def test_streamable_http_with_the_initialize_handshake(mcp_stack: tuple[Stack, Wire]) -> None:
    stack, server_wire = mcp_stack
    wire = Wire()

    async def run() -> dict[str, Any]:
        transport = streamable_http_client(f"https://{HOST}/mcp", http_client=_client(stack, wire))
        async with Client(transport, mode="legacy") as client:
            return await _session(client)

    out = stack.portal.call(run)
    assert out["tools"] == ["add", "fail", "read_file"] and out["add"].is_error is False and out["fail"].is_error
    events = stack.wait_for(lambda es: sum(e.event_type == "agent.session" for e in es) >= 2
                            and sum(e.event_type == "agent.tool_result" for e in es) >= 3)
    mcp_events = [e for e in events if e.event_type.startswith("agent.")]
    start, end = [e for e in mcp_events if e.event_type == "agent.session"]
    assert start.data.extra["action"] == "start" and end.data.extra["action"] == "end"
    assert start.data.extra["mcp_server"] == {"name": "acme-tools", "version": "3.1.4"}
    assert start.data.extra["agent"]["name"] == "mcp"
    session_id = start.data.extra["session_id"]
    assert session_id and start.attrs["mcp.session.id"] == session_id
    assert start.attrs["mcp.protocol.version"] == "2025-11-25"
    assert end.data.extra["stats"] == {"tool_calls": 3}
    _check_tool_events(mcp_events)
    assert all(e.attrs["mcp.session.id"] == session_id for e in mcp_events)
    reads = [e for e in events if e.event_type == "agent.rag_retrieve"]
    assert len(reads) == 1 and reads[0].data.extra["query"] == "config://app"
    assert reads[0].data.extra["results_count"] == 1
    assert not [e for e in events if e.event_type.startswith("ai.")]  # MCP is not a model call
    _validate(events)
    _check_bytes(wire, server_wire)


@needs_spec
def test_stateless_streamable_http_of_the_2026_protocol(mcp_stack: tuple[Stack, Wire]) -> None:
    stack, server_wire = mcp_stack
    wire = Wire()

    async def run() -> dict[str, Any]:
        transport = streamable_http_client(f"https://{HOST}/mcp", http_client=_client(stack, wire))
        async with Client(transport) as client:  # auto: server/discover, then a stateless request each
            return await _session(client)

    stack.portal.call(run)
    events = stack.wait_for(lambda es: sum(e.event_type == "agent.tool_result" for e in es) >= 3
                            and any(e.event_type == "agent.rag_retrieve" for e in es))
    starts = [e for e in events if e.event_type == "agent.session"]
    assert starts and starts[0].attrs["mcp.method.name"] == "server/discover"
    assert starts[0].data.extra["protocol_version"] == "2026-07-28"
    _check_tool_events([e for e in events if e.event_type.startswith("agent.tool")])
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    assert all(c.data.agent is not None and c.data.agent.name == "mcp" for c in calls)  # from each request's _meta
    _validate(events)
    _check_bytes(wire, server_wire)


@needs_spec
def test_http_plus_sse_answers_arrive_on_the_get_stream(mcp_stack: tuple[Stack, Wire]) -> None:
    stack, server_wire = mcp_stack
    wire = Wire()

    async def run() -> dict[str, Any]:
        transport = sse_client(f"https://{HOST}/sse", httpx_client_factory=lambda *a, **k: _client(stack, wire))
        async with Client(transport, mode="legacy") as client:
            return await _session(client)

    stack.portal.call(run)
    events = stack.wait_for(lambda es: sum(e.event_type == "agent.tool_result" for e in es) >= 3)
    _check_tool_events([e for e in events if e.event_type.startswith("agent.tool")])
    start = next(e for e in events if e.event_type == "agent.session")
    assert start.data.extra["mcp_server"]["name"] == "acme-tools" and start.attrs.get("mcp.session.id")
    _validate(events)
    _check_bytes(wire, server_wire)
