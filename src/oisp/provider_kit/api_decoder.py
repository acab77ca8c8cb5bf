"""The decoder most provider plugins subclass: :class:`ApiDecoder`.

A provider plugin claims exchanges in ``oisp_exchange_decoder`` and returns an
:class:`~oisp.hookspecs.ExchangeDecoder`. Most AI APIs are "JSON request, JSON or streamed response", so the kit
offers :class:`ApiDecoder`, which does the common work — parsing the request, choosing the stream
framing, accumulating the response, emitting ``ai.request``, ``ai.response``, ``agent.tool_call``,
``agent.tool_result`` (and optionally ``ai.streaming_chunk``) with the links between them — and leaves to each
provider only what differs: :meth:`ApiDecoder.parse_request`, :meth:`ApiDecoder.on_stream_item` and
:meth:`ApiDecoder.on_response_json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import (
    AgentToolCall,
    AgentToolResult,
    AiEmbedding,
    AiRequest,
    AiResponse,
    AiStreamingChunk,
    AuthInfo,
    Choice,
    ChunkDelta,
    Confidence,
    Event,
    Message,
    ModelInfo,
    ProviderInfo,
    RelatedEvent,
    RequestParameters,
    ResponseError,
    ToolCall,
    ToolDefinition,
    ToolInfo,
    Usage,
)
from oisp.framing import EventStreamDecoder, FramingError, JsonArrayDecoder, NdjsonDecoder, SseDecoder
from oisp.http.exchange import HttpExchange
from oisp.provider_kit.content import message
from oisp.provider_kit.context import DecoderContext
from oisp.provider_kit.exchange import (
    auth_from_exchange,
    json_or_none,
    latencies,
    provider_name,
    request_id_for,
)
from oisp.provider_kit.tool_calls import ToolCallRegistry, tool_type_for
from oisp.redaction import redact_url, sha256_text

__all__ = [
    "ApiDecoder",
    "RequestFacts",
    "ResponseState",
    "StreamFraming",
    "ToolResultFacts",
    "normalize_finish_reason",
]

logger = logging.getLogger(__name__)

#: The incremental framings a streamed response may use.
StreamFraming = SseDecoder | NdjsonDecoder | JsonArrayDecoder | EventStreamDecoder

FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "complete": "stop", "finish": "stop",
    "eos": "stop", "COMPLETE": "stop", "STOP": "stop", "end_of_turn": "stop",
    "length": "length", "max_tokens": "length", "MAX_TOKENS": "length", "model_length": "length",
    "model_context_window_exceeded": "length", "max_output_tokens": "length",
    "tool_calls": "tool_calls", "tool_use": "tool_calls", "function_call": "tool_calls", "TOOL_CALL": "tool_calls",
    "content_filter": "content_filter", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "guardrail_intervened": "content_filter", "refusal": "content_filter", "content_filtered": "content_filter",
    "ERROR": "error", "error": "error", "ERROR_TOXIC": "content_filter", "ERROR_LIMIT": "length",
    "MALFORMED_FUNCTION_CALL": "error",
}


def normalize_finish_reason(raw: Any) -> str | None:
    """The OISP finish reason (stop, length, tool_calls, content_filter, error, other) for a provider's value."""
    if raw is None:
        return None
    if isinstance(raw, int):  # integer-encoded enums (Vertex AI)
        return {1: "stop", 2: "length", 3: "content_filter", 4: "content_filter"}.get(raw, "other")
    text = str(raw)
    return FINISH_REASONS.get(text) or FINISH_REASONS.get(text.lower()) or "other"


# --- request and response facts ------------------------------------------------------------------------------

@attrs.define
class ToolResultFacts:
    """A tool result found in a request."""

    call_id: str
    content: Any
    name: str | None = None
    is_error: bool | None = None


