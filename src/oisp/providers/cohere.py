"""Cohere: Chat v1 and v2, and Embed, on ``api.cohere.com`` and ``api.cohere.ai``.

==============  ========================================================================================
path            decoder
==============  ========================================================================================
``/v1/chat``    :class:`ChatV1Decoder`: ``message``, ``chat_history``, ``preamble``, ``tools`` with
                ``parameter_definitions``, ``tool_results``; answered whole or as an NDJSON stream of
                ``event_type`` objects (``stream-start``, ``text-generation``, ``tool-calls-chunk``,
                ``tool-calls-generation``, ``stream-end`` with ``finish_reason`` and the whole response)
``/v2/chat``    :class:`ChatV2Decoder`: OpenAI-like messages (``tool`` messages with ``tool_call_id``);
                answered whole or as typed SSE (``message-start``, ``content-start/delta/end``,
                ``tool-plan-delta``, ``tool-call-start/delta/end`` with arguments in fragments,
                ``message-end`` with ``delta.finish_reason``, ``delta.usage`` and ``delta.error``)
``/v1/embed``,  :class:`EmbedDecoder`: ``ai.request`` and ``ai.embedding`` (inputs counted, vector size)
``/v2/embed``
==============  ========================================================================================

Usage: ``prompt_tokens``/``completion_tokens`` are the billed units (what the account pays for); the model's
own counts (``tokens``, which include Cohere's prompt template) are kept in the response's ``attrs`` as
``cohere.tokens.input_tokens`` and ``cohere.tokens.output_tokens``. Token counts Cohere sends as ``12.0`` are
read as integers.

The v2 tool plan (the model's reasoning before it calls tools) and ``thinking`` content are the response's
thinking. A response that called tools and finished ``COMPLETE`` (v1) is ``tool_calls``.

Tool call ids: v2 calls carry ids, echoed by ``tool`` messages. v1 calls have none: oisp synthesizes
``cohere_<16 hex digits>`` from the call's name and parameters; a v1 tool result names the call it answers
(``call.name``, ``call.parameters``), so it gets the same id. The same call made again later is a new call
(the registry keeps the latest), so its next result is reported again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import AuthInfo, Message, RequestParameters, ResponseError, ToolDefinition
from oisp.framing import NdjsonDecoder, NdjsonValue, SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    RequestFacts,
    ResponseState,
    StreamFraming,
    ToolCallRegistry,
    ToolResultFacts,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    auth_from_exchange,
    canonical_json,
    content_facts,
    json_or_none,
    message,
    normalize_finish_reason,
    parameters_or_none,
    with_images,
)
from oisp.provider_kit import synthesized_call_id as kit_synthesized_call_id
from oisp.redaction import sha256_text

__all__ = [
    "ENDPOINTS",
    "ROUTES",
    "ChatV1Decoder",
    "ChatV2Decoder",
    "EmbedDecoder",
    "cohere_auth",
    "read_usage",
    "synthesized_call_id",
    "v1_request_facts",
    "v2_request_facts",
]

#: Path -> API this module decodes.
ROUTES: Mapping[str, str] = {"/v1/chat": "chat_v1", "/v2/chat": "chat_v2", "/v1/embed": "embed",
                             "/v2/embed": "embed"}

_V1_ROLES = {"USER": "user", "CHATBOT": "assistant", "SYSTEM": "system", "TOOL": "tool"}
_TOOL_CHOICES = {"REQUIRED": "required", "NONE": "none", "AUTO": "auto"}


def synthesized_call_id(name: str | None, parameters: Any) -> str:
    """The id oisp gives a v1 tool call (which has none): ``cohere_`` and 16 hex digits of its name and
    parameters."""
    return kit_synthesized_call_id("cohere", name, parameters)


def _parameters(body: Mapping[str, Any]) -> RequestParameters | None:
    stop = body.get("stop_sequences")
    values: dict[str, Any] = {
        "temperature": as_number(body.get("temperature")), "top_p": as_number(body.get("p")),
        "max_tokens": as_int(body.get("max_tokens")),
        "frequency_penalty": as_number(body.get("frequency_penalty")),
        "presence_penalty": as_number(body.get("presence_penalty")),
        "stop": [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else None,
    }
    extra: dict[str, Any] = {k: body[k] for k in (
        "seed", "prompt_truncation", "force_single_step", "search_queries_only", "safety_mode", "thinking",
        "response_format", "strict_tools", "priority", "citation_options", "logprobs",
    ) if body.get(k) is not None}
    if body.get("k") is not None:
        extra["top_k"] = body["k"]
    if isinstance(body.get("documents"), list):
        extra["document_count"] = len(body["documents"])
    connectors = [as_mapping(c).get("id") for c in as_list(body.get("connectors"))]
    if connectors:
        extra["connectors"] = connectors
    return parameters_or_none(values, extra)


def _tool(name: Any, description: Any, schema: Any) -> ToolDefinition:
    return ToolDefinition(name=as_str(name), type="function",
                          description=description if isinstance(description, str) else None,
                          extra={"parameters_hash": sha256_text(canonical_json(schema))} if schema is not None else {})


# --- v1 ----------------------------------------------------------------------------------------------------

def _v1_results(value: Any, out: list[ToolResultFacts]) -> list[str]:
    ids = []
    for result in as_list(value):
        call = as_mapping(as_mapping(result).get("call"))
        name = as_str(call.get("name"))
        call_id = synthesized_call_id(name, call.get("parameters"))
        ids.append(call_id)
        out.append(ToolResultFacts(call_id=call_id, content=as_mapping(result).get("outputs"), name=name))
    return ids


def v1_request_facts(body: Any) -> RequestFacts:
    """The facts of a Chat v1 request body."""
    body = as_mapping(body)
    messages: list[Message] = []
    results: list[ToolResultFacts] = []
    for entry in as_list(body.get("chat_history")):
        entry = as_mapping(entry)
        role = _V1_ROLES.get(str(entry.get("role", "")).upper(), str(entry.get("role") or "user").lower())
        extra: dict[str, Any] = {}
        calls = [as_mapping(c) for c in as_list(entry.get("tool_calls"))]
        if calls:
            extra["tool_calls"] = [{"id": synthesized_call_id(as_str(c.get("name")), c.get("parameters")),
                                    "name": as_str(c.get("name"))} for c in calls]
        result_ids = _v1_results(entry.get("tool_results"), results)
        if result_ids:
            extra["tool_results"] = result_ids
        text = entry.get("message")
        if text is None and result_ids:
            text = canonical_json([as_mapping(r).get("outputs") for r in as_list(entry.get("tool_results"))])
        messages.append(message(role, text if isinstance(text, str) else None, **extra))
    result_ids = _v1_results(body.get("tool_results"), results)
    if result_ids:
        outputs = [as_mapping(r).get("outputs") for r in as_list(body.get("tool_results"))]
        messages.append(message("tool", canonical_json(outputs), tool_results=result_ids,
                                tool_call_id=result_ids[0] if len(result_ids) == 1 else None))
    current = body.get("message")
    if isinstance(current, str) and (current or not result_ids):
        messages.append(message("user", current))
    tools = [_tool(t.get("name"), t.get("description"), t.get("parameter_definitions"))
             for t in map(as_mapping, as_list(body.get("tools"))) if t]
    extra_facts = {"conversation_id": body["conversation_id"]} if isinstance(body.get("conversation_id"), str) \
        else {}
    return RequestFacts(request_type="chat", model=as_str(body.get("model")), streaming=body.get("stream") is True,
                        messages=messages, system_prompt=as_str(body.get("preamble")), tools=tools,
                        parameters=_parameters(body), tool_results=results, extra=extra_facts)


# --- v2 ----------------------------------------------------------------------------------------------------

def _v2_parts_text(content: Any) -> str | None:
    """The text of a v2 content value: text parts, and documents as their JSON (images are counted apart)."""
    if isinstance(content, str):
        return content
    texts = []
    for part in as_list(content):
        part = as_mapping(part)
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "document":
            data = as_mapping(part.get("document")).get("data")
            texts.append(data if isinstance(data, str) else canonical_json(data))
    return "\n".join(texts) if texts else None


def _v2_tool_content(content: Any) -> Any:
    """A v2 tool message's content as reported: a string as sent, documents as their data."""
    if not isinstance(content, list):
        return content
    values: list[Any] = []
    for part in content:
        part = as_mapping(part)
        if part.get("type") == "document":
            values.append(as_mapping(part.get("document")).get("data"))
        elif isinstance(part.get("text"), str):
            values.append(part["text"])
    return values[0] if len(values) == 1 else values


