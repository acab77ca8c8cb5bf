"""The Anthropic provider: Messages API requests and responses (whole, streamed, failed, cut short), tool calls
and their results across exchanges, token counting and the legacy Text Completions API."""

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
from oisp.providers.anthropic import MessagesDecoder

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
URL = "https://api.anthropic.com/v1/messages"
KEY = "sk-ant-api03-" + "Q" * 40
HEADERS = [("x-api-key", KEY), ("anthropic-version", "2023-06-01"),
           ("anthropic-beta", "interleaved-thinking-2025-05-14, token-efficient-tools-2025-02-19"),
           ("content-type", "application/json")]
SSE = "text/event-stream"
PLUGIN = "oisp.providers.anthropic"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def body(name: str) -> dict[str, Any]:
    value = json.loads(fixture(name))
    assert isinstance(value, dict)
    return value


def streamed_turn(**overrides: Any) -> list[Any]:
    return run_exchange("POST", URL, fixture("messages_tools_request.json"), request_headers=HEADERS,
                        response=fixture("messages_tools_stream.sse"), content_type=SSE,
                        response_headers=[("request-id", "req_011CStreamTurn")], expect_plugin=PLUGIN,
                        **overrides)


def test_streamed_tool_use_turn_gives_request_response_and_tool_calls(oisp_schema: SchemaValidator) -> None:
    events = streamed_turn()
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response", "agent.tool_call", "agent.tool_call"]

    request = data(events[0])
    assert request["provider"] == {"name": "anthropic", "endpoint": URL}
    assert request["model"] == {"id": "claude-sonnet-4-5"}
    assert request["request_type"] == "chat" and request["streaming"] is True
    assert request["auth"]["type"] == "api_key" and request["auth"]["key_prefix"] == "sk-ant-"
    assert request["system_prompt"] == "You are a release assistant.\nAnswer briefly."
    assert request["has_system_prompt"] is True and request["system_prompt_hash"].startswith("sha256:")
    assert request["messages_count"] == 1
    [user] = request["messages"]
    assert user["role"] == "user" and user["content"] == "Read CHANGELOG.md and tell me the weather in Lyon."
    png = base64.b64decode(body("messages_tools_request.json")["messages"][0]["content"][0]["source"]["data"])
    assert user["has_images"] is True and user["image_count"] == 1
    assert user["image_hashes"] == ["sha256:" + hashlib.sha256(png).hexdigest()]
    assert request["has_images"] is True and request["image_count"] == 1
    assert [(t["name"], t["type"], t.get("tool_type")) for t in request["tools"]] == [
        ("read_file", "function", None), ("get_weather", "function", None), ("bash", "other", "bash_20250124"),
        ("web_search", "other", "web_search_20250305")]
    assert request["tools"][0]["parameters_hash"].startswith("sha256:")
    assert request["tools_count"] == 4 and request["tool_choice"] == "required"
    parameters = request["parameters"]
    assert parameters["temperature"] == 1 and parameters["max_tokens"] == 2048 and parameters["stop"] == ["</done>"]
    assert parameters["top_k"] == 40 and parameters["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert parameters["user"] == "sha256:" + hashlib.sha256(b"user-8817").hexdigest()
    assert events[0].attrs is not None
    assert events[0].attrs["anthropic.version"] == "2023-06-01"
    assert events[0].attrs["anthropic.beta"] == ["interleaved-thinking-2025-05-14", "token-efficient-tools-2025-02-19"]

    response = data(events[1])
    assert response["request_id"] == request["request_id"]
    assert response["provider_request_id"] == "req_011CStreamTurn"
    assert response["message_id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert response["model"] == {"id": "claude-sonnet-4-5-20250929"}
    assert response["success"] is True and response["status_code"] == 200
    assert response["choices"][0]["message"] == {
        "role": "assistant", "content": "I'll look at both at once — ☀️?", "content_length": 31,
        "content_hash": "sha256:" + hashlib.sha256("I'll look at both at once — ☀️?".encode()).hexdigest()}
    assert response["thinking"] == "The user wants two things: the changelog and the weather."
    assert response["thinking_signed"] is True
    assert response["finish_reason"] == "tool_calls" and response["choices"][0]["finish_reason"] == "tool_calls"
    assert response["usage"] == {"prompt_tokens": 472 + 128 + 2048, "completion_tokens": 89,
                                 "total_tokens": 472 + 128 + 2048 + 89, "cached_tokens": 2048,
                                 "cache_creation_tokens": 128}
    assert [(c["id"], c["name"], c["arguments"]) for c in response["tool_calls"]] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "read_file", {"path": "CHANGELOG.md"}),
        ("toolu_01A09q90qw90lq917835lq9", "get_weather", {"city": "Lyon"})]
    assert response["latency_ms"] is not None and response["time_to_first_token_ms"] is not None
    assert events[1].confidence.completeness == "full"
    assert events[1].related_events is not None and events[1].related_events[0].event_id == events[0].event_id

    read, weather = (data(e) for e in events[2:])
    assert read["call_id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6" and read["tool"]["type"] == "file_read"
    assert read["arguments"] == {"path": "CHANGELOG.md"}
    assert weather["arguments"] == {"city": "Lyon"}
    for call in events[2:]:
        assert call.related_events is not None and call.related_events[0].event_id == events[1].event_id
    everything = "".join(e.to_json() for e in events)
    assert KEY not in everything and "Q" * 40 not in everything
    assert "iVBORw0KGgo" not in everything  # the image is hashed, never kept


def test_tool_results_of_a_later_request_are_linked_to_the_tool_calls(oisp_schema: SchemaValidator) -> None:
    first = streamed_turn()
    calls = {data(e)["call_id"]: e for e in of_type(first, "agent.tool_call")}
    second = run_exchange("POST", URL, fixture("messages_followup_request.json"), request_headers=HEADERS,
                          response=fixture("messages_response.json"), expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, second)
    assert [e.event_type for e in second] == ["ai.request", "agent.tool_result", "agent.tool_result",
                                              "ai.response"]
    failed, weather = (data(e) for e in of_type(second, "agent.tool_result"))
    assert failed["call_id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6" and failed["success"] is False
    assert failed["result"] == "ENOENT: no such file" and failed["tool"] == {"name": "read_file", "type": "file_read"}
    assert weather["call_id"] == "toolu_01A09q90qw90lq917835lq9" and "success" not in weather
    assert weather["result"] == {"temp_c": 14, "sky": "overcast"}
    for result in of_type(second, "agent.tool_result"):
        call = calls[data(result)["call_id"]]
        assert result.related_events is not None
        assert [(r.event_id, r.relationship) for r in result.related_events] == [(call.event_id, "parent")]

    request = data(second[0])
    assert request["system_prompt"] == "You are a release assistant." and request["has_system_prompt"] is True
    assert request["streaming"] is False
    assert request["tool_choice"] == "specific"  # {"type": "tool", "name": ...}, kept as the original
    assert second[0].attrs is not None
    assert second[0].attrs["oisp.original"]["data.tool_choice"] == {"type": "tool", "name": "get_weather"}
    user, assistant, results = request["messages"]
    assert user == {"role": "user", "content": "Read CHANGELOG.md and tell me the weather in Lyon.",
                    "content_length": 50, "content_hash": user["content_hash"]}
    assert assistant["role"] == "assistant" and assistant["content"] == "I'll look at both at once — ☀️?"
    assert assistant["tool_calls"] == [{"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "read_file"},
                                       {"id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather"}]
    assert results["role"] == "user"
    assert results["tool_results"] == ["toolu_01T1x1fJ34qAmk2tNTrN7Up6", "toolu_01A09q90qw90lq917835lq9"]
    assert results["content"] == 'ENOENT: no such file\n{"temp_c": 14, "sky": "overcast"}\nGo on.'

    response = data(one(second, "ai.response"))
    assert response["finish_reason"] == "stop" and response["success"] is True
    assert response["choices"][0]["message"]["content"] == "There is no CHANGELOG.md. Lyon: 14°C, overcast."
    assert response["provider_request_id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"  # no request-id header here
    assert response["usage"] == {"prompt_tokens": 1210, "completion_tokens": 21, "total_tokens": 1231,
                                 "cached_tokens": 0, "cache_creation_tokens": 0}
    assert one(second, "ai.response").attrs["anthropic.service_tier"] == "standard"  # type: ignore[index]

    # The client resends the whole conversation with its next request: the results are not reported again.
    third = run_exchange("POST", URL, fixture("messages_followup_request.json"), request_headers=HEADERS,
                         response=fixture("messages_response.json"))
    assert of_type(third, "agent.tool_result") == []


def test_server_tools_redacted_thinking_and_client_tools_in_a_whole_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", URL, {"model": "claude-opus-4-1", "max_tokens": 100,
                                        "messages": [{"role": "user", "content": "test it"}]},
                          request_headers=HEADERS, response=fixture("messages_tool_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["thinking"] == "I should search first."
    assert response["redacted_thinking_blocks"] == 1
    assert response["server_tool_uses"] == [{"id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB", "name": "web_search"}]
    assert response["choices"][0]["message"]["content"] == "Running the tests now."
    assert [c["name"] for c in response["tool_calls"]] == ["bash"]  # the server's web search is not the agent's
    assert response["finish_reason"] == "tool_calls"
    assert response["usage"] == {"prompt_tokens": 30, "completion_tokens": 50, "total_tokens": 80}
    assert one(events, "ai.response").attrs["anthropic.server_tool_use.web_search_requests"] == 1  # type: ignore[index]
    call = data(one(events, "agent.tool_call"))
    assert call["tool"] == {"name": "bash", "type": "shell", "provider": "native"}
    assert call["arguments"] == {"command": "pytest -q"}


def test_an_error_event_inside_a_200_stream_fails_the_response(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", URL, {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]},
                          request_headers=HEADERS, response=fixture("error_stream.sse"), content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["status_code"] == 200 and response["success"] is False
    assert response["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert response["choices"][0]["message"]["content"] == "Hello"  # what came before the error is kept
    assert response["usage"]["prompt_tokens"] == 12


def test_a_failed_request_reports_the_error_and_anthropic_request_id(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", URL, {"model": "claude-sonnet-4-5", "messages": []}, request_headers=HEADERS,
                          status=400, response=fixture("error_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 400
    assert response["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert response["provider_request_id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"


def test_mcp_servers_are_named_without_their_tokens(oisp_schema: SchemaValidator) -> None:
    request = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
               "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
               "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "tickets",
                                "authorization_token": "mcp-secret-" + "m" * 30}]}
    events = run_exchange("POST", URL, request, request_headers=[*HEADERS, ("anthropic-beta", "mcp-client-2025-04-04")],
                          response=fixture("messages_response.json"))
    assert_schema_valid(oisp_schema, events)
    facts = data(events[0])
    assert facts["tool_choice"] == "auto"
    assert facts["parameters"]["parallel_tool_calls"] is False and facts["parameters"]["mcp_servers"] == ["tickets"]
    assert events[0].attrs is not None and "mcp-client-2025-04-04" in events[0].attrs["anthropic.beta"]
    assert "m" * 30 not in "".join(e.to_json() for e in events)


@pytest.mark.parametrize(("stop_reason", "expected"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "other"), ("model_context_window_exceeded", "length"),
])
def test_stop_reasons_are_normalized(stop_reason: str, expected: str, oisp_schema: SchemaValidator) -> None:
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
              "content": [{"type": "text", "text": "ok"}], "stop_reason": stop_reason,
              "usage": {"input_tokens": 3, "output_tokens": 1}}
    events = run_exchange("POST", URL, {"model": "claude-haiku-4-5", "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "hi"}]}, response=answer)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["finish_reason"] == expected
    if expected == "other":
        assert response["choices"][0]["finish_reason_raw"] == stop_reason


def test_a_stream_cut_short_gives_partial_events_with_what_arrived(oisp_schema: SchemaValidator) -> None:
    stream = fixture("messages_tools_stream.sse")
    cut = stream.index(b'LOG.md')  # in the middle of the first tool's arguments
    exchange = make_exchange("POST", URL, fixture("messages_tools_request.json"), headers=HEADERS)
    _, decoder = claim(exchange)
    events = list(decoder.on_request(exchange))
    exchange.mark_partial("connection reset by peer")
    events += respond(exchange, decoder, 200, [stream[:cut]], content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = one(events, "ai.response")
    assert response.confidence.completeness == "partial"
    assert response.confidence.limitations is not None and "connection reset by peer" in response.confidence.limitations
    body_ = data(response)
    assert body_["success"] is False and body_["error"]["type"] == "incomplete"
    assert body_["choices"][0]["message"]["content"] == "I'll look at both at once — ☀️?"
    assert body_["tool_calls"] == [{"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "read_file",
                                    "type": "function", "arguments": '{"path": "CHANGE',
                                    "arguments_hash": body_["tool_calls"][0]["arguments_hash"]}]
    call = data(one(events, "agent.tool_call"))
    assert call["arguments"] == {"_raw": '{"path": "CHANGE'}
    assert one(events, "agent.tool_call").confidence.completeness == "partial"


def test_a_stream_that_ends_before_message_stop_is_partial(oisp_schema: SchemaValidator) -> None:
    stream = fixture("messages_tools_stream.sse")
    events = run_exchange("POST", URL, fixture("messages_tools_request.json"), request_headers=HEADERS,
                          response=stream[: stream.index(b"event: message_delta")], content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    response = one(events, "ai.response")
    assert response.confidence.completeness == "partial"
    assert response.confidence.limitations == ["stream ended before message_stop"]
    assert "finish_reason" not in data(response)


def test_unreadable_stream_events_are_noted_not_fatal(oisp_schema: SchemaValidator) -> None:
    stream = (b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x","usage":'
              b'{"input_tokens":1}}}\n\nevent: content_block_delta\ndata: {not json\n\n'
              b'event: content_block_delta\ndata: {"type":"content_block_delta","index":"zero"}\n\n'
              b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    events = run_exchange("POST", URL, b"{not json either", response=stream, content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    request, response = one(events, "ai.request"), one(events, "ai.response")
    assert request.confidence.completeness == "partial"
    assert response.confidence.completeness == "partial"
    assert data(response)["model"] == {"id": "claude-x"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=chunkings(fixture("messages_tools_stream.sse")))
def test_any_split_of_the_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream = fixture("messages_tools_stream.sse")
    request = fixture("messages_tools_request.json")

    def decode(cuts: list[int]) -> list[Any]:
        return normalized(decode_in_chunks(lambda: MessagesDecoder(registry=ToolCallRegistry()), "POST", URL,
                                           request, stream, cuts, content_type=SSE, request_headers=HEADERS))

    assert decode(cuts) == decode([])


def test_every_single_byte_split_gives_the_same_events() -> None:
    stream = fixture("messages_tools_stream.sse")
    request = fixture("messages_tools_request.json")

    def decode(cuts: Any) -> list[Any]:
        return normalized(decode_in_chunks(lambda: MessagesDecoder(registry=ToolCallRegistry()), "POST", URL,
                                           request, stream, list(cuts), content_type=SSE))

    assert decode(range(1, len(stream))) == decode([])


def test_streaming_chunk_events_when_asked_for(oisp_schema: SchemaValidator) -> None:
    events = decode_in_chunks(lambda: MessagesDecoder(registry=ToolCallRegistry(), streaming_chunks=True), "POST",
                              URL, fixture("messages_tools_request.json"), fixture("messages_tools_stream.sse"),
                              [], content_type=SSE)
    assert_schema_valid(oisp_schema, events)
    chunks = of_type(events, "ai.streaming_chunk")
    assert "".join(data(c)["delta"].get("content", "") for c in chunks) == "I'll look at both at once — ☀️?"
    assert data(chunks[-1])["finish_reason"] == "tool_calls"


def test_count_tokens_is_an_other_request_that_reports_no_tool_results(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", URL + "/count_tokens", fixture("count_tokens_request.json"),
                          request_headers=HEADERS, response={"input_tokens": 2095}, expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    assert [e.event_type for e in events] == ["ai.request", "ai.response"]
    request = data(events[0])
    assert request["request_type"] == "other" and request["messages_count"] == 3
    assert events[0].attrs is not None and events[0].attrs["anthropic.operation"] == "count_tokens"
    response = data(events[1])
    assert response["counted_input_tokens"] == 2095 and "usage" not in response


def test_legacy_text_completion_stream(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", "https://api.anthropic.com/v1/complete", fixture("complete_request.json"),
                          request_headers=HEADERS, response=fixture("complete_stream.sse"), content_type=SSE,
                          expect_plugin=PLUGIN)
    assert_schema_valid(oisp_schema, events)
    request, response = (data(e) for e in events)
    assert request["request_type"] == "completion" and request["model"] == {"id": "claude-2.1"}
    assert request["messages"][0]["content"] == "\n\nHuman: Write a haiku about proxies\n\nAssistant:"
    assert request["parameters"] == {"temperature": 0.5, "max_tokens": 64}
    assert response["choices"][0]["message"]["content"] == " Bytes pass through"
    assert response["finish_reason"] == "stop" and response["success"] is True
    assert response["message_id"] == "compl_01JQ"
    assert events[1].confidence.completeness == "full"


@pytest.mark.parametrize(("method", "url"), [
    ("GET", "https://api.anthropic.com/v1/models"),
    ("POST", "https://api.anthropic.com/v1/messages/batches"),
    ("POST", "https://api.openai.com/v1/messages"),
])
def test_other_endpoints_are_left_to_other_plugins(method: str, url: str) -> None:
    plugin, _ = claim(make_exchange(method, url, b"{}"))
    assert plugin != PLUGIN
