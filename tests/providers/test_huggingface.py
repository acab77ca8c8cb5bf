"""Hugging Face's task inference API: text generation (whole and streamed), feature extraction, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.oisp_schema import SchemaValidator
from tests.providers.exchange_harness import (
    assert_schema_valid,
    claim,
    data,
    make_exchange,
    one,
    run_exchange,
    split_at,
)
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

from oisp.events.spec_gaps import conform
from oisp.providers.huggingface import task_path

FIXTURES = Path(__file__).parent / "fixtures" / "huggingface"
API = "https://api-inference.huggingface.co"
AUTH = [("authorization", "Bearer hf_" + "q" * 34)]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_text_generation(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/models/openai-community/gpt2", fixture("text_generation_request.json"),
                          response=fixture("text_generation_response.json"), request_headers=AUTH,
                          expect_plugin="oisp.providers.huggingface")
    assert_schema_valid(oisp_schema, events)
    request_event = one(events, "ai.request")
    request = data(request_event)
    assert request["provider"]["name"] == "huggingface"
    assert request["model"]["id"] == "openai-community/gpt2"
    assert request["request_type"] == "completion"
    assert request["messages"] == [{"role": "user", "content": "The answer to the universe is", "content_length": 29,
                                    "content_hash": request["messages"][0]["content_hash"]}]
    assert request["parameters"]["max_tokens"] == 20 and request["parameters"]["temperature"] == 0.7
    assert request["parameters"]["num_return_sequences"] == 2
    assert request["auth"]["key_prefix"] == "hf_"
    assert "q" * 34 not in request_event.to_json()
    response = data(one(events, "ai.response"))
    assert [c["message"]["content"] for c in response["choices"]] == [" 42, said the computer.", " unknown."]
    assert response["success"] is True


def test_streamed_text_generation(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/models/mistralai/Mistral-7B-Instruct-v0.3",
                          {"inputs": "The answer to the universe is", "stream": True},
                          response=fixture("text_generation_stream.sse"), content_type="text/event-stream")
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.request"))["streaming"] is True
    response = data(one(events, "ai.response"))
    assert response["choices"][0]["message"]["content"] == " 42, said the computer."
    assert response["finish_reason"] == "stop"
    assert response["usage"]["completion_tokens"] == 4


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_streamed_text_generation_is_the_same_at_any_split(draw: st.DataObject) -> None:
    body = fixture("text_generation_stream.sse")
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=30))
    events = run_exchange("POST", f"{API}/models/m/x", {"inputs": "x", "stream": True},
                          response=split_at(body, cuts), content_type="text/event-stream")
    assert data(one(events, "ai.response"))["choices"][0]["message"]["content"] == " 42, said the computer."


@pytest.mark.parametrize("url", [
    f"{API}/pipeline/feature-extraction/intfloat/multilingual-e5-large",
    f"{API}/models/sentence-transformers/all-MiniLM-L6-v2",
    "https://router.huggingface.co/hf-inference/models/BAAI/bge-small-en-v1.5",
])
def test_feature_extraction_is_an_embedding(oisp_schema: SchemaValidator, url: str) -> None:
    events = run_exchange("POST", url, fixture("feature_extraction_request.json"),
                          response=fixture("feature_extraction_response.json"))
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.request"))["request_type"] == "embedding"
    embedding = data(one(events, "ai.embedding"))
    assert embedding["input_count"] == 2 and embedding["dimensions"] == 5
    assert embedding["provider"]["name"] == "huggingface"


def test_summarization_text(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/pipeline/summarization/facebook/bart-large-cnn",
                          {"inputs": "The tower is 324 metres (1,063 ft) tall, about the same height as..."},
                          response=fixture("summarization_response.json"))
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.response"))["choices"][0]["message"]["content"] == "The tower is 324 metres tall."


def test_model_loading_error(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/models/mistralai/Mistral-7B-Instruct-v0.3", {"inputs": "hi"}, status=503,
                          response=fixture("model_loading_503.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 503
    assert response["error"]["type"] == "model_loading"
    assert response["error"]["message"] == "Model mistralai/Mistral-7B-Instruct-v0.3 is currently loading"


@pytest.mark.parametrize(("url", "mine"), [
    (f"{API}/models/gpt2", True),
    ("https://router.huggingface.co/hf-inference/models/gpt2", True),
    ("https://router.huggingface.co/v1/chat/completions", False),
    ("https://router.huggingface.co/hf-inference/models/m/x/v1/chat/completions", False),
    (f"{API}/models/m/x/v1/chat/completions", False),
    ("https://router.huggingface.co/together/v1/completions", False),
])
def test_claims_only_the_task_api(url: str, mine: bool) -> None:
    """The OpenAI-compatible routes belong to the OpenAI-dialect plugin (or, unclaimed, to metadata)."""
    assert (claim(make_exchange("POST", url, {"inputs": "x"}))[0] == "oisp.providers.huggingface") is mine


def test_task_path() -> None:
    assert task_path("/models/org/model") == (None, "org/model")
    assert task_path("/pipeline/feature-extraction/org/model") == ("feature-extraction", "org/model")
    assert task_path("/models/org/model/v1/chat/completions") is None
    assert task_path("/api/models") is None


# --- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def hf_upstream(request: Request) -> Response:
    if "feature-extraction" in request.target:
        return Response(body=fixture("feature_extraction_response.json"))
    return Response(body=fixture("text_generation_response.json"))


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=hf_upstream) as running:
        yield running


def test_httpx_through_the_proxy(stack: Stack, oisp_schema: SchemaValidator) -> None:
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), headers=dict(AUTH)) as client:
        generated = client.post(f"{API}/models/openai-community/gpt2", content=fixture("text_generation_request.json"))
        embedded = client.post(f"{API}/pipeline/feature-extraction/sentence-transformers/all-MiniLM-L6-v2",
                               json={"inputs": ["a", "b"]})
    assert generated.status_code == 200 and embedded.status_code == 200
    events = [conform(e) for e in stack.wait_for(
        lambda ev: {"ai.response", "ai.embedding"} <= {e.event_type for e in ev})]
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.response"))["choices"][0]["message"]["content"] == " 42, said the computer."
    assert data(one(events, "ai.embedding"))["dimensions"] == 5
