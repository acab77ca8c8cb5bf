"""The real ``google-genai`` SDK through the proxy (HTTPS_PROXY, SSL_CERT_FILE): a streamed turn with function
calls, then generate_content with the function responses, against the Gemini API and against Vertex AI."""

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

pytest.importorskip("google.genai")

FIXTURES = Path(__file__).parent / "fixtures" / "google"
API_KEY = "AIzaSy" + "k" * 33


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def gemini_api(request: Request) -> Response:
    """Streams function calls; answers a request that carries function responses with text."""
    path = request.target.split("?")[0]
    if path.endswith(":streamGenerateContent"):
        chunks = [c for c in (FIXTURES / "stream_response.sse").read_bytes().split(b"\r\n\r\n") if c.strip()]

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk + b"\r\n\r\n"

        return Response(headers=[("content-type", "text/event-stream")], body=stream)
    if path.endswith(":generateContent"):
        return Response(body=(FIXTURES / "generate_response.json").read_bytes())
    return Response(status=404, body=(FIXTURES / "error_response.json").read_bytes())


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=gemini_api) as running:
        yield running


CLIENT = """
import json, sys
from google import genai
from google.genai import types
if sys.argv[1] == "vertex":
    from google.oauth2.credentials import Credentials
    client = genai.Client(vertexai=True, project="acme-prod", location="us-central1",
                          credentials=Credentials(token="ya29.test-token-" + "v" * 30))
else:
    client = genai.Client(api_key=%(key)r)
weather = types.FunctionDeclaration(name="get_weather", description="Current weather for a city",
    parameters=types.Schema(type="OBJECT", properties={"city": types.Schema(type="STRING")}, required=["city"]))
config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[weather])],
                                     system_instruction="You are a weather bot.", temperature=0.4)
question = "What is the weather in Lyon and in Paris?"
parts = []
for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents=question, config=config):
    parts += chunk.candidates[0].content.parts or []
calls = [p.function_call for p in parts if p.function_call]
contents = [types.Content(role="user", parts=[types.Part(text=question)]),
            types.Content(role="model", parts=parts),
            types.Content(role="user", parts=[types.Part.from_function_response(
                name=c.name, response={"output": "sunny in " + c.args["city"]}) for c in calls])]
final = client.models.generate_content(model="gemini-2.5-flash", contents=contents, config=config)
print(json.dumps({"calls": [[c.name, c.args] for c in calls], "answer": final.text}))
"""


def run_client(stack: Stack, api: str) -> dict[str, object]:
    env = stack.client_env(drop=("GOOGLE_", "GEMINI_"))
    out = subprocess.run([sys.executable, "-c", CLIENT % {"key": API_KEY}, api], env=env, capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("api", ["gemini", "vertex"])
def test_streamed_function_calls_and_responses_through_the_proxy(stack: Stack, oisp_schema: SchemaValidator,
                                                                 api: str) -> None:
    result = run_client(stack, api)
    assert result["calls"] == [["get_weather", {"city": "Lyon"}], ["get_weather", {"city": "Paris"}]]
    assert result["answer"] == "Lyon: 14°C and overcast. Paris: no data right now."
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    ai = [e for e in events if e.event_type != "network.connect"]
    for event in ai:
        oisp_schema.assert_valid(event.to_dict())

    def of(kind: str) -> list[Event]:
        return [e for e in ai if e.event_type == kind]

    streamed_request, followup = of("ai.request")
    assert [m.role for m in followup.data.messages] == ["user", "assistant", "user"]  # type: ignore[attr-defined]
    assert streamed_request.data.streaming is True  # type: ignore[attr-defined]
    assert streamed_request.data.model.id == "gemini-2.5-flash"  # type: ignore[attr-defined]
    provider = streamed_request.data.provider  # type: ignore[attr-defined]
    assert provider.name == "google"
    if api == "vertex":
        assert (provider.region, provider.project_id) == ("us-central1", "acme-prod")
        assert streamed_request.data.auth.type == "oauth"  # type: ignore[attr-defined]
    else:
        assert streamed_request.data.auth.key_prefix == "AIza"  # type: ignore[attr-defined]
    streamed, answered = of("ai.response")
    assert streamed.data.finish_reason == "tool_calls" and streamed.data.success is True  # type: ignore[attr-defined]
    assert answered.data.finish_reason == "stop"  # type: ignore[attr-defined]
    calls, results = of("agent.tool_call"), of("agent.tool_result")
    assert len(calls) == 2 and len(results) == 2
    for call, tool_result in zip(calls, results, strict=True):
        assert tool_result.data.call_id == call.data.call_id  # type: ignore[attr-defined]
        assert tool_result.related_events is not None
        assert tool_result.related_events[0].event_id == call.event_id
        city = call.data.arguments["city"]  # type: ignore[attr-defined]
        assert tool_result.data.result == {"output": "sunny in " + city}  # type: ignore[attr-defined]
    everything = "".join(e.to_json() for e in events)
    assert "k" * 33 not in everything and "v" * 30 not in everything
