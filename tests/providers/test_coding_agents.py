"""Coding agents' model APIs end to end, with real clients sending what the agents send, through the proxy to
stand-in servers: GitHub Copilot (the ``openai`` SDK with Copilot's base URL and headers), Codex with ChatGPT
sign-in (the ``openai`` SDK on ``chatgpt.com/backend-api/codex``, and the Responses API over a WebSocket), Gemini
CLI's Code Assist (``httpx``, ``v1internal:`` methods), a provider of the spec bundle's OpenAI-compatible list;
and which app each request names."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from tests.oisp_schema import SchemaValidator, needs_spec
from tests.providers.fixtures.openai.replay import load
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response, WsPeer

from oisp.endpoints import EndpointTable
from oisp.events import Event
from oisp.plugins import create_plugin_manager

pytest.importorskip("openai")

COPILOT_TOKEN = "tid=0123456789abcdef;exp=1765155000;sku=copilot_for_business_seat;proxy-ep=proxy.business." \
    "githubcopilot.com;8kp=1:" + "f" * 64
CHATGPT_TOKEN = "eyJhbGciOiJSUzI1NiJ9." + "a" * 120 + ".sig"
COPILOT_HEADERS = {
    "Editor-Version": "vscode/1.104.1", "Editor-Plugin-Version": "copilot-chat/0.31.2",
    "Copilot-Integration-Id": "vscode-chat", "User-Agent": "GitHubCopilotChat/0.31.2",
    "Openai-Intent": "conversation-panel", "X-Initiator": "user",
}
CODEX_HEADERS = {
    "originator": "codex_cli_rs", "User-Agent": "codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64) xterm-256color",
    "chatgpt-account-id": "4a1b2c3d-0000-4000-8000-123456789abc", "OpenAI-Beta": "responses=experimental",
    "session_id": "0199f0a2-5c1e-7c31-b5a5-2a1f0c3e9d11",
}
GEMINI_UA = "GeminiCLI/0.8.2/gemini-2.5-pro (linux; x64) google-api-nodejs-client/9.15.1"


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


def _sse_events(body: bytes) -> list[bytes]:
    return [part + b"\n\n" for part in body.split(b"\n\n") if part.strip()]


def _gemini_chunks() -> list[dict[str, Any]]:
    usage = {"promptTokenCount": 812, "candidatesTokenCount": 23, "totalTokenCount": 835}
    return [
        {"response": {"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me read it."}]}}],
                      "modelVersion": "gemini-2.5-pro"}, "traceId": "3f0c1e2d4b5a6978"},
        {"response": {"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "read_file", "args": {"absolute_path": "/work/app/main.py"}}}]},
            "finishReason": "STOP"}], "usageMetadata": usage, "modelVersion": "gemini-2.5-pro"},
         "traceId": "3f0c1e2d4b5a6978"},
    ]


async def stand_in(request: Request) -> Response:
    """Answers like Copilot's, ChatGPT's Codex and Code Assist's servers (and an OpenAI-compatible one)."""
    path = request.target.split("?", 1)[0]
    body = json.loads(request.body or b"{}")
    if path in ("/chat/completions", "/v1/chat/completions"):
        case = load("openai_chat_stream_parallel_tools" if body.get("stream") else "lmstudio_chat")
    elif path in ("/responses", "/backend-api/codex/responses"):
        case = load("openai_responses_stream_tools")
    elif path == "/v1internal:streamGenerateContent":
        chunks = [b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in _gemini_chunks()]

        async def gemini() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await anyio.sleep(0)

        return Response(headers=[("content-type", "text/event-stream")], body=gemini)
    elif path == "/v1internal:generateContent":
        whole = _gemini_chunks()[1]
        return Response(body=json.dumps(whole).encode())
    else:
        return Response(status=404, body=b'{"error": {"message": "not found"}}')
    headers = [("content-type", "text/event-stream"), ("x-request-id", "req_stand_in")]
    if not body.get("stream"):
        return Response(status=200, body=case.response_body)

    async def stream() -> AsyncIterator[bytes]:
        for event in _sse_events(case.response_body):
            yield event
            await anyio.sleep(0)

    return Response(status=200, headers=headers, body=stream)


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=stand_in) as running:
        yield running