def v2_request_facts(body: Any) -> RequestFacts:
    """The facts of a Chat v2 request body."""
    body = as_mapping(body)
    messages: list[Message] = []
    results: list[ToolResultFacts] = []
    system: list[str] = []
    names: dict[str, str] = {}
    for raw in as_list(body.get("messages")):
        raw = as_mapping(raw)
        role = str(raw.get("role") or "user")
        content = raw.get("content")
        extra: dict[str, Any] = {}
        calls = []
        for call in map(as_mapping, as_list(raw.get("tool_calls"))):
            call_id, name = as_str(call.get("id")), as_str(as_mapping(call.get("function")).get("name"))
            calls.append({"id": call_id, "name": name})
            if call_id and name:
                names[call_id] = name
        if calls:
            extra["tool_calls"] = calls
        if as_str(raw.get("tool_plan")):
            extra["tool_plan"] = raw["tool_plan"]
        text = _v2_parts_text(content)
        msg = message(role, text, tool_call_id=as_str(raw.get("tool_call_id")), **extra)
        images = content_facts([p for p in as_list(content) if "image" in str(as_mapping(p).get("type", ""))])
        messages.append(with_images(msg, images.image_hashes))
        if role == "system" and text:
            system.append(text)
        call_id = as_str(raw.get("tool_call_id"))
        if role == "tool" and call_id:
            results.append(ToolResultFacts(call_id=call_id, content=_v2_tool_content(content),
                                           name=names.get(call_id)))
    tools = []
    for tool in map(as_mapping, as_list(body.get("tools"))):
        function = as_mapping(tool.get("function"))
        tools.append(_tool(function.get("name"), function.get("description"), function.get("parameters")))
    choice = body.get("tool_choice")
    return RequestFacts(
        request_type="chat", model=as_str(body.get("model")), streaming=body.get("stream") is True,
        messages=messages, system_prompt="\n".join(system) if system else None, tools=tools,
        tool_choice=_TOOL_CHOICES.get(choice.upper(), choice.lower()) if isinstance(choice, str) else None,
        parameters=_parameters(body), tool_results=results,
    )