@attrs.define
class RequestFacts:
    """What a provider found in a request body."""

    request_type: str = "chat"
    model: str | None = None
    streaming: bool = False
    messages: list[Message] = attrs.field(factory=list)
    system_prompt: str | None = None
    tools: list[ToolDefinition] = attrs.field(factory=list)
    tool_choice: Any = None
    parameters: RequestParameters | None = None
    tool_results: list[ToolResultFacts] = attrs.field(factory=list)
    #: Extra keys for ``data`` (schema-compatible additions such as ``input_count``).
    extra: dict[str, Any] = attrs.field(factory=dict)
    #: Extra keys for the request event's ``attrs``.
    attrs: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class _ToolCallState:
    id: str | None = None
    name: str | None = None
    type: str | None = "function"
    arguments: list[str] = attrs.field(factory=list)
    parsed: Any = None


@attrs.define
class _ChoiceState:
    role: str = "assistant"
    text: list[str] = attrs.field(factory=list)
    thinking: list[str] = attrs.field(factory=list)
    finish_raw: Any = None
    tool_calls: dict[int, _ToolCallState] = attrs.field(factory=dict)


@attrs.define
class ResponseState:
    """The response as it accumulates, chunk by chunk or from one JSON body."""

    model: str | None = None
    provider_request_id: str | None = None
    choices: dict[int, _ChoiceState] = attrs.field(factory=dict)
    usage: dict[str, int] = attrs.field(factory=dict)
    error: ResponseError | None = None
    chunks: int = 0
    problems: list[str] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)
    #: Extra keys for the response event's ``attrs`` (provider measurements such as durations).
    attrs: dict[str, Any] = attrs.field(factory=dict)
    #: Embedding responses: how many vectors and their size.
    embedding_count: int | None = None
    embedding_dimensions: int | None = None
    #: Proxy timestamp (``time.monotonic_ns``) of the response chunk being decoded; None outside streams.
    now_ns: int | None = None
    #: When the first generated content (text, reasoning or a tool call) arrived: the time to first token.
    first_content_ns: int | None = None

    def _content_seen(self) -> None:
        if self.first_content_ns is None:
            self.first_content_ns = self.now_ns

    def choice(self, index: int = 0) -> _ChoiceState:
        choice = self.choices.get(index)
        if choice is None:  # not setdefault: it would build a state per stream chunk
            choice = self.choices[index] = _ChoiceState()
        return choice

    def add_text(self, text: str | None, index: int = 0) -> None:
        if text:
            self.choice(index).text.append(text)
            self._content_seen()

    def add_thinking(self, text: str | None, index: int = 0) -> None:
        if text:
            self.choice(index).thinking.append(text)
            self._content_seen()

    def tool_call(self, position: int, *, choice: int = 0, id: str | None = None, name: str | None = None,
                  arguments: str | None = None, parsed: Any = None, type: str | None = None) -> None:
        """Add to the tool call at ``position`` (fragments of arguments are concatenated in order)."""
        calls = self.choice(choice).tool_calls
        state = calls.get(position)
        if state is None:
            state = calls[position] = _ToolCallState()
        self._content_seen()
        if id:
            state.id = id
        if name:
            state.name = name
        if type:
            state.type = type
        if arguments:
            state.arguments.append(arguments)
        if parsed is not None:
            state.parsed = parsed

    def finish(self, reason: Any, index: int = 0) -> None:
        if reason is not None:
            self.choice(index).finish_raw = reason

    def set_usage(self, **counts: Any) -> None:
        """Token counts by OISP name (prompt_tokens, completion_tokens, total_tokens, cached_tokens,
        reasoning_tokens, cache_creation_tokens); None values are ignored, later values win."""
        for key, value in counts.items():
            if isinstance(value, int) and not isinstance(value, bool):
                self.usage[key] = value


