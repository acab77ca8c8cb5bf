"""The Cohere provider: Chat v1 (NDJSON stream, synthesized tool call ids), Chat v2 (typed SSE, tool plan, tool
calls in fragments), tool results across exchanges, errors, partial streams and embeddings."""

from __future__ import annotations

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
from oisp.providers.cohere import ChatV1Decoder, ChatV2Decoder, synthesized_call_id

FIXTURES = Path(__file__).parent / "fixtures" / "cohere"
KEY = "co-" + "C" * 37
AUTH = [("authorization", f"Bearer {KEY}")]
V1 = "https://api.cohere.com/v1/chat"
V2 = "https://api.cohere.com/v2/chat"
NDJSON = "application/stream+json"
SSE = "text/event-stream"
PLUGIN = "oisp.providers.cohere"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def v1_turn() -> list[Any]:
    return run_exchange("POST", V1, fixture("chat_v1_request.json"), request_headers=AUTH,
                        response=fixture("chat_v1_stream.ndjson"), content_type=NDJSON, expect_plugin=PLUGIN)


def v2_turn() -> list[Any]:
    return run_exchange("POST", V2, fixture("chat_v2_request.json"), request_headers=AUTH,
                        response=fixture("chat_v2_tool_stream.sse"), content_type=SSE, expect_plugin=PLUGIN)


def test_v1_streamed_tool_calls(oisp_schema: SchemaValidator) -> None:
    events = v1_turn()
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response", "agent.tool_call", "agent.tool_call"]
    request = data(events[0])
    assert request["provider"] == {"name": "cohere", "endpoint": V1}
    assert request["model"] == {"id": "command-r-plus-08-2024"} and request["streaming"] is True
    assert request["auth"]["type"] == "api_key" and request["auth"]["key_hash"].startswith("sha256:")
    assert request["system_prompt"] == "You are an assistant for a retail team."
    assert [(m["role"], m["content"]) for m in request["messages"]] == [
        ("user", "Hi"), ("assistant", "Hello! How can I help?"),
        ("user", "What were the sales on 2023-09-29, and how many items are in stock?")]
    assert [(t["name"], t["type"]) for t in request["tools"]] == [("query_daily_sales_report", "function"),
                                                                 ("query_product_catalog", "function")]
    assert request["parameters"] == {"temperature": 0.3, "top_p": 0.75, "max_tokens": 400, "stop": ["<end>"],
                                     "seed": 42, "top_k": 10}
    response = data(events[1])
    assert response["provider_request_id"] == "7a0e3e3e-1c0f-4e43-a4ab-0f0cb2c0b1d2"
    assert response["generation_id"] == "2f3b9b67-0d5c-4fb0-a3d5-4a7cba1e5f10"
    assert response["thinking"] == "I will look up the sales report and the catalog."
    assert response["finish_reason"] == "tool_calls" and response["finish_reason_raw"] == "COMPLETE"
    assert response["usage"] == {"prompt_tokens": 1054, "completion_tokens": 45, "total_tokens": 1099}
    assert events[1].attrs is not None and events[1].attrs["cohere.tokens.input_tokens"] == 1870
    sales, catalog = response["tool_calls"]
    assert sales["id"] == synthesized_call_id("query_daily_sales_report", {"day": "2023-09-29"})
    assert sales["arguments"] == {"day": "2023-09-29"} and catalog["arguments"] == {"category": "all"}
    assert [data(e)["call_id"] for e in events[2:]] == [sales["id"], catalog["id"]]
    assert KEY not in "".join(e.to_json() for e in events)


def test_v1_tool_results_are_linked_to_the_synthesized_call_ids(oisp_schema: SchemaValidator) -> None:
    calls = of_type(v1_turn(), "agent.tool_call")
    events = run_exchange("POST", V1, fixture("chat_v1_followup_request.json"), request_headers=AUTH,
                          response=fixture("chat_v1_response.json"))
    assert_schema_valid(oisp_schema, events)
    results = of_type(events, "agent.tool_result")
    assert [data(r)["call_id"] for r in results] == [data(c)["call_id"] for c in calls]
    for call, result in zip(calls, results, strict=True):
        assert result.related_events is not None and result.related_events[0].event_id == call.event_id
    assert data(results[0])["result"] == [{"date": "2023-09-29",
                                           "summary": "Total Sales Amount: 10000, Total Units Sold: 250"}]
    request = data(events[0])
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "tool"]
    assert request["messages"][1]["tool_calls"][0]["id"] == data(calls[0])["call_id"]
    response = data(one(events, "ai.response"))
    assert response["choices"][0]["message"]["content"].startswith("On 2023-09-29 you sold 250 units")
    assert response["finish_reason"] == "stop" and response["citations"] == 1
    assert response["provider_request_id"] == "d1b1f6c4-5c2e-4d53-bb6b-4d6c0b9d2f11"


