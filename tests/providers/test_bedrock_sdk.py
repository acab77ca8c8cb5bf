"""boto3's ``bedrock-runtime`` client through the proxy (HTTPS_PROXY, AWS_CA_BUNDLE, dummy credentials), against
an upstream that answers with the fixtures (eventstreams built with ``oisp.framing.encode_message``)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

from oisp.events.spec_gaps import conform
from oisp.framing import encode_message

pytest.importorskip("boto3")

FIXTURES = Path(__file__).parent / "fixtures" / "bedrock"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr" + "t" * 64


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def event(event_type: str, payload: Any) -> bytes:
    return encode_message({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                          json.dumps(payload).encode())


async def bedrock_upstream(request: Request) -> Response:
    operation = request.target.rsplit("/", 1)[-1]
    headers = [("x-amzn-requestid", f"req-{operation}")]
    if operation == "converse":
        return Response(headers=[("content-type", "application/json"), *headers],
                        body=fixture("converse_response_tool_use.json"))
    if operation == "converse-stream":
        messages = [event(k, p) for k, p in json.loads(fixture("converse_stream_events.json"))]
    else:
        messages = [event("chunk", {"bytes": base64.b64encode(json.dumps(e).encode()).decode()})
                    for e in json.loads(fixture("invoke_anthropic_stream_events.json"))]
    body = b"".join(messages)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 97):  # chunks that do not follow message boundaries
            yield body[start:start + 97]

    return Response(headers=[("content-type", "application/vnd.amazon.eventstream"), *headers], body=stream)


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=bedrock_upstream) as running:
        yield running


CLIENT = """
import json, boto3
client = boto3.client("bedrock-runtime", region_name="us-east-1")
schema = {"type": "object", "properties": {"city": {"type": "string"}}}
tools = {"tools": [{"toolSpec": {"name": "get_weather", "description": "Current weather of a place",
                                 "inputSchema": {"json": schema}}}]}
messages = [{"role": "user", "content": [{"text": "What is the weather in Paris?"}]}]
r = client.converse(modelId="anthropic.claude-3-5-sonnet-20240620-v1:0", messages=messages, toolConfig=tools,
                    system=[{"text": "You are a travel assistant."}], inferenceConfig={"maxTokens": 256})
print("converse:", r["stopReason"], r["output"]["message"]["content"][1]["toolUse"]["input"])
s = client.converse_stream(modelId="us.anthropic.claude-3-5-sonnet-20240620-v1:0", messages=messages, toolConfig=tools)
text = "".join(e["contentBlockDelta"]["delta"].get("text", "") for e in s["stream"] if "contentBlockDelta" in e)
print("stream:", text)
body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100, "messages": messages}
w = client.invoke_model_with_response_stream(modelId="anthropic.claude-3-5-sonnet-20240620-v1:0", body=json.dumps(body))
chunks = [json.loads(e["chunk"]["bytes"]) for e in w["body"]]
print("invoke:", "".join(c["delta"].get("text", "") for c in chunks if c["type"] == "content_block_delta"))
"""


def test_boto3_converse_converse_stream_and_invoke_stream(stack: Stack, oisp_schema: SchemaValidator) -> None:
    env = stack.client_env(drop=("AWS_",), trust_var="AWS_CA_BUNDLE",
                           AWS_ACCESS_KEY_ID="AKIAIOSFODNN7EXAMPLE", AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                           AWS_SESSION_TOKEN=SESSION_TOKEN, AWS_EC2_METADATA_DISABLED="true",
                           AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    out = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "converse: tool_use {'city': 'Paris'}" in out.stdout
    assert "stream: Checking Paris." in out.stdout
    assert "invoke: Hello from Bedrock." in out.stdout

    raw = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 3)
    events = [conform(e) for e in raw]
    for e in events:
        oisp_schema.assert_valid(e.to_dict())
    dumped = "".join(e.to_json() for e in events)
    assert SECRET_KEY not in dumped and SESSION_TOKEN not in dumped and "t" * 64 not in dumped
    assert "Signature=" not in dumped
    requests = [e.to_dict()["data"] for e in events if e.event_type == "ai.request"]
    responses = [e.to_dict()["data"] for e in events if e.event_type == "ai.response"]
    assert [r["model"]["id"] for r in requests] == ["anthropic.claude-3-5-sonnet-20240620-v1:0",
                                                    "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
                                                    "anthropic.claude-3-5-sonnet-20240620-v1:0"]
    assert all(r["provider"]["name"] == "aws_bedrock" and r["provider"]["region"] == "us-east-1" for r in requests)
    assert all(r["auth"]["type"] == "service_account" and r["auth"]["key_prefix"] == "AKIA" for r in requests)
    assert [r["streaming"] for r in requests] == [False, True, True]
    assert requests[0]["system_prompt"] == "You are a travel assistant."
    assert requests[0]["tools"][0]["name"] == "get_weather"
    assert [r["success"] for r in responses] == [True, True, True]
    assert [r["provider_request_id"] for r in responses] == ["req-converse", "req-converse-stream",
                                                             "req-invoke-with-response-stream"]
    assert responses[0]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert responses[1]["choices"][0]["message"]["content"] == "Checking Paris."
    assert responses[1]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert responses[2]["choices"][0]["message"]["content"] == "Hello from Bedrock."
    assert responses[2]["usage"]["completion_tokens"] == 30
    assert len([e for e in events if e.event_type == "agent.tool_call"]) == 3
