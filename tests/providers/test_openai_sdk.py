"""End to end: the real ``openai`` SDK, in its own process, through the running proxy to an upstream that answers
like OpenAI (with the bodies of the fixtures); the events the pipeline delivers are checked and validated."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.providers.fixtures.openai.replay import load
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

pytest.importorskip("openai")

API_KEY = "sk-proj-" + "e2e" * 16


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


def _sse_events(body: bytes) -> list[bytes]:
    return [part + b"\n\n" for part in body.split(b"\n\n") if part.strip()]


async def openai_like(request: Request) -> Response:
    """Answers the way api.openai.com does, streaming SSE event by event."""
    body = json.loads(request.body or b"{}")
    path = request.target.split("?", 1)[0]
    if path == "/v1/chat/completions":
        name = "openai_chat_tool_results" if any(m.get("role") == "tool" for m in body["messages"]) \
            else "openai_chat_stream_parallel_tools"
    elif path == "/v1/responses":
        name = "openai_responses_tool_outputs" if isinstance(body.get("input"), list) \
            else "openai_responses_stream_tools"
    elif path == "/v1/embeddings":
        name = "openai_embeddings_base64"
    else:
        return Response(status=404, body=b'{"error": {"message": "not found", "type": "invalid_request_error"}}')
    case = load(name)
    headers = [("content-type", dict(case.response_headers).get("content-type", "application/json")),
               ("x-request-id", f"req_{name}")]
    if not body.get("stream"):
        return Response(status=case.status, headers=headers, body=case.response_body)

    async def stream() -> AsyncIterator[bytes]:
        for event in _sse_events(case.response_body):
            yield event
            await anyio.sleep(0.002)

    return Response(status=case.status, headers=headers, body=stream)


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=openai_like) as running:
        yield running


def _run_sdk(stack: Stack, code: str) -> dict[str, object]:
    env = stack.client_env(OPENAI_API_KEY=API_KEY)
    prelude = "import json, openai\nclient = openai.OpenAI(max_retries=0)\nout = {}\n"
    out = subprocess.run([sys.executable, "-c", prelude + code + "\nprint(json.dumps(out))\n"], env=env,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _validated(stack: Stack, schema: SchemaValidator) -> None:
    for event in stack.sink.events:
        schema.assert_valid(event.to_dict())
    assert API_KEY not in "".join(e.to_json() for e in stack.sink.events)


def test_chat_streaming_with_parallel_tool_calls_then_tool_results(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = _run_sdk(stack, """
tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("get_weather", "get_local_time")]
messages = [{"role": "user", "content": "Weather and local time in Paris?"}]
calls = {}
stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools, stream=True,
                                        stream_options={"include_usage": True})
for chunk in stream:
    for choice in chunk.choices:
        for call in choice.delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            slot["id"] = call.id or slot["id"]
            slot["name"] = (call.function.name if call.function else None) or slot["name"]
            slot["arguments"] += (call.function.arguments or "") if call.function else ""
    if chunk.usage:
        out["usage"] = chunk.usage.total_tokens
out["calls"] = [calls[i] for i in sorted(calls)]
messages.append({"role": "assistant", "content": None, "tool_calls": [
    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
    for c in out["calls"]]})
messages += [{"role": "tool", "tool_call_id": c["id"], "content": "ok " + c["name"]} for c in out["calls"]]
answer = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
out["answer"] = answer.choices[0].message.content
""")
    assert result["usage"] == 140 and len(result["calls"]) == 2  # type: ignore[arg-type]
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2
                            and len([e for e in ev if e.event_type == "agent.tool_result"]) >= 2)
    responses = [e for e in events if e.event_type == "ai.response"]
    first = responses[0].data
    assert [c.arguments for c in first.tool_calls] == ['{"city": "Paris"}', '{"tz": "Europe/Paris"}']  # type: ignore[attr-defined]
    assert first.usage.total_tokens == 140 and first.time_to_first_token_ms is not None  # type: ignore[attr-defined]
    calls = {e.data.call_id: e.event_id for e in events if e.event_type == "agent.tool_call"}  # type: ignore[attr-defined]
    results = [e for e in events if e.event_type == "agent.tool_result"]
    assert {r.data.call_id for r in results} == set(calls)  # type: ignore[attr-defined]
    for result_event in results:
        assert result_event.related_events is not None
        assert result_event.related_events[0].event_id == calls[result_event.data.call_id]  # type: ignore[attr-defined]
    assert responses[1].data.choices[0].message.content == result["answer"]  # type: ignore[attr-defined]
    requests = [e for e in events if e.event_type == "ai.request"]
    assert requests[0].data.auth.key_prefix == "sk-proj-"  # type: ignore[attr-defined]
    _validated(stack, oisp_schema)


def test_responses_api_streamed_function_calls_and_outputs(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = _run_sdk(stack, """
calls = []
with client.responses.stream(model="gpt-4.1", input="Read config.yaml and list /etc") as stream:
    for event in stream:
        pass
    final = stream.get_final_response()
calls = [(item.call_id, item.name, item.arguments) for item in final.output if item.type == "function_call"]
out["calls"] = calls
follow = client.responses.create(model="gpt-4.1", stream=True, input=[
    *[{"type": "function_call", "call_id": c, "name": n, "arguments": a} for c, n, a in calls],
    *[{"type": "function_call_output", "call_id": c, "output": "done"} for c, _, _ in calls]])
out["text"] = "".join(e.delta for e in follow if e.type == "response.output_text.delta")
""")
    assert [c[1] for c in result["calls"]] == ["read_file", "run_shell"]  # type: ignore[union-attr]
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    first, second = [e for e in events if e.event_type == "ai.response"][:2]
    assert [c.name for c in first.data.tool_calls] == ["read_file", "run_shell"]  # type: ignore[attr-defined]
    assert first.data.usage.total_tokens == 127  # type: ignore[attr-defined]
    assert second.data.choices[0].message.content == result["text"]  # type: ignore[attr-defined]
    results = [e for e in events if e.event_type == "agent.tool_result"]
    assert sorted(r.data.call_id for r in results) == sorted(c[0] for c in result["calls"])  # type: ignore[attr-defined,union-attr]
    assert all(r.related_events for r in results)
    _validated(stack, oisp_schema)


def test_embeddings_with_the_sdks_default_base64_encoding(stack: Stack, oisp_schema: SchemaValidator) -> None:
    result = _run_sdk(stack, """
response = client.embeddings.create(model="text-embedding-3-large", input=["first text", "second text"])
out["dimensions"] = [len(item.embedding) for item in response.data]
""")
    assert result["dimensions"] == [16, 16]
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.embedding" for e in ev))
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.request_type == "embedding"  # type: ignore[attr-defined]
    assert request.attrs is not None and request.attrs["openai.encoding_format"] == "base64"
    embedding = next(e for e in events if e.event_type == "ai.embedding").data
    assert (embedding.input_count, embedding.dimensions, embedding.total_tokens) == (2, 16, 6)  # type: ignore[attr-defined]
    _validated(stack, oisp_schema)
