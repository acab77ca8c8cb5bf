"""AWS Bedrock Runtime: Converse, ConverseStream, InvokeModel (Anthropic and the other model providers) and
InvokeModelWithResponseStream, with eventstream bytes built by ``oisp.framing.encode_message``."""

from __future__ import annotations

import base64
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

from oisp.framing import encode_message
from oisp.provider_kit import DecoderContext
from oisp.providers.bedrock import bedrock_route, model_family

FIXTURES = Path(__file__).parent / "fixtures" / "bedrock"
HOST = "https://bedrock-runtime.us-east-1.amazonaws.com"
SONNET = "anthropic.claude-3-5-sonnet-20240620-v1%3A0"
EVENTSTREAM = "application/vnd.amazon.eventstream"
SECRET_SIGNATURE = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr" + "x" * 60
AUTH = [
    ("authorization", "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20250110/us-east-1/bedrock/aws4_request, "
                      f"SignedHeaders=host;x-amz-date;x-amz-security-token, Signature={SECRET_SIGNATURE}"),
    ("x-amz-date", "20250110T100000Z"),
    ("x-amz-security-token", SESSION_TOKEN),
]
REQUEST_ID = [("x-amzn-requestid", "6a5d3c1e-2b4f-4e0a-9c7d-1f2e3d4c5b6a")]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def event_message(event_type: str, payload: Any) -> bytes:
    return encode_message({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                          json.dumps(payload).encode())


def exception_message(exception_type: str, text: str) -> bytes:
    return encode_message({":exception-type": exception_type, ":content-type": "application/json",
                           ":message-type": "exception"}, json.dumps({"message": text}).encode())


def converse_stream(events: list[list[Any]]) -> bytes:
    return b"".join(event_message(kind, payload) for kind, payload in events)


def chunk_stream(native: list[dict[str, Any]]) -> bytes:
    return b"".join(event_message("chunk", {"bytes": base64.b64encode(json.dumps(e).encode()).decode(), "p": "abc"})
                    for e in native)


def assert_no_secrets(events: list[Any]) -> None:
    text = "".join(e.to_json() for e in events)
    assert SECRET_SIGNATURE not in text and SESSION_TOKEN not in text and "x" * 60 not in text


# --- Converse ---------------------------------------------------------------------------------------------------

def test_converse_request_response_and_tool_call(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse", fixture("converse_request.json"),
                          response=fixture("converse_response_tool_use.json"), request_headers=AUTH,
                          response_headers=REQUEST_ID, expect_plugin="oisp.providers.bedrock")
    assert_schema_valid(oisp_schema, events)
    assert_no_secrets(events)
    request_event = one(events, "ai.request")
    request = data(request_event)
    assert request["provider"] == {"name": "aws_bedrock", "region": "us-east-1",
                                   "endpoint": f"{HOST}/model/{SONNET}/converse"}
    assert request["model"]["id"] == "anthropic.claude-3-5-sonnet-20240620-v1:0"
    assert request["auth"] == {"type": "service_account", "key_prefix": "AKIA",
                               "key_hash": request["auth"]["key_hash"]}
    assert request["request_type"] == "chat" and request["streaming"] is False
    assert request["has_system_prompt"] is True and request["system_prompt"] == "You are a travel assistant."
    user = request["messages"][0]
    assert user["content"] == "What is the weather where this photo was taken?"
    assert user["image_count"] == 1 and user["has_images"] is True
    assert request["tools"] == [{"name": "get_weather", "type": "function", "description": "Current weather of a place",
                                 "parameters_hash": request["tools"][0]["parameters_hash"]}]
    assert request["tool_choice"] == "auto"
    assert request["parameters"] == {"max_tokens": 512, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\nHuman:"],
                                     "top_k": 200}
    assert request_event.attrs is not None
    assert request_event.attrs["aws.bedrock.guardrail_id"] == "gr-abc123"
    assert request_event.attrs["aws.bedrock.operation"] == "converse"
    assert request_event.attrs["aws.bedrock.model_provider"] == "anthropic"

    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["provider_request_id"] == "6a5d3c1e-2b4f-4e0a-9c7d-1f2e3d4c5b6a"
    assert response["success"] is True
    assert response["choices"][0]["message"]["content"] == "The photo shows the Eiffel Tower, so I will check Paris."
    assert response["finish_reason"] == "tool_calls"
    assert response["tool_calls"][0]["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
    assert response["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert response["usage"] == {"prompt_tokens": 1610, "completion_tokens": 52, "total_tokens": 1662,
                                 "cached_tokens": 1200, "cache_creation_tokens": 0}
    assert response_event.attrs is not None and response_event.attrs["aws.bedrock.latency_ms"] == 1320
    call = one(events, "agent.tool_call")
    assert data(call)["call_id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
    assert data(call)["arguments"] == {"city": "Paris"}

    followup = run_exchange("POST", f"{HOST}/model/{SONNET}/converse", fixture("converse_followup_request.json"),
                            response={"output": {"message": {"role": "assistant", "content": [{"text": "18°C."}]}},
                                      "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 3,
                                                                          "totalTokens": 8}})
    assert_schema_valid(oisp_schema, followup)
    result = one(followup, "agent.tool_result")
    assert data(result)["call_id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
    assert data(result)["result"] == {"temp_c": 18, "sky": "clear"}
    assert data(result)["success"] is True
    assert result.related_events and result.related_events[0].event_id == call.event_id
    followup_request = one(followup, "ai.request")
    assert data(followup_request)["tool_choice"] == "specific"  # {"tool": {...}}: kept under oisp.original
    assert data(followup_request)["messages"][1]["tool_calls"][0]["name"] == "get_weather"


def test_converse_stream(oisp_schema: SchemaValidator) -> None:
    body = converse_stream(fixture_json("converse_stream_events.json"))
    events = run_exchange("POST", f"{HOST}/model/us.{SONNET}/converse-stream", fixture("converse_request.json"),
                          response=[body], content_type=EVENTSTREAM, request_headers=AUTH)
    assert_schema_valid(oisp_schema, events)
    assert_no_secrets(events)
    assert data(one(events, "ai.request"))["streaming"] is True
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["success"] is True
    assert response["choices"][0]["message"]["content"] == "Checking Paris."
    assert response["thinking"] == "Paris, so get_weather."
    assert response["tool_calls"] == [{"id": "tooluse_7dKq2m3YQ2WxZ0aB1cD2eF", "name": "get_weather",
                                       "type": "function", "arguments": {"city": "Paris"},
                                       "arguments_hash": response["tool_calls"][0]["arguments_hash"]}]
    assert response["finish_reason"] == "tool_calls"
    assert response["usage"] == {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}
    assert response_event.confidence.completeness == "full"
    assert response_event.attrs is not None and response_event.attrs["aws.bedrock.latency_ms"] == 845
    assert data(one(events, "agent.tool_call"))["arguments"] == {"city": "Paris"}


def _stable(events: list[Any]) -> dict[str, Any]:
    response = data(one(events, "ai.response"))
    for key in ("request_id", "latency_ms", "time_to_first_token_ms"):
        response.pop(key, None)
    return response


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_converse_stream_is_the_same_at_any_split(decoder_run: DecoderContext, draw: st.DataObject) -> None:
    body = converse_stream(fixture_json("converse_stream_events.json"))
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=40))
    url = f"{HOST}/model/{SONNET}/converse-stream"
    whole = run_exchange("POST", url, {"messages": []}, response=[body], content_type=EVENTSTREAM)
    split = run_exchange("POST", url, {"messages": []}, response=split_at(body, cuts), content_type=EVENTSTREAM)
    assert _stable(split) == _stable(whole)
    assert len(of_type(split, "agent.tool_call")) == 1


def test_exception_inside_a_converse_stream_fails_the_response(oisp_schema: SchemaValidator) -> None:
    stream_events = fixture_json("converse_stream_events.json")
    body = converse_stream(stream_events[:5]) + exception_message(
        "throttlingException", "Too many tokens, please wait before trying again.")
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse-stream", {"messages": []}, response=[body],
                          content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False
    assert response["error"] == {"type": "throttlingException",
                                 "message": "Too many tokens, please wait before trying again."}
    assert response["choices"][0]["message"]["content"] == "Checking"


def test_bad_crc_is_an_error_on_a_partial_response_not_a_crash(oisp_schema: SchemaValidator) -> None:
    messages = [event_message(kind, payload) for kind, payload in fixture_json("converse_stream_events.json")]
    damaged = bytearray(messages[5])
    damaged[-6] ^= 0xFF  # a payload byte of " Paris.": its message CRC no longer matches
    body = b"".join(messages[:5]) + bytes(damaged) + b"".join(messages[6:])
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse-stream", {"messages": []}, response=[body],
                          content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response_event.confidence.completeness == "partial"
    assert response_event.confidence.limitations and "CRC" in response_event.confidence.limitations[0]
    assert response["success"] is False and response["error"]["type"] == "eventstream_error"
    assert response["choices"][0]["message"]["content"] == "Checking"  # the damaged message is left out
    assert response["finish_reason"] == "tool_calls"  # the messages after it are still read
    assert response["usage"]["completion_tokens"] == 40


def test_bad_prelude_crc_stops_decoding_and_fails_the_response(oisp_schema: SchemaValidator) -> None:
    messages = [event_message(kind, payload) for kind, payload in fixture_json("converse_stream_events.json")]
    damaged = bytearray(messages[4])
    damaged[9] ^= 0x01  # the prelude CRC
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse-stream", {"messages": []},
                          response=[b"".join(messages[:4]) + bytes(damaged) + b"".join(messages[5:])],
                          content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    response_event = one(events, "ai.response")
    assert response_event.confidence.completeness == "partial"
    assert data(response_event)["success"] is False
    assert data(response_event)["thinking"] == "Paris, so get_weather."


def test_converse_stream_that_stops_early_is_partial() -> None:
    body = converse_stream(fixture_json("converse_stream_events.json")[:6])
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse-stream", {"messages": []}, response=[body],
                          content_type=EVENTSTREAM)
    response_event = one(events, "ai.response")
    assert response_event.confidence.completeness == "partial"
    assert response_event.confidence.limitations == ["stream ended before its last event"]


