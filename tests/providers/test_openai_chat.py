"""OpenAI Chat Completions and legacy completions: what the events say, transcript style."""

from __future__ import annotations

import json

from attrs import evolve
from tests.providers.fixtures.openai.replay import MS, T0, exchange_for, load, of_type, one, replay

from oisp.events import AgentToolCall, AgentToolResult, AiRequest, AiResponse
from oisp.events.spec_gaps import ORIGINAL_KEY, conform
from oisp.hookspecs import DecoderSettings
from oisp.http.exchange import Headers, HttpResponse
from oisp.provider_kit import DecoderContext, ToolCallRegistry
from oisp.providers.openai import oisp_exchange_decoder
from oisp.redaction import sha256_text


def test_request_facts_messages_images_tools_parameters_auth_and_organization() -> None:
    request = one(replay(load("openai_chat_vision_tools")), "ai.request")
    data: AiRequest = request.data
    assert data.provider is not None and data.provider.name == "openai"
    assert data.provider.organization_id == "org-9fJ2kLmNoPq3RsTuVwXyZ"
    assert data.provider.project_id == "proj_7hGfEdCbA6543210"
    assert data.model is not None and data.model.id == "gpt-4o"
    assert data.request_type == "chat" and data.streaming is False
    assert data.auth is not None and data.auth.type == "api_key" and data.auth.key_prefix == "sk-proj-"
    assert data.auth.key_hash == sha256_text("sk-proj-Abc123Def456Ghi789Jkl012Mno345Pqr678Stu901Vwx")
    assert [m.role for m in data.messages or []] == ["developer", "system", "user"]
    user = (data.messages or [])[2]
    assert user.content == "What is the weather like where this photo was taken?"
    assert user.has_images is True and user.image_count == 1
    assert user.extra["image_hashes"][0].startswith("sha256:")
    assert "iVBORw0KGgo" not in request.to_json()  # images are hashed, never copied
    assert data.has_images is True and data.image_count == 1
    assert data.has_system_prompt is True
    assert data.extra["system_prompt"] == "You are a weather assistant. Answer in one sentence.\nUnits: metric."
    assert data.system_prompt_hash == sha256_text(data.extra["system_prompt"])
    assert data.tools is not None and data.tools[0].name == "get_weather" and data.tools[0].type == "function"
    assert data.tools[0].description == "Current weather for a city"
    assert data.tools[0].extra["parameters_hash"].startswith("sha256:")
    assert data.tools_count == 1 and data.tool_choice == "auto"
    parameters = data.parameters
    assert parameters is not None
    assert (parameters.temperature, parameters.top_p, parameters.max_tokens) == (0.2, 0.9, 300)
    assert parameters.stop == ["\n\n"]
    assert parameters.extra["seed"] == 42 and parameters.extra["user"] == sha256_text("user-4711")
    # the developer role is outside the schema's enum: mapped to system, the original kept
    conformed = conform(request)
    assert conformed.data.messages[0].role == "system"  # type: ignore[attr-defined]
    assert conformed.attrs is not None and conformed.attrs[ORIGINAL_KEY]["data.messages[0].role"] == "developer"


def test_response_text_usage_with_cached_tokens_and_links() -> None:
    events = replay(load("openai_chat_vision_tools"))
    request, response = one(events, "ai.request"), one(events, "ai.response")
    data: AiResponse = response.data
    assert data.request_id == request.data.request_id
    assert response.related_events is not None and response.related_events[0].event_id == request.event_id
    assert data.provider_request_id == "chatcmpl-AzK8mN3pQ4rS5tU6vW7xY8zA9bC0d"
    assert data.model is not None and data.model.id == "gpt-4o-2024-08-06"
    assert data.success is True and data.status_code == 200 and data.error is None
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "It looks like Paris on a cloudy day, around 11°C."
    assert data.finish_reason == "stop"
    assert data.usage is not None
    assert (data.usage.prompt_tokens, data.usage.completion_tokens, data.usage.total_tokens,
            data.usage.cached_tokens, data.usage.reasoning_tokens) == (1290, 17, 1307, 1024, 0)
    assert data.latency_ms == 200 and data.time_to_first_token_ms == 120
    assert data.extra["system_fingerprint"] == "fp_50cad350e4"


