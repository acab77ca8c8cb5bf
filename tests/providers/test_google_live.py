"""End to end: the real ``google-genai`` SDK's Live client (``client.aio.live.connect``) through the proxy to a
stand-in ``BidiGenerateContent`` server on the test upstream: setup, streamed audio, a turn, a tool call and its
response, a spoken answer with usage; the events are checked and validated."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.stack import Stack, running_stack
from tests.upstream import Request, WsPeer

pytest.importorskip("google.genai")
pytest.importorskip("websockets")

API_KEY = "AIza" + "L" * 35
SPOKEN = bytes(range(256)) * 150  # 38,400 bytes: 800 ms of 24 kHz pcm16
HEARD = bytes(range(256)) * 125  # 32,000 bytes: 1 s of 16 kHz pcm16
ANSWER = "It is sunny in Paris."


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca) as running:
        yield running


async def live_server(request: Request, ws: WsPeer) -> None:
    setup = await ws.recv()
    assert setup is not None and "setup" in json.loads(setup)
    await ws.send_json({"setupComplete": {}})
    while (message := await ws.recv()) is not None:
        event = json.loads(message)
        if "clientContent" in event or "client_content" in event:  # the SDK writes snake_case
            await ws.send_json({"toolCall": {"functionCalls": [
                {"id": "fc_live_1", "name": "get_weather", "args": {"city": "Paris"}}]}})
        elif "toolResponse" in event or "tool_response" in event:
            for i in range(0, len(SPOKEN), 9600):
                await ws.send_json({"serverContent": {"modelTurn": {"parts": [{"inlineData": {
                    "mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(SPOKEN[i:i + 9600]).decode()}}]}}},
                    fragments=3)
            await ws.send_json({"serverContent": {"outputTranscription": {"text": ANSWER}}})
            await ws.send_json({"serverContent": {"turnComplete": True}, "usageMetadata": {
                "promptTokenCount": 60, "responseTokenCount": 30, "totalTokenCount": 90,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 35}, {"modality": "AUDIO",
                                                                                   "tokenCount": 25}],
                "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 30}]}})


def test_google_genai_live_client_through_the_proxy(stack: Stack, oisp_schema: SchemaValidator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from google import genai
    from google.genai import types

    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", stack.proxy_url)  # websockets' connect reads the proxy from the environment
    stack.upstream.websocket = live_server
    stack.upstream.websocket_segment = 61
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(
        async_client_args={"ssl": stack.client_context()}))
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO], system_instruction="Answer briefly.",
        output_audio_transcription=types.AudioTranscriptionConfig(),
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(
            name="get_weather", description="Weather of a city",
            parameters=types.Schema(type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}),
        )])])
    received: dict[str, Any] = {"audio": b"", "text": ""}

    async def run() -> None:
        async with client.aio.live.connect(model="gemini-live-2.5-flash", config=config) as session:
            for i in range(0, len(HEARD), 3200):
                await session.send_realtime_input(audio=types.Blob(data=HEARD[i:i + 3200],
                                                                   mime_type="audio/pcm;rate=16000"))
            await session.send_client_content(turns=types.Content(role="user", parts=[
                types.Part(text="What is the weather in Paris?")]), turn_complete=True)
            async for message in session.receive():
                if message.tool_call:
                    break
            await session.send_tool_response(function_responses=[types.FunctionResponse(
                id="fc_live_1", name="get_weather", response={"weather": "sunny"})])
            async for message in session.receive():
                content = message.server_content
                if content and content.model_turn:
                    for part in content.model_turn.parts or []:
                        if part.inline_data and part.inline_data.data:
                            received["audio"] += part.inline_data.data
                if content and content.output_transcription:
                    received["text"] += content.output_transcription.text or ""
                if content and content.turn_complete:
                    break

    anyio.run(run)
    assert received == {"audio": SPOKEN, "text": ANSWER}
    events = stack.wait_for(lambda es: sum(e.event_type == "ai.response" for e in es) >= 2)
    by_type: dict[str, list[Any]] = {}
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
        by_type.setdefault(event.event_type, []).append(event)
    first, second = by_type["ai.request"]
    done1, done2 = by_type["ai.response"]
    assert first.data.model.id == "gemini-live-2.5-flash" and first.data.provider.name == "google"
    assert first.data.messages[-1].content == "What is the weather in Paris?"
    assert first.data.system_prompt_hash and [t.name for t in first.data.tools] == ["get_weather"]
    assert first.attrs["google.live.input_audio_bytes"] == len(HEARD)
    assert first.attrs["google.live.input_audio_ms"] == 1000
    assert first.attrs["oisp.transport"] == "websocket"
    assert done1.data.request_id == first.data.request_id and done1.data.finish_reason == "tool_calls"
    (call,) = by_type["agent.tool_call"]
    assert call.data.call_id == "fc_live_1" and call.data.arguments == {"city": "Paris"}
    (result,) = by_type["agent.tool_result"]
    assert result.data.call_id == "fc_live_1" and result.related_events[0].event_id == call.event_id
    assert result.attrs["oisp.request_id"] == second.data.request_id
    assert done2.data.request_id == second.data.request_id and done2.data.success
    assert done2.data.choices[0].message.content == ANSWER
    assert done2.data.usage.prompt_tokens == 60 and done2.data.usage.completion_tokens == 30
    assert done2.data.usage.extra == {"input_text_tokens": 35, "input_audio_tokens": 25, "output_audio_tokens": 30}
    assert done2.attrs["google.live.output_audio_bytes"] == len(SPOKEN)
    assert done2.attrs["google.live.output_audio_ms"] == 800
    serialized = json.dumps([e.to_dict() for e in events])
    assert base64.b64encode(SPOKEN[:300]).decode()[:40] not in serialized
    assert API_KEY not in serialized