@pytest.mark.parametrize(("status", "error_type", "body"), [
    (400, "ValidationException", fixture("error_validation.json")),
    (429, "ThrottlingException", b'{"message": "Too many requests, please wait before trying again."}'),
])
def test_error_responses(oisp_schema: SchemaValidator, status: int, error_type: str, body: bytes) -> None:
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/converse", {"messages": []}, status=status, response=body,
                          response_headers=[("x-amzn-errortype",
                                             f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
                                            *REQUEST_ID])
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False and response["status_code"] == status
    assert response["error"]["type"] == error_type
    assert response["error"]["message"] == json.loads(body)["message"]
    assert response["provider_request_id"] == "6a5d3c1e-2b4f-4e0a-9c7d-1f2e3d4c5b6a"


# --- InvokeModel ------------------------------------------------------------------------------------------------

def test_invoke_anthropic(oisp_schema: SchemaValidator) -> None:
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/invoke", fixture("invoke_anthropic_request.json"),
                          response=fixture("invoke_anthropic_response.json"), request_headers=AUTH,
                          response_headers=[("x-amzn-bedrock-input-token-count", "380"),
                                            ("x-amzn-bedrock-output-token-count", "61"),
                                            ("x-amzn-bedrock-invocation-latency", "2110")])
    assert_schema_valid(oisp_schema, events)
    assert_no_secrets(events)
    request_event = one(events, "ai.request")
    request = data(request_event)
    assert request["model"]["id"] == "anthropic.claude-3-5-sonnet-20240620-v1:0"
    assert request["system_prompt"] == "You are a careful assistant."
    assert request["messages"][0]["content"] == "List the files in /tmp."
    assert request["tools"][0]["name"] == "bash"
    assert request["parameters"]["max_tokens"] == 1024
    assert request_event.attrs is not None and request_event.attrs["anthropic.version"] == "bedrock-2023-05-31"
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["model"]["id"] == "claude-3-5-sonnet-20240620"
    assert response["choices"][0]["message"]["content"] == "I'll list them."
    assert response["tool_calls"][0]["arguments"] == {"command": "ls /tmp"}
    assert response["finish_reason"] == "tool_calls"
    assert response["usage"] == {"prompt_tokens": 380, "completion_tokens": 61, "total_tokens": 441}
    assert response_event.attrs is not None and response_event.attrs["aws.bedrock.latency_ms"] == 2110
    call = data(one(events, "agent.tool_call"))
    assert call["tool"]["type"] == "shell" and call["call_id"] == "toolu_bdrk_01A09q90qw90lq917835lq9"

    answer = {"role": "assistant", "content": json.loads(fixture("invoke_anthropic_response.json"))["content"]}
    followup_body = {**fixture_json("invoke_anthropic_request.json")}
    followup_body["messages"] = [*followup_body["messages"], answer, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_bdrk_01A09q90qw90lq917835lq9", "content": "a.txt\nb.txt"}]}]
    followup = run_exchange("POST", f"{HOST}/model/{SONNET}/invoke", followup_body,
                            response={"type": "message", "content": [], "stop_reason": "end_turn"})
    result = one(followup, "agent.tool_result")
    assert data(result)["result"] == "a.txt\nb.txt" and data(result)["tool"]["name"] == "bash"


def test_invoke_with_response_stream_anthropic(oisp_schema: SchemaValidator) -> None:
    body = chunk_stream(fixture_json("invoke_anthropic_stream_events.json"))
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/invoke-with-response-stream",
                          fixture("invoke_anthropic_request.json"), response=[body], content_type=EVENTSTREAM,
                          request_headers=AUTH, response_headers=REQUEST_ID)
    assert_schema_valid(oisp_schema, events)
    assert_no_secrets(events)
    assert data(one(events, "ai.request"))["streaming"] is True
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["success"] is True
    assert response["choices"][0]["message"]["content"] == "Hello from Bedrock."
    assert response["tool_calls"][0]["name"] == "read_file"
    assert response["tool_calls"][0]["arguments"] == {"path": "/etc/hosts"}
    assert response["finish_reason"] == "tool_calls"
    assert response["usage"]["prompt_tokens"] == 25 and response["usage"]["completion_tokens"] == 30
    assert response_event.attrs is not None
    assert response_event.attrs["aws.bedrock.latency_ms"] == 1234
    assert response_event.attrs["aws.bedrock.first_byte_latency_ms"] == 321
    assert response_event.confidence.completeness == "full"
    assert data(one(events, "agent.tool_call"))["tool"]["type"] == "file_read"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_invoke_stream_is_the_same_at_any_split(decoder_run: DecoderContext, draw: st.DataObject) -> None:
    body = chunk_stream(fixture_json("invoke_anthropic_stream_events.json"))
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=40))
    url = f"{HOST}/model/{SONNET}/invoke-with-response-stream"
    whole = run_exchange("POST", url, {"messages": []}, response=[body], content_type=EVENTSTREAM)
    split = run_exchange("POST", url, {"messages": []}, response=split_at(body, cuts), content_type=EVENTSTREAM)
    assert _stable(split) == _stable(whole)


