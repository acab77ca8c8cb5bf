"""Per-run state: two event decoders in one process share no tool calls and no Replicate predictions."""

from __future__ import annotations

import json
from pathlib import Path

from tests.providers.exchange_harness import data, make_exchange, of_type, respond

from oisp.event_decoder import EventDecoder
from oisp.events import Event
from oisp.plugins import create_plugin_manager
from oisp.provider_kit import DecoderContext
from oisp.providers.replicate import predictions

FIXTURES = Path(__file__).parent / "fixtures"
ANTHROPIC = "https://api.anthropic.com/v1/messages"
HEADERS = [("x-api-key", "sk-ant-api03-" + "x" * 40), ("anthropic-version", "2023-06-01")]
PLUGINS = create_plugin_manager(entrypoints=False)


def exchange_through(run: EventDecoder, url: str, request: bytes, response: bytes, content_type: str,
                     *, status: int = 200) -> list[Event]:
    exchange = make_exchange("POST" if request else "GET", url, request or None, headers=HEADERS)
    _, decoder = run.decoder_for(exchange)
    return list(decoder.on_request(exchange)) + respond(exchange, decoder, status, [response],
                                                        content_type=content_type)


def tool_turn(run: EventDecoder) -> list[Event]:
    anthropic = FIXTURES / "anthropic"
    return exchange_through(run, ANTHROPIC, (anthropic / "messages_tools_request.json").read_bytes(),
                            (anthropic / "messages_tools_stream.sse").read_bytes(), "text/event-stream")


def followup(run: EventDecoder) -> list[Event]:
    anthropic = FIXTURES / "anthropic"
    return exchange_through(run, ANTHROPIC, (anthropic / "messages_followup_request.json").read_bytes(),
                            (anthropic / "messages_response.json").read_bytes(), "application/json")


def test_each_event_decoder_has_a_context_of_its_own() -> None:
    first, second = EventDecoder(PLUGINS, lambda e: None), EventDecoder(PLUGINS, lambda e: None)
    assert first.context is not second.context
    assert first.context.tool_calls is not second.context.tool_calls
    shared = DecoderContext()
    assert EventDecoder(PLUGINS, lambda e: None, context=shared).context is shared


def test_tool_calls_of_one_run_are_not_linked_from_another() -> None:
    run_a, run_b = EventDecoder(PLUGINS, lambda e: None), EventDecoder(PLUGINS, lambda e: None)
    calls = {data(e)["call_id"]: e.event_id for e in of_type(tool_turn(run_a), "agent.tool_call")}
    assert calls

    in_b = of_type(followup(run_b), "agent.tool_result")
    assert in_b and all(e.related_events is None for e in in_b)  # run B never saw the calls

    in_a = of_type(followup(run_a), "agent.tool_result")
    linked = {data(e)["call_id"]: e.related_events[0].event_id for e in in_a if e.related_events}
    assert linked and all(calls[call_id] == event_id for call_id, event_id in linked.items())
    # reported once per run: run B reports its own copy, run A's second copy is not reported again
    assert of_type(followup(run_a), "agent.tool_result") == []
    assert of_type(followup(run_b), "agent.tool_result") == []


def test_a_replicate_prediction_is_known_only_to_the_run_that_saw_it_created() -> None:
    replicate = FIXTURES / "replicate"
    run_a, run_b = EventDecoder(PLUGINS, lambda e: None), EventDecoder(PLUGINS, lambda e: None)
    created = exchange_through(run_a, "https://api.replicate.com/v1/models/meta/meta-llama-3-70b-instruct/predictions",
                               (replicate / "create_request.json").read_bytes(),
                               (replicate / "create_response_starting.json").read_bytes(), "application/json",
                               status=201)
    prediction = json.loads((replicate / "create_response_starting.json").read_bytes())["id"]
    assert predictions(run_a.context).get(prediction) is not None
    assert predictions(run_b.context).get(prediction) is None
    request_id = data(of_type(created, "ai.request")[0])["request_id"]

    poll = f"https://api.replicate.com/v1/predictions/{prediction}"
    done = (replicate / "poll_succeeded.json").read_bytes()
    in_b = of_type(exchange_through(run_b, poll, b"", done, "application/json"), "ai.response")
    in_a = of_type(exchange_through(run_a, poll, b"", done, "application/json"), "ai.response")
    assert [data(e)["request_id"] for e in in_a] == [request_id]  # run A links the outcome to its creation
    assert len(in_b) == 1 and data(in_b[0])["request_id"] != request_id  # run B reports the poll on its own