# --- responses ---------------------------------------------------------------------------------------------

def read_usage(state: ResponseState, usage: Any) -> None:
    """Read a v2 ``usage`` object or a v1 ``meta`` object into ``state``."""
    usage = as_mapping(usage)
    billed = as_mapping(usage.get("billed_units"))
    tokens = as_mapping(usage.get("tokens"))
    prompt = as_int(billed.get("input_tokens"))
    completion = as_int(billed.get("output_tokens"))
    state.set_usage(
        prompt_tokens=prompt if prompt is not None else as_int(tokens.get("input_tokens")),
        completion_tokens=completion if completion is not None else as_int(tokens.get("output_tokens")),
        cached_tokens=as_int(usage.get("cached_tokens")),
    )
    for group, values in (("tokens", tokens), ("billed_units", billed)):
        for key, value in values.items():
            if as_int(value) is not None:
                state.attrs[f"cohere.{group}.{key}"] = as_int(value)


def cohere_auth(exchange: HttpExchange) -> AuthInfo | None:
    """Cohere authenticates with ``Authorization: Bearer <API key>``; its keys have no public prefix, so the
    shared reading would call them OAuth tokens."""
    auth = auth_from_exchange(exchange)
    if auth is not None and auth.type == "oauth":
        return attrs.evolve(auth, type="api_key")
    return auth


class _CohereDecoder(ApiDecoder):
    """What the chat decoders share: API-key auth, the end of a stream, finish reasons, errors."""

    #: The stream event that ends a complete stream.
    final_event = ""

    def __init__(self, *, context: DecoderContext | None = None,
                 registry: ToolCallRegistry | None = None, streaming_chunks: bool = False) -> None:
        super().__init__(context=context, registry=registry, streaming_chunks=streaming_chunks)
        self._ended = False
        self._streamed = False

    def auth_info(self, exchange: HttpExchange) -> AuthInfo | None:
        return cohere_auth(exchange)

    def _finish(self, reason: Any) -> None:
        if not isinstance(reason, str):
            return
        self.state.finish(reason)
        if reason == "ERROR" and self.state.error is None:
            self.state.error = ResponseError(type="generation_error", code=reason)

    def on_response_complete(self, exchange: HttpExchange) -> None:
        choice = self.state.choices.get(0)
        if choice is not None and choice.tool_calls and normalize_finish_reason(choice.finish_raw) == "stop":
            self.state.extra["finish_reason_raw"] = choice.finish_raw
            choice.finish_raw = "tool_calls"
        response = exchange.response
        ok = response is not None and 200 <= response.status < 300
        if ok and self._streamed and not self._ended and not exchange.partial:
            self.state.problems.append(f"stream ended before {self.final_event}")