def test_model_stream_error_inside_an_invoke_stream(oisp_schema: SchemaValidator) -> None:
    native = fixture_json("invoke_anthropic_stream_events.json")[:4]
    body = chunk_stream(native) + encode_message(
        {":exception-type": "modelStreamErrorException", ":content-type": "application/json",
         ":message-type": "exception"},
        json.dumps({"message": "Model stream error", "originalStatusCode": 529}).encode())
    events = run_exchange("POST", f"{HOST}/model/{SONNET}/invoke-with-response-stream", {"messages": []},
                          response=[body], content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    response = data(one(events, "ai.response"))
    assert response["success"] is False
    assert response["error"]["type"] == "modelStreamErrorException"
    assert response["error"]["originalStatusCode"] == 529
    assert response["choices"][0]["message"]["content"] == "Hello from Bedrock."


@pytest.mark.parametrize("case", fixture_json("invoke_models.json"), ids=lambda c: c["name"])
def test_invoke_other_model_providers(oisp_schema: SchemaValidator, case: dict[str, Any]) -> None:
    events = run_exchange("POST", f"{HOST}/model/{case['model']}/invoke", case["request"], response=case["response"],
                          response_headers=[tuple(h) for h in case.get("headers", [])])
    assert_schema_valid(oisp_schema, events)
    request = data(one(events, "ai.request"))
    assert request["model"]["id"] == case["model"]
    assert request["parameters"]["max_tokens"] == case["max_tokens"]
    assert request["messages"]
    response = data(one(events, "ai.response"))
    assert response["success"] is True
    assert response["choices"][0]["message"]["content"] == case["text"]
    assert response["usage"]["prompt_tokens"] == case["prompt_tokens"]
    assert response["usage"]["completion_tokens"] == case["completion_tokens"]
    assert response["finish_reason"] == case["finish"]


@pytest.mark.parametrize("case", fixture_json("invoke_stream_models.json"), ids=lambda c: c["name"])
def test_invoke_stream_other_model_providers(oisp_schema: SchemaValidator, case: dict[str, Any]) -> None:
    events = run_exchange("POST", f"{HOST}/model/{case['model']}/invoke-with-response-stream", case["request"],
                          response=[chunk_stream(case["chunks"])], content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    response_event = one(events, "ai.response")
    response = data(response_event)
    assert response["success"] is True
    assert response["choices"][0]["message"]["content"] == case["text"]
    assert response["usage"]["prompt_tokens"] == case["prompt_tokens"]
    assert response["usage"]["completion_tokens"] == case["completion_tokens"]
    assert response["finish_reason"] == case["finish"]
    assert response_event.confidence.completeness == "full"


@pytest.mark.parametrize("case", fixture_json("invoke_embeddings.json"), ids=lambda c: c["model"])
def test_invoke_embedding_models(oisp_schema: SchemaValidator, case: dict[str, Any]) -> None:
    events = run_exchange("POST", f"{HOST}/model/{case['model']}/invoke", case["request"], response=case["response"],
                          response_headers=[tuple(h) for h in case.get("headers", [])])
    assert_schema_valid(oisp_schema, events)
    assert data(one(events, "ai.request"))["request_type"] == "embedding"
    embedding = data(one(events, "ai.embedding"))
    assert embedding["input_count"] == case["count"]
    assert embedding["dimensions"] == case["dimensions"]
    assert embedding["total_tokens"] == case["tokens"]
    assert embedding["provider"]["region"] == "us-east-1"


# --- model ids, regions, claims ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("path_id", "model_id", "family", "region"), [
    (SONNET, "anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic", "us-east-1"),
    ("us.anthropic.claude-3-7-sonnet-20250219-v1%3A0", "us.anthropic.claude-3-7-sonnet-20250219-v1:0", "anthropic",
     "us-east-1"),
    ("global.anthropic.claude-sonnet-4-20250514-v1%3A0", "global.anthropic.claude-sonnet-4-20250514-v1:0",
     "anthropic", "us-east-1"),
    ("arn%3Aaws%3Abedrock%3Aeu-west-1%3A123456789012%3Ainference-profile%2Feu.meta.llama3-2-1b-instruct-v1%3A0",
     "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.meta.llama3-2-1b-instruct-v1:0", "meta",
     "us-east-1"),
    ("arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-pro-v1:0",
     "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-pro-v1:0", "amazon", "us-east-1"),
    ("arn%3Aaws%3Abedrock%3Aus-west-2%3A123456789012%3Aprovisioned-model%2Fabc123xyz",
     "arn:aws:bedrock:us-west-2:123456789012:provisioned-model/abc123xyz", None, "us-east-1"),
])
def test_model_id_family_and_region(path_id: str, model_id: str, family: str | None, region: str) -> None:
    route = bedrock_route(make_exchange("POST", f"{HOST}/model/{path_id}/converse", {}))
    assert route is not None and route.model_id == model_id and route.region == region
    assert model_family(route.model_id) == family


