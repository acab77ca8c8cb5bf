"""Replicate through the proxy: the official ``replicate`` client (sync mode falling back to polling, and
streaming) and plain httpx, against a programmable upstream on api.replicate.com."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

from oisp.events import Event
from oisp.events.spec_gaps import conform

FIXTURES = Path(__file__).parent / "fixtures" / "replicate"
API = "https://api.replicate.com"
TOKEN = "r8_" + "S" * 37


def prediction(name: str, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((FIXTURES / name).read_bytes())
    value.update(changes)
    return value


class FakeReplicate:
    """Answers like api.replicate.com: predictions run for two polls, streams serve the SSE fixture."""

    def __init__(self) -> None:
        self.polls = 0

    async def __call__(self, request: Request) -> Response:
        path = request.target.split("?", 1)[0]
        if request.method == "POST" and path.endswith("/predictions"):
            body = json.loads(request.body)
            if body.get("stream"):
                created = prediction("create_response_starting.json", id="streamed1")
                created["urls"]["stream"] = f"{API}/v1/streams/tok-streamed1"
                return self.json(created, 201)
            # sync mode whose wait ran out: "starting", and the client polls
            return self.json(prediction("create_response_starting.json"), 201)
        if path == "/v1/streams/tok-streamed1":
            async def sse() -> AsyncIterator[bytes]:
                for event in (FIXTURES / "stream.sse").read_bytes().split(b"\n\n")[:-1]:
                    yield event + b"\n\n"
            return Response(headers=[("content-type", "text/event-stream")], body=sse)
        if request.method == "GET" and path.startswith("/v1/predictions/"):
            self.polls += 1
            return self.json(prediction("poll_processing.json" if self.polls < 2 else "poll_succeeded.json"))
        return self.json({"title": "Not found", "detail": path, "status": 404}, 404)

    @staticmethod
    def json(value: Any, status: int = 200) -> Response:
        return Response(status=status, body=json.dumps(value).encode())


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=FakeReplicate()) as running:
        yield running


def _valid(stack: Stack, schema: SchemaValidator, count: int) -> list[Event]:
    events = [conform(e) for e in stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"])
                                                 >= count)]
    for event in events:
        schema.assert_valid(event.to_dict())
    return events


# The client builds its own transport, which ignores HTTPS_PROXY: it is given one the way a user would.
CLIENT = """
import os, ssl, httpx, replicate
tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
client = replicate.Client(transport=httpx.HTTPTransport(proxy=os.environ["HTTPS_PROXY"], verify=tls))
print("run:", "".join(client.run("meta/meta-llama-3-70b-instruct", input={"prompt": "Write a haiku about llamas."})))
print("stream:", "".join(str(e) for e in client.stream("meta/meta-llama-3-70b-instruct",
                                                       input={"prompt": "Write a haiku about llamas."})))
"""


def test_replicate_client_run_and_stream(stack: Stack, oisp_schema: SchemaValidator) -> None:
    pytest.importorskip("replicate")
    env = stack.client_env(REPLICATE_API_TOKEN=TOKEN, REPLICATE_POLL_INTERVAL="0.05")
    out = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "run: Soft wool on high hills" in out.stdout
    assert "stream: Soft wool on high hills" in out.stdout
    events = _valid(stack, oisp_schema, 2)
    requests = [e for e in events if e.event_type == "ai.request"]
    responses = [e for e in events if e.event_type == "ai.response"]
    assert len(requests) == 2 and len(responses) == 2
    run_request, stream_request = requests
    assert run_request.attrs and run_request.attrs["replicate.prefer"].startswith("wait")
    assert stream_request.to_dict()["data"]["streaming"] is True
    for request, response in zip(requests, responses, strict=True):
        assert response.to_dict()["data"]["request_id"] == request.to_dict()["data"]["request_id"]
        assert response.related_events and response.related_events[0].event_id == request.event_id
        assert response.to_dict()["data"]["choices"][0]["message"]["content"] == "Soft wool on high hills"
    assert responses[0].to_dict()["data"]["usage"]["prompt_tokens"] == 22  # from the poll's metrics
    assert TOKEN not in "".join(e.to_json() for e in events)


def test_httpx_create_then_poll(stack: Stack, oisp_schema: SchemaValidator) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), headers=headers) as client:
        created = client.post(f"{API}/v1/models/meta/meta-llama-3-70b-instruct/predictions",
                              json={"input": {"prompt": "Write a haiku about llamas.", "max_tokens": 64}}).json()
        status = created["status"]
        while status not in ("succeeded", "failed", "canceled"):
            status = client.get(created["urls"]["get"]).json()["status"]
    events = _valid(stack, oisp_schema, 1)
    request = next(e for e in events if e.event_type == "ai.request").to_dict()["data"]
    response = next(e for e in events if e.event_type == "ai.response").to_dict()["data"]
    assert request["parameters"]["max_tokens"] == 64
    assert response["request_id"] == request["request_id"]
    assert response["usage"]["completion_tokens"] == 5
    assert response["provider_request_id"] == "gm3qorzdhgbfurvjtvhg6dckhu"