def test_v2_streamed_tool_plan_and_tool_call(oisp_schema: SchemaValidator) -> None:
    events = v2_turn()
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response", "agent.tool_call"]
    request = data(events[0])
    assert request["system_prompt"] == "You help with weather questions." and request["has_system_prompt"] is True
    system, user = request["messages"]
    assert system["role"] == "system"
    assert user["content"] == "What's the weather in Toronto and what is in this picture?"
    assert user["image_count"] == 1 and request["image_count"] == 1
    assert request["tool_choice"] == "required"
    assert request["parameters"] == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 500, "top_k": 20,
                                     "thinking": {"type": "enabled", "token_budget": 256}}
    response = data(events[1])
    assert response["provider_request_id"] == "c14c80c3-18eb-4519-9460-6c92edd8cfb4"
    assert response["thinking"] == "I will search for the weather in Toronto."
    assert response["finish_reason"] == "tool_calls"
    assert response["usage"] == {"prompt_tokens": 37, "completion_tokens": 28, "total_tokens": 65,
                                 "cached_tokens": 0}
    [call] = response["tool_calls"]
    assert call["id"] == "get_weather_nsz5zm3w56q3" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"location": "Toronto"}
    assert data(events[2])["arguments"] == {"location": "Toronto"}
    assert "iVBORw0KGgo" not in "".join(e.to_json() for e in events)