class ChatV1Decoder(_CohereDecoder):
    """``/v1/chat``, whole or streamed as NDJSON."""

    final_event = "stream-end"

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        return v1_request_facts(body)

    def stream_framing(self, exchange: HttpExchange) -> StreamFraming | None:
        framing = super().stream_framing(exchange)
        if framing is None and self.request is not None and self.request.streaming:
            return NdjsonDecoder()  # application/stream+json
        return framing

    def _tool_calls(self, calls: Any) -> None:
        for position, call in enumerate(map(as_mapping, as_list(calls))):
            name, parameters = as_str(call.get("name")), call.get("parameters")
            self.state.tool_call(position, id=synthesized_call_id(name, parameters), name=name, type="function",
                                 parsed=parameters if isinstance(parameters, Mapping) else {})

    def _whole(self, body: Mapping[str, Any]) -> None:
        self.state.provider_request_id = as_str(body.get("response_id")) or self.state.provider_request_id
        if as_str(body.get("generation_id")):
            self.state.extra["generation_id"] = body["generation_id"]
        if body.get("tool_calls") and not self.state.choice(0).tool_calls:
            self._tool_calls(body.get("tool_calls"))
        read_usage(self.state, body.get("meta"))
        if isinstance(body.get("citations"), list):
            self.state.extra["citations"] = len(body["citations"])
        self._finish(body.get("finish_reason"))

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        body = as_mapping(body)
        self.state.add_text(as_str(body.get("text")))
        self._whole(body)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, NdjsonValue):
            return
        self._streamed = True
        event = as_mapping(item.value)
        kind = event.get("event_type")
        if kind == "stream-start":
            if as_str(event.get("generation_id")):
                self.state.extra["generation_id"] = event["generation_id"]
        elif kind == "text-generation":
            self.state.add_text(as_str(event.get("text")))
        elif kind == "tool-calls-chunk":
            delta = as_mapping(event.get("tool_call_delta"))
            index = as_int(delta.get("index"))
            if index is not None:
                self.state.tool_call(index, name=as_str(delta.get("name")), type="function",
                                     arguments=as_str(delta.get("parameters")))
            self.state.add_thinking(as_str(delta.get("text")))
        elif kind == "tool-calls-generation":
            if not self.state.choice(0).thinking:
                self.state.add_thinking(as_str(event.get("text")))
            self._tool_calls(event.get("tool_calls"))
        elif kind == "stream-end":
            self._ended = True
            self._whole(as_mapping(event.get("response")))
            self._finish(event.get("finish_reason"))


