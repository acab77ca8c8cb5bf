"""Replicate predictions: the create call's ai.request, and one ai.response from whichever later exchange (sync
answer, poll, cancel, SSE stream) first shows the prediction finished, linked back to the create call."""

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
from oisp.providers import replicate
from oisp.providers.replicate import PredictionTable

FIXTURES = Path(__file__).parent / "fixtures" / "replicate"
API = "https://api.replicate.com"
LLAMA = "/v1/models/meta/meta-llama-3-70b-instruct/predictions"
PREDICTION = "gm3qorzdhgbfurvjtvhg6dckhu"
AUTH = [("authorization", "Bearer r8_" + "Z" * 37)]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def table(decoder_run: DecoderContext) -> PredictionTable:
    return replicate.predictions(decoder_run)


def create_llama() -> list[Any]:
    return run_exchange("POST", API + LLAMA, fixture("create_request.json"), status=201,
                        response=fixture("create_response_starting.json"), request_headers=AUTH,
                        expect_plugin="oisp.providers.replicate")


def test_async_prediction_is_answered_by_the_poll_that_sees_it_finish(oisp_schema: SchemaValidator) -> None:
    created = create_llama()
    assert_schema_valid(oisp_schema, created)
    assert [e.event_type for e in created] == ["ai.request"]  # still starting: no answer yet
    request_event = created[0]
    request = data(request_event)
    assert request["provider"]["name"] == "replicate"
    assert request["model"]["id"] == "meta/meta-llama-3-70b-instruct"
    assert request["request_type"] == "completion"
    assert request["streaming"] is True
    assert request["auth"]["key_prefix"] == "r8_" and request["auth"]["type"] == "api_key"
    assert [(m["role"], m["content"]) for m in request["messages"]] == [
        ("system", "You are a poet."), ("user", "Write a haiku about llamas.")]
    assert request["messages"][1]["image_count"] == 1
    assert request["parameters"]["max_tokens"] == 256 and request["parameters"]["temperature"] == 0.6
    assert request["parameters"]["stop"] == ["<|end_of_text|>", "<|eot_id|>"]
    assert request["parameters"]["top_k"] == 50
    assert "Z" * 37 not in request_event.to_json()

    poll = f"{API}/v1/predictions/{PREDICTION}"
    assert run_exchange("GET", poll, status=200, response=fixture("poll_processing.json")) == []
    finished = run_exchange("GET", poll, status=200, response=fixture("poll_succeeded.json"))
    assert_schema_valid(oisp_schema, finished)
    response_event = one(finished, "ai.response")
    response = data(response_event)
    assert response["request_id"] == request["request_id"]
    assert response_event.related_events and response_event.related_events[0].event_id == request_event.event_id
    assert response_event.related_events[0].relationship == "caused_by"
    assert response["provider_request_id"] == PREDICTION
    assert response["model"]["id"] == "meta/meta-llama-3-70b-instruct"
    assert response["success"] is True and response["finish_reason"] == "stop"
    assert response["choices"][0]["message"]["content"] == "Soft wool on high hills"
    assert response["usage"] == {"prompt_tokens": 22, "completion_tokens": 5, "total_tokens": 27}
    assert response["latency_ms"] == 1750 and response["time_to_first_token_ms"] == 125
    assert response_event.attrs is not None
    assert response_event.attrs["replicate.predict_time_ms"] == 1500
    assert response_event.attrs["replicate.status"] == "succeeded"
    # polling again after the end tells nothing new
    assert run_exchange("GET", poll, status=200, response=fixture("poll_succeeded.json")) == []


def test_sync_mode_answers_in_the_create_call(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/v1/predictions", fixture("create_sync_request.json"), status=201,
                          response=fixture("create_sync_succeeded.json"), request_headers=[("prefer", "wait")])
    assert_schema_valid(oisp_schema, events)
    request_event, response_event = one(events, "ai.request"), one(events, "ai.response")
    request, response = data(request_event), data(response_event)
    assert request["model"]["id"] == "stability-ai/sdxl"
    assert request_event.attrs is not None and request_event.attrs["replicate.prefer"] == "wait"
    assert request_event.attrs["replicate.version"].startswith("7762fd07")
    assert request["parameters"]["num_outputs"] == 2
    assert response["request_id"] == request["request_id"]
    assert response["choices"][0]["message"]["content"] == (
        "https://replicate.delivery/xezq/out-0.png\nhttps://replicate.delivery/xezq/out-1.png")
    assert response["success"] is True
    later = run_exchange("GET", f"{API}/v1/predictions/rrr4z55ocneqzikepnug6xezpe",
                         response=fixture("create_sync_succeeded.json"))
    assert later == []


