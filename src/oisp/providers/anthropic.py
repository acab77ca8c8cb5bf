"""Anthropic: the Messages API, its token counter and the legacy Text Completions API.

Claims POSTs on hosts the endpoint table names ``anthropic``:

==============================  ===========================================================================
``/v1/messages``                chat, whole or streamed (typed SSE)
``/v1/messages/count_tokens``   ``request_type`` ``other``; the count is ``counted_input_tokens`` in the response
``/v1/complete``                legacy text completion, whole or streamed
==============================  ===========================================================================

:class:`MessagesDecoder` also reads Claude on Vertex AI (``publishers/anthropic/models/{model}:rawPredict`` and
``:streamRawPredict``), which :mod:`oisp.providers.google` hands to it with the model taken from the path.

Requests: ``system`` as a string or a list of text blocks (the system prompt, not a message); messages with
text, images (``base64`` sources hashed from their decoded bytes, ``url``/``file`` sources from the reference;
never kept), ``tool_use`` blocks (listed in the message's ``extra.tool_calls``) and ``tool_result`` blocks (the
message's text includes the result's text; each one is an ``agent.tool_result`` linked to the ``agent.tool_call``
of the same ``tool_use_id``); tools, with server and Anthropic-defined tools (``bash_*``, ``computer_*``,
``web_search_*``) kept by their type; ``tool_choice`` (``auto``, ``any`` → ``required``, ``none``, a named tool
is kept as given, which the schema mapping turns into ``specific``); sampling parameters; the
``anthropic-version`` and ``anthropic-beta`` headers in ``attrs``.

Responses: text, ``thinking`` (the response's ``extra.thinking``; signatures and redacted thinking are only
counted), ``tool_use`` blocks (arguments streamed as ``input_json_delta`` fragments are joined, then parsed),
server tool uses (executed by Anthropic, so listed in ``extra.server_tool_uses``, not reported as agent tool
calls), the stop reason (``end_turn``/``stop_sequence`` → stop, ``max_tokens`` → length, ``tool_use`` →
tool_calls, ``refusal`` → content_filter, ``pause_turn`` → other with the raw value kept), an ``error`` event
inside a 200 stream, and a stream that ends before ``message_stop`` (a partial event).

Usage: Anthropic counts ``input_tokens`` without the cached part; oisp reports ``prompt_tokens`` as the whole
prompt, ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``, so that ``cached_tokens``
(``cache_read_input_tokens``) and ``cache_creation_tokens`` are parts of it, as they are for every other provider.
The provider request id is the ``request-id`` header; the message id is ``extra.message_id``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import Message, ProviderInfo, RequestParameters, ResponseError, ToolDefinition
from oisp.framing import SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    MessageParts,
    RequestFacts,
    ToolCallRegistry,
    ToolResultFacts,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    base64_digest,
    canonical_json,
    content_facts,
    json_or_none,
    message,
    parameters_or_none,
)
from oisp.redaction import sha256_text

__all__ = ["ENDPOINTS", "ROUTES", "MessagesDecoder", "TextCompletionDecoder", "messages_request_facts"]

#: Path -> operation this module decodes.
ROUTES: Mapping[str, str] = {
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/complete": "complete",
}

_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


# --- request side ------------------------------------------------------------------------------------------

def _image_hash(block: Mapping[str, Any]) -> str:
    source = as_mapping(block.get("source"))
    kind = source.get("type")
    if kind == "base64":
        return base64_digest(source.get("data"))
    for key in ("url", "file_id"):
        if isinstance(source.get(key), str):
            return sha256_text(source[key])
    return sha256_text(canonical_json(source))


def tool_result_content(content: Any) -> Any:
    """A ``tool_result`` block's content as reported: a string as sent; blocks become their text (images inside
    a result are counted by the message and never copied into the result)."""
    if isinstance(content, list):
        return content_facts([b for b in content if isinstance(b, Mapping) and b.get("type") == "text"]).text or ""
    return content


def _message(raw: Mapping[str, Any], names: dict[str, str], results: list[ToolResultFacts] | None) -> Message:
    """One request message; tool results are appended to ``results`` (None: not collected)."""
    role = str(raw.get("role") or "user")
    content = raw.get("content")
    if not isinstance(content, list):
        return message(role, content if isinstance(content, str) else None)
    parts = MessageParts()
    for block in content:
        if isinstance(block, str):
            parts.texts.append(block)
            continue
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.texts.append(block["text"])
        elif kind == "image":
            parts.image_hashes.append(_image_hash(block))
        elif kind == "document":
            parts.count("document")
        elif kind == "tool_use":
            call_id, name = as_str(block.get("id")), as_str(block.get("name"))
            parts.add_call(call_id, name)
            if call_id and name:
                names[call_id] = name
        elif kind == "tool_result":
            call_id = as_str(block.get("tool_use_id"))
            inner = block.get("content")
            text = tool_result_content(inner)
            parts.add_text(text)
            parts.image_hashes += [_image_hash(b) for b in as_list(inner)
                                   if isinstance(b, Mapping) and b.get("type") == "image"]
            if call_id is None:
                continue
            parts.tool_results.append(call_id)
            if results is not None:
                error = block.get("is_error")
                results.append(ToolResultFacts(call_id=call_id, content=text, name=names.get(call_id),
                                               is_error=error if isinstance(error, bool) else None))
    return parts.message(role)


def _tools(value: Any) -> list[ToolDefinition]:
    tools = []
    for tool in as_list(value):
        if not isinstance(tool, Mapping):
            continue
        raw_type = str(tool.get("type") or "custom")
        if raw_type == "custom":
            kind = "function"
        elif raw_type.startswith("computer_"):
            kind = "computer_use"
        elif raw_type.startswith("code_execution_"):
            kind = "code_interpreter"
        else:
            kind = "other"
        extra: dict[str, Any] = {}
        if tool.get("input_schema") is not None:
            extra["parameters_hash"] = sha256_text(canonical_json(tool["input_schema"]))
        if raw_type != "custom":
            extra["tool_type"] = raw_type
        description = tool.get("description")
        tools.append(ToolDefinition(name=as_str(tool.get("name")), type=kind,
                                    description=description if isinstance(description, str) else None,
                                    extra=extra))
    return tools


def _tool_choice(value: Any) -> Any:
    if isinstance(value, Mapping):
        kind = value.get("type")
        if isinstance(kind, str) and kind in _TOOL_CHOICES:
            return _TOOL_CHOICES[kind]
        return dict(value)
    return value if isinstance(value, str) else None


def _parameters(body: Mapping[str, Any], max_tokens_key: str = "max_tokens") -> RequestParameters | None:
    stop = body.get("stop_sequences")
    values: dict[str, Any] = {
        "temperature": as_number(body.get("temperature")), "top_p": as_number(body.get("top_p")),
        "max_tokens": as_int(body.get(max_tokens_key)),
        "stop": [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else None,
    }
    extra: dict[str, Any] = {k: body[k] for k in ("top_k", "thinking", "service_tier", "inference_geo")
                             if body.get(k) is not None}
    user = as_mapping(body.get("metadata")).get("user_id")
    if user is not None:
        extra["user"] = sha256_text(str(user))
    if as_mapping(body.get("tool_choice")).get("disable_parallel_tool_use") is True:
        extra["parallel_tool_calls"] = False
    servers = [as_str(as_mapping(s).get("name")) for s in as_list(body.get("mcp_servers"))]
    if servers:  # names only: a server entry may carry an authorization token
        extra["mcp_servers"] = servers
    return parameters_or_none(values, extra)


def messages_request_facts(body: Any, *, request_type: str = "chat", tool_results: bool = True) -> RequestFacts:
    """The facts of a Messages API request body (``tool_results=False``: results are not reported, for
    requests such as ``count_tokens`` that only measure a conversation)."""
    body = as_mapping(body)
    names: dict[str, str] = {}
    results: list[ToolResultFacts] = []
    messages = [_message(raw, names, results if tool_results else None)
                for raw in as_list(body.get("messages")) if isinstance(raw, Mapping)]
    system = body.get("system")
    system_text = content_facts(system).text if isinstance(system, str | list) else None
    return RequestFacts(
        request_type=request_type, model=as_str(body.get("model")), streaming=body.get("stream") is True,
        messages=messages, system_prompt=system_text, tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")), parameters=_parameters(body), tool_results=results,
    )


def _header_attrs(exchange: HttpExchange) -> dict[str, Any]:
    headers = exchange.request.headers
    out: dict[str, Any] = {}
    version = headers.get("anthropic-version")
    if version:
        out["anthropic.version"] = version
    betas = [b.strip() for value in headers.get_all("anthropic-beta") for b in value.split(",") if b.strip()]
    if betas:
        out["anthropic.beta"] = betas
    return out


# --- decoders ----------------------------------------------------------------------------------------------

class _AnthropicDecoder(ApiDecoder):
    """What the Messages and Text Completions decoders share: headers, errors, ids, the end of a stream."""

    #: The stream event that ends a complete stream.
    final_event = "message_stop"

    def __init__(self, *, context: DecoderContext | None = None,
                 registry: ToolCallRegistry | None = None, streaming_chunks: bool = False,
                 model: str | None = None, region: str | None = None, project_id: str | None = None) -> None:
        super().__init__(context=context, registry=registry, streaming_chunks=streaming_chunks)
        #: Claude on Vertex AI names the model in the path, and the region and project.
        self.path_model = model
        self.region = region
        self.project_id = project_id
        self._stopped = False
        self._streamed = False

    def _finish_facts(self, exchange: HttpExchange, facts: RequestFacts) -> RequestFacts:
        facts.model = facts.model or self.path_model
        facts.attrs.update(_header_attrs(exchange))
        self.state.attrs.update(_header_attrs(exchange))
        return facts

    def provider_info(self, exchange: HttpExchange) -> ProviderInfo:
        info = super().provider_info(exchange)
        organization = exchange.response.headers.get("anthropic-organization-id") \
            if exchange.response is not None else None
        return attrs.evolve(info, organization_id=organization or None, project_id=self.project_id,
                            region=self.region)

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        request_id = as_str(as_mapping(body).get("request_id"))
        if request_id:
            self.state.provider_request_id = request_id
        return super().on_error_json(exchange, body)

    def _stream_data(self, item: Any) -> Mapping[str, Any] | None:
        """The JSON object of one SSE event (None for comments and unreadable data, which are noted)."""
        if not isinstance(item, SseEvent):
            return None
        self._streamed = True
        value, problem = json_or_none(item.data)
        if problem is not None or not isinstance(value, Mapping):
            self.state.problems.append(f"stream event {item.event!r}: {problem or 'not an object'}")
            return None
        if value.get("type") == self.final_event or item.event == self.final_event:
            self._stopped = True
        if value.get("type") == "error" or item.event == "error":
            error = as_mapping(value.get("error"))
            self.state.error = ResponseError(type=as_str(error.get("type")) or "error",
                                             message=as_str(error.get("message")))
            self._stopped = True
        return value

    def on_response_complete(self, exchange: HttpExchange) -> None:
        response = exchange.response
        header_id = response.headers.get("request-id") if response is not None else None
        if header_id:
            self.state.provider_request_id = header_id
        elif self.state.provider_request_id is None:
            self.state.provider_request_id = as_str(self.state.extra.get("message_id"))
        streamed = response is not None and 200 <= response.status < 300 and self._streamed
        if streamed and not self._stopped and not exchange.partial:
            self.state.problems.append(f"stream ended before {self.final_event}")


class MessagesDecoder(_AnthropicDecoder):
    """``/v1/messages`` (and ``count_tokens``), whole or streamed."""

    def __init__(self, *, count_tokens: bool = False, context: DecoderContext | None = None,
                 registry: ToolCallRegistry | None = None,
                 streaming_chunks: bool = False, model: str | None = None, region: str | None = None,
                 project_id: str | None = None) -> None:
        super().__init__(context=context, registry=registry, streaming_chunks=streaming_chunks, model=model,
                         region=region,
                         project_id=project_id)
        self.count_tokens = count_tokens
        #: Content block index -> block type, for the deltas that follow its start.
        self._blocks: dict[int, str] = {}
        #: Content block index -> the tool input given whole at the block's start.
        self._inputs: dict[int, Any] = {}
        self._usage: dict[str, int] = {}

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        if self.count_tokens:
            facts = messages_request_facts(body, request_type="other", tool_results=False)
            facts.attrs["anthropic.operation"] = "count_tokens"
        else:
            facts = messages_request_facts(body)
        return self._finish_facts(exchange, facts)

    # usage ------------------------------------------------------------------------------------------
    def _read_usage(self, usage: Any) -> None:
        usage = as_mapping(usage)
        for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            value = as_int(usage.get(key))
            if value is not None:
                self._usage[key] = value
        raw = self._usage
        read, created = raw.get("cache_read_input_tokens"), raw.get("cache_creation_input_tokens")
        prompt = raw.get("input_tokens")
        if prompt is not None:
            prompt += (read or 0) + (created or 0)
        self.state.set_usage(prompt_tokens=prompt, completion_tokens=raw.get("output_tokens"),
                             cached_tokens=read, cache_creation_tokens=created)
        server_tools = as_mapping(usage.get("server_tool_use"))
        for key, value in server_tools.items():
            if as_int(value) is not None:
                self.state.attrs[f"anthropic.server_tool_use.{key}"] = value
        if isinstance(usage.get("service_tier"), str):
            self.state.attrs["anthropic.service_tier"] = usage["service_tier"]

    def _message_head(self, body: Mapping[str, Any]) -> None:
        self.state.model = as_str(body.get("model")) or self.state.model
        if as_str(body.get("id")):
            self.state.extra["message_id"] = body["id"]
        if isinstance(body.get("role"), str):
            self.state.choice(0).role = body["role"]
        self._read_usage(body.get("usage"))

    def _stop(self, body: Mapping[str, Any]) -> None:
        self.state.finish(as_str(body.get("stop_reason")))
        if as_str(body.get("stop_sequence")):
            self.state.extra["stop_sequence"] = body["stop_sequence"]

    def _count(self, key: str) -> None:
        self.state.extra[key] = int(self.state.extra.get(key, 0)) + 1

    def _server_tool_use(self, block: Mapping[str, Any]) -> None:
        self.state.extra.setdefault("server_tool_uses", []).append(
            {"id": as_str(block.get("id")), "name": as_str(block.get("name"))})

    # whole responses --------------------------------------------------------------------------------
    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        body = as_mapping(body)
        if self.count_tokens:
            counted = as_int(body.get("input_tokens"))
            if counted is not None:
                self.state.extra["counted_input_tokens"] = counted
            return
        self._message_head(body)
        for index, block in enumerate(as_list(body.get("content"))):
            if not isinstance(block, Mapping):
                continue
            kind = block.get("type")
            if kind == "text":
                self.state.add_text(as_str(block.get("text")))
            elif kind == "thinking":
                self.state.add_thinking(as_str(block.get("thinking")))
            elif kind == "redacted_thinking":
                self._count("redacted_thinking_blocks")
            elif kind == "tool_use":
                self.state.tool_call(index, id=as_str(block.get("id")), name=as_str(block.get("name")),
                                     parsed=block.get("input"),
                                     type="function")
            elif kind == "server_tool_use":
                self._server_tool_use(block)
        self._stop(body)

    # streams ----------------------------------------------------------------------------------------
    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        event = self._stream_data(item)
        if event is None:
            return
        kind = event.get("type")
        index = as_int(event.get("index"))
        if kind == "message_start":
            self._message_head(as_mapping(event.get("message")))
        elif kind == "content_block_start" and index is not None:
            self._block_start(index, as_mapping(event.get("content_block")))
        elif kind == "content_block_delta" and index is not None:
            self._block_delta(index, as_mapping(event.get("delta")))
        elif kind == "content_block_stop" and index is not None:
            self._block_stop(index)
        elif kind == "message_delta":
            self._stop(as_mapping(event.get("delta")))
            self._read_usage(event.get("usage"))

    def _block_start(self, index: int, block: Mapping[str, Any]) -> None:
        kind = str(block.get("type") or "")
        self._blocks[index] = kind
        if kind == "text":
            self.state.add_text(as_str(block.get("text")))
        elif kind == "thinking":
            self.state.add_thinking(as_str(block.get("thinking")))
        elif kind == "redacted_thinking":
            self._count("redacted_thinking_blocks")
        elif kind == "tool_use":
            self._inputs[index] = block.get("input")
            self.state.tool_call(index, id=as_str(block.get("id")), name=as_str(block.get("name")), type="function")
        elif kind == "server_tool_use":
            self._server_tool_use(block)

    def _block_delta(self, index: int, delta: Mapping[str, Any]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            self.state.add_text(as_str(delta.get("text")))
        elif kind == "thinking_delta":
            self.state.add_thinking(as_str(delta.get("thinking")))
        elif kind == "signature_delta":
            self.state.extra["thinking_signed"] = True
        elif kind == "citations_delta":
            self._count("citations")
        elif kind == "input_json_delta" and self._blocks.get(index) == "tool_use":
            self.state.tool_call(index, arguments=as_str(delta.get("partial_json")))

    def _block_stop(self, index: int) -> None:
        if self._blocks.get(index) != "tool_use":
            return
        call = self.state.choice(0).tool_calls.get(index)
        if call is None:
            return
        text = "".join(call.arguments)
        if not text.strip():
            start = self._inputs.get(index)
            self.state.tool_call(index, parsed=dict(start) if isinstance(start, Mapping) else {})
            return
        parsed, problem = json_or_none(text)
        if problem is not None:
            self.state.problems.append(f"tool_use input of block {index}: {problem}")
        else:
            self.state.tool_call(index, parsed=parsed)


class TextCompletionDecoder(_AnthropicDecoder):
    """The legacy ``/v1/complete``: a prompt in, a completion out, whole or streamed (``completion`` events)."""

    final_event = "__none__"  # the legacy stream has no end marker: the last completion has its stop_reason

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = as_mapping(body)
        prompt = body.get("prompt")
        facts = RequestFacts(
            request_type="completion", model=as_str(body.get("model")), streaming=body.get("stream") is True,
            messages=[message("user", prompt)] if isinstance(prompt, str) else [],
            parameters=_parameters(body, "max_tokens_to_sample"),
        )
        return self._finish_facts(exchange, facts)

    def _completion(self, body: Mapping[str, Any]) -> None:
        self.state.model = as_str(body.get("model")) or self.state.model
        for key in ("id", "log_id"):
            if as_str(body.get(key)):
                self.state.extra["message_id"] = body[key]
        self.state.add_text(as_str(body.get("completion")))
        if as_str(body.get("stop_reason")):
            self.state.finish(body["stop_reason"])
            self._stopped = True

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        self._completion(as_mapping(body))

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        event = self._stream_data(item)
        if event is not None and "completion" in (event.get("type"), getattr(item, "event", None)):
            self._completion(event)


def decoder_for(exchange: HttpExchange, settings: DecoderSettings | None = None,
                context: DecoderContext | None = None) -> ApiDecoder | None:
    """A decoder for an exchange with the Anthropic API, or None when this module does not read it."""
    if exchange.connection.provider != "anthropic" or exchange.request.method != "POST":
        return None
    operation = ROUTES.get(exchange.request.path.rstrip("/"))
    chunks = (settings or DecoderSettings()).streaming_chunks
    if operation == "messages":
        return MessagesDecoder(context=context, streaming_chunks=chunks)
    if operation == "count_tokens":
        return MessagesDecoder(count_tokens=True, context=context, streaming_chunks=chunks)
    if operation == "complete":
        return TextCompletionDecoder(context=context, streaming_chunks=chunks)
    return None


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    return decoder_for(exchange, settings, context)


#: The endpoints of the Anthropic API, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("anthropic", "api.anthropic.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
