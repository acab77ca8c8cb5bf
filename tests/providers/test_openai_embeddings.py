"""Embeddings in the OpenAI dialect: input counting, float and base64 vectors, failures."""

from __future__ import annotations

import base64
import struct

import pytest
from tests.providers.fixtures.openai.replay import load, of_type, one, replay

from oisp.events import AiEmbedding, AiRequest, AiResponse
from oisp.providers.openai_embeddings import embedding_dimensions, embeddings_request_facts


def test_float_vectors_give_count_dimensions_and_tokens() -> None:
    events = replay(load("openai_embeddings_float"))
    assert [e.event_type for e in events] == ["ai.request", "ai.embedding"]
    request: AiRequest = events[0].data
    assert request.request_type == "embedding"
    assert [m.content for m in request.messages or []] == [
        "The food was delicious", "The waiter was friendly", "Too loud"]
    assert request.extra["input_count"] == 3
    assert request.parameters is not None and request.parameters.extra["dimensions"] == 8
    embedding: AiEmbedding = events[1].data
    assert embedding.input_count == 3 and embedding.dimensions == 8 and embedding.total_tokens == 14
    assert embedding.model is not None and embedding.model.id == "text-embedding-3-small"
    assert embedding.provider is not None and embedding.provider.name == "openai"
    assert embedding.latency_ms == 200 and embedding.extra["embedding_count"] == 3
    assert events[1].attrs is not None and events[1].attrs["oisp.request_id"] == request.request_id
    assert events[1].attrs["oisp.success"] is True
    assert events[1].related_events is not None and events[1].related_events[0].event_id == events[0].event_id


def test_base64_vectors_are_decoded_to_count_dimensions_and_token_arrays_count_as_inputs() -> None:
    events = replay(load("openai_embeddings_base64"))
    request: AiRequest = one(events, "ai.request").data
    assert request.extra["input_count"] == 2
    assert [m.extra["input_token_count"] for m in request.messages or []] == [4, 2]
    assert one(events, "ai.request").attrs["openai.encoding_format"] == "base64"
    embedding: AiEmbedding = one(events, "ai.embedding").data
    assert embedding.dimensions == 16 and embedding.extra["encoding_format"] == "base64"
    assert "8IVJPBHHOr1T" not in one(events, "ai.embedding").to_json()  # vectors are never copied


def test_a_failed_embedding_call_is_an_ai_response_with_the_error() -> None:
    events = replay(load("openai_embeddings_error"))
    assert not of_type(events, "ai.embedding")
    data: AiResponse = one(events, "ai.response").data
    assert data.success is False and data.status_code == 400
    assert data.error is not None and data.error.type == "invalid_request_error"
    assert data.error.message is not None and "maximum context length" in data.error.message


@pytest.mark.parametrize(("value", "count"), [
    ("one text", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3]], 2), ([], 0), (None, 0), (42, 0),
])
def test_inputs_are_counted_as_the_api_defines_them(value: object, count: int) -> None:
    assert embeddings_request_facts({"model": "m", "input": value}).extra["input_count"] == count


def test_dimensions_of_float_and_base64_vectors() -> None:
    packed = base64.b64encode(struct.pack("<3f", 0.1, 0.2, 0.3)).decode()
    assert embedding_dimensions([0.1] * 1536) == 1536
    assert embedding_dimensions(packed) == 3
    assert embedding_dimensions("not base64!") is None
    assert embedding_dimensions(base64.b64encode(b"abc").decode()) is None  # not whole float32 values
    assert embedding_dimensions(None) is None