def test_sync_mode_processing_answer_is_the_answer_and_starting_is_not() -> None:
    processing = json.loads(fixture("poll_processing.json"))
    events = run_exchange("POST", API + LLAMA, {"input": {"prompt": "hi"}}, status=201, response=processing,
                          request_headers=[("prefer", "wait=10")])
    assert data(one(events, "ai.response"))["choices"][0]["message"]["content"] == "Soft wool"
    assert run_exchange("GET", f"{API}/v1/predictions/{PREDICTION}", response=fixture("poll_succeeded.json")) == []
    timed_out = run_exchange("POST", API + LLAMA, {"input": {"prompt": "hi"}}, status=201,
                             response={**processing, "id": "other1", "status": "starting", "output": None},
                             request_headers=[("prefer", "wait")])
    assert [e.event_type for e in timed_out] == ["ai.request"]


def stream_events(chunks: list[bytes]) -> list[Any]:
    return run_exchange("GET", "https://stream.replicate.com/v1/files/bcwr-3okdfv3o2wehstv5f2okyftwxy57hhypqsi6osiim5iu"
                        "ijbjgrta", response=chunks, content_type="text/event-stream", provider="replicate",
                        request_headers=[("accept", "text/event-stream")])


def test_stream_answers_the_prediction_it_was_created_with(oisp_schema: SchemaValidator) -> None:
    request_event = create_llama()[0]
    events = stream_events([fixture("stream.sse")])
    assert_schema_valid(oisp_schema, events)
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["request_id"] == data(request_event)["request_id"]
    assert response_event.related_events and response_event.related_events[0].event_id == request_event.event_id
    assert response["choices"][0]["message"]["content"] == "Soft wool on high hills"
    assert response["model"]["id"] == "meta/meta-llama-3-70b-instruct"
    assert response["success"] is True and response["finish_reason"] == "stop"
    # the poll after the stream is not a second answer
    assert run_exchange("GET", f"{API}/v1/predictions/{PREDICTION}", response=fixture("poll_succeeded.json")) == []


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_stream_is_the_same_at_any_split(table: PredictionTable, draw: st.DataObject) -> None:
    body = fixture("stream.sse")
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=30))
    response = data(one(stream_events(split_at(body, cuts)), "ai.response"))
    assert response["choices"][0]["message"]["content"] == "Soft wool on high hills"
    assert response["finish_reason"] == "stop"


