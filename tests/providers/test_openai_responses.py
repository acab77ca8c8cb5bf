"""The OpenAI Responses API: input items, instructions, typed stream events, function calls by call_id."""

from __future__ import annotations

from attrs import evolve
from tests.providers.fixtures.openai.replay import load, of_type, one, replay

from oisp.events import AiRequest, AiResponse
from oisp.provider_kit import ToolCallRegistry
from oisp.redaction import sha256_text


def test_string_input_instructions_reasoning_and_usage_details() -> None:
    events = replay(load("openai_responses_basic"))
    request: AiRequest = one(events, "ai.request").data
    assert request.request_type == "chat" and request.model is not None and request.model.id == "o4-mini"
    assert [(m.role, m.content) for m in request.messages or []] == [("user", "Is 221 prime?")]
    assert request.has_system_prompt is True and request.extra["system_prompt"] == "You are a terse math tutor."
    assert request.system_prompt_hash == sha256_text("You are a terse math tutor.")
    assert request.parameters is not None and request.parameters.max_tokens == 2000
    assert request.parameters.extra["reasoning_effort"] == "low" and request.parameters.extra["store"] is False
    assert one(events, "ai.request").attrs["openai.previous_response_id"].startswith("resp_67ccd2be")
    data: AiResponse = one(events, "ai.response").data
    assert data.provider_request_id == "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41"
    assert data.model is not None and data.model.id == "o4-mini-2025-04-16"
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "No: 221 = 13 * 17."
    assert data.extra["thinking"] == "**Checking divisibility**\n\n221 = 13 * 17."
    assert data.finish_reason == "stop" and data.success is True
    assert data.usage is not None
    assert (data.usage.prompt_tokens, data.usage.completion_tokens, data.usage.total_tokens,
            data.usage.cached_tokens, data.usage.reasoning_tokens) == (1536, 220, 1756, 1024, 192)


def test_streamed_function_calls_are_output_items_with_call_ids() -> None:
    events = replay(load("openai_responses_stream_tools"))
    request: AiRequest = one(events, "ai.request").data
    assert request.streaming is True
    assert [t.name for t in request.tools or []] == ["read_file", "run_shell"]
    assert request.tool_choice == {"type": "function", "name": "read_file"}  # "specific" once conformed
    data: AiResponse = one(events, "ai.response").data
    assert data.model is not None and data.model.id == "gpt-4.1-2025-04-14"
    assert [(c.id, c.name, c.arguments) for c in data.tool_calls or []] == [
        ("call_R3adF1leAbCdEfGhIjKlMnOp", "read_file", '{"path":"config.yaml"}'),
        ("call_Sh3llQrStUvWxYzAbCdEfGh", "run_shell", '{"cmd":"ls /etc"}'),
    ]
    assert data.finish_reason == "tool_calls" and data.usage is not None and data.usage.total_tokens == 127
    calls = of_type(events, "agent.tool_call")
    assert [(c.data.tool.name, c.data.tool.type, c.data.arguments) for c in calls] == [
        ("read_file", "file_read", {"path": "config.yaml"}), ("run_shell", "shell", {"cmd": "ls /etc"})]


def test_a_stream_cut_before_completion_keeps_the_delta_arguments() -> None:
    case = load("openai_responses_stream_tools")
    cut = case.response_body.index(b"event: response.output_item.done")
    data: AiResponse = one(replay(evolve(case, response_body=case.response_body[:cut])), "ai.response").data
    assert data.tool_calls is not None and data.tool_calls[0].arguments == '{"path":"config.yaml"}'
    assert data.finish_reason is None  # never told


