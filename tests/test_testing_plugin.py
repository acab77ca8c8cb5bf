"""The pytest plugin (``oisp_capture``), used the way a team would in its own tests: the real openai SDK, with
nothing configured but what the fixture puts in the environment, against a local stand-in for api.openai.com."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio.from_thread
import openai
import pytest
import trustme
from tests.upstream import Request, Response, Upstream, server_context

from oisp.testing import AICapture

TOOL_CALL = {"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
             "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                 "role": "assistant", "content": None, "tool_calls": [{
                     "id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}}],
             "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}}


async def _openai(request: Request) -> Response:
    return Response(body=json.dumps(TOOL_CALL).encode())


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("stand-in") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = Upstream(server_context(ca.issue_cert("api.openai.com")), _openai)
    with anyio.from_thread.start_blocking_portal() as portal:
        future, port = portal.start_task(upstream.serve)
        yield port, ca_file
        future.cancel()


@pytest.fixture
def oisp_capture_options(stand_in: tuple[int, Path]) -> Mapping[str, Any]:
    port, ca_file = stand_in
    return {"resolve": [f"api.openai.com:443:127.0.0.1:{port}"], "upstream_ca": ca_file}


def my_agent() -> str:
    """The code under test: an agent that knows nothing of oisp."""
    client = openai.OpenAI(api_key="sk-test-not-a-real-key-000000000000")
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    return answer.choices[0].message.tool_calls[0].function.name  # type: ignore[index,union-attr]


def test_a_team_asserts_which_model_and_tools_its_agent_used(oisp_capture: AICapture) -> None:
    assert my_agent() == "get_weather"
    call = oisp_capture.wait_for_calls(1)[0]
    assert call.provider == "openai" and call.model == "gpt-4o-mini-2024-07-18"
    assert call.tool_names == ["get_weather"]
    assert call.total_tokens == 60 and call.cost_usd is not None and call.cost_usd > 0
    request = call.request
    assert request is not None and request.process is not None  # attributed: this very test process
    assert "sk-test-not-a-real-key" not in request.to_json()  # the key is redacted
    oisp_capture.clear()
    assert oisp_capture.calls() == []


def test_waiting_for_a_call_that_never_comes_says_what_was_seen(oisp_capture: AICapture) -> None:
    with pytest.raises(AssertionError, match=r"expected 1 complete AI call\(s\) within 0.2 s; saw none"):
        oisp_capture.wait_for_calls(1, timeout=0.2)
