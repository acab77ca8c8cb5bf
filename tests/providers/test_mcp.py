"""The MCP decoder fed exchanges as the proxy would (sans-io): batches, notifications, errors, the HTTP+SSE
transport's answers on the GET stream, cancellations, bad input; and which exchanges are MCP."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from tests.oisp_schema import SchemaValidator, needs_spec
from tests.providers.exchange_harness import claim, make_exchange, of_type, one, run_exchange

from oisp.events import Event
from oisp.http.exchange import Headers, HttpResponse
from oisp.providers.mcp import WELL_KNOWN_SERVERS, McpDecoder, McpSessions, is_mcp_exchange


def rpc(request_id: Any, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def answer(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def sse(*messages: Any) -> bytes:
    return b"".join(b"event: message\r\ndata: " + json.dumps(m).encode() + b"\r\n\r\n" for m in messages)


def host() -> str:
    return f"mcp-{uuid.uuid4().hex[:8]}.example"  # the decoder's sessions are process-wide: a host per test


def post(server: str, body: Any, response: Any, *, session: str | None = None, status: int = 200,
         content_type: str = "application/json", response_headers: tuple[tuple[str, str], ...] = ()) -> list[Event]:
    headers = [("content-type", "application/json"), ("accept", "application/json, text/event-stream")]
    if session:
        headers.append(("mcp-session-id", session))
    return run_exchange("POST", f"https://{server}/mcp", body, request_headers=headers, provider="mcp",
                        status=status, response=response, content_type=content_type,
                        response_headers=response_headers, expect_plugin="oisp.providers.mcp")


def initialize(server: str, session: str = "s-1") -> list[Event]:
    return post(server, rpc(0, "initialize", protocolVersion="2025-06-18", capabilities={},
                            clientInfo={"name": "claude-code", "version": "2.0.14"}),
                [sse(answer(0, {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                                "serverInfo": {"name": "linear", "version": "1.2.0"}}))],
                content_type="text/event-stream", response_headers=(("mcp-session-id", session),))


@needs_spec
def test_a_batch_with_two_tool_calls_and_a_notification_answered_by_one_json_array() -> None:
    server = host()
    initialize(server)
    batch = [rpc(1, "tools/call", name="search_issues", arguments={"query": "crash"}),
             {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1}},
             rpc("two", "tools/call", name="create_issue", arguments={"title": "Fix it"})]
    events = post(server, batch, [answer("two", {"content": [{"type": "text", "text": "ENG-42"}]}),
                                  answer(1, {"content": [{"type": "text", "text": "3 issues"}]})], session="s-1")
    calls, results = of_type(events, "agent.tool_call"), of_type(events, "agent.tool_result")
    assert [c.data.tool.name for c in calls] == ["search_issues", "create_issue"]
    assert {r.data.tool.name: r.data.result for r in results} == {"create_issue": "ENG-42",
                                                                   "search_issues": "3 issues"}
    for call in calls:
        assert call.data.tool.server == "linear" and call.data.agent is not None
        assert call.data.agent.name == "claude-code" and call.attrs["mcp.session.id"] == "s-1"
    by_id = {c.attrs["jsonrpc.request.id"]: c for c in calls}
    for result in results:
        assert result.related_events is not None
        assert result.related_events[0].event_id == by_id[result.attrs["jsonrpc.request.id"]].event_id
    validator = SchemaValidator()
    for event in events:
        validator.assert_valid(event.to_dict())


def test_a_json_rpc_error_is_a_failed_tool_result_with_its_message() -> None:
    server = host()
    initialize(server)
    events = post(server, rpc(5, "tools/call", name="nope", arguments={}),
                  {"jsonrpc": "2.0", "id": 5, "error": {"code": -32602, "message": "Unknown tool: nope"}},
                  session="s-1")
    result = one(events, "agent.tool_result").data
    assert result.success is False and result.error is not None
    assert result.error.type == "jsonrpc_error" and result.error.message == "Unknown tool: nope"
    assert result.error.extra == {"code": -32602}


def test_an_http_error_answers_the_calls_of_its_request() -> None:
    server = host()
    events = post(server, rpc(1, "tools/call", name="x", arguments={}), b"Unauthorized", status=401,
                  content_type="text/plain")
    assert one(events, "agent.tool_call").data.tool.server == server  # no initialize seen: the host names it
    result = one(events, "agent.tool_result").data
    assert result.success is False and result.error is not None and result.error.message == "HTTP 401"


def test_http_plus_sse_answers_come_on_the_get_stream_of_the_session() -> None:
    server = host()
    stream = make_exchange("GET", f"https://{server}/sse", headers=[("accept", "text/event-stream")],
                           provider="mcp")
    plugin, stream_decoder = claim(stream)
    assert plugin == "oisp.providers.mcp"
    assert list(stream_decoder.on_request(stream)) == []
    stream.response = HttpResponse(status=200, reason="OK", http_version="1.1",
                                   headers=Headers([("content-type", "text/event-stream")]))
    assert stream_decoder.on_response_data(stream, b"event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\n") \
        == []
    target = f"https://{server}/messages/?session_id=abc"
    for body in (rpc(0, "initialize", protocolVersion="2024-11-05", clientInfo={"name": "cursor"}),
                 rpc(1, "tools/call", name="get_weather", arguments={"city": "Oslo"})):
        events = run_exchange("POST", target, body, provider="mcp", status=202, response=b"Accepted",
                              content_type="text/plain")
        calls = of_type(events, "agent.tool_call")
        assert not of_type(events, "agent.tool_result")  # 202: the answer comes on the stream
    assert calls and calls[0].attrs["mcp.session.id"] == "abc"
    events = list(stream_decoder.on_response_data(stream, sse(
        answer(0, {"protocolVersion": "2024-11-05", "serverInfo": {"name": "weather", "version": "0.1"}}),
        {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}},
        answer(1, {"content": [{"type": "text", "text": "-3 C"}], "isError": False}))))
    start = one(events, "agent.session")
    assert start.data.extra["mcp_server"] == {"name": "weather", "version": "0.1"}
    result = one(events, "agent.tool_result")
    assert result.data.result == "-3 C" and result.data.success is True
    assert result.related_events is not None and result.related_events[0].event_id == calls[0].event_id


def test_a_cancelled_call_is_reported_once_as_cancelled() -> None:
    server = host()
    events = post(server, rpc(7, "tools/call", name="slow", arguments={}), b"", status=202,
                  content_type="text/plain")
    assert of_type(events, "agent.tool_call") and not of_type(events, "agent.tool_result")
    events = post(server, {"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": 7, "reason": "user pressed Esc"}}, b"", status=202,
                  content_type="text/plain")
    result = one(events, "agent.tool_result").data
    assert result.success is False and result.error is not None and result.error.type == "cancelled"
    assert result.error.message == "user pressed Esc"


def test_an_image_result_is_kept_as_its_content_list_with_its_size() -> None:
    server = host()
    content = [{"type": "text", "text": "the chart:"}, {"type": "image", "mimeType": "image/png", "data": "iVBOR"}]
    events = post(server, rpc(1, "tools/call", name="chart", arguments={}), answer(1, {"content": content}))
    result = one(events, "agent.tool_result").data
    assert isinstance(result.result, list) and result.result[1]["type"] == "image"
    assert result.extra["content_types"] == ["image", "text"]
    assert result.result_size_bytes == len(json.dumps({"content": content}, separators=(",", ":")))


def test_the_session_ends_with_delete() -> None:
    server = host()
    initialize(server, session="gone")
    post(server, rpc(1, "tools/call", name="a", arguments={}), answer(1, {"content": []}), session="gone")
    events = run_exchange("DELETE", f"https://{server}/mcp", provider="mcp", request_headers=[
        ("mcp-session-id", "gone")], status=200)
    end = one(events, "agent.session")
    assert end.data.extra["action"] == "end" and end.data.extra["session_id"] == "gone"
    assert end.data.extra["stats"] == {"tool_calls": 1}
    assert end.data.extra["mcp_methods"] == {"initialize": 1, "tools/call": 1}


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"jsonrpc": "2.0"}', b"", b"\xff\xfe"])
def test_bad_input_never_raises_and_is_reported(body: bytes) -> None:
    server = host()
    events = post(server, body, b"also {not json", content_type="application/json")
    assert not of_type(events, "agent.tool_call")


def test_an_unreadable_stream_marks_the_result_partial() -> None:
    server = host()
    events = post(server, rpc(1, "tools/call", name="a", arguments={}),
                  [b"data: {broken\r\n\r\n", sse(answer(1, {"content": [{"type": "text", "text": "ok"}]}))],
                  content_type="text/event-stream")
    result = one(events, "agent.tool_result")
    assert result.data.result == "ok" and result.confidence.completeness == "partial"
    assert result.confidence.limitations and "event stream message" in result.confidence.limitations[0]


def test_sessions_are_bounded() -> None:
    registry = McpSessions(max_sessions=3)
    for index in range(10):
        registry.get("h", f"s{index}")
    assert len(registry) == 3
    decoder = McpDecoder(registry)
    assert decoder.registry is registry


def test_which_exchanges_are_mcp() -> None:
    def exchange(url: str, body: Any = None, provider: str | None = None, method: str = "POST",
                 headers: tuple[tuple[str, str], ...] = ()) -> bool:
        return is_mcp_exchange(make_exchange(method, url, body, provider=provider, headers=headers))

    ping = rpc(1, "ping")
    assert exchange("https://api.githubcopilot.com/mcp/", ping, provider="github_copilot")
    assert exchange("https://api.githubcopilot.com/mcp/x/issues", [ping], provider="github_copilot")
    assert not exchange("https://api.githubcopilot.com/chat/completions", {"model": "gpt-4o"},
                        provider="github_copilot")
    assert not exchange("https://api.githubcopilot.com/mcp/", {"model": "gpt-4o"}, provider="github_copilot")
    assert exchange("https://tools.corp.example/anything", ping, provider="mcp")
    assert exchange("https://api.githubcopilot.com/mcp/", method="GET", provider="github_copilot",
                    headers=(("accept", "text/event-stream"),))
    assert not exchange("https://api.openai.com/v1/mcp", method="GET", provider="openai")
    assert "mcp.linear.app" in {spec.host for spec in WELL_KNOWN_SERVERS}


@needs_spec
def test_metadata_only_redaction_leaves_no_tool_content() -> None:
    from oisp.events.spec_gaps import conform
    from oisp.redaction import Redactor

    server = host()
    events = post(server, rpc(1, "tools/call", name="read_file", arguments={"path": "/etc/hosts"}),
                  answer(1, {"content": [{"type": "text", "text": "127.0.0.1 localhost"}], "isError": True,
                             "structuredContent": {"lines": ["127.0.0.1 localhost"]}}))
    events += post(server, rpc(2, "resources/read", uri="file:///srv/secret-plans.md"),
                   answer(2, {"contents": [{"uri": "file:///srv/secret-plans.md", "text": "world domination"}]}))
    redactor = Redactor(profile="metadata-only")
    redacted = [conform(redactor(event)) for event in events]  # as the pipeline does
    validator = SchemaValidator()
    for event in redacted:
        validator.assert_valid(event.to_dict())
    text = "\n".join(event.to_json() for event in redacted)
    for content in ("/etc/hosts", "127.0.0.1 localhost", "secret-plans", "world domination"):
        assert content not in text
    result = one(events, "agent.tool_result").data
    assert result.success is False and result.error is not None and result.error.type == "tool_error"