def test_parallel_tool_calls_streamed_in_fragments_by_index_with_usage_trailer() -> None:
    events = replay(load("openai_chat_stream_parallel_tools"))
    request, response = one(events, "ai.request"), one(events, "ai.response")
    assert request.data.streaming is True and request.attrs["openai.include_usage"] is True
    assert request.data.tool_choice == "required"
    assert request.data.parameters.extra["parallel_tool_calls"] is True
    data: AiResponse = response.data
    assert data.finish_reason == "tool_calls" and data.tool_calls_count == 2
    calls = data.tool_calls or []
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_wX1yZ2aB3cD4eF5gH6iJ7kL8", "get_weather", '{"city": "Paris"}'),
        ("call_mN9oP0qR1sT2uV3wX4yZ5aB6", "get_local_time", '{"tz": "Europe/Paris"}'),
    ]
    assert calls[0].arguments_hash == sha256_text('{"city": "Paris"}')
    assert data.usage is not None and (data.usage.prompt_tokens, data.usage.completion_tokens) == (96, 44)
    tool_events = of_type(events, "agent.tool_call")
    assert [e.data.call_id for e in tool_events] == [c.id for c in calls]
    first: AgentToolCall = tool_events[0].data
    assert first.tool.name == "get_weather" and first.arguments == {"city": "Paris"}
    assert first.triggered_by == "llm_decision"
    assert tool_events[0].related_events is not None
    assert tool_events[0].related_events[0].event_id == response.event_id


def test_tool_results_in_a_later_request_are_linked_to_the_calls_and_reported_once() -> None:
    registry = ToolCallRegistry()
    first = replay(load("openai_chat_stream_parallel_tools"), registry=registry, exchange_id=1)
    second = replay(load("openai_chat_tool_results"), registry=registry, exchange_id=2)
    calls = {e.data.call_id: e for e in of_type(first, "agent.tool_call")}
    results = of_type(second, "agent.tool_result")
    assert len(results) == 2
    for result in results:
        data: AgentToolResult = result.data
        assert result.related_events is not None
        assert result.related_events[0].event_id == calls[data.call_id].event_id
        assert result.related_events[0].relationship == "parent"
    weather, clock = (r.data for r in results)
    assert weather.tool is not None and weather.tool.name == "get_weather"
    assert weather.result == {"temp_c": 11, "sky": "cloudy"}
    assert weather.result_size_bytes == len('{"temp_c": 11, "sky": "cloudy"}')
    assert clock.tool is not None and clock.tool.name == "get_local_time"
    assert clock.result == "14:05"  # content parts become their text
    request = one(second, "ai.request").data
    assistant = request.messages[2]
    assert assistant.role == "assistant" and [c["name"] for c in assistant.extra["tool_calls"]] == [
        "get_weather", "get_local_time"]
    assert request.messages[3].tool_call_id == "call_wX1yZ2aB3cD4eF5gH6iJ7kL8"
    # clients resend the whole conversation: the same results are not reported again
    third = replay(load("openai_chat_tool_results"), registry=registry, exchange_id=3)
    assert of_type(third, "agent.tool_result") == []


def test_tool_result_without_a_seen_call_is_still_reported_with_its_name_from_the_conversation() -> None:
    events = replay(load("openai_chat_tool_results"))
    results = of_type(events, "agent.tool_result")
    assert [r.data.tool.name for r in results] == ["get_weather", "get_local_time"]
    assert all(r.related_events is None for r in results)


def test_http_error_is_an_unsuccessful_response_with_the_providers_error() -> None:
    events = replay(load("openai_chat_error_401"))
    data: AiResponse = one(events, "ai.response").data
    assert data.success is False and data.status_code == 401
    assert data.error is not None and data.error.type == "invalid_request_error"
    assert data.error.code == "invalid_api_key" and data.error.message is not None
    assert "Incorrect API key" in data.error.message
    assert data.provider_request_id == "req_e1d2c3b4a5f60718293a4b5c6d7e8f90"  # from x-request-id
    assert not of_type(events, "agent.tool_call")


def test_legacy_function_call_is_a_tool_call_without_id() -> None:
    events = replay(load("openai_chat_legacy_functions"))
    request = one(events, "ai.request").data
    assert request.tools[0].name == "run_shell_command" and request.tool_choice == "auto"
    data: AiResponse = one(events, "ai.response").data
    assert data.finish_reason == "tool_calls"
    assert data.tool_calls is not None and data.tool_calls[0].name == "run_shell_command"
    call = one(events, "agent.tool_call").data
    assert call.arguments == {"command": "ls /tmp"} and call.tool.type == "shell" and call.call_id is None


