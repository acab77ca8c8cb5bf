"""The otlp sink's pure parts: OISP -> GenAI attribute mapping, options, and the bounded span pairing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from tests.events import samples

from oisp.events import (
    AgentToolCall,
    AgentToolResult,
    AiRequest,
    AiResponse,
    Event,
    Host,
    Message,
    ModelInfo,
    ProcessInfo,
    ProviderInfo,
    Redacted,
    RedactionMarker,
    RelatedEvent,
    RequestParameters,
    ToolInfo,
    TraceContext,
)
from oisp.sinks.otlp import mapping
from oisp.sinks.otlp.options import OtlpOptions
from oisp.sinks.otlp.spans import SpanBuilder

FULL = samples.FULL


@pytest.mark.parametrize(("name", "endpoint", "expected"), [
    ("openai", "https://api.openai.com/v1/chat/completions", "openai"),
    ("anthropic", None, "anthropic"),
    ("azure_openai", "https://myres.openai.azure.com/openai/deployments/x", "azure.ai.openai"),
    ("aws_bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com/model/x/converse", "aws.bedrock"),
    ("google", "https://generativelanguage.googleapis.com/v1beta/models/gemini:generateContent", "gcp.gemini"),
    ("google", "https://us-central1-aiplatform.googleapis.com/v1/projects/p", "gcp.vertex_ai"),
    ("google", None, "gcp.gen_ai"),
    ("cohere", None, "cohere"),
    ("mistral", None, "mistral_ai"),
    ("groq", None, "groq"),
    ("deepseek", None, "deepseek"),
    ("perplexity", None, "perplexity"),
    ("xai", None, "x_ai"),
    ("ollama", None, "ollama"),
    ("openrouter", None, "openrouter"),
])
def test_provider_names_are_the_conventions_values_or_oisps(name: str, endpoint: str | None, expected: str) -> None:
    assert mapping.provider_name(ProviderInfo(name=name, endpoint=endpoint)) == expected


@pytest.mark.parametrize(("request_type", "operation"), [
    ("chat", "chat"), ("completion", "text_completion"), ("embedding", "embeddings"), (None, "chat"),
    ("other", "other"),
])
def test_operation_names(request_type: str | None, operation: str) -> None:
    assert mapping.operation_name(request_type) == operation


def test_server_address_and_port_come_from_the_endpoint() -> None:
    assert mapping.server_attributes(ProviderInfo(endpoint="http://localhost:11434/api/chat")) == {
        "server.address": "localhost", "server.port": 11434}
    assert mapping.server_attributes(ProviderInfo(endpoint="https://api.x.ai/v1")) == {
        "server.address": "api.x.ai", "server.port": 443}
    assert mapping.server_attributes(None) == {}


def test_parameters_only_when_set_and_redacted_content_stays_redacted() -> None:
    secret = Redacted(marker=RedactionMarker(reason="secret", detector="openai_key"))
    request = AiRequest(model=ModelInfo(id="m"), parameters=RequestParameters(top_p=0.9),
                        messages=[Message(role="user", content=secret)], extra={"system_prompt": "Be brief."})
    attrs = mapping.request_attributes(request, content=False)
    assert attrs["gen_ai.request.top_p"] == 0.9
    assert not {"gen_ai.request.temperature", "gen_ai.request.max_tokens", "gen_ai.request.stream"} & attrs.keys()
    assert "gen_ai.input.messages" not in attrs
    with_content = mapping.request_attributes(request, content=True)
    assert with_content["gen_ai.input.messages"] == \
        '[{"role":"user","parts":[{"type":"text","content":"[redacted: secret]"}]}]'
    assert with_content["gen_ai.system_instructions"] == '[{"type":"text","content":"Be brief."}]'


def test_trace_ids_prefer_the_events_own_trace_context_then_conversation_then_process() -> None:
    process = ProcessInfo(pid=7, start_time="2026-01-01T00:00:00.000000Z")
    event = Event.create(AiRequest(), confidence=FULL, process=process, host=Host(hostname="h"))
    by_process = mapping.trace_id_for(event)
    assert by_process is not None
    assert mapping.trace_id_for(event) == by_process
    assert mapping.trace_id_for(event, "conv-1") not in (None, by_process)
    other_start = event.with_context(process=ProcessInfo(pid=7, start_time="2026-01-02T00:00:00.000000Z"))
    assert mapping.trace_id_for(other_start) != by_process  # a reused pid is another process
    traced = event.with_context(trace_context=TraceContext(trace_id="0af7651916cd43dd8448eb211c80319c",
                                                           span_id="b7ad6b7169203331"))
    assert mapping.trace_id_for(traced) == 0x0AF7651916CD43DD8448EB211C80319C
    assert mapping.parent_span_id(traced) == 0xB7AD6B7169203331
    assert mapping.trace_id_for(Event.create(AiRequest(), confidence=FULL)) is None
    # without a process: the client connection (one process's), apart from the same id in another run
    on_connection = Event.create(AiRequest(), confidence=FULL, attrs={"oisp.connection_id": "c1.1"})
    assert mapping.trace_id_for(on_connection, run="a") == mapping.trace_id_for(on_connection, run="a")
    assert mapping.trace_id_for(on_connection, run="a") != mapping.trace_id_for(on_connection, run="b")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(i: int) -> Event:
    return Event.create(AiRequest(request_id=f"req_{i}", model=ModelInfo(id="m")), confidence=FULL)


def test_a_request_waits_for_its_response_only_until_pending_timeout() -> None:
    clock = Clock()
    builder = SpanBuilder(pending_timeout=30, clock=clock)
    first = request(1)
    spans, context = builder.feed(first)
    assert spans == []
    assert context is not None
    clock.now += 29
    assert builder.expire() == []
    clock.now += 2
    later = request(2).with_context(ts=first.ts + timedelta(seconds=31))
    builder.feed(later)
    [expired] = builder.expire()
    assert expired.attributes["error.type"] == "oisp.no_response"
    assert expired.attributes["oisp.incomplete"] == "no response within 30 s"
    assert expired.span_id == context.span_id  # the log record of the request points at this span
    assert expired.end_ns == mapping.ts_ns(later.ts)
    assert builder.pending == 1
    # a response arriving after its request expired still makes a (response-only) span
    [late], _ = builder.feed(Event.create(AiResponse(request_id="req_1", latency_ms=5), confidence=FULL))
    assert late.attributes["oisp.incomplete"] == "the request was not seen"


def test_at_most_max_pending_requests_wait_the_oldest_leaves_first() -> None:
    builder = SpanBuilder(max_pending=3)
    out = []
    for i in range(5):
        spans, _ = builder.feed(request(i))
        out += spans
    assert [s.attributes["oisp.request_id"] for s in out] == ["req_0", "req_1"]
    assert builder.pending == 3
    [span], _ = builder.feed(Event.create(AiResponse(request_id="req_4", success=True), confidence=FULL))
    assert "oisp.incomplete" not in span.attributes
    assert len(builder.drain()) == 2
    assert builder.pending == 0


def test_a_response_pairs_by_related_event_before_request_id() -> None:
    builder = SpanBuilder()
    first = request(1)
    builder.feed(first)
    response = Event.create(AiResponse(request_id="another-id"), confidence=FULL,
                            related_events=[RelatedEvent(event_id=first.event_id, relationship="caused_by")])
    [span], _ = builder.feed(response)
    assert span.attributes["oisp.request.event_id"] == first.event_id
    assert "oisp.incomplete" not in span.attributes


def test_tool_call_and_result_pair_by_call_id() -> None:
    builder = SpanBuilder(content=True)
    call = Event.create(AgentToolCall(tool=ToolInfo(name="grep"), call_id="c1", arguments={"q": "x"}),
                        confidence=FULL)
    assert builder.feed(call)[0] == []
    result = Event.create(AgentToolResult(call_id="c1", result="found"), confidence=FULL).with_context(
        ts=call.ts + timedelta(seconds=2))
    [span], _ = builder.feed(result)
    assert span.name == "execute_tool grep"
    assert span.end_ns - span.start_ns == 2_000_000_000
    assert span.attributes["gen_ai.tool.call.arguments"] == '{"q":"x"}'
    assert span.attributes["gen_ai.tool.call.result"] == '"found"'


def test_options_defaults_and_derived_urls() -> None:
    options = OtlpOptions.from_mapping({"endpoint": "http://collector:4318/otlp"})
    assert options.protocol == "http/protobuf"
    assert options.content is False
    assert options.signal_url("traces") == "http://collector:4318/otlp/v1/traces"
    assert options.insecure
    grpc = OtlpOptions.from_mapping({"endpoint": "https://collector", "protocol": "grpc",
                                     "headers": {"X-Token": "t"}})
    assert grpc.grpc_target == "collector:4317"
    assert not grpc.insecure
    assert grpc.headers == {"x-token": "t"}
