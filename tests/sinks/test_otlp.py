"""The otlp sink against a real OTLP receiver (gRPC and HTTP/protobuf), asserting on the decoded protobufs."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest
from tests.events import samples
from tests.sinks.otlp_receiver import Receiver, attributes, decode_value

from oisp.errors import ConfigurationError, OispError, PluginError
from oisp.events import (
    AgentToolCall,
    AgentToolResult,
    AiRequest,
    AiResponse,
    Event,
    Host,
    ModelInfo,
    ProcessInfo,
    ProviderInfo,
    RelatedEvent,
    ToolInfo,
    Usage,
)
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks.otlp import create_sink
from oisp.sinks.otlp.mapping import ts_ns
from oisp.sinks.otlp.sink import OtlpSink

HOST = Host(hostname="dev-box", os="linux")
FULL = samples.FULL
SPAN_KIND_CLIENT = 3
SPAN_KIND_INTERNAL = 1
STATUS_ERROR = 2


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(request.param)
    yield server
    server.close()


def sink_for(receiver: Receiver, **options: Any) -> OtlpSink:
    sink = create_sink({"endpoint": receiver.endpoint, "protocol": receiver.protocol, **options})
    assert isinstance(sink, OtlpSink)
    return sink


def on_host(event: Event) -> Event:
    return event.with_context(host=HOST)


def exchange() -> tuple[Event, Event]:
    """The sample request and, 812 ms later, its response (linked as oisp links them)."""
    request = on_host(samples.ai_request())
    response = samples.ai_response()
    response = response.with_context(host=HOST, ts=request.ts + timedelta(milliseconds=812),
                                      related_events=[RelatedEvent(event_id=request.event_id,
                                                                   relationship="caused_by")])
    return request, response


def span_attrs(span: Any) -> dict[str, Any]:
    return attributes(span.attributes)


# --- the chat span -------------------------------------------------------------------------------
def test_a_request_and_its_response_become_one_client_span_with_genai_attributes(receiver: Receiver) -> None:
    request, response = exchange()
    sink = sink_for(receiver, service_name="agents-fleet")
    sink.write([request])
    sink.write([response])
    assert sink.flush()
    receiver.wait_for(lambda: receiver.counts["spans"] >= 1)
    sink.close()

    [(resource, span)] = receiver.spans()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == SPAN_KIND_CLIENT
    assert span.start_time_unix_nano == ts_ns(request.ts)
    assert span.end_time_unix_nano == ts_ns(response.ts)
    assert span.end_time_unix_nano - span.start_time_unix_nano == 812_000_000
    assert span.status.code != STATUS_ERROR
    attrs = span_attrs(span)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.request.max_tokens"] == 512
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.2)
    assert "gen_ai.request.top_p" not in attrs  # not set in the request
    assert attrs["gen_ai.request.stop_sequences"] == ["\n\n"]
    assert attrs["gen_ai.response.id"] == "chatcmpl-abc"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["gen_ai.response.finish_reasons"] == ["tool_calls"]
    assert attrs["gen_ai.usage.input_tokens"] == 120
    assert attrs["gen_ai.usage.output_tokens"] == 18
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 64
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 0
    assert attrs["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.23)
    assert attrs["server.address"] == "api.openai.com"
    assert attrs["server.port"] == 443
    assert attrs["oisp.request.event_id"] == request.event_id
    assert attrs["oisp.response.event_id"] == response.event_id
    assert "error.type" not in attrs
    # content is opt-in
    assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
                "gen_ai.tool.definitions"} & attrs.keys()
    assert resource["service.name"] == "agents-fleet"
    assert resource["host.name"] == "dev-box"
    assert resource["process.pid"] == 4242
    assert resource["process.executable.path"] == "/usr/bin/python3.11"
    assert resource["process.command_args"] == ["python3", "agent.py", "--task", "fix"]


def test_a_failed_call_has_error_type_and_an_error_status(receiver: Receiver) -> None:
    request = on_host(Event.create(AiRequest(request_id="req_02", provider=ProviderInfo(
        name="anthropic", endpoint="https://api.anthropic.com/v1/messages"), model=ModelInfo(id="claude-x"),
        request_type="chat"), confidence=FULL, process=samples.PROCESS))
    response = on_host(samples.ai_response_error()).with_context(ts=request.ts + timedelta(seconds=1))
    sink = sink_for(receiver)
    sink.write([request, response])
    sink.close()
    [(_, span)] = receiver.spans()
    assert span.name == "chat claude-x"
    attrs = span_attrs(span)
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["error.type"] == "rate_limit_error"
    assert attrs["http.response.status_code"] == 429
    assert span.status.code == STATUS_ERROR
    assert span.status.message == "Rate limit reached"


def test_content_is_opt_in_and_shaped_as_the_conventions_say(receiver: Receiver) -> None:
    request, response = exchange()
    sink = sink_for(receiver, content=True)
    sink.write([request, response])
    sink.close()
    [(_, span)] = receiver.spans()
    attrs = span_attrs(span)
    inputs = json.loads(attrs["gen_ai.input.messages"])
    assert inputs[0] == {"role": "system", "parts": [{"type": "text", "content": "You are a careful coding agent."}]}
    assert inputs[1] == {"role": "user", "parts": [{"type": "text", "content": "What is the weather in Paris?"}]}
    assert inputs[2] == {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1",
                                                    "response": '{"temp_c": 11}'}]}
    outputs = json.loads(attrs["gen_ai.output.messages"])
    assert outputs == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
        {"type": "text", "content": "Calling the tool."},
        {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}]
    assert json.loads(attrs["gen_ai.tool.definitions"]) == [
        {"type": "function", "name": "get_weather", "description": "Current weather"}]


def test_tool_calls_become_execute_tool_spans_from_call_to_result(receiver: Receiver) -> None:
    request, response = exchange()
    call = on_host(samples.agent_tool_call()).with_context(
        ts=response.ts + timedelta(milliseconds=1),
        related_events=[RelatedEvent(event_id=response.event_id, relationship="caused_by")])
    result = on_host(samples.agent_tool_result()).with_context(ts=call.ts + timedelta(milliseconds=450))
    sink = sink_for(receiver)
    sink.write([request, response, call])
    sink.write([result])
    sink.close()
    spans = {span.name: span for _, span in receiver.spans()}
    assert set(spans) == {"chat gpt-4o-mini", "execute_tool get_weather"}
    tool, chat = spans["execute_tool get_weather"], spans["chat gpt-4o-mini"]
    assert tool.kind == SPAN_KIND_INTERNAL
    assert tool.start_time_unix_nano == ts_ns(call.ts)
    assert tool.end_time_unix_nano == ts_ns(result.ts)
    attrs = span_attrs(tool)
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "get_weather"
    assert attrs["gen_ai.tool.call.id"] == "call_1"
    assert "gen_ai.tool.call.arguments" not in attrs
    # the tool span is in the chat span's trace and links to it
    assert tool.trace_id == chat.trace_id
    assert [(link.trace_id, link.span_id) for link in tool.links] == [(chat.trace_id, chat.span_id)]


def test_spans_of_one_agent_process_share_a_trace_and_other_processes_get_their_own(receiver: Receiver) -> None:
    def call(i: int, pid: int) -> list[Event]:
        process = ProcessInfo(pid=pid, exe="/usr/bin/node", start_time="2026-11-24T08:00:00.000000Z")
        request = Event.create(AiRequest(request_id=f"req_{i}", model=ModelInfo(id="m")), confidence=FULL,
                               process=process, host=HOST)
        response = Event.create(AiResponse(request_id=f"req_{i}", status_code=200, success=True),
                                confidence=FULL, process=process, host=HOST)
        return [request, response]

    sink = sink_for(receiver)
    sink.write([*call(1, 100), *call(2, 100), *call(3, 200)])
    sink.close()
    by_request = {span_attrs(span)["oisp.request_id"]: span for _, span in receiver.spans()}
    assert by_request["req_1"].trace_id == by_request["req_2"].trace_id
    assert by_request["req_3"].trace_id != by_request["req_1"].trace_id
    assert len({span.span_id for span in by_request.values()}) == 3
    # deterministic: a second sink (a restarted oisp) puts the same process in the same trace
    again = Receiver(receiver.protocol)
    try:
        sink = sink_for(again)
        sink.write(call(4, 100))
        sink.close()
        [(_, span)] = again.spans()
        assert span.trace_id == by_request["req_1"].trace_id
    finally:
        again.close()


def test_a_request_without_response_ends_as_an_incomplete_span_at_close(receiver: Receiver) -> None:
    request, _ = exchange()
    later = on_host(samples.network_connect()).with_context(ts=request.ts + timedelta(seconds=5))
    sink = sink_for(receiver)
    sink.write([request, later])
    assert sink.builder.pending == 1
    sink.close()
    [(_, span)] = receiver.spans()
    attrs = span_attrs(span)
    assert attrs["error.type"] == "oisp.no_response"
    assert "oisp.incomplete" in attrs
    assert span.status.code == STATUS_ERROR
    assert span.start_time_unix_nano == ts_ns(request.ts)
    assert span.end_time_unix_nano == ts_ns(later.ts)  # the latest event time seen


# --- logs ----------------------------------------------------------------------------------------
def test_a_lone_event_goes_out_after_batch_delay_without_a_flush(receiver: Receiver) -> None:
    sink = sink_for(receiver, batch_delay=0.1, metrics=False)
    sink.write([on_host(samples.network_connect())])
    receiver.wait_for(lambda: receiver.counts["logs"] >= 1, timeout=3.0)  # not export_interval (10 s) later
    sink.close()


@pytest.mark.parametrize("log_body", ["json", "map"])
def test_every_event_of_every_type_is_one_log_record_with_the_event_as_body(receiver: Receiver,
                                                                           log_body: str) -> None:
    events = [on_host(make()) for make in samples.ALL.values()]
    sink = sink_for(receiver, log_body=log_body)
    sink.write(events)
    sink.close()
    records = receiver.logs()
    assert len(records) == len(events) == len(samples.ALL)
    by_id = {attributes(record.attributes)["oisp.event_id"]: (resource, record) for resource, record in records}
    assert set(by_id) == {event.event_id for event in events}
    for event in events:
        resource, record = by_id[event.event_id]
        assert record.event_name == event.event_type
        assert record.time_unix_nano == ts_ns(event.ts)
        body = decode_value(record.body)
        if log_body == "json":
            assert body == event.to_json()  # the line a JSONL file holds
        else:
            assert body == event.to_dict()  # the same, field by field
        assert resource["host.name"] == "dev-box"
        if event.process is not None:
            assert resource["process.pid"] == event.process.pid
    # the request's log record belongs to the chat span
    request_record = next(r for _, r in records if r.event_name == "ai.request")
    assert len(request_record.trace_id) == 16
    assert len(request_record.span_id) == 8


def test_undecodable_text_in_an_event_is_escaped_not_a_failed_export(receiver: Receiver) -> None:
    request, response = exchange()
    broken = request.with_context(data=AiRequest(request_id="req_01", model=ModelInfo(id="gpt-\udcff"),
                                                 request_type="chat"))
    sink = sink_for(receiver, content=True)
    sink.write([broken, response])
    sink.close()
    [(_, record), _] = receiver.logs()
    assert json.loads(decode_value(record.body)) == broken.to_dict()
    [(_, span)] = receiver.spans()
    assert span.name == "chat gpt-\\udcff"
    assert sink.stats.failed == {"spans": 0, "logs": 0}


def test_log_records_of_a_call_carry_its_span(receiver: Receiver) -> None:
    request, response = exchange()
    sink = sink_for(receiver)
    sink.write([request, response])
    sink.close()
    [(_, span)] = receiver.spans()
    records = {record.event_name: record for _, record in receiver.logs()}
    for name in ("ai.request", "ai.response"):
        assert records[name].trace_id == span.trace_id
        assert records[name].span_id == span.span_id


# --- metrics -------------------------------------------------------------------------------------
def test_token_usage_duration_and_time_to_first_chunk_histograms(receiver: Receiver) -> None:
    request, response = exchange()
    sink = sink_for(receiver)
    sink.write([request, response])
    sink.close()
    metrics = {metric.name: metric for metric in receiver.metrics()}
    tokens = metrics["gen_ai.client.token.usage"]
    assert tokens.unit == "{token}"
    by_type = {attributes(p.attributes)["gen_ai.token.type"]: p for p in tokens.histogram.data_points}
    assert by_type["input"].sum == 120
    assert by_type["output"].sum == 18
    point = by_type["input"]
    assert list(point.explicit_bounds)[:3] == [1, 4, 16]
    attrs = attributes(point.attributes)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["server.address"] == "api.openai.com"
    [duration] = metrics["gen_ai.client.operation.duration"].histogram.data_points
    assert metrics["gen_ai.client.operation.duration"].unit == "s"
    assert duration.count == 1
    assert duration.sum == pytest.approx(0.812)
    [first] = metrics["gen_ai.client.operation.time_to_first_chunk"].histogram.data_points
    assert first.sum == pytest.approx(0.23)


# --- through the pipeline, headers, compression ---------------------------------------------------
def test_through_the_plugin_manager_and_pipeline_with_headers_and_gzip(receiver: Receiver) -> None:
    sink = create_plugin_manager().create_sink("otlp", {
        "endpoint": receiver.endpoint, "protocol": receiver.protocol, "compression": "gzip",
        "headers": {"Authorization": "Bearer t0ken"}})
    request, response = exchange()

    async def main() -> None:
        async with Pipeline({"otlp": sink}) as pipeline:
            pipeline.emit(request)
            pipeline.emit(response)

    anyio.run(main)
    receiver.wait_for(lambda: receiver.counts["logs"] >= 2 and receiver.counts["spans"] >= 1)
    assert all(h.get("authorization") == "Bearer t0ken" for h in receiver.headers)
    [(_, span)] = receiver.spans()
    assert span.name == "chat gpt-4o-mini"


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "named"), [
    ({"endpoint": "http://127.0.0.1:4318", "colour": "blue"}, "colour"),
    ({}, "endpoint"),
    ({"endpoint": 4318}, "endpoint"),
    ({"endpoint": "127.0.0.1:4318"}, "endpoint"),
    ({"endpoint": "http://127.0.0.1:4318", "protocol": "http/json"}, "protocol"),
    ({"endpoint": "http://127.0.0.1:4318", "content": "yes"}, "content"),
    ({"endpoint": "http://127.0.0.1:4318", "headers": ["a"]}, "headers"),
    ({"endpoint": "http://127.0.0.1:4318", "headers": {"a": 1}}, "headers.a"),
    ({"endpoint": "http://127.0.0.1:4318", "service_name": ""}, "service_name"),
    ({"endpoint": "http://127.0.0.1:4318", "timeout": -1}, "timeout"),
    ({"endpoint": "http://127.0.0.1:4318", "max_pending": True}, "max_pending"),
])
def test_bad_options_are_rejected_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"sinks\.otlp\W.*{named}|sinks\.otlp\.{named}"):
        create_plugin_manager().create_sink("otlp", options)


def test_without_the_sdk_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "oisp.sinks.otlp.sink", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'oisp\[otlp\]'"):
        create_sink({"endpoint": "http://127.0.0.1:4318"})


def test_listing_plugins_and_other_sinks_never_imports_opentelemetry() -> None:
    code = ("import sys; from oisp.plugins import create_plugin_manager; m = create_plugin_manager(); "
            "assert 'otlp' in m.sink_types(); m.create_sink('memory', {}); "
            "print(sorted(n for n in sys.modules if n.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_write_after_close_raises(receiver: Receiver) -> None:
    sink = sink_for(receiver)
    sink.close()
    with pytest.raises(OispError):
        sink.write([samples.ai_request()])


def test_only_the_chosen_signals_are_sent(receiver: Receiver) -> None:
    request, response = exchange()
    sink = sink_for(receiver, logs=False, metrics=False)
    sink.write([request, response])
    sink.close()
    assert len(receiver.spans()) == 1
    assert receiver.logs() == []
    assert list(receiver.metrics()) == []


def test_unknown_tool_results_and_responses_still_make_spans(receiver: Receiver) -> None:
    response = Event.create(AiResponse(request_id="req_x", model=ModelInfo(id="gpt-4o"), status_code=200,
                                       success=True, latency_ms=300, usage=Usage(prompt_tokens=3)),
                            confidence=FULL, host=HOST)
    result = Event.create(AgentToolResult(call_id="call_z", tool=ToolInfo(name="ls"), success=False,
                                          duration_ms=20), confidence=FULL, host=HOST)
    sink = sink_for(receiver)
    sink.write([response, result])
    sink.close()
    spans = {span.name: span for _, span in receiver.spans()}
    chat = spans["chat gpt-4o"]
    assert chat.end_time_unix_nano - chat.start_time_unix_nano == 300_000_000
    assert "oisp.incomplete" in span_attrs(chat)
    tool = spans["execute_tool ls"]
    assert tool.end_time_unix_nano - tool.start_time_unix_nano == 20_000_000
    assert span_attrs(tool)["error.type"] == "_OTHER"


def test_create_sink_with_an_unknown_kind_still_names_otlp_among_the_kinds() -> None:
    with pytest.raises(PluginError, match="otlp"):
        create_plugin_manager().create_sink("otlp-typo", {})


def test_agent_tool_call_without_call_id_or_result_is_bounded() -> None:
    sink = create_sink({"endpoint": "http://127.0.0.1:9", "max_pending": 2, "logs": False, "metrics": False,
                        "traces": False})
    assert isinstance(sink, OtlpSink)
    for i in range(5):
        sink.write([Event.create(AgentToolCall(tool=ToolInfo(name="t"), call_id=f"c{i}"), confidence=FULL)])
    assert sink.builder.pending == 2
    assert sink.builder.incomplete == 3
    sink.close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_missing_collector_is_reported_at_start_up(protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    caplog.set_level(logging.WARNING, logger="oisp.sinks.otlp")
    sink = create_sink({"endpoint": f"http://127.0.0.1:{port}", "protocol": protocol, "timeout": 0.5})
    sink.close()
    assert any("nothing answers at" in r.getMessage() and str(port) in r.getMessage() for r in caplog.records)


def test_a_listening_collector_gives_no_start_up_warning(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="oisp.sinks.otlp")
    sink_for(receiver).close()
    assert not [r for r in caplog.records if "nothing answers" in r.getMessage()]


def test_failed_exports_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="oisp.sinks.otlp")
    sink = create_sink({"endpoint": f"http://127.0.0.1:{port}", "timeout": 0.5, "metrics": False})
    assert isinstance(sink, OtlpSink)
    request, response = exchange()
    sink.write([request, response, on_host(samples.network_connect())])
    sink.close()
    assert sink.stats.failed == {"spans": 1, "logs": 3}
    assert sink.stats.sent == {"spans": 0, "logs": 0}
    assert any("3 logs could not be exported" in r.getMessage() for r in caplog.records)