class ApiDecoder:
    """The common decoder of JSON APIs; subclasses say how their requests and responses look."""

    #: The provider name (``openai``); the endpoint table's name is used when None.
    provider: str | None = None

    def __init__(self, *, context: DecoderContext | None = None, registry: ToolCallRegistry | None = None,
                 streaming_chunks: bool = False) -> None:
        #: The run's state (the hook's ``context``); a decoder built without one has a run of its own.
        self.context = context if context is not None else DecoderContext()
        #: Where tool calls are remembered and results claimed (the run's, unless one is given).
        self.registry = registry if registry is not None else self.context.tool_calls
        self.streaming_chunks = streaming_chunks
        self.request: RequestFacts | None = None
        self.state = ResponseState()
        self._request_event: Event | None = None
        self._framing: StreamFraming | None = None
        self._framing_chosen = False
        self._request_problem: str | None = None

    # --- provider hooks --------------------------------------------------------------------------
    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        """Facts of the request body (already parsed JSON; may be any JSON value)."""
        raise NotImplementedError

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        """Fill :attr:`state` from a complete (non-streamed) JSON response body."""
        raise NotImplementedError

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        """Fill :attr:`state` from one item of a streamed response (an SseEvent, NdjsonValue, ...)."""
        raise NotImplementedError

    def on_response_complete(self, exchange: HttpExchange) -> None:
        """Called once the whole response has been read (streamed or not, also when it was cut short), before
        the response event is built: settle what only the end can tell (default: nothing)."""

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        """The error of a non-2xx response body (default: OpenAI-style ``{"error": {...}}``)."""
        error = body.get("error") if isinstance(body, Mapping) else None
        if isinstance(error, Mapping):
            return ResponseError(type=_str(error.get("type") or error.get("status")),
                                 message=_str(error.get("message")), code=_str(error.get("code")))
        if isinstance(error, str):
            return ResponseError(type="error", message=error)
        if isinstance(body, Mapping) and body.get("message"):
            return ResponseError(type=_str(body.get("type") or body.get("__type") or "error"),
                                 message=_str(body.get("message")))
        return ResponseError(type="http_error")

    def stream_framing(self, exchange: HttpExchange) -> StreamFraming | None:
        """The framing of a streamed response, from its content type (None: not streamed, buffer the body)."""
        response = exchange.response
        content_type = (response.headers.get("content-type") or "") if response is not None else ""
        content_type = content_type.lower()
        if "text/event-stream" in content_type:
            return SseDecoder()
        if "ndjson" in content_type or "jsonl" in content_type or "x-json-stream" in content_type:
            return NdjsonDecoder()
        if "vnd.amazon.eventstream" in content_type:
            return EventStreamDecoder()
        return None

    def auth_info(self, exchange: HttpExchange) -> AuthInfo | None:
        """How the request authenticated (default: :func:`auth_from_exchange`); a provider whose bearer tokens
        are API keys without a known prefix says so here."""
        return auth_from_exchange(exchange)

    def provider_info(self, exchange: HttpExchange) -> ProviderInfo:
        """Provider name and endpoint (URL with credentials removed), plus organization and project headers."""
        headers = exchange.request.headers
        return ProviderInfo(
            name=provider_name(exchange, self.provider), endpoint=redact_url(exchange.request.url),
            organization_id=headers.get("openai-organization"),
            project_id=headers.get("openai-project"),
        )

    # --- ExchangeDecoder -------------------------------------------------------------------------
    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        body, problem = json_or_none(exchange.request.body)
        if problem is not None and exchange.request.body:
            self._request_problem = f"request body: {problem}"
        try:
            facts = self.parse_request(exchange, body if body is not None else {})
        except Exception as exc:  # a provider that cannot read this body still reports the call
            logger.info("%s: could not read the request body of %s: %s", type(self).__name__,
                        exchange.request.path, exc)
            self._request_problem = f"request body not understood: {type(exc).__name__}"
            facts = RequestFacts(request_type="other")
        self.request = facts
        request_id = request_id_for(exchange)
        data = AiRequest(
            request_id=request_id, provider=self.provider_info(exchange),
            model=ModelInfo(id=facts.model) if facts.model else None, auth=self.auth_info(exchange),
            request_type=facts.request_type, streaming=facts.streaming, messages=facts.messages or None,
            messages_count=len(facts.messages) if facts.messages else None,
            has_system_prompt=facts.system_prompt is not None or any(m.role == "system" for m in facts.messages),
            system_prompt_hash=sha256_text(facts.system_prompt) if facts.system_prompt else None,
            tools=facts.tools or None, tools_count=len(facts.tools), tool_choice=facts.tool_choice,
            parameters=facts.parameters, has_images=any(m.has_images for m in facts.messages) or None,
            image_count=sum(m.image_count or 0 for m in facts.messages) or None,
            extra={**({"system_prompt": facts.system_prompt} if facts.system_prompt else {}), **facts.extra},
        )
        event = Event.create(data, confidence=self._confidence(exchange, request_side=True),
                             attrs=self._attrs(exchange, facts.attrs))
        self._request_event = event
        events = [event, *self._tool_result_events(exchange, facts)]
        return events

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        if not self._framing_chosen:
            self._framing_chosen = True
            status = exchange.response.status if exchange.response is not None else 0
            self._framing = self.stream_framing(exchange) if 200 <= status < 300 else None
        if self._framing is None:
            return ()
        chunks = exchange.timings.response_chunks
        self.state.now_ns = chunks[-1][0] if chunks else None
        return self._consume(exchange, self._framing.feed(data))

    def _consume(self, exchange: HttpExchange, items: Iterable[Any]) -> list[Event]:
        out: list[Event] = []
        for item in items:
            if isinstance(item, FramingError):
                self.state.problems.append(f"{item.framing} {item.kind.value}: {item.reason}")
                continue
            self.state.chunks += 1
            before = self._snapshot() if self.streaming_chunks else None
            try:
                self.on_stream_item(exchange, item)
            except Exception as exc:
                self.state.problems.append(f"stream item not understood: {type(exc).__name__}: {exc}")
                logger.debug("stream item not understood", exc_info=True)
                continue
            if before is not None:
                out += self._chunk_events(exchange, before)
        return out

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        events: list[Event] = []
        if self._framing is not None:
            events += self._consume(exchange, self._framing.close())
        response = exchange.response
        status = response.status if response is not None else None
        if response is not None and self._framing is None and response.body:
            body, problem = json_or_none(response.body)
            if status is not None and status >= 400:
                self.state.error = self.on_error_json(exchange, body if body is not None else {})
                if self.state.error.message is None and body is None:
                    self.state.error = attrs.evolve(self.state.error, message=_snippet(response.body))
            elif problem is not None:
                self.state.problems.append(f"response body: {problem}")
            else:
                try:
                    self.on_response_json(exchange, body)
                except Exception as exc:
                    self.state.problems.append(f"response body not understood: {type(exc).__name__}")
                    logger.debug("response body not understood", exc_info=True)
        elif status is not None and status >= 400 and self.state.error is None:
            self.state.error = ResponseError(type="http_error", code=str(status))
        try:
            self.on_response_complete(exchange)
        except Exception as exc:
            self.state.problems.append(f"response not understood: {type(exc).__name__}")
            logger.debug("response not understood", exc_info=True)
        response_event = self._response_event(exchange, status)
        events.append(response_event)
        events += self._tool_call_events(exchange, response_event)
        return events

    # --- event construction ----------------------------------------------------------------------
    def _confidence(self, exchange: HttpExchange, *, request_side: bool) -> Confidence:
        limitations = list(exchange.partial_reasons)
        if request_side and self._request_problem:
            limitations.append(self._request_problem)
        if not request_side:
            limitations += self.state.problems
        complete = not limitations and (request_side or not exchange.partial)
        return Confidence(
            level="high", completeness="full" if complete else "partial",
            reasons=["known_endpoint", "payload_parsed"], limitations=limitations or None,
            content_source="mitm_decryption" if exchange.connection.tls else "plaintext_capture",
            ai_detection_method="known_endpoint",
        )

    def _attrs(self, exchange: HttpExchange, extra: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"http.method": exchange.request.method, "http.path": redact_url(exchange.request.target),
                               "oisp.connection_id": exchange.connection.connection_id}
        if exchange.stream_id is not None:
            out["http.stream_id"] = exchange.stream_id
        if exchange.response is not None:
            out["http.status"] = exchange.response.status
        out.update(extra)
        return out

    def _response_event(self, exchange: HttpExchange, status: int | None) -> Event:
        facts = self.request or RequestFacts()
        state = self.state
        response_headers = exchange.response.headers if exchange.response is not None else None
        if state.provider_request_id is None and response_headers is not None:
            state.provider_request_id = (response_headers.get("x-request-id") or response_headers.get("request-id")
                                         or response_headers.get("x-amzn-requestid"))
        total, ttft = latencies(exchange, state.first_content_ns)
        success = status is not None and 200 <= status < 300 and state.error is None and not exchange.partial
        request_id = request_id_for(exchange)
        related = [RelatedEvent(event_id=self._request_event.event_id, relationship="caused_by")] \
            if self._request_event is not None else None
        confidence = self._confidence(exchange, request_side=False)
        model = ModelInfo(id=state.model or facts.model) if (state.model or facts.model) else None
        if facts.request_type == "embedding" and success:  # a failed one is an ai.response with its error
            data_embedding = AiEmbedding(
                provider=self.provider_info(exchange), model=model,
                input_count=facts.extra.get("input_count"), total_tokens=state.usage.get("total_tokens")
                or state.usage.get("prompt_tokens"), dimensions=state.embedding_dimensions, latency_ms=total,
                extra=dict(state.extra),
            )
            return Event.create(data_embedding, confidence=confidence, attrs=self._attrs(exchange, {
                "oisp.request_id": request_id, "oisp.success": success, **state.attrs}), related_events=related)
        choices: list[Choice] = []
        calls: list[ToolCall] = []
        finish: str | None = None
        thinking: list[str] = []
        for index in sorted(state.choices):
            choice = state.choices[index]
            text = "".join(choice.text) if choice.text else None
            reason = normalize_finish_reason(choice.finish_raw)
            finish = finish or reason
            choice_calls = [self._tool_call(call) for _, call in sorted(choice.tool_calls.items())]
            calls += choice_calls
            if choice.thinking:
                thinking.append("".join(choice.thinking))
            choices.append(Choice(index=index, message=message(choice.role, text), finish_reason=reason,
                                  extra={"finish_reason_raw": choice.finish_raw}
                                  if reason == "other" and choice.finish_raw is not None else {}))
        usage = Usage(**dict[str, Any](state.usage)) if state.usage else None
        if usage is not None and usage.total_tokens is None and usage.prompt_tokens is not None \
                and usage.completion_tokens is not None:
            usage = attrs.evolve(usage, total_tokens=usage.prompt_tokens + usage.completion_tokens)
        error = state.error
        if error is None and status is not None and status >= 400:
            error = ResponseError(type="http_error", code=str(status))
        if error is None and exchange.partial:
            error = ResponseError(type="incomplete", message="; ".join(exchange.partial_reasons))
        data = AiResponse(
            request_id=request_id, provider_request_id=state.provider_request_id,
            provider=self.provider_info(exchange), model=model, status_code=status, success=success, error=error,
            choices=choices or None, tool_calls=calls or None, tool_calls_count=len(calls) if choices else None,
            usage=usage, latency_ms=total, time_to_first_token_ms=ttft, finish_reason=finish,
            extra={**({"thinking": "\n".join(thinking)} if thinking else {}), **state.extra},
        )
        return Event.create(data, confidence=confidence, attrs=self._attrs(exchange, state.attrs),
                            related_events=related)

    @staticmethod
    def _tool_call(call: _ToolCallState) -> ToolCall:
        arguments: str | dict[str, Any] | None
        if call.parsed is not None:
            arguments = call.parsed if isinstance(call.parsed, dict) else json.dumps(call.parsed)
        else:
            arguments = "".join(call.arguments) if call.arguments else None
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True) if arguments else None
        return ToolCall(id=call.id, name=call.name, type=call.type, arguments=arguments,
                        arguments_hash=sha256_text(text) if text else None)

    def _tool_call_events(self, exchange: HttpExchange, response_event: Event) -> list[Event]:
        out: list[Event] = []
        calls = getattr(response_event.data, "tool_calls", None) or []
        for call in calls:
            arguments = call.arguments
            parsed: dict[str, Any]
            if isinstance(arguments, dict):
                parsed = arguments
            else:
                value, _ = json_or_none(arguments or "")
                parsed = value if isinstance(value, dict) else ({} if not arguments else {"_raw": arguments})
            event = Event.create(
                AgentToolCall(tool=ToolInfo(name=call.name, type=tool_type_for(call.name), provider="native"),
                              call_id=call.id, triggered_by="llm_decision", arguments=parsed,
                              arguments_hash=call.arguments_hash),
                confidence=Confidence(level="high", completeness=response_event.confidence.completeness,
                                      reasons=["llm_tool_call_observed"], content_source=
                                      response_event.confidence.content_source),
                related_events=[RelatedEvent(event_id=response_event.event_id, relationship="caused_by")],
                attrs={"oisp.connection_id": exchange.connection.connection_id},
            )
            if call.id:
                self.registry.record_call(call.id, event.event_id, call.name)
            out.append(event)
        return out

    def _tool_result_events(self, exchange: HttpExchange, facts: RequestFacts) -> list[Event]:
        out: list[Event] = []
        for result in facts.tool_results:
            report, record = self.registry.claim_result(result.call_id)
            if not report:
                continue
            content = result.content
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)
            value: Any = content
            if isinstance(content, str):
                parsed, _ = json_or_none(content)
                value = parsed if isinstance(parsed, dict | list) else content
            related = [RelatedEvent(event_id=record.event_id, relationship="parent")] if record else None
            name = result.name or (record.name if record else None)
            out.append(Event.create(
                AgentToolResult(call_id=result.call_id, tool=ToolInfo(name=name, type=tool_type_for(name))
                                if name else None,
                                success=None if result.is_error is None else not result.is_error, result=value,
                                result_hash=sha256_text(text), result_size_bytes=len(text.encode("utf-8"))),
                confidence=Confidence(level="high", completeness="full", reasons=["tool_result_in_request"],
                                      content_source="mitm_decryption" if exchange.connection.tls
                                      else "plaintext_capture"),
                related_events=related, attrs={"oisp.connection_id": exchange.connection.connection_id,
                                               "oisp.request_id": request_id_for(exchange)},  # the carrying request
            ))
        return out

    def _snapshot(self) -> dict[int, tuple[int, int, Any, dict[int, int]]]:
        """Per choice: how many text pieces, thinking pieces, the finish reason and argument pieces per call
        (counts of pieces, not characters, so taking a snapshot per chunk stays cheap on long answers)."""
        return {i: (len(c.text), len(c.thinking), c.finish_raw, {p: len(t.arguments) for p, t in c.tool_calls.items()})
                for i, c in self.state.choices.items()}

    def _chunk_events(self, exchange: HttpExchange,
                      before: dict[int, tuple[int, int, Any, dict[int, int]]]) -> list[Event]:
        """One ``ai.streaming_chunk`` per choice the last stream item changed."""
        out: list[Event] = []
        for index, choice in sorted(self.state.choices.items()):
            texts, thoughts, finish, calls = before.get(index, (0, 0, None, {}))
            text = "".join(choice.text[texts:])
            thinking = "".join(choice.thinking[thoughts:])
            deltas = []
            for position, call in choice.tool_calls.items():
                args = "".join(call.arguments[calls.get(position, 0):])
                if args or position not in calls:
                    deltas.append(ToolCall(id=call.id, name=call.name, arguments=args or None))
            finished = choice.finish_raw is not None and choice.finish_raw != finish
            if text or thinking or deltas or finished:
                extra: dict[str, Any] = {"thinking": thinking} if thinking else {}
                if index:
                    extra["choice_index"] = index
                out.append(Event.create(
                    AiStreamingChunk(request_id=request_id_for(exchange),
                                     chunk_index=self.state.chunks - 1,
                                     delta=ChunkDelta(content=text or None, tool_calls=deltas or None),
                                     finish_reason=normalize_finish_reason(choice.finish_raw) if finished else None,
                                     extra=extra),
                    confidence=Confidence(level="high", completeness="full"),
                ))
        return out


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _snippet(body: bytes | bytearray) -> str:
    return bytes(body[:200]).decode("utf-8", "replace")
