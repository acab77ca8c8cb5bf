"""The real ``anthropic`` SDK through the proxy (HTTPS_PROXY, SSL_CERT_FILE): a streamed turn with tool use, then
the follow-up request with the tool results, against an upstream that answers like the Messages API."""

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

pytest.importorskip("anthropic")

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
KEY = "sk-ant-api03-" + "s" * 40


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def messages_api(request: Request) -> Response:
    """Streams the tool-use turn; answers the request that carries tool results with text."""
    body = json.loads(request.body or b"{}")
    headers = [("content-type", "application/json"), ("request-id", "req_sdk_" + str(len(body["messages"])))]
    key = request.header("x-api-key") or (request.header("authorization") or "").removeprefix("Bearer ")
    if request.target.split("?")[0] != "/v1/messages" or key != KEY:
        return Response(status=404, headers=headers, body=(FIXTURES / "error_response.json").read_bytes())
    if not body.get("stream"):
        return Response(headers=headers, body=(FIXTURES / "messages_response.json").read_bytes())
    events = (FIXTURES / "messages_tools_stream.sse").read_bytes().split(b"\n\n")

    async def stream() -> AsyncIterator[bytes]:
        for event in events:
            if event.strip():
                yield event + b"\n\n"

    return Response(headers=[("content-type", "text/event-stream"), headers[1]], body=stream)


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=messages_api) as running:
        yield running


CLIENT = """
import json, anthropic
client = anthropic.Anthropic(api_key=%(key)r, max_retries=0)
tools = [{"name": "read_file", "description": "Read a file", "input_schema": {"type": "object",
          "properties": {"path": {"type": "string"}}}},
         {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object",
          "properties": {"city": {"type": "string"}}}}]
messages = [{"role": "user", "content": "Read CHANGELOG.md and tell me the weather in Lyon."}]
with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1024, tools=tools, messages=messages,
                            system="You are a release assistant.") as stream:
    reply = stream.get_final_message()
uses = [b for b in reply.content if b.type == "tool_use"]
messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "result of " + u.name}
                                          for u in uses]}]
final = client.messages.create(model="claude-sonnet-4-5", max_tokens=1024, tools=tools, messages=messages)
print(json.dumps({"calls": [[u.id, u.name, u.input] for u in uses], "answer": final.content[0].text}))
"""


def run_client(stack: Stack) -> dict[str, object]:
    env = stack.client_env()
    out = subprocess.run([sys.executable, "-c", CLIENT % {"key": KEY}], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_streamed_tool_use_and_tool_results_through_the_proxy(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = run_client(stack)
    assert result["calls"] == [["toolu_01T1x1fJ34qAmk2tNTrN7Up6", "read_file", {"path": "CHANGELOG.md"}],
                               ["toolu_01A09q90qw90lq917835lq9", "get_weather", {"city": "Lyon"}]]
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    ai = [e for e in events if e.event_type != "network.connect"]
    for event in ai:
        oisp_schema.assert_valid(event.to_dict())

    def of(kind: str) -> list[Event]:
        return [e for e in ai if e.event_type == kind]

    first, second = of("ai.request")
    assert first.data.streaming is True and second.data.streaming is False  # type: ignore[attr-defined]
    assert first.data.provider.name == "anthropic"  # type: ignore[attr-defined]
    assert first.data.auth.key_prefix == "sk-ant-"  # type: ignore[attr-defined]
    assert first.attrs is not None and "anthropic.version" in first.attrs
    streamed, answered = of("ai.response")
    assert streamed.data.finish_reason == "tool_calls" and streamed.data.success is True  # type: ignore[attr-defined]
    assert streamed.data.provider_request_id == "req_sdk_1"  # type: ignore[attr-defined]
    assert streamed.data.usage.cached_tokens == 2048  # type: ignore[attr-defined]
    assert answered.data.finish_reason == "stop"  # type: ignore[attr-defined]
    calls, results = of("agent.tool_call"), of("agent.tool_result")
    assert [c.data.call_id for c in calls] == [r.data.call_id for r in results]  # type: ignore[attr-defined]
    for call, tool_result in zip(calls, results, strict=True):
        assert tool_result.related_events is not None
        assert tool_result.related_events[0].event_id == call.event_id
        assert tool_result.data.result == "result of " + call.data.tool.name  # type: ignore[attr-defined]
    assert "s" * 40 not in "".join(e.to_json() for e in events)