def test_region_from_an_arn_when_the_host_does_not_say() -> None:
    exchange = make_exchange("POST", "https://bedrock.internal.example/model/arn%3Aaws%3Abedrock%3Aap-south-1%3A1%3A"
                             "inference-profile%2Fapac.amazon.nova-lite-v1%3A0/converse", {}, provider="aws_bedrock")
    route = bedrock_route(exchange)
    assert route is not None and route.region == "ap-south-1"


def test_provisioned_anthropic_model_is_recognized_by_its_body() -> None:
    events = run_exchange("POST", f"{HOST}/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aprovisioned-model%2Fp1/invoke",
                          fixture("invoke_anthropic_request.json"), response=fixture("invoke_anthropic_response.json"))
    assert data(one(events, "ai.response"))["tool_calls"][0]["name"] == "bash"


@pytest.mark.parametrize(("method", "path", "mine"), [
    ("POST", f"/model/{SONNET}/converse", True),
    ("POST", f"/model/{SONNET}/converse-stream", True),
    ("POST", f"/model/{SONNET}/invoke", True),
    ("POST", f"/model/{SONNET}/invoke-with-response-stream", True),
    ("POST", f"/model/{SONNET}/count-tokens", False),
    ("POST", "/openai/v1/chat/completions", False),
    ("GET", "/async-invoke", False),
    ("POST", "/guardrail/gr-1/version/1/apply", False),
])
def test_claims(method: str, path: str, mine: bool) -> None:
    assert (claim(make_exchange(method, HOST + path, {}))[0] == "oisp.providers.bedrock") is mine


def test_streaming_chunk_events_when_asked_for(oisp_schema: SchemaValidator) -> None:
    from tests.providers.exchange_harness import respond

    from oisp.events.spec_gaps import conform
    from oisp.providers.bedrock import BedrockDecoder

    exchange = make_exchange("POST", f"{HOST}/model/{SONNET}/converse-stream", {"messages": []})
    route = bedrock_route(exchange)
    assert route is not None
    decoder = BedrockDecoder(route, streaming_chunks=True)
    request = list(decoder.on_request(exchange))
    events = [conform(e) for e in request] + respond(
        exchange, decoder, 200, [converse_stream(fixture_json("converse_stream_events.json"))],
        content_type=EVENTSTREAM)
    assert_schema_valid(oisp_schema, events)
    chunks = of_type(events, "ai.streaming_chunk")
    assert "".join(data(c)["delta"].get("content", "") for c in chunks) == "Checking Paris."
    assert {data(c)["request_id"] for c in chunks} == {data(request[0])["request_id"]}
