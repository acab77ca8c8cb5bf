"""The MCP provider plugin: Model Context Protocol traffic over Streamable HTTP and the older HTTP+SSE transport.

MCP is JSON-RPC 2.0. Over Streamable HTTP a client POSTs one message (or a batch) to the server's endpoint and the
answer comes back as a JSON body or as a ``text/event-stream``; a GET opens a stream of server messages; DELETE
ends the session named by the ``Mcp-Session-Id`` header. Over HTTP+SSE (protocol 2024-11-05) a GET opens the
stream, whose first ``endpoint`` event names the URL the client then POSTs to (answered ``202``), and every answer
arrives on that GET stream. The decoder therefore reads each exchange's messages into a per-session state
(:class:`McpSessions`) shared across exchanges, and:

* ``initialize`` (``server/discover`` from protocol 2026-07-28 on, whose requests each carry the client's name and
  version in ``_meta`` and whose answers carry the server's): an ``agent.session`` event (``action = "start"``)
  with the client (``agent``), the server's name and version and the protocol version; the server's name becomes
  ``tool.server`` of the session's tools;
* ``tools/list``: the tool definitions are remembered (their descriptions go into later tool calls);
* ``tools/call``: ``agent.tool_call`` (``tool.provider = "mcp"``, ``tool.server``, arguments) when the request is
  seen, ``agent.tool_result`` (success or error, size, the content) when its answer is, linked to the call by
  the JSON-RPC id (``call_id`` and ``related_events``);
* ``resources/read``: an ``agent.rag_retrieve`` event (the context the agent pulled in: URI and sizes);
* ``DELETE``: an ``agent.session`` event with ``action = "end"``;
* every other message (lists, ``prompts/get``, ``ping``, notifications, the server's own requests) is read and
  kept as metadata only: it is counted in the session's statistics and never becomes an AI event.

Every event's ``attrs`` carry the OpenTelemetry MCP conventions' ``mcp.method.name``, ``mcp.session.id``,
``jsonrpc.request.id`` and ``mcp.protocol.version``. Which exchanges are MCP: every exchange with a host of the
``mcp`` provider (the built-in list :data:`WELL_KNOWN_SERVERS`, plus hosts users add as ``mcp=HOST[:PORT]``), and on
other intercepted hosts, POSTs whose body is JSON-RPC 2.0 to a path with an ``mcp`` segment (GitHub's MCP server
at ``api.githubcopilot.com/mcp/``). A message that cannot be read is reported in the events' limitations and
never harms the relay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from oisp.events import (
    AgentInfo,
    AgentToolCall,
    AgentToolResult,
    Confidence,
    Event,
    RelatedEvent,
    ToolError,
    ToolInfo,
    UnknownPayload,
)
from oisp.framing import FramingError, SseDecoder
from oisp.hookspecs import EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import DecoderContext, json_or_none, tool_type_for
from oisp.redaction import redact_url, sha256_text

__all__ = [
    "MCP_PROVIDER",
    "WELL_KNOWN_SERVERS",
    "McpDecoder",
    "McpSessions",
    "is_mcp_exchange",
]

logger = logging.getLogger(__name__)

#: The endpoint-table provider name of MCP servers (``--add-endpoint mcp=HOST[:PORT]``).
MCP_PROVIDER = "mcp"

#: Remote MCP servers whose vendors publish them (the MCP endpoint is on its own host). Users add their own
#: servers with ``--add-endpoint mcp=HOST[:PORT]`` or ``[endpoints] add = [{ provider = "mcp", host = "..." }]``;
#: no other host is intercepted. GitHub's server (``api.githubcopilot.com/mcp/``) shares its host with Copilot's
#: model API and is recognised by its path instead.
WELL_KNOWN_SERVERS: tuple[EndpointSpec, ...] = tuple(EndpointSpec(MCP_PROVIDER, host) for host in (
    "mcp.linear.app",
    "mcp.notion.com",
    "mcp.atlassian.com",
    "mcp.sentry.dev",
    "mcp.stripe.com",
    "mcp.asana.com",
    "mcp.paypal.com",
    "mcp.squareup.com",
    "mcp.intercom.com",
    "mcp.vercel.com",
    "mcp.supabase.com",
    "mcp.neon.tech",
    "mcp.deepwiki.com",
    "mcp.context7.com",
    "mcp.webflow.com",
    "mcp.wix.com",
    "*.mcp.cloudflare.com",
))

#: Bytes of a JSON-RPC message kept for reading (larger messages are counted, not parsed).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_JSONRPC_HINT = b'"jsonrpc"'


# --- sessions ------------------------------------------------------------------------------------------------

@attrs.define
class PendingRequest:
    """A JSON-RPC request the client sent whose answer has not been seen yet."""

    method: str
    started_ns: int
    tool_name: str | None = None
    call_event_id: str | None = None
    uri: str | None = None
    exchange_key: tuple[str, int] | None = None


@attrs.define
class McpSession:
    """What one MCP session has said so far (server identity, tools, requests in flight, counts)."""

    key: tuple[str, str]
    session_id: str | None = None
    server_name: str | None = None
    server_version: str | None = None
    protocol_version: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    #: Tool name -> description, from ``tools/list`` answers.
    tools: dict[str, str | None] = attrs.field(factory=dict)
    pending: OrderedDict[str, PendingRequest] = attrs.field(factory=OrderedDict)
    #: Method -> how many requests or notifications were seen (metadata of the session).
    methods: dict[str, int] = attrs.field(factory=dict)
    max_pending: int = 1024

    def count(self, method: str) -> None:
        if method in self.methods or len(self.methods) < 256:
            self.methods[method] = self.methods.get(method, 0) + 1

    def remember(self, request_id: str, pending: PendingRequest) -> None:
        self.pending[request_id] = pending
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)


class McpSessions:
    """The MCP sessions seen, by (server host, session id): bounded (least recently used dropped), thread-safe."""

    def __init__(self, max_sessions: int = 4096) -> None:
        self._sessions: OrderedDict[tuple[str, str], McpSession] = OrderedDict()
        self._lock = threading.Lock()
        self.max_sessions = max_sessions

    def get(self, host: str, session_id: str | None) -> McpSession:
        key = (host, session_id or "")
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = McpSession(key, session_id=session_id)
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            else:
                self._sessions.move_to_end(key)
            return session

    def adopt(self, host: str, session_id: str, source: McpSession) -> McpSession:
        """The session ``session_id`` names, taking over what ``source`` (the session-less state an
        ``initialize`` ran in) learned: the server answers ``initialize`` with the id of the session it opens."""
        session = self.get(host, session_id)
        if session is not source:
            for field in ("server_name", "server_version", "protocol_version", "client_name", "client_version"):
                if getattr(session, field) is None:
                    setattr(session, field, getattr(source, field))
            session.tools.update(source.tools)
        return session

    def end(self, host: str, session_id: str | None) -> McpSession | None:
        with self._lock:
            return self._sessions.pop((host, session_id or ""), None)

    def __len__(self) -> int:
        return len(self._sessions)




# --- which exchanges are MCP ---------------------------------------------------------------------------------

def _host(exchange: HttpExchange) -> str:
    authority = exchange.request.authority or ""
    host = authority.rsplit(":", 1)[0] if authority and not authority.endswith("]") else authority
    return (host or str(exchange.connection.server_addr[0])).strip("[]").lower()


def _has_mcp_segment(path: str) -> bool:
    return any(segment.lower() == "mcp" or segment.lower().startswith("mcp-") or segment.lower() == "sse"
               for segment in path.split("/"))


def is_mcp_exchange(exchange: HttpExchange) -> bool:
    """Whether an exchange is MCP: any exchange with an ``mcp`` endpoint, else a JSON-RPC 2.0 POST (or an event
    stream GET) to a path with an ``mcp`` segment on an intercepted host."""
    request = exchange.request
    if exchange.connection.provider == MCP_PROVIDER:
        return not request.asks_websocket
    target = request.target.lower()
    if "mcp" not in target and "sse" not in target:  # most exchanges: no MCP path, nothing else to look at
        return False
    if not _has_mcp_segment(request.path) or request.asks_websocket:
        return False
    if request.method == "POST":
        head = bytes(request.body[:4096])
        return _JSONRPC_HINT in head and head.lstrip()[:1] in (b"{", b"[")
    if request.method == "GET":
        return "text/event-stream" in (request.headers.get("accept") or "")
    return request.method == "DELETE" and request.headers.get("mcp-session-id") is not None


@hookimpl(tryfirst=True)
def oisp_exchange_decoder(exchange: HttpExchange, context: DecoderContext) -> ExchangeDecoder | None:
    # Messages of one session travel in many exchanges: the run's context keeps its sessions.
    return McpDecoder(context.state("mcp.sessions", McpSessions)) if is_mcp_exchange(exchange) else None


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return WELL_KNOWN_SERVERS


# --- the decoder ---------------------------------------------------------------------------------------------

def _id_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class McpDecoder:
    """Decodes one HTTP exchange of an MCP session (a POST of messages, the GET stream, or the closing DELETE)."""

    def __init__(self, registry: McpSessions | None = None) -> None:
        #: The sessions of this decoding run (a decoder made without them has a run of its own).
        self.registry = registry if registry is not None else McpSessions()
        self.session: McpSession | None = None
        self.host = ""
        self.problems: list[str] = []
        self._sse: SseDecoder | None = None
        self._is_stream = False
        #: The requests this exchange carried, by JSON-RPC id: answered here over Streamable HTTP (where stateless
        #: clients of one server all count ids from 1), on the GET stream over HTTP+SSE.
        self._sent: dict[str, PendingRequest] = {}

    # --- ExchangeDecoder ---------------------------------------------------------------------------
    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        request = exchange.request
        self.host = _host(exchange)
        session_id = request.headers.get("mcp-session-id") or _legacy_session_id(request.target)
        self.session = self.registry.get(self.host, session_id)
        if request.method == "DELETE":
            return ()
        if request.method != "POST":
            return ()
        if request.truncated or len(request.body) > MAX_MESSAGE_BYTES:
            self.problems.append("request body over the body cap: messages not read")
            return ()
        value, problem = json_or_none(request.body)
        if problem is not None:
            self.problems.append(f"request body: {problem}")
            return ()
        events: list[Event] = []
        for message in value if isinstance(value, list) else [value]:
            if isinstance(message, Mapping):
                events += self._client_message(exchange, message)
            else:
                self.problems.append("a batch item is not a JSON-RPC message")
        return events

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        if self._sse is None and not self._is_stream:
            content_type = exchange.response.headers.get("content-type") if exchange.response else None
            self._is_stream = bool(content_type and "text/event-stream" in content_type.lower())
            if self._is_stream:
                self._sse = SseDecoder(max_item_size=MAX_MESSAGE_BYTES)
        if self._sse is None:
            return ()
        return self._stream_items(exchange, self._sse.feed(data))

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        events: list[Event] = []
        response = exchange.response
        status = response.status if response is not None else None
        if self._sse is not None:
            events += self._stream_items(exchange, self._sse.close())
        elif response is not None and response.body and status is not None and status < 300 \
                and "json" in (response.headers.get("content-type") or "").lower():
            if response.truncated:
                self.problems.append("response body over the body cap: messages not read")
            else:
                value, problem = json_or_none(response.body)
                if problem is not None:
                    self.problems.append(f"response body: {problem}")
                else:
                    for message in value if isinstance(value, list) else [value]:
                        if isinstance(message, Mapping):
                            events += self._server_message(exchange, message)
        if exchange.request.method == "DELETE" and self.session is not None and status is not None \
                and status < 300:
            events.append(self._session_event(exchange, "end", self.session))
            self.registry.end(self.host, self.session.session_id)
        # Requests of this exchange left without an answer: the server refused them (HTTP error) or the exchange
        # ended first. Over HTTP+SSE a 202 means the answer comes on the GET stream: they stay pending.
        if status != 202 and self.session is not None:
            for request_id, pending in self._sent.items():
                if self.session.pending.get(request_id) is pending:
                    del self.session.pending[request_id]
                if pending.call_event_id is None:
                    continue
                reason = f"HTTP {status}" if status is not None and status >= 300 else \
                    "; ".join(exchange.partial_reasons) or "the exchange ended before the tool's result"
                events.append(self._tool_result(exchange, request_id, pending, None, ToolError(
                    type="http_error" if status is not None and status >= 300 else "incomplete", message=reason)))
        return events

    # --- messages ----------------------------------------------------------------------------------
    def _stream_items(self, exchange: HttpExchange, items: Iterable[Any]) -> list[Event]:
        events: list[Event] = []
        for item in items:
            if isinstance(item, FramingError):
                self.problems.append(f"event stream: {item}")
                continue
            data = getattr(item, "data", None)
            if not isinstance(data, str) or not data:
                continue
            if getattr(item, "event", "message") == "endpoint":  # HTTP+SSE: where the client is to POST
                session_id = _legacy_session_id(data)
                if session_id and self.session is not None and self.session.session_id is None:
                    self.session = self.registry.get(self.host, session_id)
                continue
            value, problem = json_or_none(data)
            if problem is not None:
                self.problems.append(f"event stream message: {problem}")
                continue
            for message in value if isinstance(value, list) else [value]:
                if isinstance(message, Mapping):
                    events += self._server_message(exchange, message)
        return events

    def _client_message(self, exchange: HttpExchange, message: Mapping[str, Any]) -> list[Event]:
        session = self.session
        assert session is not None
        method = message.get("method")
        request_id = _id_text(message.get("id"))
        if not isinstance(method, str):
            return []  # the client's answer to a server request (sampling, elicitation): metadata only
        session.count(method)
        params = message.get("params") if isinstance(message.get("params"), Mapping) else {}
        if method == "notifications/cancelled" and isinstance(params, Mapping):
            cancelled = _id_text(params.get("requestId"))
            pending = session.pending.pop(cancelled, None) if cancelled else None
            if pending is not None and pending.call_event_id is not None and cancelled is not None:
                reason = params.get("reason")
                return [self._tool_result(exchange, cancelled, pending, None, ToolError(
                    type="cancelled", message=reason if isinstance(reason, str) else None))]
            return []
        if request_id is None:
            return []  # a notification
        pending = PendingRequest(method=method, started_ns=_now(exchange))
        events: list[Event] = []
        assert isinstance(params, Mapping)
        meta = params.get("_meta")
        if isinstance(meta, Mapping):  # protocol 2026-07-28 and later: every request says who and which version
            client = meta.get("io.modelcontextprotocol/clientInfo")
            if isinstance(client, Mapping) and isinstance(client.get("name"), str):
                session.client_name = client["name"]
                session.client_version = _str(client.get("version"))
            session.protocol_version = _str(meta.get("io.modelcontextprotocol/protocolVersion")) \
                or session.protocol_version
        if method == "initialize":
            client = params.get("clientInfo")
            if isinstance(client, Mapping):
                session.client_name = _str(client.get("name"))
                session.client_version = _str(client.get("version"))
            session.protocol_version = session.protocol_version or _str(params.get("protocolVersion"))
        elif method == "tools/call":
            name = _str(params.get("name"))
            arguments = params.get("arguments")
            pending.tool_name = name
            event = Event.create(
                AgentToolCall(
                    tool=self._tool(name), call_id=self._call_id(request_id),
                    arguments=dict(arguments) if isinstance(arguments, Mapping) else None,
                    arguments_hash=sha256_text(_canonical(arguments)) if arguments is not None else None,
                    agent=self._agent(),
                ),
                confidence=self._confidence(exchange, ["mcp_tool_call_observed"]),
                attrs=self._attrs(exchange, method, request_id),
            )
            pending.call_event_id = event.event_id
            events.append(event)
        elif method == "resources/read":
            pending.uri = _str(params.get("uri"))
        session.remember(request_id, pending)
        self._sent[request_id] = pending
        return events

    def _server_message(self, exchange: HttpExchange, message: Mapping[str, Any]) -> list[Event]:
        session = self.session
        assert session is not None
        method = message.get("method")
        if isinstance(method, str):  # the server's own request or notification (progress, sampling, ...)
            session.count(method)
            return []
        request_id = _id_text(message.get("id"))
        if request_id is None:
            return []
        pending = self._sent.pop(request_id, None)
        if pending is not None:
            if session.pending.get(request_id) is pending:
                del session.pending[request_id]
        else:
            pending = session.pending.pop(request_id, None)
        if pending is None:
            return []
        result = message.get("result")
        error = message.get("error")
        if isinstance(result, Mapping):
            meta = result.get("_meta")
            server = result.get("serverInfo") or (meta.get("io.modelcontextprotocol/serverInfo")
                                                  if isinstance(meta, Mapping) else None)
            if isinstance(server, Mapping) and isinstance(server.get("name"), str) and server["name"]:
                session.server_name = server["name"]
                session.server_version = _str(server.get("version")) or None
        if pending.method in ("initialize", "server/discover") and isinstance(result, Mapping):
            versions = result.get("supportedVersions")
            session.protocol_version = _str(result.get("protocolVersion")) or session.protocol_version or (
                versions[0] if isinstance(versions, list) and versions and isinstance(versions[0], str) else None)
            header_id = exchange.response.headers.get("mcp-session-id") if exchange.response else None
            if header_id and header_id != session.session_id:
                source = session
                session = self.session = self.registry.adopt(self.host, header_id, source)
                if source.methods.get(pending.method, 0) > 0:  # the handshake belongs to the session it opened
                    source.methods[pending.method] -= 1
                    session.count(pending.method)
            return [self._session_event(exchange, "start", session, request_id, result, pending.method)]
        if pending.method == "tools/list" and isinstance(result, Mapping):
            tools = result.get("tools")
            for tool in tools if isinstance(tools, list) else []:
                if isinstance(tool, Mapping) and isinstance(tool.get("name"), str) and len(session.tools) < 4096:
                    session.tools[tool["name"]] = _str(tool.get("description"))
            return []
        if pending.method == "tools/call" and pending.call_event_id is not None:
            tool_error = None
            if isinstance(error, Mapping):
                tool_error = ToolError(type="jsonrpc_error", message=_str(error.get("message")),
                                       extra={"code": error.get("code")} if "code" in error else {})
            return [self._tool_result(exchange, request_id, pending, result if isinstance(result, Mapping)
                                      else None, tool_error)]
        if pending.method == "resources/read" and isinstance(result, Mapping):
            return [self._resource_event(exchange, request_id, pending, result)]
        return []

    # --- events ------------------------------------------------------------------------------------
    def _tool(self, name: str | None) -> ToolInfo:
        session = self.session
        description = session.tools.get(name) if session is not None and name else None
        return ToolInfo(name=name, type=tool_type_for(name), provider=MCP_PROVIDER, server=self._server_name(),
                        description=description)

    def _server_name(self) -> str:
        session = self.session
        return (session.server_name if session is not None and session.server_name else None) or self.host

    def _agent(self) -> AgentInfo | None:
        session = self.session
        if session is None or session.client_name is None:
            return None
        return AgentInfo(name=session.client_name, version=session.client_version, session_id=session.session_id)

    def _call_id(self, request_id: str) -> str:
        session = self.session
        scope = session.session_id if session is not None and session.session_id else self.host
        return f"mcp:{scope}:{request_id}"

    def _tool_result(self, exchange: HttpExchange, request_id: str, pending: PendingRequest,
                     result: Mapping[str, Any] | None, error: ToolError | None) -> Event:
        value: Any = None
        text = ""
        extra: dict[str, Any] = {}
        is_error = error is not None
        if result is not None:
            is_error = is_error or result.get("isError") is True
            content = result.get("content")
            items = content if isinstance(content, list) else []
            texts = [item.get("text") for item in items if isinstance(item, Mapping) and item.get("type") == "text"]
            if items and len(texts) == len(items) and all(isinstance(t, str) for t in texts):
                value = "\n".join(str(t) for t in texts)
            elif items:
                value = [dict(item) for item in items if isinstance(item, Mapping)]
            if isinstance(result.get("structuredContent"), Mapping):
                extra["structured_content"] = dict(result["structuredContent"])
            kinds = sorted({str(item.get("type")) for item in items if isinstance(item, Mapping)})
            if kinds:
                extra["content_types"] = kinds
            text = _canonical(result)
            if is_error and error is None:
                error = ToolError(type="tool_error")  # what the tool said is the result (content, redacted as such)
        duration = (_now(exchange) - pending.started_ns) // 1_000_000 if pending.started_ns else None
        return Event.create(
            AgentToolResult(
                call_id=self._call_id(request_id), tool=self._tool(pending.tool_name), agent=self._agent(),
                success=not is_error, error=error, result=value,
                result_hash=sha256_text(text) if text else None,
                result_size_bytes=len(text.encode("utf-8")) if text else None,
                duration_ms=duration if duration is not None and duration >= 0 else None, extra=extra,
            ),
            confidence=self._confidence(exchange, ["mcp_tool_result_observed"]),
            related_events=[RelatedEvent(event_id=pending.call_event_id, relationship="parent")]
            if pending.call_event_id else None,
            attrs=self._attrs(exchange, "tools/call", request_id),
        )

    def _resource_event(self, exchange: HttpExchange, request_id: str, pending: PendingRequest,
                        result: Mapping[str, Any]) -> Event:
        contents = result.get("contents")
        items = [item for item in contents if isinstance(item, Mapping)] if isinstance(contents, list) else []
        results = []
        for item in items[:32]:
            body = item.get("text") if isinstance(item.get("text"), str) else item.get("blob")
            entry: dict[str, Any] = {"source": _str(item.get("uri")) or pending.uri or ""}
            if isinstance(body, str):
                entry["content_hash"] = sha256_text(body)
                entry["metadata"] = {"bytes": len(body.encode("utf-8")), "mime_type": item.get("mimeType")}
            results.append(entry)
        latency = (_now(exchange) - pending.started_ns) // 1_000_000
        data = {"source": {"type": "other", "name": self._server_name(), "provider": MCP_PROVIDER},
                "query": pending.uri, "query_hash": sha256_text(pending.uri) if pending.uri else None,
                "results_count": len(items), "results": results, "latency_ms": max(latency, 0)}
        return Event.create(
            UnknownPayload(extra={k: v for k, v in data.items() if v is not None}), event_type="agent.rag_retrieve",
            confidence=self._confidence(exchange, ["mcp_resource_read_observed"]),
            attrs=self._attrs(exchange, "resources/read", request_id),
        )

    def _session_event(self, exchange: HttpExchange, action: str, session: McpSession,
                       request_id: str | None = None, result: Mapping[str, Any] | None = None,
                       method: str = "initialize") -> Event:
        data: dict[str, Any] = {"action": action}
        if session.session_id:
            data["session_id"] = session.session_id
        if session.client_name:
            data["agent"] = {k: v for k, v in (("name", session.client_name), ("version", session.client_version))
                             if v}
        server = {k: v for k, v in (("name", session.server_name), ("version", session.server_version)) if v}
        if server:
            data["mcp_server"] = server
        if session.protocol_version:
            data["protocol_version"] = session.protocol_version
        capabilities = result.get("capabilities") if result is not None else None
        if isinstance(capabilities, Mapping):
            data["server_capabilities"] = sorted(str(k) for k in capabilities)
        if action == "end" and session.methods:
            data["stats"] = {"tool_calls": session.methods.get("tools/call", 0)}
            data["mcp_methods"] = dict(session.methods)
        method = method if action == "start" else "session/delete"
        return Event.create(UnknownPayload(extra=data), event_type="agent.session",
                            confidence=self._confidence(exchange, ["mcp_session_observed"]),
                            attrs=self._attrs(exchange, method, request_id))

    def _confidence(self, exchange: HttpExchange, reasons: list[str]) -> Confidence:
        limitations = [*exchange.partial_reasons, *self.problems]
        return Confidence(
            level="high", completeness="partial" if limitations else "full", reasons=["mcp_protocol", *reasons],
            limitations=limitations or None,
            content_source="mitm_decryption" if exchange.connection.tls else "plaintext_capture",
        )

    def _attrs(self, exchange: HttpExchange, method: str, request_id: str | None) -> dict[str, Any]:
        session = self.session
        out: dict[str, Any] = {"mcp.method.name": method, "http.method": exchange.request.method,
                               "http.path": redact_url(exchange.request.target),
                               "server.address": self.host,
                               "oisp.connection_id": exchange.connection.connection_id}
        if request_id is not None:
            out["jsonrpc.request.id"] = request_id
        if session is not None and session.session_id:
            out["mcp.session.id"] = session.session_id
        if session is not None and session.protocol_version:
            out["mcp.protocol.version"] = session.protocol_version
        if session is not None and session.server_name:
            out["mcp.server.name"] = session.server_name
        return out


def _legacy_session_id(target: str) -> str | None:
    """The session id in an HTTP+SSE message URL (``/messages/?session_id=...`` or ``?sessionId=...``)."""
    query = urlsplit(target).query
    if not query:
        return None
    for key, value in parse_qsl(query):
        if key in ("session_id", "sessionId") and value:
            return value
    return None


def _now(exchange: HttpExchange) -> int:
    timings = exchange.timings
    if timings.response_end is not None:
        return timings.response_end
    if timings.response_chunks:
        return timings.response_chunks[-1][0]
    return timings.response_first_byte or timings.request_end or time.monotonic_ns()


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