def _run_sdk(stack: Stack, code: str) -> None:
    out = subprocess.run([sys.executable, "-c", "import json, openai\n" + code], env=stack.client_env(),
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr


def _events(stack: Stack, count: int) -> list[Event]:
    events = stack.wait_for(lambda es: sum(e.event_type == "ai.response" for e in es) >= count)
    validator = SchemaValidator()
    for event in events:
        validator.assert_valid(event.to_dict())
    return events


@needs_spec
def test_copilot_chat_and_responses_through_the_openai_sdk(stack: Stack) -> None:
    _run_sdk(stack, f"""
client = openai.OpenAI(base_url="https://api.business.githubcopilot.com", api_key={COPILOT_TOKEN!r},
                       default_headers={COPILOT_HEADERS!r}, max_retries=0)
stream = client.chat.completions.create(model="gpt-4.1", stream=True,
                                        messages=[{{"role": "user", "content": "list the files"}}])
print([c.choices[0].delta.content for c in stream if c.choices])
for _ in client.responses.create(model="gpt-5-mini", input="read config.yaml", stream=True):
    pass
""")
    events = _events(stack, 2)
    requests = [e for e in events if e.event_type == "ai.request"]
    assert len(requests) == 2
    for request in requests:
        assert request.data.provider.name == "other" and request.attrs["oisp.provider"] == "github_copilot"
        assert request.app is not None and request.app.app_id == "github-copilot-vscode"
        assert request.app.version == "0.31.2" and request.app.extra["identified_by"] == "request"
        assert request.data.auth is not None and request.data.auth.type == "oauth"
    assert {r.data.model.id for r in requests} == {"gpt-4.1", "gpt-5-mini"}
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    assert len(calls) >= 2 and all(c.app is not None and c.app.app_id == "github-copilot-vscode" for c in calls)
    text = "\n".join(e.to_json() for e in events)
    assert "f" * 64 not in text  # the Copilot token never reaches an event


@needs_spec
def test_codex_with_chatgpt_sign_in_over_http(stack: Stack) -> None:
    _run_sdk(stack, f"""
client = openai.OpenAI(base_url="https://chatgpt.com/backend-api/codex", api_key={CHATGPT_TOKEN!r},
                       default_headers={CODEX_HEADERS!r}, max_retries=0)
for _ in client.responses.create(model="gpt-5-codex", instructions="You are Codex.", stream=True, store=False,
                                 input=[{{"role": "user", "content": "Read config.yaml and list /etc"}}]):
    pass
""")
    events = _events(stack, 1)
    request = next(e for e in events if e.event_type == "ai.request")
    response = next(e for e in events if e.event_type == "ai.response")
    assert request.data.provider.name == "openai" and request.attrs["openai.api"] == "chatgpt_codex"
    assert request.attrs["openai.originator"] == "codex_cli_rs"
    assert request.data.model.id == "gpt-5-codex"
    assert response.data.usage is not None and response.data.usage.total_tokens
    assert request.app is not None and request.app.app_id == "codex-cli" and request.app.version == "0.46.0"
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    assert sorted(c.data.tool.name for c in calls) == ["read_file", "run_shell"]
    assert "chatgpt-account-id" not in "".join(e.to_json() for e in events)


@needs_spec
def test_codex_responses_over_websocket(stack: Stack) -> None:
    websockets = pytest.importorskip("websockets")
    case = load("openai_responses_stream_tools")
    server_events = [json.loads(part.split(b"data: ", 1)[1]) for part in _sse_events(case.response_body)
                     if b"data: " in part]

    async def serve(request: Request, peer: WsPeer) -> None:
        assert request.target == "/backend-api/codex/responses"
        message = await peer.recv()
        assert isinstance(message, str) and json.loads(message)["type"] == "response.create"
        for event in server_events:
            await peer.send_json(event)

    stack.upstream.websocket = serve

    async def client() -> None:
        context = ssl.create_default_context(cafile=stack.ca_file)
        from websockets.asyncio.client import connect

        async with connect("wss://chatgpt.com/backend-api/codex/responses", ssl=context,
                           proxy=stack.proxy_url, additional_headers={
                               "Authorization": f"Bearer {CHATGPT_TOKEN}", **CODEX_HEADERS},
                           user_agent_header=CODEX_HEADERS["User-Agent"]) as ws:
            await ws.send(json.dumps({"type": "response.create", "model": "gpt-5-codex", "instructions": "Codex",
                                      "input": [{"role": "user", "content": "Read config.yaml"}]}))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "response.completed":
                    return

    assert websockets is not None
    stack.portal.call(client)
    events = _events(stack, 1)
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.data.provider.name == "openai" and response.attrs["oisp.transport"] == "websocket"
    assert response.attrs["openai.api"] == "chatgpt_codex"
    assert response.app is not None and response.app.app_id == "codex-cli"
    assert len([e for e in events if e.event_type == "agent.tool_call"]) == 2


@needs_spec
def test_gemini_cli_code_assist_stream_and_single_answer(stack: Stack) -> None:
    body = {"model": "gemini-2.5-pro", "project": "rapid-gadget-8k2l1", "user_prompt_id": "a1b2c3########1",
            "request": {"contents": [{"role": "user", "parts": [{"text": "what does main.py do?"}]}],
                        "systemInstruction": {"role": "user", "parts": [{"text": "You are Gemini CLI."}]},
                        "tools": [{"functionDeclarations": [{"name": "read_file", "description": "Reads a file",
                                                             "parametersJsonSchema": {"type": "object"}}]}],
                        "generationConfig": {"temperature": 0, "topP": 1}}}
    headers = {"User-Agent": GEMINI_UA, "Authorization": "Bearer ya29.a0AfB_" + "x" * 60,
               "x-goog-api-client": "gl-node/22.17.0"}
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), trust_env=False) as client:
        with client.stream("POST", "https://cloudcode-pa.googleapis.com/v1internal:streamGenerateContent?alt=sse",
                           json=body, headers=headers) as response:
            assert response.status_code == 200
            received = b"".join(response.iter_bytes())
        assert received.count(b"data: ") == 2
        single = client.post("https://cloudcode-pa.googleapis.com/v1internal:generateContent", json=body,
                             headers=headers)
        assert single.json()["traceId"] == "3f0c1e2d4b5a6978"
    events = _events(stack, 2)
    responses = [e for e in events if e.event_type == "ai.response"]
    for response in responses:
        assert response.data.provider.name == "google" and response.data.provider.project_id == "rapid-gadget-8k2l1"
        assert response.attrs["google.api"] == "code_assist"
        assert response.data.model.id == "gemini-2.5-pro"
        assert response.data.usage.prompt_tokens == 812 and response.data.usage.completion_tokens == 23
        assert response.data.finish_reason == "tool_calls"
        assert response.data.provider_request_id == "3f0c1e2d4b5a6978"
        assert response.app is not None and response.app.app_id == "gemini-cli" and response.app.version == "0.8.2"
    streamed = next(r for r in responses if r.attrs.get("google.method") == "streamGenerateContent")
    assert streamed.data.choices[0].message.content == "Let me read it."
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.model.id == "gemini-2.5-pro" and request.data.system_prompt_hash
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    assert calls and calls[0].data.tool.name == "read_file"
    assert calls[0].data.arguments == {"absolute_path": "/work/app/main.py"}