def test_stream_with_an_error_fails_the_prediction(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("GET", f"https://streaming.api.replicate.com/v1/predictions/{PREDICTION}",
                          response=fixture("stream_error.sse"), content_type="text/event-stream",
                          provider="replicate", request_headers=[("accept", "text/event-stream")])
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False
    assert response["error"] == {"type": "prediction_failed", "message": "CUDA error: out of memory"}
    assert response["finish_reason"] == "error"
    assert response["provider_request_id"] == PREDICTION


def test_stream_cut_short_leaves_the_answer_to_the_next_poll() -> None:
    create_llama()
    assert stream_events([fixture("stream.sse").split(b"event: done")[0]]) == []
    finished = run_exchange("GET", f"{API}/v1/predictions/{PREDICTION}", response=fixture("poll_succeeded.json"))
    assert data(one(finished, "ai.response"))["usage"]["completion_tokens"] == 5


def test_failed_prediction(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("GET", f"{API}/v1/predictions/ufawqhfynnddngldkgtslldrkq",
                          response=fixture("poll_failed.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))  # its creation was not seen: answered on its own
    assert response["success"] is False and response["finish_reason"] == "error"
    assert response["error"] == {"type": "prediction_failed", "message": "CUDA error: out of memory"}
    assert response["model"]["id"] == "meta/meta-llama-3-8b-instruct"
    assert response["latency_ms"] == 2000


def test_cancel_answers_the_deployment_prediction(oisp_schema: SchemaValidator) -> None:
    created = run_exchange(
        "POST", f"{API}/v1/deployments/acme/support-bot/predictions", {"input": {"prompt": "Summarize this ticket"}},
        status=201, response={**json.loads(fixture("cancel_response.json")), "status": "processing", "output": None})
    request_event = one(created, "ai.request")
    assert data(request_event)["model"]["id"] == "acme/support-bot"
    assert request_event.attrs is not None and request_event.attrs["replicate.deployment"] == "acme/support-bot"
    assert of_type(created, "ai.response") == []
    events = run_exchange("POST", f"{API}/v1/predictions/qh4sdkefmhrda0cmbpyb1tdg3w/cancel",
                          response=fixture("cancel_response.json"))
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["request_id"] == data(request_event)["request_id"]
    assert response["success"] is False and response["error"]["type"] == "canceled"
    assert response["finish_reason"] == "other"
    assert response["choices"][0]["message"]["content"] == "The"


def test_rejected_create_is_answered_at_once(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{API}/v1/predictions", {"version": "nope", "input": {"prompt": "x"}},
                          status=422, response=fixture("error_422.json"), content_type="application/problem+json")
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == 422
    assert response["error"] == {"type": "Invalid version or not permitted", "code": "422", "message":
                                 "The specified version does not exist (or perhaps you don't have permission to "
                                 "use it?)"}


def test_prediction_table_is_bounded() -> None:
    table = PredictionTable(max_entries=3)
    for i in range(5):
        table.created(f"p{i}", replicate._Created(f"req{i}", f"ev{i}", 0, None), f"https://s/{i}")
    assert table.id_for_stream("https://s/0") is None and table.id_for_stream("https://s/4") == "p4"
    assert table.finish("p0") == (True, None)  # forgotten: reported on its own
    report, record = table.finish("p4")
    assert report and record is not None and record.request_id == "req4"
    assert table.finish("p4") == (False, record)


@pytest.mark.parametrize(("method", "path", "plugin"), [
    ("POST", "/v1/predictions", "oisp.providers.replicate"),
    ("POST", "/v1/models/meta/llama/predictions", "oisp.providers.replicate"),
    ("POST", "/v1/deployments/acme/bot/predictions", "oisp.providers.replicate"),
    ("GET", "/v1/predictions/abc123", "oisp.providers.replicate"),
    ("POST", "/v1/predictions/abc123/cancel", "oisp.providers.replicate"),
    ("GET", "/v1/models", "oisp.providers.metadata"),
    ("GET", "/v1/predictions", "oisp.providers.metadata"),
])
def test_claims(method: str, path: str, plugin: str) -> None:
    assert claim(make_exchange(method, API + path, {}))[0] == plugin


def test_streaming_chunks_of_a_prediction_stream_carry_the_create_calls_request_id(
        oisp_schema: SchemaValidator, decoder_run: DecoderContext) -> None:
    from tests.providers.exchange_harness import respond

    from oisp.events.spec_gaps import conform
    from oisp.providers.replicate import ReplicateDecoder

    request_event = create_llama()[0]
    exchange = make_exchange("GET", "https://stream.replicate.com/v1/files/bcwr-3okdfv3o2wehstv5f2okyftwxy57hhypqsi6"
                             "osiim5iuijbjgrta", provider="replicate")
    decoder = ReplicateDecoder(create=False, prediction_id=PREDICTION, context=decoder_run, streaming_chunks=True)
    events = [conform(e) for e in decoder.on_request(exchange)] + respond(
        exchange, decoder, 200, [fixture("stream.sse")], content_type="text/event-stream")
    assert_schema_valid(oisp_schema, events)
    chunks = of_type(events, "ai.streaming_chunk")
    assert "".join(data(c)["delta"].get("content", "") for c in chunks if "delta" in data(c)) == \
        "Soft wool on high hills"
    assert data(chunks[-1])["finish_reason"] == "stop"
    assert {data(c)["request_id"] for c in chunks} == {data(request_event)["request_id"]}