class ChatV2Decoder(_CohereDecoder):
    """``/v2/chat``, whole or streamed as typed SSE."""

    final_event = "message-end"

    def __init__(self, *, context: DecoderContext | None = None,
                 registry: ToolCallRegistry | None = None, streaming_chunks: bool = False) -> None:
        super().__init__(context=context, registry=registry, streaming_chunks=streaming_chunks)
        #: Content index -> content type (text or thinking), for the deltas that follow its start.
        self._content: dict[int, str] = {}

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        return v2_request_facts(body)

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        body = as_mapping(body)
        self.state.provider_request_id = as_str(body.get("id")) or self.state.provider_request_id
        msg = as_mapping(body.get("message"))
        for part in map(as_mapping, as_list(msg.get("content"))):
            if part.get("type") == "thinking":
                self.state.add_thinking(as_str(part.get("thinking")))
            elif isinstance(part.get("text"), str):
                self.state.add_text(part["text"])
        self.state.add_thinking(as_str(msg.get("tool_plan")))
        for position, call in enumerate(map(as_mapping, as_list(msg.get("tool_calls")))):
            function = as_mapping(call.get("function"))
            self.state.tool_call(position, id=as_str(call.get("id")), name=as_str(function.get("name")),
                                 type=as_str(call.get("type")) or "function",
                                 arguments=as_str(function.get("arguments")))
        if isinstance(msg.get("citations"), list):
            self.state.extra["citations"] = len(msg["citations"])
        read_usage(self.state, body.get("usage"))
        self._finish(body.get("finish_reason"))

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent) or item.data.strip() in ("", "[DONE]"):
            return
        self._streamed = True
        value, problem = json_or_none(item.data)
        if problem is not None or not isinstance(value, Mapping):
            self.state.problems.append(f"stream event {item.event!r}: {problem or 'not an object'}")
            return
        kind = value.get("type") or item.event
        index = as_int(value.get("index"))
        delta = as_mapping(value.get("delta"))
        msg = as_mapping(delta.get("message"))
        if kind == "message-start":
            self.state.provider_request_id = as_str(value.get("id")) or self.state.provider_request_id
        elif kind in ("content-start", "content-delta"):
            content = as_mapping(msg.get("content"))
            position = index or 0
            if kind == "content-start":
                self._content[position] = str(content.get("type") or "text")
            if self._content.get(position) == "thinking" or "thinking" in content:
                self.state.add_thinking(as_str(content.get("thinking")))
            else:
                self.state.add_text(as_str(content.get("text")))
        elif kind == "tool-plan-delta":
            self.state.add_thinking(as_str(msg.get("tool_plan")))
        elif kind in ("tool-call-start", "tool-call-delta") and index is not None:
            call = as_mapping(msg.get("tool_calls"))
            function = as_mapping(call.get("function"))
            self.state.tool_call(index, id=as_str(call.get("id")), name=as_str(function.get("name")),
                                 type=as_str(call.get("type")), arguments=as_str(function.get("arguments")))
        elif kind == "citation-start":
            self.state.extra["citations"] = int(self.state.extra.get("citations", 0)) + 1
        elif kind == "message-end":
            self._ended = True
            read_usage(self.state, delta.get("usage"))
            if as_str(delta.get("error")):
                self.state.error = ResponseError(type="stream_error", message=delta["error"])
            self._finish(delta.get("finish_reason"))


class EmbedDecoder(ApiDecoder):
    """``/v1/embed`` and ``/v2/embed``."""

    def auth_info(self, exchange: HttpExchange) -> AuthInfo | None:
        return cohere_auth(exchange)

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = as_mapping(body)
        count = sum(len(as_list(body.get(key))) for key in ("texts", "images", "inputs"))
        extra: dict[str, Any] = {"input_count": count}
        for key in ("input_type", "embedding_types", "truncate", "output_dimension"):
            if body.get(key) is not None:
                extra[key] = body[key]
        return RequestFacts(request_type="embedding", model=as_str(body.get("model")), extra=extra)

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        body = as_mapping(body)
        self.state.provider_request_id = as_str(body.get("id")) or self.state.provider_request_id
        embeddings = body.get("embeddings")
        vectors: list[Any] = []
        if isinstance(embeddings, list):
            vectors = embeddings
        elif isinstance(embeddings, Mapping):  # by type: {"float": [[...]], "int8": [[...]]}
            vectors = next((v for v in embeddings.values() if isinstance(v, list) and v), [])
        vectors = [v for v in vectors if isinstance(v, list)]
        self.state.embedding_count = len(vectors)
        if vectors:
            self.state.embedding_dimensions = len(vectors[0])
        meta = as_mapping(body.get("meta"))
        read_usage(self.state, meta)
        billed = as_mapping(meta.get("billed_units"))
        self.state.set_usage(total_tokens=as_int(billed.get("input_tokens")))


def decoder_for(exchange: HttpExchange, settings: DecoderSettings | None = None,
                context: DecoderContext | None = None) -> ApiDecoder | None:
    """A decoder for an exchange with the Cohere API, or None when this module does not read it."""
    if exchange.connection.provider != "cohere" or exchange.request.method != "POST":
        return None
    api = ROUTES.get(exchange.request.path.rstrip("/"))
    chunks = (settings or DecoderSettings()).streaming_chunks
    if api == "chat_v1":
        return ChatV1Decoder(context=context, streaming_chunks=chunks)
    if api == "chat_v2":
        return ChatV2Decoder(context=context, streaming_chunks=chunks)
    if api == "embed":
        return EmbedDecoder(context=context, streaming_chunks=chunks)
    return None


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    return decoder_for(exchange, settings, context)


#: The endpoints of the Cohere API, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("cohere", "api.cohere.ai"),
    EndpointSpec("cohere", "api.cohere.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