def test_function_call_outputs_in_the_next_request_are_tool_results_linked_by_call_id() -> None:
    registry = ToolCallRegistry()
    first = replay(load("openai_responses_stream_tools"), registry=registry, exchange_id=1)
    second = replay(load("openai_responses_tool_outputs"), registry=registry, exchange_id=2)
    calls = {e.data.call_id: e.event_id for e in of_type(first, "agent.tool_call")}
    results = of_type(second, "agent.tool_result")
    assert [(r.data.call_id, r.data.tool.name, r.data.result) for r in results] == [
        ("call_R3adF1leAbCdEfGhIjKlMnOp", "read_file", "port: 8080\nhost: 0.0.0.0\n"),
        ("call_Sh3llQrStUvWxYzAbCdEfGh", "run_shell", "hosts\npasswd\nresolv.conf\n"),
    ]
    assert [r.related_events[0].event_id for r in results if r.related_events] == list(calls.values())
    request: AiRequest = one(second, "ai.request").data
    roles = [m.role for m in request.messages or []]
    assert roles == ["user", "assistant", "assistant", "tool", "tool"]
    user = (request.messages or [])[0]
    assert user.content == "Read config.yaml and list /etc" and user.image_count == 1
    assert request.messages is not None and request.messages[3].tool_call_id == "call_R3adF1leAbCdEfGhIjKlMnOp"
    assert request.messages[1].extra["tool_calls"][0]["name"] == "read_file"
    assert request.extra["system_prompt"] == "Be brief."
    data: AiResponse = one(second, "ai.response").data
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "The server listens on 0.0.0.0:8080; /etc has 3 entries."
    assert data.usage is not None and data.usage.cached_tokens == 128 and data.finish_reason == "stop"


def test_response_failed_is_an_unsuccessful_response_with_the_error() -> None:
    data: AiResponse = one(replay(load("openai_responses_stream_failed")), "ai.response").data
    assert data.success is False and data.status_code == 200
    assert data.error is not None and data.error.code == "server_error"
    assert data.error.message == "The model failed to generate a response."
    assert data.finish_reason == "error" and data.extra["status"] == "failed"


def test_error_event_in_a_200_stream() -> None:
    data: AiResponse = one(replay(load("openai_responses_stream_error")), "ai.response").data
    assert data.success is False
    assert data.error is not None and data.error.code == "rate_limit_exceeded"
    assert data.error.message is not None and data.error.message.startswith("Rate limit reached")


def test_incomplete_response_is_stopped_by_length() -> None:
    events = replay(load("openai_responses_incomplete"))
    request: AiRequest = one(events, "ai.request").data
    assert [m.role for m in request.messages or []] == ["developer", "user"]
    assert request.extra["system_prompt"] == "Count slowly."
    assert request.parameters is not None and request.parameters.max_tokens == 16
    data: AiResponse = one(events, "ai.response").data
    assert data.success is True and data.finish_reason == "length"
    assert data.extra["incomplete_reason"] == "max_output_tokens"
    assert data.choices is not None and data.choices[0].message is not None
    assert data.choices[0].message.content == "1, 2, 3, 4, 5, 6, 7,"


def test_hosted_tools_are_listed_and_custom_tool_calls_are_agent_tool_calls() -> None:
    events = replay(load("openai_responses_hosted_tools"))
    request: AiRequest = one(events, "ai.request").data
    tools = {t.name: t for t in request.tools or []}
    assert tools["web_search_preview"].type == "other" and tools["web_search_preview"].extra["tool_type"] == (
        "web_search_preview")
    assert tools["file_search"].type == "file_search"
    assert tools["deepwiki"].extra["tool_type"] == "mcp"
    assert tools["save_note"].type == "function" and tools["computer_use_preview"].type == "computer_use"
    data: AiResponse = one(events, "ai.response").data
    assert data.extra["hosted_tool_calls"] == [{"type": "web_search_call", "id": "ws_h01", "status": "completed",
                                                "action": {"type": "search", "query": "top news today"}}]
    assert data.tool_calls is not None and data.tool_calls[0].name == "save_note"
    call = one(events, "agent.tool_call").data
    assert call.call_id == "call_S4veN0teXyZ" and call.arguments == {"input": "Top story: markets rally."}
    assert data.usage is not None and data.usage.reasoning_tokens == 32