def test_several_choices_stream_interleaved_each_with_its_finish_reason_and_refusal() -> None:
    data: AiResponse = one(replay(load("openai_chat_stream_two_choices")), "ai.response").data
    assert data.choices is not None and [c.index for c in data.choices] == [0, 1]
    assert data.choices[0].message is not None and data.choices[0].message.content == "Hello there, friend"
    assert data.choices[0].finish_reason == "length" and data.choices[1].finish_reason == "stop"
    assert data.finish_reason == "length"
    assert data.extra["refusal"] == {"1": "I can't help with that."}
    assert data.usage is not None and data.usage.total_tokens == 19


def test_time_to_first_token_is_the_chunk_that_brought_the_first_content() -> None:
    # Azure's first chunk only carries prompt filter results; the first token comes 300 ms later.
    case = load("azure_chat_stream")
    cuts = [case.response_body.index(b"\n\ndata:") + 2]  # the empty chunk alone, then the rest
    data = one(replay(case, cuts=cuts, chunk_times=lambda n: T0 + (50 if n == 0 else 350) * MS), "ai.response").data
    assert data.time_to_first_token_ms == 350
    whole = one(replay(load("openai_chat_vision_tools")), "ai.response").data
    assert whole.time_to_first_token_ms == 120  # not streamed: the first byte of the body


def test_a_stream_cut_short_is_partial_and_keeps_what_arrived() -> None:
    case = load("openai_chat_stream_parallel_tools")
    body = case.response_body
    cut = body.index(b"get_local_time")
    exchange = exchange_for(case)
    decoder = oisp_exchange_decoder(exchange, DecoderSettings(), DecoderContext())
    assert decoder is not None
    list(decoder.on_request(exchange))
    exchange.response = HttpResponse(200, "OK", "1.1", Headers([("content-type", "text/event-stream")]))
    list(decoder.on_response_data(exchange, body[:cut]))
    exchange.mark_partial("connection closed by upstream mid-body")
    events = list(decoder.on_end(exchange))
    data: AiResponse = one(events, "ai.response").data
    assert data.success is False and data.error is not None and data.error.type == "incomplete"
    response = one(events, "ai.response")
    assert response.confidence.completeness == "partial"
    assert any("mid-body" in reason for reason in response.confidence.limitations or [])
    assert any("incomplete" in reason for reason in response.confidence.limitations or [])  # the cut SSE event
    assert data.tool_calls is not None and data.tool_calls[0].id == "call_wX1yZ2aB3cD4eF5gH6iJ7kL8"


def test_invalid_json_bodies_are_reported_as_limitations_not_crashes() -> None:
    case = load("openai_chat_vision_tools")
    broken = evolve(case, request_body=b"{not json", response_body=b"<html>oops</html>")
    events = replay(broken)
    request, response = one(events, "ai.request"), one(events, "ai.response")
    assert request.confidence.completeness == "partial"
    assert response.confidence.limitations and "response body: invalid JSON" in response.confidence.limitations[0]
    assert response.data.provider is not None


def test_legacy_completions_prompts_are_messages_and_choices_are_text() -> None:
    events = replay(load("openai_completions_prompts"))
    request: AiRequest = one(events, "ai.request").data
    assert request.request_type == "completion"
    assert [m.content for m in request.messages or []] == ["Say this is a test", "Say that is a test"]
    assert request.extra["prompt_count"] == 2
    assert request.parameters is not None and request.parameters.stop == ["\n"]
    data: AiResponse = one(events, "ai.response").data
    assert [c.message.content for c in data.choices or [] if c.message] == ["\n\nThis is indeed a test",
                                                                           "\n\nThat is a test"]
    assert [c.finish_reason for c in data.choices or []] == ["length", "stop"]
    assert data.provider_request_id == "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7"


def test_legacy_completions_streamed_with_suffix_and_usage_trailer() -> None:
    events = replay(load("openai_completions_stream"))
    request: AiRequest = one(events, "ai.request").data
    assert request.streaming is True and request.messages is not None
    assert request.messages[0].content == "def fib(n):"
    assert request.messages[0].extra["suffix"] == "\n\nprint(fib(10))"
    data: AiResponse = one(events, "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == (
        "\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)")
    assert data.usage is not None and data.usage.total_tokens == 38 and data.finish_reason == "stop"


def test_arguments_that_are_not_json_are_kept_raw() -> None:
    case = load("openai_chat_legacy_functions")
    body = json.loads(case.response_body)
    body["choices"][0]["message"]["function_call"]["arguments"] = "ls -la"
    events = replay(evolve(case, response_body=json.dumps(body).encode()))
    assert one(events, "agent.tool_call").data.arguments == {"_raw": "ls -la"}
