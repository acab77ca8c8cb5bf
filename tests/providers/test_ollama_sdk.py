"""The real ``ollama`` Python client, through the proxy (HTTP_PROXY), against a plain-HTTP upstream on :11434."""

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
from oisp.events.spec_gaps import conform

pytest.importorskip("ollama")

FIXTURES = Path(__file__).parent / "fixtures" / "ollama"


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def ollama_upstream(request: Request) -> Response:
    """A tiny Ollama: streams chat and generate as NDJSON, answers tools, embeds."""
    body = json.loads(request.body or b"{}")
    path = request.target.split("11434", 1)[-1]
    if path == "/api/embed":
        return Response(body=(FIXTURES / "embed_response.json").read_bytes())
    if path == "/api/chat" and body.get("tools") and not any(m.get("role") == "tool" for m in body["messages"]):
        return Response(body=(FIXTURES / "chat_tools_response.json").read_bytes())
    if path == "/api/chat" and body.get("tools"):
        return Response(body=json.dumps({"model": "qwen3", "created_at": "2025-01-10T10:00:02Z", "done": True,
                                         "done_reason": "stop", "message": {"role": "assistant",
                                                                            "content": "18 and 24."}}).encode())
    name = "chat_stream.ndjson" if path == "/api/chat" else "generate_stream.ndjson"
    lines = (FIXTURES / name).read_bytes().splitlines(keepends=True)

    async def stream() -> AsyncIterator[bytes]:
        for line in lines:
            yield line

    return Response(headers=[("content-type", "application/x-ndjson")], body=stream)


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=ollama_upstream) as running:
        yield running


CLIENT = """
import ollama
client = ollama.Client(host="http://localhost:11434")
text = "".join(part.message.content for part in client.chat(
    model="llama3.2", stream=True, options={"temperature": 0.2},
    messages=[{"role": "user", "content": "What is in this picture?", "images": [b"\\x89PNG fake image"]}]))
print("chat:", text)
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
first = client.chat(model="qwen3", messages=messages, tools=tools)
print("calls:", [c.function.arguments["city"] for c in first.message.tool_calls])
messages.append(first.message)
for call, temp in zip(first.message.tool_calls, (18, 24)):
    messages.append({"role": "tool", "content": '{"temp_c": %d}' % temp, "tool_name": call.function.name})
print("answer:", client.chat(model="qwen3", messages=messages, tools=tools).message.content)
print("generate:", "".join(p.response for p in client.generate(model="deepseek-r1", prompt="Why?", stream=True)))
print("embed:", len(client.embed(model="all-minilm", input=["a", "b"]).embeddings))
"""


def test_ollama_client_through_http_proxy(stack: Stack, oisp_schema: SchemaValidator) -> None:
    env = stack.client_env(drop=("OLLAMA_HOST",), proxy_var="HTTP_PROXY", trust_var=None)
    out = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "chat: A red pixel." in out.stdout
    assert "calls: ['Paris', 'Tokyo']" in out.stdout
    assert "answer: 18 and 24." in out.stdout
    assert "generate: Short wavelengths scatter more." in out.stdout
    assert "embed: 2" in out.stdout

    def complete(events: list[Event]) -> bool:
        return len([e for e in events if e.event_type in ("ai.response", "ai.embedding")]) >= 5

    events = [conform(e) for e in stack.wait_for(complete)]
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    requests = [e for e in events if e.event_type == "ai.request"]
    responses = [e for e in events if e.event_type == "ai.response"]
    assert [r.data.model.id for r in requests] == [  # type: ignore[attr-defined]
        "llama3.2", "qwen3", "qwen3", "deepseek-r1", "all-minilm"]
    assert all(r.data.provider.name == "ollama" for r in requests)  # type: ignore[attr-defined]
    chat = requests[0].to_dict()["data"]
    assert chat["streaming"] is True and chat["messages"][0]["image_count"] == 1
    assert chat["parameters"]["temperature"] == 0.2
    assert responses[0].to_dict()["data"]["choices"][0]["message"]["content"] == "A red pixel."
    assert responses[0].to_dict()["data"]["usage"]["completion_tokens"] == 3
    assert responses[0].attrs and responses[0].attrs["ollama.eval_duration_ms"] == 4535.599
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    results = [e for e in events if e.event_type == "agent.tool_result"]
    assert len(calls) == 2 and len(results) == 2
    assert [r.data.call_id for r in results] == [c.data.call_id for c in calls]  # type: ignore[attr-defined]
    assert [r.related_events[0].event_id for r in results if r.related_events] == [c.event_id for c in calls]
    assert responses[3].to_dict()["data"]["thinking"] == "Rayleigh scattering."
    embedding = next(e for e in events if e.event_type == "ai.embedding").to_dict()["data"]
    assert embedding["dimensions"] == 4 and embedding["input_count"] == 2
    assert all(e.confidence.content_source == "plaintext_capture" for e in requests)
