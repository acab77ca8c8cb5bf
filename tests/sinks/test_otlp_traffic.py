"""Real SDK traffic through the test stack, then into the otlp sink: the events the proxy made from the
``anthropic`` SDK's streamed tool-use turn and its follow-up become the spans, log records and metrics a
collector would receive (both protocols)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests.sinks.otlp_receiver import Receiver, attributes, decode_value
from tests.stack import running_stack

from oisp.events import Event
from oisp.sinks.otlp import create_sink
from oisp.sinks.otlp.mapping import ts_ns

pytest.importorskip("anthropic")

from tests.providers.test_anthropic_sdk import messages_api, run_client


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> list[Event]:
    """Every event of one real anthropic SDK session (two calls, two tools) through the proxy."""
    tmp_path: Path = tmp_path_factory.mktemp("stack")
    with running_stack(tmp_path, trustme.CA(), handler=messages_api) as stack:
        run_client(stack)
        return stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(request.param)
    yield server
    server.close()


def test_real_sdk_traffic_becomes_genai_spans_log_records_and_metrics(traffic: list[Event],
                                                                     receiver: Receiver) -> None:
    sink = create_sink({"endpoint": receiver.endpoint, "protocol": receiver.protocol, "content": True})
    for event in traffic:  # one event per batch, the hardest case for pairing
        sink.write([event])
    sink.close()

    # logs: every event, once, as it is in the JSONL file
    records = receiver.logs()
    assert sorted(r.event_name for _, r in records) == sorted(e.event_type for e in traffic)
    bodies = {attributes(r.attributes)["oisp.event_id"]: json.loads(decode_value(r.body)) for _, r in records}
    assert bodies == {e.event_id: json.loads(e.to_json()) for e in traffic}

    # traces: two chat spans with the real times, two execute_tool spans from call to result
    spans = [span for _, span in receiver.spans()]
    chats = sorted((s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time_unix_nano)
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    assert [s.name for s in chats] == ["chat claude-sonnet-4-5", "chat claude-sonnet-4-5"]
    assert sorted(s.name for s in tools) == ["execute_tool get_weather", "execute_tool read_file"]
    assert len(spans) == 4
    requests = [e for e in traffic if e.event_type == "ai.request"]
    responses = [e for e in traffic if e.event_type == "ai.response"]
    for span, request, response in zip(chats, requests, responses, strict=True):
        assert span.start_time_unix_nano == ts_ns(request.ts)
        assert span.end_time_unix_nano == ts_ns(response.ts)
        attrs = attributes(span.attributes)
        assert attrs["gen_ai.provider.name"] == "anthropic"
        assert attrs["server.address"] == "api.anthropic.com"
        assert attrs["gen_ai.response.id"] == response.data.provider_request_id  # type: ignore[attr-defined]
    first = attributes(chats[0].attributes)
    assert first["gen_ai.request.stream"] is True
    assert first["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert first["gen_ai.usage.cache_read.input_tokens"] == 2048
    assert json.loads(first["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "You are a release assistant."}]
    outputs = json.loads(first["gen_ai.output.messages"])
    assert [p["name"] for p in outputs[0]["parts"] if p["type"] == "tool_call"] == ["read_file", "get_weather"]
    calls = {e.data.call_id: e for e in traffic if e.event_type == "agent.tool_call"}  # type: ignore[attr-defined]
    results = {e.data.call_id: e for e in traffic if e.event_type == "agent.tool_result"}  # type: ignore[attr-defined]
    for tool in tools:
        call_id = attributes(tool.attributes)["gen_ai.tool.call.id"]
        assert tool.start_time_unix_nano == ts_ns(calls[call_id].ts)
        assert tool.end_time_unix_nano == ts_ns(results[call_id].ts)
        assert tool.trace_id == chats[0].trace_id
    # one agent process: one trace
    assert len({s.trace_id for s in spans}) == 1

    metrics = {m.name: m for m in receiver.metrics()}
    [duration] = metrics["gen_ai.client.operation.duration"].histogram.data_points
    assert duration.count == 2
