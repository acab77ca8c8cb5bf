"""Every OpenAI-dialect fixture, replayed: events validate against OISP v0.1, streamed bodies decode the same at any
split, and ``ai.streaming_chunk`` events appear only when switched on."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.framing.chunking import chunkings
from tests.oisp_schema import SchemaValidator
from tests.providers.fixtures.openai.replay import case_names, comparable, load, of_type, replay

from oisp.events import AiStreamingChunk
from oisp.hookspecs import DecoderSettings
from oisp.pipeline import Pipeline

CASES = case_names()
STREAMED = [name for name in CASES if load(name).raw["response"].get("body_file", "").endswith(".sse")]


def test_there_is_a_fixture_for_every_variant() -> None:
    prefixes = {name.split("_", 1)[0] for name in CASES}
    assert {"openai", "azure", "mistral", "groq", "together", "fireworks", "perplexity", "openrouter", "deepseek",
            "xai", "huggingface", "lmstudio", "ollama"} <= prefixes
    assert len(STREAMED) >= 15


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunks", [False, True], ids=["plain", "with_chunks"])
def test_every_event_of_every_fixture_validates_after_the_pipeline(name: str, chunks: bool,
                                                                   oisp_schema: SchemaValidator) -> None:
    pipeline = Pipeline({})
    events = replay(load(name), settings=DecoderSettings(streaming_chunks=chunks))
    assert [e.event_type for e in events][:1] == ["ai.request"]
    assert any(e.event_type in ("ai.response", "ai.embedding") for e in events)
    for event in events:
        oisp_schema.assert_valid(pipeline.process(event).to_dict())


@pytest.mark.parametrize("name", STREAMED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_streamed_body_gives_the_same_events_however_it_is_split(name: str, data: st.DataObject) -> None:
    case = load(name)
    whole = comparable(replay(case))
    cuts = data.draw(chunkings(case.response_body))
    assert comparable(replay(case, cuts=cuts)) == whole


@pytest.mark.parametrize("name", ["openai_chat_stream_parallel_tools", "openai_responses_stream_tools",
                                  "perplexity_chat_stream", "openrouter_chat_stream"])
def test_a_streamed_body_fed_byte_by_byte_gives_the_same_events(name: str) -> None:
    case = load(name)
    assert comparable(replay(case, cuts=range(1, len(case.response_body)))) == comparable(replay(case))


@pytest.mark.parametrize("name", STREAMED)
def test_streaming_chunk_events_are_off_by_default_and_add_nothing_else_when_on(name: str) -> None:
    case = load(name)
    plain = replay(case)
    with_chunks = replay(case, settings=DecoderSettings(streaming_chunks=True))
    assert not of_type(plain, "ai.streaming_chunk")
    chunk_events = of_type(with_chunks, "ai.streaming_chunk")
    others = [e for e in with_chunks if e.event_type != "ai.streaming_chunk"]
    assert comparable(others) == comparable(plain)
    request_id = plain[0].data.request_id  # type: ignore[attr-defined]
    for chunk in chunk_events:
        assert isinstance(chunk.data, AiStreamingChunk)
        assert chunk.data.request_id == request_id
    indexes = [c.data.chunk_index for c in chunk_events]  # type: ignore[attr-defined]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)


def test_streaming_chunks_carry_the_text_and_tool_call_fragments_in_order() -> None:
    events = replay(load("openai_chat_stream_parallel_tools"), settings=DecoderSettings(streaming_chunks=True))
    deltas = [c.data.delta for c in of_type(events, "ai.streaming_chunk")]  # type: ignore[attr-defined]
    fragments: dict[str, str] = {}
    for delta in deltas:
        for call in delta.tool_calls or []:
            fragments[call.id] = fragments.get(call.id, "") + (call.arguments or "")
    assert fragments == {"call_wX1yZ2aB3cD4eF5gH6iJ7kL8": '{"city": "Paris"}',
                         "call_mN9oP0qR1sT2uV3wX4yZ5aB6": '{"tz": "Europe/Paris"}'}
    last = of_type(events, "ai.streaming_chunk")[-1]
    assert last.data.finish_reason == "tool_calls"  # type: ignore[attr-defined]
    text = replay(load("openai_responses_tool_outputs"), settings=DecoderSettings(streaming_chunks=True))
    assert "".join(c.data.delta.content or "" for c in of_type(text, "ai.streaming_chunk")) == (  # type: ignore[attr-defined]
        "The server listens on 0.0.0.0:8080; /etc has 3 entries.")
