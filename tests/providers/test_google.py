"""The Google provider: Gemini API and Vertex AI generateContent (whole, SSE and JSON-array streams), function
calls and responses across exchanges (with and without ids), integer-encoded enums, blocked prompts, errors,
partial streams, embeddings, token counting and Claude on Vertex AI."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from tests.framing.chunking import chunkings
from tests.oisp_schema import SchemaValidator
from tests.providers.event_compare import decode_in_chunks, normalized
from tests.providers.exchange_harness import (
    assert_schema_valid,
    claim,
    data,
    make_exchange,
    of_type,
    one,
    respond,
    run_exchange,
)

from oisp.provider_kit import ToolCallRegistry
from oisp.providers.google import GeminiDecoder, route_for

FIXTURES = Path(__file__).parent / "fixtures" / "google"
ANTHROPIC = Path(__file__).parent / "fixtures" / "anthropic"
API_KEY = "AIzaSy" + "G" * 33
BASE = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
SSE_URL = f"{BASE}:streamGenerateContent?alt=sse&key={API_KEY}"
ARRAY_URL = f"{BASE}:streamGenerateContent"
KEY_HEADER = [("x-goog-api-key", API_KEY)]
VERTEX = ("https://us-central1-aiplatform.googleapis.com/v1/projects/acme-prod/locations/us-central1/publishers/"
          "google/models/gemini-2.0-flash-001")
TOKEN = [("authorization", "Bearer ya29.a0AfB_byC" + "t" * 40)]
SSE = "text/event-stream"
PLUGIN = "oisp.providers.google"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def body(name: str) -> dict[str, Any]:
    value = json.loads(fixture(name))
    assert isinstance(value, dict)
    return value


def sse_turn() -> list[Any]:
    return run_exchange("POST", SSE_URL, fixture("generate_request.json"), response=fixture("stream_response.sse"),
                        content_type=SSE, expect_plugin=PLUGIN)


def test_streamed_sse_turn_gives_request_response_and_function_calls(oisp_schema: SchemaValidator) -> None:
    events = sse_turn()
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response", "agent.tool_call", "agent.tool_call"]
    request = data(events[0])
    endpoint = f"{BASE}:streamGenerateContent?alt=sse&key=[REDACTED]"
    assert request["provider"] == {"name": "google", "endpoint": endpoint}
    assert request["model"] == {"id": "gemini-2.5-flash"}
    assert request["auth"]["type"] == "api_key" and request["auth"]["key_prefix"] == "AIza"
    assert request["streaming"] is True and request["request_type"] == "chat"
    assert request["system_prompt"] == "You are a weather bot.\nUse the tools."
    [user] = request["messages"]
    assert user["role"] == "user"
    assert user["content"] == "What is the weather in Lyon and in Paris? Here is a photo of my window."
    jpeg = base64.b64decode(body("generate_request.json")["contents"][0]["parts"][1]["inlineData"]["data"])
    assert user["image_count"] == 1 and user["image_hashes"] == ["sha256:" + hashlib.sha256(jpeg).hexdigest()]
    assert [a["mime_type"] for a in user["attachments"]] == ["audio/wav", "application/pdf"]
    assert user["attachments"][1]["uri"].endswith("/files/abc-123")
    assert [(t["name"], t["type"]) for t in request["tools"]] == [
        ("get_weather", "function"), ("get_time", "function"), ("code_execution", "code_interpreter"),
        ("google_search", "other")]
    assert all(t["parameters_hash"].startswith("sha256:") for t in request["tools"][:2])
    assert request["tool_choice"] == "auto"
    assert request["parameters"] == {
        "temperature": 0.4, "top_p": 0.9, "max_tokens": 1024, "stop": ["END"], "top_k": 32, "candidate_count": 1,
        "seed": 7, "thinking_config": {"thinkingBudget": 512, "includeThoughts": True}}
    assert events[0].attrs is not None
    assert events[0].attrs["http.path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=" \
                                           "[REDACTED]"
    assert events[0].attrs["google.api"] == "gemini" and events[0].attrs["google.api_version"] == "v1beta"

    response = data(events[1])
    assert response["model"] == {"id": "gemini-2.5-flash"}
    assert response["provider_request_id"] == "mFXEaMHgBeuBz7IPvKbC2Ak"
    assert response["success"] is True and events[1].confidence.completeness == "full"
    assert response["choices"][0]["message"]["content"] == "Let me check both cities — één moment."
    assert response["thinking"] == "The user asks for two cities; I will call get_weather twice."
    assert response["finish_reason"] == "tool_calls" and response["finish_reason_raw"] == "STOP"
    assert response["usage"] == {"prompt_tokens": 812, "completion_tokens": 40 + 159, "total_tokens": 1011,
                                 "cached_tokens": 512, "reasoning_tokens": 159}
    lyon, paris = response["tool_calls"]
    assert (lyon["name"], lyon["arguments"]) == ("get_weather", {"city": "Lyon"})
    assert (paris["name"], paris["arguments"]) == ("get_weather", {"city": "Paris"})
    assert lyon["id"].startswith("gemini_") and paris["id"].startswith("gemini_") and lyon["id"] != paris["id"]
    assert [data(e)["call_id"] for e in events[2:]] == [lyon["id"], paris["id"]]
    assert API_KEY not in "".join(e.to_json() for e in events)


def test_a_json_array_stream_gives_the_same_answer_as_sse(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", ARRAY_URL, fixture("generate_request.json"), request_headers=KEY_HEADER,
                          response=fixture("stream_response.json"), content_type="application/json; charset=UTF-8")
    assert_schema_valid(oisp_schema, events)
    reference = sse_turn()
    for kind in ("ai.response", "agent.tool_call"):
        mine = [{k: v for k, v in data(e).items() if k not in ("provider", "request_id", "latency_ms",
                                                              "time_to_first_token_ms")} for e in of_type(events, kind)]
        theirs = [{k: v for k, v in data(e).items() if k not in ("provider", "request_id", "latency_ms",
                                                                "time_to_first_token_ms")}
                  for e in of_type(reference, kind)]
        assert mine == theirs
    assert one(events, "ai.response").confidence.completeness == "full"
    assert data(one(events, "ai.request"))["auth"]["key_prefix"] == "AIza"


def test_function_responses_of_a_later_request_are_linked_to_the_calls(oisp_schema: SchemaValidator) -> None:
    first = sse_turn()
    lyon, paris = of_type(first, "agent.tool_call")
    second = run_exchange("POST", f"{BASE}:generateContent", fixture("followup_request.json"),
                          request_headers=KEY_HEADER, response=fixture("generate_response.json"),
                          expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, second)
    assert [e.event_type for e in second] == ["ai.request", "agent.tool_result", "agent.tool_result",
                                              "ai.response"]
    ok, failed = of_type(second, "agent.tool_result")
    assert data(ok)["call_id"] == data(lyon)["call_id"] and data(ok)["result"] == {"output": {"temp_c": 14,
                                                                                               "sky": "overcast"}}
    assert "success" not in data(ok) and data(ok)["tool"]["name"] == "get_weather"
    assert data(failed)["call_id"] == data(paris)["call_id"] and data(failed)["success"] is False
    assert ok.related_events is not None and ok.related_events[0].event_id == lyon.event_id
    assert failed.related_events is not None and failed.related_events[0].event_id == paris.event_id

    request = data(second[0])
    assert request["streaming"] is False and request["tool_choice"] == "specific"
    user, model, results = request["messages"]
    assert user["role"] == "user" and user["image_count"] == 1
    assert model["role"] == "assistant" and model["content"] == "Let me check both cities — één moment."
    assert model["thought_parts"] == 1
    assert [c["id"] for c in model["tool_calls"]] == [data(lyon)["call_id"], data(paris)["call_id"]]
    assert results["role"] == "user" and results["tool_results"] == [data(lyon)["call_id"], data(paris)["call_id"]]
    assert second[0].attrs is not None
    assert second[0].attrs["oisp.original"]["data.tool_choice"] == {"mode": "ANY",
                                                                    "allowedFunctionNames": ["get_weather"]}
    response = data(second[-1])
    assert response["finish_reason"] == "stop" and response["provider_request_id"] == "nFXEaJ6mLo2Hz7IP6Y2XyQY"
    assert response["usage"] == {"prompt_tokens": 1104, "completion_tokens": 17, "total_tokens": 1121,
                                 "cached_tokens": 1024}


def test_function_call_ids_link_results_when_the_api_gives_them(oisp_schema: SchemaValidator) -> None:
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"id": "fc-7Hq2", "name": "lookup_order", "args": {"order": 41}}}]},
        "finishReason": "STOP"}], "modelVersion": "gemini-2.5-pro"}
    conversation = [{"role": "user", "parts": [{"text": "Where is order 41?"}]}]
    first = run_exchange("POST", f"{BASE}:generateContent", {"contents": conversation}, response=answer)
    call = one(first, "agent.tool_call")
    assert data(call)["call_id"] == "fc-7Hq2"
    followup = {"contents": [*conversation, answer["candidates"][0]["content"],  # type: ignore[index]
                             {"role": "user", "parts": [{"functionResponse": {
                                 "id": "fc-7Hq2", "name": "lookup_order", "response": {"result": "shipped"}}}]}]}
    second = run_exchange("POST", f"{BASE}:generateContent", followup,
                          response=body("generate_response.json"))
    assert_schema_valid(oisp_schema, first + second)
    result = one(second, "agent.tool_result")
    assert data(result)["call_id"] == "fc-7Hq2" and data(result)["result"] == {"result": "shipped"}
    assert result.related_events is not None and result.related_events[0].event_id == call.event_id


def test_vertex_ai_names_project_region_and_reads_integer_enums(oisp_schema: SchemaValidator) -> None:
    url = f"{VERTEX}:generateContent?$alt=json;enum-encoding=int"
    events = run_exchange("POST", url, fixture("vertex_request.json"), request_headers=TOKEN,
                          response=fixture("vertex_response_int_enums.json"), expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    request, response = (data(e) for e in events)
    assert request["provider"]["region"] == "us-central1" and request["provider"]["project_id"] == "acme-prod"
    assert request["provider"]["name"] == "google"
    assert request["model"] == {"id": "gemini-2.0-flash-001"}
    assert request["auth"]["type"] == "oauth"
    assert request["parameters"] == {"temperature": 0.0, "max_tokens": 8}
    assert events[0].attrs is not None and events[0].attrs["google.api"] == "vertex_ai"
    assert response["finish_reason"] == "length" and response["finish_reason_raw"] == "MAX_TOKENS"
    assert response["choices"][0]["message"] == {
        "role": "assistant", "content": "Disk full on db-2 caused", "content_length": 24,
        "content_hash": "sha256:" + hashlib.sha256(b"Disk full on db-2 caused").hexdigest()}
    assert response["usage"] == {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}
    assert "t" * 40 not in "".join(e.to_json() for e in events)


@pytest.mark.parametrize(("url", "model", "region", "project"), [
    ("https://aiplatform.googleapis.com/v1/projects/p1/locations/global/publishers/google/models/"
     "gemini-2.5-pro:streamGenerateContent?alt=sse", "gemini-2.5-pro", "global", "p1"),
    (f"https://europe-west4-aiplatform.googleapis.com/v1/publishers/google/models/gemini-2.5-pro:generateContent"
     f"?key={API_KEY}", "gemini-2.5-pro", "europe-west4", None),
    ("https://us-east5-aiplatform.googleapis.com/v1beta1/projects/p2/locations/us-east5/endpoints/"
     "4242:generateContent", "endpoints/4242", "us-east5", "p2"),
    ("https://generativelanguage.googleapis.com/v1beta/tunedModels/sentiment-v3:generateContent",
     "tunedModels/sentiment-v3", None, None),
    ("https://generativelanguage.googleapis.com/v1/models/gemini-2.0-flash:generateContent",
     "gemini-2.0-flash", None, None),
])
def test_routes_name_model_region_and_project(url: str, model: str, region: str | None,
                                              project: str | None) -> None:
    route = route_for(make_exchange("POST", url, b"{}"))
    assert route is not None
    assert (route.model, route.region, route.project) == (model, region, project)


@pytest.mark.parametrize(("method", "url"), [
    ("GET", "https://generativelanguage.googleapis.com/v1beta/models"),
    ("GET", "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"),
    ("POST", "https://generativelanguage.googleapis.com/v1beta/cachedContents"),
    ("POST", "https://generativelanguage.googleapis.com/upload/v1beta/files"),
    ("POST", "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/publishers/"
             "meta/models/llama-4:rawPredict"),
    ("POST", "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:predictLongRunning"),
])
def test_other_endpoints_are_left_to_other_plugins(method: str, url: str) -> None:
    plugin, _ = claim(make_exchange(method, url, b"{}"))
    assert plugin != PLUGIN


def test_a_blocked_prompt_is_a_content_filter_error(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{BASE}:generateContent", fixture("vertex_request.json"),
                          response=fixture("blocked_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 200
    assert response["error"] == {"type": "prompt_blocked", "code": "PROHIBITED_CONTENT"}
    assert response["finish_reason"] == "content_filter"


@pytest.mark.parametrize(("raw", "expected"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"), ("IMAGE_SAFETY", "content_filter"),
    ("MALFORMED_FUNCTION_CALL", "error"), ("UNEXPECTED_TOOL_CALL", "error"), ("LANGUAGE", "other"),
    ("OTHER", "other"), (1, "stop"), (3, "content_filter"), (9, "error"), (99, "other"),
])
def test_finish_reasons_are_normalized(raw: Any, expected: str, oisp_schema: SchemaValidator) -> None:
    answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": "…"}]}, "finishReason": raw}]}
    events = run_exchange("POST", f"{VERTEX}:generateContent", fixture("vertex_request.json"), response=answer)
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.response"))["finish_reason"] == expected


def test_a_failed_request_reports_googles_error(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{BASE}:generateContent?key=bad", fixture("vertex_request.json"), status=400,
                          response=fixture("error_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False
    assert response["error"] == {"type": "INVALID_ARGUMENT", "code": "400",
                                 "message": "API key not valid. Please pass a valid API key."}
    # A streamed request without alt=sse fails with an array holding the error.
    events = run_exchange("POST", ARRAY_URL, fixture("vertex_request.json"), status=429,
                          response=b'[{\n  "error": {"code": 429, "message": "Resource has been exhausted",'
                                   b' "status": "RESOURCE_EXHAUSTED"}\n}\n]')
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.response"))["error"]["type"] == "RESOURCE_EXHAUSTED"


def test_an_error_inside_a_200_stream_fails_the_response(oisp_schema: SchemaValidator) -> None:
    stream = fixture("stream_response.sse").split(b"\r\n\r\n")
    broken = stream[0] + b"\r\n\r\n" + b'data: {"error": {"code": 503, "message": "The model is overloaded.", ' \
        b'"status": "UNAVAILABLE"}}\r\n\r\n'
    events = run_exchange("POST", SSE_URL, fixture("generate_request.json"), response=broken, content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 200
    assert response["error"] == {"type": "UNAVAILABLE", "message": "The model is overloaded.", "code": "503"}
    assert response["thinking"] == "The user asks for two cities; "


def test_streams_cut_short_give_partial_events(oisp_schema: SchemaValidator) -> None:
    array = fixture("stream_response.json")
    cut = array.index(b'"functionCall"')
    events = run_exchange("POST", ARRAY_URL, fixture("generate_request.json"), response=array[:cut])
    assert_schema_valid(oisp_schema, events)
    response = one(events, "ai.response")
    assert response.confidence.completeness == "partial"
    assert response.confidence.limitations is not None
    assert any("json-array incomplete" in reason for reason in response.confidence.limitations)
    assert data(response)["choices"][0]["message"]["content"] == "Let me check both cities — één moment."
    assert of_type(events, "agent.tool_call") == []

    sse = fixture("stream_response.sse")
    exchange = make_exchange("POST", SSE_URL, fixture("generate_request.json"))
    _, decoder = claim(exchange)
    events = list(decoder.on_request(exchange))
    exchange.mark_partial("stream reset by the server (RST_STREAM)")
    events += respond(exchange, decoder, 200, [sse[: sse.index(b"functionCall")]], content_type=SSE)
    response = one(events, "ai.response")
    assert data(response)["error"]["type"] == "incomplete" and response.confidence.completeness == "partial"

    # An SSE stream that simply stops before any finish reason.
    events = run_exchange("POST", SSE_URL, fixture("generate_request.json"),
                          response=sse[: sse.index(b"data:", 10)], content_type=SSE)
    assert one(events, "ai.response").confidence.limitations == ["stream ended before a finish reason"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=chunkings(fixture("stream_response.json")))
def test_any_split_of_a_json_array_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream = fixture("stream_response.json")

    def decode(at: list[int]) -> list[Any]:
        route = route_for(make_exchange("POST", ARRAY_URL, b"{}"))
        assert route is not None
        return normalized(decode_in_chunks(lambda: GeminiDecoder(route, registry=ToolCallRegistry()), "POST",
                                           ARRAY_URL, fixture("generate_request.json"), stream, at,
                                           content_type="application/json"))

    assert decode(cuts) == decode([])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=chunkings(fixture("stream_response.sse")))
def test_any_split_of_an_sse_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream = fixture("stream_response.sse")

    def decode(at: list[int]) -> list[Any]:
        route = route_for(make_exchange("POST", SSE_URL, b"{}"))
        assert route is not None
        return normalized(decode_in_chunks(lambda: GeminiDecoder(route, registry=ToolCallRegistry()), "POST",
                                           SSE_URL, fixture("generate_request.json"), stream, at, content_type=SSE))

    assert decode(cuts) == decode([])
    assert decode(list(range(1, len(stream)))) == decode([])


def test_streaming_chunk_events_when_asked_for(oisp_schema: SchemaValidator) -> None:
    route = route_for(make_exchange("POST", SSE_URL, b"{}"))
    assert route is not None
    events = decode_in_chunks(lambda: GeminiDecoder(route, registry=ToolCallRegistry(), streaming_chunks=True),
                              "POST", SSE_URL, fixture("generate_request.json"), fixture("stream_response.sse"), [],
                              content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    chunks = of_type(events, "ai.streaming_chunk")
    assert "".join(data(c)["delta"].get("content", "") for c in chunks) == "Let me check both cities — één moment."
    assert [c["name"] for c in data(chunks[-1])["delta"]["tool_calls"]] == ["get_weather", "get_weather"]


def test_embeddings_give_an_embedding_event(oisp_schema: SchemaValidator) -> None:
    single = run_exchange("POST", "https://generativelanguage.googleapis.com/v1beta/models/gemini-embedding-001:"
                          "embedContent", {"content": {"parts": [{"text": "hello"}]}}, request_headers=KEY_HEADER,
                          response=fixture("embed_response.json"), expect_plugin=PLUGIN)
    batch = run_exchange("POST", "https://generativelanguage.googleapis.com/v1beta/models/gemini-embedding-001:"
                         "batchEmbedContents", fixture("batch_embed_request.json"),
                         response=fixture("batch_embed_response.json"))
    vertex = run_exchange("POST", "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/"
                          "us-central1/publishers/google/models/text-embedding-005:predict",
                          {"instances": [{"content": "a"}, {"content": "b"}]}, request_headers=TOKEN,
                          response=fixture("vertex_predict_embed_response.json"), expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, single + batch + vertex)
    for events, count, dimensions in ((single, 1, 8), (batch, 3, 4), (vertex, 2, 5)):
        assert [e.event_type for e in events] == ["ai.request", "ai.embedding"]
        assert data(events[0])["request_type"] == "embedding"
        embedding = data(events[1])
        assert embedding["input_count"] == count and embedding["dimensions"] == dimensions
    assert data(vertex[1])["total_tokens"] == 10
    assert data(vertex[1])["provider"]["region"] == "us-central1"


def test_count_tokens_is_an_other_request_without_tool_results(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{BASE}:countTokens", fixture("followup_request.json"),
                          response={"totalTokens": 1104, "cachedContentTokenCount": 1024}, expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response"]
    assert data(events[0])["request_type"] == "other" and data(events[0])["messages_count"] == 3
    assert data(events[1])["counted_input_tokens"] == 1104


def test_snake_case_fields_are_read_too(oisp_schema: SchemaValidator) -> None:
    request = {"contents": [{"role": "user", "parts": [{"text": "hi"}, {"inline_data": {
        "mime_type": "image/png", "data": "iVBORw0KGgo="}}]}],
        "system_instruction": {"parts": [{"text": "be brief"}]},
        "generation_config": {"max_output_tokens": 5, "top_p": 0.5},
        "tools": [{"function_declarations": [{"name": "f", "parameters": {"type": "object"}}]}],
        "tool_config": {"function_calling_config": {"mode": "NONE"}}}
    events = run_exchange("POST", f"{BASE}:generateContent", request,
                          response={"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]},
                                                    "finish_reason": "STOP"}],
                                    "usage_metadata": {"prompt_token_count": 3, "candidates_token_count": 1}})
    assert_schema_valid(oisp_schema, events)
    facts = data(events[0])
    assert facts["system_prompt"] == "be brief" and facts["image_count"] == 1
    assert facts["parameters"] == {"top_p": 0.5, "max_tokens": 5}
    assert facts["tools"][0]["name"] == "f" and facts["tool_choice"] == "none"
    response = data(one(events, "ai.response"))
    assert response["finish_reason"] == "stop" and response["usage"]["total_tokens"] == 4


def test_claude_on_vertex_ai_is_read_as_the_messages_api(oisp_schema: SchemaValidator) -> None:
    url = ("https://us-east5-aiplatform.googleapis.com/v1/projects/acme/locations/us-east5/publishers/anthropic/"
           "models/claude-sonnet-4-5@20250929:streamRawPredict")
    request = json.loads((ANTHROPIC / "messages_tools_request.json").read_bytes())
    del request["model"]
    request["anthropic_version"] = "vertex-2023-10-16"
    events = run_exchange("POST", url, request, request_headers=TOKEN,
                          response=(ANTHROPIC / "messages_tools_stream.sse").read_bytes(), content_type=SSE,
                          expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response", "agent.tool_call", "agent.tool_call"]
    facts = data(events[0])
    assert facts["model"] == {"id": "claude-sonnet-4-5@20250929"}
    assert facts["provider"]["name"] == "google"
    assert (facts["provider"]["region"], facts["provider"]["project_id"]) == ("us-east5", "acme")
    assert data(events[1])["finish_reason"] == "tool_calls"