@needs_spec
def test_an_openai_compatible_provider_of_the_spec_bundle(stack: Stack) -> None:
    _run_sdk(stack, """
client = openai.OpenAI(base_url="https://api.cerebras.ai/v1", api_key="csk-" + "c" * 48, max_retries=0)
client.chat.completions.create(model="gpt-oss-120b", messages=[{"role": "user", "content": "hi"}])
""")
    events = _events(stack, 1)
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.attrs["oisp.provider"] == "cerebras" and request.data.model.id == "gpt-oss-120b"
    assert request.confidence.completeness == "full"


def test_the_endpoint_table_knows_the_coding_agents_and_the_bundles_providers() -> None:
    table = EndpointTable(create_plugin_manager(entrypoints=False).endpoints())
    expect = {
        "api.githubcopilot.com": "github_copilot", "api.enterprise.githubcopilot.com": "github_copilot",
        "proxy.individual.githubcopilot.com": "github_copilot", "chatgpt.com": "chatgpt",
        "cloudcode-pa.googleapis.com": "gemini_code_assist", "api.moonshot.ai": "moonshotai",
        "integrate.api.nvidia.com": "nvidia", "models.github.ai": "github_models", "mcp.notion.com": "mcp",
        "bindings.mcp.cloudflare.com": "mcp",
    }
    for host, provider in expect.items():
        spec = table.match(host, 443)
        assert spec is not None and spec.provider == provider, host
    for host in ("opencode.ai", "nano-gpt.com", "mcp.unknown-vendor.example", "github.com"):
        assert table.match(host, 443) is None, host


def test_copilot_inline_completions_on_the_proxy_host() -> None:
    from tests.providers.exchange_harness import run_exchange

    body = {"prompt": "def fib(n):\n    ", "suffix": "\n", "max_tokens": 500, "temperature": 0, "top_p": 1, "n": 1,
            "stop": ["\ndef "], "stream": True, "extra": {"language": "python"}}
    chunks = [b'data: {"id":"cmpl-1","model":"gpt-41-copilot","choices":[{"index":0,"text":"return n if n < 2 ",'
              b'"finish_reason":null}]}\n\n',
              b'data: {"id":"cmpl-1","model":"gpt-41-copilot","choices":[{"index":0,"text":"else fib(n-1)+fib(n-2)",'
              b'"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n"]
    events = run_exchange(
        "POST", "https://proxy.individual.githubcopilot.com/v1/engines/gpt-41-copilot/completions", body,
        provider="github_copilot", response=chunks, content_type="text/event-stream",
        request_headers=[("authorization", f"Bearer {COPILOT_TOKEN}"), *COPILOT_HEADERS.items()],
        expect_plugin="oisp.providers.openai")
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.data.choices[0].message.content == "return n if n < 2 else fib(n-1)+fib(n-2)"
    assert response.data.model.id == "gpt-41-copilot" and response.data.finish_reason == "stop"
    assert response.attrs["oisp.provider"] == "github_copilot"
