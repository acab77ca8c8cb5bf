"""Ollama's native API: chat, generate and embeddings, whole and streamed (NDJSON), tools, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.oisp_schema import SchemaValidator
from tests.providers.exchange_harness import (
    assert_schema_valid,
    claim,
    data,
    make_exchange,
    of_type,
    one,
    run_exchange,
    split_at,
)

from oisp.provider_kit import DecoderContext
from oisp.providers.ollama import synthesized_call_id
from oisp.redaction import sha256_text

FIXTURES = Path(__file__).parent / "fixtures" / "ollama"
URL = "http://localhost:11434"
NDJSON = "application/x-ndjson"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def test_streamed_chat_becomes_request_and_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{URL}/api/chat", fixture("chat_request.json"),
                          response=fixture("chat_stream.ndjson"), content_type=NDJSON,
                          expect_plugin="oisp.providers.ollama")
    assert_schema_valid(oisp_schema, events)
    request = data(one(events, "ai.request"))
    assert request["provider"]["name"] == "ollama"
    assert request["model"]["id"] == "llama3.2"
    assert request["request_type"] == "chat"
    assert request["streaming"] is True  # Ollama streams unless told not to
    assert request["system_prompt_hash"] == sha256_text("You are terse.")
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    user = request["messages"][1]
    assert user["content"] == "What is in this picture?"
    assert user["has_images"] is True and user["image_count"] == 1
    assert user["image_hashes"][0].startswith("sha256:")
    assert "iVBORw0KGgo" not in json.dumps(request)  # the image bytes are never kept
    assert request["parameters"]["temperature"] == 0.2
    assert request["parameters"]["top_p"] == 0.9
    assert request["parameters"]["max_tokens"] == 128
    assert request["parameters"]["stop"] == ["\n\n"]
    assert request["parameters"]["seed"] == 7 and request["parameters"]["num_ctx"] == 4096
    assert request["parameters"]["format"] == "json"

    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["success"] is True
    assert response["request_id"] == request["request_id"]
    assert response_event.related_events and response_event.related_events[0].relationship == "caused_by"
    assert response["choices"][0]["message"]["content"] == "A red pixel."
    assert response["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}
    assert response_event.attrs is not None
    assert response_event.attrs["ollama.total_duration_ms"] == 4883.583
    assert response_event.attrs["ollama.load_duration_ms"] == 1.335
    assert response_event.attrs["ollama.prompt_eval_duration_ms"] == 342.546
    assert response_event.attrs["ollama.eval_duration_ms"] == 4535.599
    assert response_event.attrs["ollama.done_reason"] == "stop"
    assert response_event.confidence.completeness == "full"
    assert response_event.confidence.content_source == "plaintext_capture"


def _response_facts(events: list[Any]) -> dict[str, Any]:
    response = data(one(events, "ai.response"))
    for key in ("request_id", "latency_ms", "time_to_first_token_ms"):
        response.pop(key, None)
    return response


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_streamed_chat_is_the_same_at_any_split(decoder_run: DecoderContext, chunks: st.DataObject) -> None:
    body = fixture("chat_stream.ndjson") + fixture("chat_tools_response.json").replace(b"\n", b"") + b"\n"
    cuts = chunks.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=40))
    whole = run_exchange("POST", f"{URL}/api/chat", fixture("chat_request.json"), response=[body],
                         content_type=NDJSON)
    split = run_exchange("POST", f"{URL}/api/chat", fixture("chat_request.json"), response=split_at(body, cuts),
                         content_type=NDJSON)
    assert _response_facts(split) == _response_facts(whole)
    assert data(one(split, "ai.response"))["choices"][0]["message"]["content"] == "A red pixel."
    assert len(of_type(split, "agent.tool_call")) == 2


def test_tool_calls_get_synthesized_ids_and_results_link_back(oisp_schema: SchemaValidator) -> None:
    first = run_exchange("POST", f"{URL}/api/chat", fixture("chat_tools_request.json"),
                         response=fixture("chat_tools_response.json"))
    assert_schema_valid(oisp_schema, first)
    request = data(one(first, "ai.request"))
    assert request["streaming"] is False
    assert request["tools_count"] == 1
    assert request["tools"][0]["name"] == "get_weather"
    assert request["tools"][0]["parameters_hash"].startswith("sha256:")
    response = data(one(first, "ai.response"))
    assert response["finish_reason"] == "tool_calls"
    assert response["thinking"] == "Two cities, two calls."
    calls = response["tool_calls"]
    assert [c["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [c["arguments"] for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    ids = [c["id"] for c in calls]
    assert all(i.startswith("ollama_") and len(i) == len("ollama_") + 16 for i in ids) and ids[0] != ids[1]
    tool_calls = of_type(first, "agent.tool_call")
    assert [data(e)["call_id"] for e in tool_calls] == ids
    assert [data(e)["arguments"] for e in tool_calls] == [{"city": "Paris"}, {"city": "Tokyo"}]

    followup = run_exchange("POST", f"{URL}/api/chat", fixture("chat_tools_followup_request.json"),
                            response={"model": "qwen3", "message": {"role": "assistant", "content": "18 and 24."},
                                      "done": True, "done_reason": "stop"})
    assert_schema_valid(oisp_schema, followup)
    results = of_type(followup, "agent.tool_result")
    assert [data(r)["call_id"] for r in results] == ids
    assert [data(r)["result"] for r in results] == [{"temp_c": 18}, {"temp_c": 24}]
    for result, call in zip(results, tool_calls, strict=True):
        assert result.related_events and result.related_events[0].event_id == call.event_id
        assert result.related_events[0].relationship == "parent"
    assistant = data(one(followup, "ai.request"))["messages"][1]
    assert [c["id"] for c in assistant["tool_calls"]] == ids
    # the conversation is sent again with the next turn: its results are not reported twice
    again = run_exchange("POST", f"{URL}/api/chat", fixture("chat_tools_followup_request.json"),
                         response={"done": True})
    assert of_type(again, "agent.tool_result") == []


def test_tool_results_without_tool_name_match_calls_in_order() -> None:
    prefix = [{"role": "user", "content": "two files"}]
    calls = [{"function": {"name": "read_file", "arguments": {"path": p}}} for p in ("a", "b")]
    body = {"model": "m", "messages": [*prefix, {"role": "assistant", "content": "", "tool_calls": calls},
                                       {"role": "tool", "content": "A"}, {"role": "tool", "content": "B"}]}
    events = run_exchange("POST", f"{URL}/api/chat", body, response={"done": True})
    from oisp.providers.ollama import conversation_key

    expected = [synthesized_call_id(conversation_key(prefix), i, "read_file", {"path": p})
                for i, p in enumerate(("a", "b"))]
    results = of_type(events, "agent.tool_result")
    assert [data(r)["call_id"] for r in results] == expected
    assert [data(r)["result"] for r in results] == ["A", "B"]
    assert [data(r)["tool"]["type"] for r in results] == ["file_read", "file_read"]


def test_streamed_generate_with_thinking(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{URL}/api/generate", fixture("generate_request.json"),
                          response=fixture("generate_stream.ndjson"), content_type=NDJSON)
    assert_schema_valid(oisp_schema, events)
    request = data(one(events, "ai.request"))
    assert request["request_type"] == "completion"
    assert [(m["role"], m["content"]) for m in request["messages"]] == [
        ("system", "Answer in one sentence."), ("user", "Why is the sky blue?")]
    assert request["has_system_prompt"] is True
    assert request["parameters"]["max_tokens"] == 64
    assert request["parameters"]["think"] is True
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["choices"][0]["message"]["content"] == "Short wavelengths scatter more."
    assert response["thinking"] == "Rayleigh scattering."
    assert response["finish_reason"] == "length"
    assert response["usage"]["prompt_tokens"] == 26 and response["usage"]["completion_tokens"] == 64
    assert response_event.attrs is not None and response_event.attrs["ollama.context_tokens"] == 5


@pytest.mark.parametrize(("path", "request_file", "response_file", "count", "dimensions", "tokens"), [
    ("/api/embed", "embed_request.json", "embed_response.json", 2, 4, 8),
    ("/api/embeddings", "embeddings_legacy_request.json", "embeddings_legacy_response.json", 1, 3, None),
])
def test_embeddings(oisp_schema: SchemaValidator, path: str, request_file: str, response_file: str, count: int,
                    dimensions: int, tokens: int | None) -> None:
    events = run_exchange("POST", URL + path, fixture(request_file), response=fixture(response_file))
    assert_schema_valid(oisp_schema, events)
    request = data(one(events, "ai.request"))
    assert request["request_type"] == "embedding"
    assert request["streaming"] is False
    assert request["input_count"] == count
    embedding = data(one(events, "ai.embedding"))
    assert embedding["provider"]["name"] == "ollama"
    assert embedding["dimensions"] == dimensions
    assert embedding.get("total_tokens") == tokens


def test_error_inside_a_stream_fails_the_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{URL}/api/chat", {"model": "llama3.2", "messages": []},
                          response=fixture("error_in_stream.ndjson"), content_type=NDJSON)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False
    assert response["error"]["message"] == "an error was encountered while running the model: unexpected EOF"
    assert response["choices"][0]["message"]["content"] == "Partial"


def test_error_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{URL}/api/chat", {"model": "llama9", "messages": []}, status=404,
                          response=fixture("error_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 404
    assert response["error"]["message"] == 'model "llama9" not found, try pulling it first'


def test_bad_line_in_a_stream_marks_the_response_partial(oisp_schema: SchemaValidator) -> None:
    body = fixture("chat_stream.ndjson").replace(b'" red"},"done":false}', b'" red"},"done":fal', 1)
    events = run_exchange("POST", f"{URL}/api/chat", {"model": "llama3.2", "messages": []}, response=body,
                          content_type=NDJSON)
    assert_schema_valid(oisp_schema, events)
    response_event = one(events, "ai.response")
    assert response_event.confidence.completeness == "partial"
    assert response_event.confidence.limitations and "ndjson" in response_event.confidence.limitations[0]
    assert data(response_event)["choices"][0]["message"]["content"] == "A pixel."


@pytest.mark.parametrize(("method", "url", "plugin"), [
    ("POST", f"{URL}/v1/chat/completions", "oisp.providers.openai"),  # the OpenAI-compatible API is not ours
    ("GET", f"{URL}/api/tags", "oisp.providers.metadata"),
    ("POST", f"{URL}/api/pull", "oisp.providers.metadata"),
    ("POST", "http://127.0.0.1:11434/api/chat", "oisp.providers.ollama"),
    ("POST", "https://api.openai.com/api/chat", "oisp.providers.metadata"),
])
def test_claims_only_the_native_api_of_ollama_endpoints(method: str, url: str, plugin: str) -> None:
    exchange = make_exchange(method, url, {"model": "m"})
    assert claim(exchange)[0] == plugin


def test_any_host_the_endpoint_table_calls_ollama_is_claimed() -> None:
    exchange = make_exchange("POST", "http://gpu-box.lan:8080/api/generate", {"model": "m"}, provider="ollama")
    assert claim(exchange)[0] == "oisp.providers.ollama"