def test_v2_tool_messages_are_tool_results_of_earlier_calls(oisp_schema: SchemaValidator) -> None:
    call = one(v2_turn(), "agent.tool_call")
    events = run_exchange("POST", V2, fixture("chat_v2_followup_request.json"), request_headers=AUTH,
                          response=fixture("chat_v2_text_stream.sse"), content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    result = one(events, "agent.tool_result")
    assert data(result)["call_id"] == "get_weather_nsz5zm3w56q3"
    assert data(result)["result"] == {"temperature": "24C"}
    assert data(result)["tool"]["name"] == "get_weather"
    assert result.related_events is not None and result.related_events[0].event_id == call.event_id
    request = data(events[0])
    assistant, tool = request["messages"][2:]
    assert assistant["tool_plan"] == "I will search for the weather in Toronto."
    assert tool["role"] == "tool" and tool["tool_call_id"] == "get_weather_nsz5zm3w56q3"
    assert tool["content"] == '{"temperature": "24C"}'
    response = data(one(events, "ai.response"))
    assert response["choices"][0]["message"]["content"] == "It's 24°C in Toronto."
    assert response["thinking"] == "The tool says 24°C."
    assert response["finish_reason"] == "stop" and response["citations"] == 1
    assert response["usage"] == {"prompt_tokens": 70, "completion_tokens": 10, "total_tokens": 80,
                                 "cached_tokens": 512}


def test_v2_whole_response(oisp_schema: SchemaValidator) -> None:
    request = json.loads(fixture("chat_v2_followup_request.json"))
    request["stream"] = False
    events = run_exchange("POST", "https://api.cohere.ai/v2/chat", request, response=fixture("chat_v2_response.json"),
                          expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["provider"]["name"] == "cohere"
    assert response["choices"][0]["message"]["content"] == "It's 24°C in Toronto."
    assert response["usage"] == {"prompt_tokens": 70, "completion_tokens": 10, "total_tokens": 80}


@pytest.mark.parametrize(("raw", "expected"), [
    ("COMPLETE", "stop"), ("STOP_SEQUENCE", "stop"), ("MAX_TOKENS", "length"), ("TOOL_CALL", "tool_calls"),
    ("ERROR", "error"), ("TIMEOUT", "other"), ("ERROR_TOXIC", "content_filter"), ("ERROR_LIMIT", "length"),
])
def test_finish_reasons_are_normalized(raw: str, expected: str, oisp_schema: SchemaValidator) -> None:
    answer = {"id": "x", "finish_reason": raw, "message": {"role": "assistant", "content": [
        {"type": "text", "text": "t"}]}}
    events = run_exchange("POST", V2, {"model": "command-a-03-2025", "messages": []}, response=answer)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["finish_reason"] == expected
    assert response["success"] is (raw != "ERROR")


def test_errors_fail_the_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", V2, {"model": "command-x", "messages": []}, status=404,
                          response=fixture("error_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 404
    assert response["error"]["message"].startswith("invalid request: model 'command-x' not found")

    stream = fixture("chat_v2_text_stream.sse")
    head = stream[: stream.index(b"event: citation-start")]
    failed = head + b'event: message-end\ndata: {"type": "message-end", "delta": {"finish_reason": "ERROR", ' \
                    b'"error": "internal generation failure"}}\n\n'
    events = run_exchange("POST", V2, fixture("chat_v2_followup_request.json"), response=failed, content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 200
    assert response["error"] == {"type": "stream_error", "message": "internal generation failure"}
    assert response["choices"][0]["message"]["content"] == "It's 24°C in Toronto."


def test_streams_cut_short_give_partial_events(oisp_schema: SchemaValidator) -> None:
    stream = fixture("chat_v2_tool_stream.sse")
    exchange = make_exchange("POST", V2, fixture("chat_v2_request.json"))
    _, decoder = claim(exchange)
    events = list(decoder.on_request(exchange))
    exchange.mark_partial("connection closed before the response was complete")
    cut = len(b"\n\n".join(stream.split(b"\n\n")[:6])) + 20  # inside the last arguments fragment
    events += respond(exchange, decoder, 200, [stream[:cut]], content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = one(events, "ai.response")
    assert response.confidence.completeness == "partial" and data(response)["success"] is False
    assert data(response)["tool_calls"][0]["arguments"] == '{\n    "location": "Toronto'
    assert data(one(events, "agent.tool_call"))["arguments"] == {"_raw": '{\n    "location": "Toronto'}

    lines = fixture("chat_v1_stream.ndjson")
    events = run_exchange("POST", V1, fixture("chat_v1_request.json"), content_type=NDJSON,
                          response=lines[: lines.index(b'{"is_finished":true')])
    response = one(events, "ai.response")
    assert response.confidence.limitations == ["stream ended before stream-end"]
    assert [c["arguments"] for c in data(response)["tool_calls"]] == [{"day": "2023-09-29"}, {"category": "all"}]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=chunkings(fixture("chat_v1_stream.ndjson")))
def test_any_split_of_a_v1_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream = fixture("chat_v1_stream.ndjson")

    def decode(at: list[int]) -> list[Any]:
        return normalized(decode_in_chunks(lambda: ChatV1Decoder(registry=ToolCallRegistry()), "POST", V1,
                                           fixture("chat_v1_request.json"), stream, at, content_type=NDJSON))

    assert decode(cuts) == decode([])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=chunkings(fixture("chat_v2_tool_stream.sse") + fixture("chat_v2_text_stream.sse")))
def test_any_split_of_a_v2_stream_gives_the_same_events(cuts: list[int]) -> None:
    for name in ("chat_v2_tool_stream.sse", "chat_v2_text_stream.sse"):
        stream = fixture(name)
        at = [c for c in cuts if c <= len(stream)]

        def decode(pieces: list[int], stream: bytes = stream) -> list[Any]:
            return normalized(decode_in_chunks(lambda: ChatV2Decoder(registry=ToolCallRegistry()), "POST", V2,
                                               fixture("chat_v2_request.json"), stream, pieces, content_type=SSE))

        assert decode(at) == decode([])
        assert decode(list(range(1, len(stream)))) == decode([])


def test_streaming_chunk_events_when_asked_for(oisp_schema: SchemaValidator) -> None:
    events = decode_in_chunks(lambda: ChatV2Decoder(registry=ToolCallRegistry(), streaming_chunks=True), "POST",
                              V2, fixture("chat_v2_followup_request.json"), fixture("chat_v2_text_stream.sse"), [],
                              content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    chunks = of_type(events, "ai.streaming_chunk")
    assert "".join(data(c)["delta"].get("content", "") for c in chunks) == "It's 24°C in Toronto."


def test_embeddings_give_an_embedding_event(oisp_schema: SchemaValidator) -> None:
    v1 = run_exchange("POST", "https://api.cohere.ai/v1/embed", {"texts": ["hello", "goodbye"],
                                                                  "model": "embed-english-v3.0",
                                                                  "input_type": "search_document"},
                      request_headers=AUTH, response=fixture("embed_v1_response.json"), expect_plugin=PLUGIN)
    v2 = run_exchange("POST", "https://api.cohere.com/v2/embed", {"texts": ["hello", "goodbye", "again"],
                                                                   "model": "embed-v4.0",
                                                                   "embedding_types": ["float", "int8"]},
                      request_headers=AUTH, response=fixture("embed_v2_response.json"), expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, v1 + v2)
    for events, count, dimensions, model in ((v1, 2, 4, "embed-english-v3.0"), (v2, 3, 3, "embed-v4.0")):
        assert [e.event_type for e in events] == ["ai.request", "ai.embedding"]
        embedding = data(events[1])
        assert embedding["input_count"] == count and embedding["dimensions"] == dimensions
        assert embedding["model"] == {"id": model} and embedding["total_tokens"] == count


@pytest.mark.parametrize(("method", "url"), [
    ("GET", "https://api.cohere.com/v1/models"),
    ("POST", "https://api.cohere.com/v2/rerank"),
    ("POST", "https://api.cohere.com/v1/chat/completions"),
])
def test_other_endpoints_are_left_to_other_plugins(method: str, url: str) -> None:
    plugin, _ = claim(make_exchange(method, url, b"{}"))
    assert plugin != PLUGIN
