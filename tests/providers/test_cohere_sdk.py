"""The real ``cohere`` SDK through the proxy (HTTPS_PROXY, SSL_CERT_FILE): a v2 chat stream with a tool call, the
follow-up stream with the tool result, and a v1 chat stream, against an upstream that answers like Cohere."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

from oisp.events import Event

pytest.importorskip("cohere")

FIXTURES = Path(__file__).parent / "fixtures" / "cohere"
KEY = "co-" + "z" * 37


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


def _streamed(name: str, separator: bytes, content_type: str) -> Response:
    pieces = [p for p in (FIXTURES / name).read_bytes().split(separator) if p.strip()]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece + separator

    return Response(headers=[("content-type", content_type)], body=stream)


async def cohere_api(request: Request) -> Response:
    """v2: a tool call first, text once a tool message comes back; v1: the tool-call stream."""
    body = json.loads(request.body or b"{}")
    path = request.target.split("?")[0]
    if request.header("authorization") != f"Bearer {KEY}":
        return Response(status=401, body=(FIXTURES / "error_response.json").read_bytes())
    if path == "/v2/chat":
        answered = any(m.get("role") == "tool" for m in body.get("messages", []))
        return _streamed("chat_v2_text_stream.sse" if answered else "chat_v2_tool_stream.sse", b"\n\n",
                         "text/event-stream")
    if path == "/v1/chat":
        return _streamed("chat_v1_stream.ndjson", b"\n", "application/stream+json")
    return Response(status=404, body=(FIXTURES / "error_response.json").read_bytes())


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=cohere_api) as running:
        yield running


CLIENT = """
import json, sys, cohere
if sys.argv[1] == "v2":
    co = cohere.ClientV2(api_key=%(key)r)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a location",
              "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What's the weather in Toronto?"}]
    plan, calls, arguments = "", [], {}
    for event in co.chat_stream(model="command-a-03-2025", messages=messages, tools=tools):
        if event.type == "tool-plan-delta":
            plan += event.delta.message.tool_plan
        elif event.type == "tool-call-start":
            calls.append([event.delta.message.tool_calls.id, event.delta.message.tool_calls.function.name])
            arguments[event.index] = ""
        elif event.type == "tool-call-delta":
            arguments[event.index] += event.delta.message.tool_calls.function.arguments
    messages.append({"role": "assistant", "tool_plan": plan, "tool_calls": [
        {"id": c[0], "type": "function", "function": {"name": c[1], "arguments": arguments[i]}}
        for i, c in enumerate(calls)]})
    messages += [{"role": "tool", "tool_call_id": c[0], "content": [{"type": "document", "document": {
        "data": json.dumps({"temperature": "24C"})}}]} for c in calls]
    text = ""
    for event in co.chat_stream(model="command-a-03-2025", messages=messages, tools=tools):
        if event.type == "content-delta" and event.delta.message.content.text:
            text += event.delta.message.content.text
    print(json.dumps({"calls": calls, "answer": text}))
else:
    co = cohere.Client(api_key=%(key)r)
    calls = []
    for event in co.chat_stream(model="command-r-plus-08-2024", message="Sales on 2023-09-29?", tools=[
            {"name": "query_daily_sales_report", "description": "Daily sales",
             "parameter_definitions": {"day": {"type": "str", "required": True}}}]):
        if event.event_type == "tool-calls-generation":
            calls = [[c.name, c.parameters] for c in event.tool_calls]
    print(json.dumps({"calls": calls}))
"""


def run_client(stack: Stack, api: str) -> dict[str, object]:
    env = stack.client_env(drop=("CO_",))
    out = subprocess.run([sys.executable, "-c", CLIENT % {"key": KEY}, api], env=env, capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_v2_chat_streams_with_a_tool_call_and_its_result(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = run_client(stack, "v2")
    assert result == {"calls": [["get_weather_nsz5zm3w56q3", "get_weather"]], "answer": "It's 24°C in Toronto."}
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    ai = [e for e in events if e.event_type != "network.connect"]
    for event in ai:
        oisp_schema.assert_valid(event.to_dict())

    def of(kind: str) -> list[Event]:
        return [e for e in ai if e.event_type == kind]

    first, second = of("ai.request")
    assert first.data.provider.name == "cohere" and first.data.streaming is True  # type: ignore[attr-defined]
    assert [m.role for m in second.data.messages] == ["user", "assistant", "tool"]  # type: ignore[attr-defined]
    assert first.data.auth.type == "api_key"  # type: ignore[attr-defined]
    called, answered = of("ai.response")
    assert called.data.finish_reason == "tool_calls"  # type: ignore[attr-defined]
    assert called.data.extra["thinking"] == "I will search for the weather in Toronto."  # type: ignore[attr-defined]
    assert answered.data.choices[0].message.content == "It's 24°C in Toronto."  # type: ignore[attr-defined]
    [call], [tool_result] = of("agent.tool_call"), of("agent.tool_result")
    assert call.data.arguments == {"location": "Toronto"}  # type: ignore[attr-defined]
    assert tool_result.data.call_id == "get_weather_nsz5zm3w56q3"  # type: ignore[attr-defined]
    assert tool_result.related_events is not None and tool_result.related_events[0].event_id == call.event_id
    assert "z" * 37 not in "".join(e.to_json() for e in events)


def test_v1_chat_stream(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = run_client(stack, "v1")
    assert result == {"calls": [["query_daily_sales_report", {"day": "2023-09-29"}],
                                ["query_product_catalog", {"category": "all"}]]}
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    [response] = [e for e in events if e.event_type == "ai.response"]
    assert response.data.finish_reason == "tool_calls"  # type: ignore[attr-defined]
    assert response.confidence.completeness == "full"
    assert len([e for e in events if e.event_type == "agent.tool_call"]) == 2
