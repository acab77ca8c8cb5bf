"""Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``).

Ollama serves plain HTTP on ``localhost:11434``; any host the endpoint table names ``ollama`` is handled the same
way. Requests stream by default (``"stream": false`` turns it off): the response is NDJSON, one object per
line with the next piece of ``message.content`` (chat) or ``response`` (generate), and a last object with
``"done": true``, the ``done_reason``, token counts (``prompt_eval_count``, ``eval_count``) and durations in
nanoseconds, which are kept in the response event's ``attrs`` as milliseconds (``ollama.total_duration_ms``).
Errors come as ``{"error": "..."}``, as the body of a failed response or as a line of a stream.

Tool calls arrive whole, and carry no id. oisp gives each one a synthesized id, ``ollama_<16 hex digits>``,
a hash of the conversation before the call (the roles and contents of the request's messages), the call's
position and its name and arguments. When the client sends the conversation back with the tool results, the
assistant message that holds the calls yields the same ids, and each ``tool`` message after it is matched to
one of its calls: by ``tool_name`` when the message has one, else in order. A client that echoes an ``id`` or
``tool_call_id`` gets that instead.

Ollama's OpenAI-compatible ``/v1/...`` endpoints are not claimed here: :mod:`oisp.providers.openai` reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from oisp.events import Message, RequestParameters, ResponseError, ToolDefinition
from oisp.framing import NdjsonValue
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    PendingCalls,
    RequestFacts,
    ToolResultFacts,
    canonical_json,
    message,
    parameters_or_none,
)
from oisp.provider_kit import as_mapping as _mapping
from oisp.provider_kit import synthesized_call_id as kit_synthesized_call_id
from oisp.redaction import sha256_text

__all__ = ["ENDPOINTS", "OLLAMA_PATHS", "OllamaDecoder", "synthesized_call_id"]

#: Native API path -> OISP request type.
OLLAMA_PATHS: Mapping[str, str] = {
    "/api/chat": "chat",
    "/api/generate": "completion",
    "/api/embed": "embedding",
    "/api/embeddings": "embedding",
}

_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
# Options that have an OISP parameter; every other option is kept in ``parameters.extra``.
_OPTION_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "num_predict": "max_tokens",
                      "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}


def conversation_key(messages: Sequence[Any]) -> str:
    """A digest of a conversation's messages (roles and text contents only), the seed of synthesized ids."""
    pairs = [[str(m.get("role", "")), m.get("content") if isinstance(m.get("content"), str) else ""]
             for m in messages if isinstance(m, Mapping)]
    return hashlib.sha256(canonical_json(pairs).encode("utf-8")).hexdigest()


def synthesized_call_id(conversation: str, position: int, name: Any, arguments: Any) -> str:
    """The id oisp gives an Ollama tool call (which has none): stable across the request that sends it back."""
    return kit_synthesized_call_id("ollama", conversation, position, name, arguments)


def _function(call: Any) -> Mapping[str, Any]:
    return _mapping(_mapping(call).get("function"))


def _arguments(function: Mapping[str, Any]) -> Any:
    """Ollama sends arguments as an object; a JSON string (OpenAI style) is read as one."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _images(value: Any) -> list[dict[str, str]]:
    """Ollama's base64 ``images`` as image parts, so they are counted and hashed (never kept)."""
    if not isinstance(value, list):
        return []
    return [{"type": "image", "data": f"data:image;base64,{image}"} for image in value if isinstance(image, str)]


def _content(text: Any, images: Any) -> Any:
    parts = _images(images)
    if not parts:
        return text
    return [text, *parts] if isinstance(text, str) else parts


def _tools(body: Mapping[str, Any]) -> list[ToolDefinition]:
    tools = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, Mapping):
            continue
        function = _function(tool) or tool
        parameters = function.get("parameters")
        tools.append(ToolDefinition(
            name=function.get("name"), type=str(tool.get("type", "function")), description=function.get("description"),
            extra={"parameters_hash": sha256_text(canonical_json(parameters))} if parameters is not None else {},
        ))
    return tools


def _parameters(body: Mapping[str, Any]) -> RequestParameters | None:
    options: Mapping[str, Any] = body["options"] if isinstance(body.get("options"), Mapping) else {}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in _OPTION_PARAMETERS:
            values[_OPTION_PARAMETERS[key]] = value
        elif key == "stop":
            values["stop"] = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else None
        else:
            extra[key] = value
    for key in ("format", "think", "keep_alive", "truncate", "dimensions", "raw", "suffix"):
        if body.get(key) is not None:
            extra[key] = body[key]
    return parameters_or_none(values, extra)


class OllamaDecoder(ApiDecoder):
    """One native Ollama call: chat, generate or embed, whole or streamed."""

    provider = "ollama"

    def __init__(self, request_type: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request_type = request_type
        self._conversation = conversation_key([])
        self._calls = 0

    # --- request ---------------------------------------------------------------------------------
    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        if not isinstance(body, Mapping):
            body = {}
        facts = RequestFacts(request_type=self.request_type, model=body.get("model"),
                             streaming=body.get("stream", True) is not False, parameters=_parameters(body),
                             tools=_tools(body))
        if self.request_type == "chat":
            self._chat_messages(body, facts)
        elif self.request_type == "completion":
            self._generate_prompt(body, facts)
        else:
            raw = body.get("input", body.get("prompt"))
            facts.extra["input_count"] = len(raw) if isinstance(raw, list) else 1 if raw is not None else 0
            facts.streaming = False
        if isinstance(body.get("context"), list):
            facts.attrs["ollama.context_tokens"] = len(body["context"])
        return facts

    def _chat_messages(self, body: Mapping[str, Any], facts: RequestFacts) -> None:
        raw_messages = [m for m in body.get("messages") or [] if isinstance(m, Mapping)]
        self._conversation = conversation_key(raw_messages)
        system: list[str] = []
        pending = PendingCalls()  # the calls of the last assistant message
        for index, raw in enumerate(raw_messages):
            role = str(raw.get("role", "user"))
            content = raw.get("content")
            extra: dict[str, Any] = {}
            tool_call_id = raw.get("tool_call_id") if isinstance(raw.get("tool_call_id"), str) else None
            name = raw.get("tool_name") if isinstance(raw.get("tool_name"), str) else raw.get("name")
            if role == "assistant" and raw.get("tool_calls"):
                prefix = conversation_key(raw_messages[:index])
                pending.reset()
                calls = []
                for position, call in enumerate(raw["tool_calls"]):
                    function = _function(call)
                    call_name = function.get("name") if isinstance(function.get("name"), str) else None
                    given = _mapping(call).get("id")
                    call_id = given if isinstance(given, str) else \
                        synthesized_call_id(prefix, position, call_name, _arguments(function))
                    pending.add(call_id, call_name)
                    calls.append({"id": call_id, "name": call_name})
                extra["tool_calls"] = calls
            elif role == "tool":
                answered = pending.answer(name if isinstance(name, str) else None) if tool_call_id is None else None
                if answered is not None:
                    tool_call_id, call_name = answered
                    name = name or call_name
                if tool_call_id is not None:
                    facts.tool_results.append(ToolResultFacts(call_id=tool_call_id, content=content, name=name))
            elif role == "system" and isinstance(content, str):
                system.append(content)
            if raw.get("thinking"):
                extra["thinking"] = raw["thinking"]
            facts.messages.append(message(role, _content(content, raw.get("images")), tool_call_id=tool_call_id,
                                          name=name if isinstance(name, str) else None, **extra))
        facts.system_prompt = "\n".join(system) if system else None

    def _generate_prompt(self, body: Mapping[str, Any], facts: RequestFacts) -> None:
        system = body.get("system")
        messages: list[Message] = []
        if isinstance(system, str):
            facts.system_prompt = system
            messages.append(message("system", system))
        prompt = body.get("prompt")
        if prompt is not None or body.get("images"):
            messages.append(message("user", _content(prompt, body.get("images"))))
        facts.messages = messages
        self._conversation = conversation_key([{"role": "user", "content": prompt}])

    # --- response --------------------------------------------------------------------------------
    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        self._read(body)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if isinstance(item, NdjsonValue):
            self._read(item.value)

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        if isinstance(body, Mapping) and isinstance(body.get("error"), str):
            return ResponseError(type="error", message=body["error"])
        return super().on_error_json(exchange, body)

    def _read(self, obj: Any) -> None:
        """One response object: a whole response, or one line of a stream."""
        if not isinstance(obj, Mapping):
            self.state.problems.append("response object is not a JSON object")
            return
        state = self.state
        if obj.get("error") is not None:
            error = obj["error"]
            text = error if isinstance(error, str) else canonical_json(error)
            state.error = ResponseError(type="error", message=text)
            return
        if isinstance(obj.get("model"), str):
            state.model = obj["model"]
        if self.request_type == "embedding":
            self._embedding(obj)
        else:
            msg = _mapping(obj.get("message"))
            if msg.get("role"):
                state.choice(0).role = str(msg["role"])
            state.add_text(msg.get("content") if isinstance(msg.get("content"), str) else None)
            state.add_text(obj.get("response") if isinstance(obj.get("response"), str) else None)
            state.add_thinking(msg.get("thinking") if isinstance(msg.get("thinking"), str) else None)
            state.add_thinking(obj.get("thinking") if isinstance(obj.get("thinking"), str) else None)
            for call in msg.get("tool_calls") or []:
                self._add_tool_call(call)
        if obj.get("done"):
            self._done(obj)

    def _add_tool_call(self, call: Any) -> None:
        function = _function(call)
        arguments = _arguments(function)
        position = self._calls
        self._calls += 1
        call_id = call.get("id") if isinstance(call, Mapping) and isinstance(call.get("id"), str) else \
            synthesized_call_id(self._conversation, position, function.get("name"), arguments)
        self.state.tool_call(position, id=call_id, name=function.get("name"),
                             parsed=arguments if isinstance(arguments, dict) else None,
                             arguments=arguments if isinstance(arguments, str) else None)

    def _embedding(self, obj: Mapping[str, Any]) -> None:
        vectors = obj.get("embeddings")
        if not isinstance(vectors, list) and isinstance(obj.get("embedding"), list):
            vectors = [obj["embedding"]]
        if isinstance(vectors, list):
            self.state.embedding_count = len(vectors)
            first = vectors[0] if vectors else None
            self.state.embedding_dimensions = len(first) if isinstance(first, list) else None
        self.state.set_usage(prompt_tokens=obj.get("prompt_eval_count"))
        self._durations(obj)

    def _done(self, obj: Mapping[str, Any]) -> None:
        state = self.state
        reason = obj.get("done_reason")
        if reason is not None:
            state.attrs["ollama.done_reason"] = reason
        calls = state.choices.get(0) is not None and bool(state.choice(0).tool_calls)
        if self.request_type != "embedding":
            state.finish("tool_calls" if calls and reason in (None, "stop") else reason or "stop")
        state.set_usage(prompt_tokens=obj.get("prompt_eval_count"), completion_tokens=obj.get("eval_count"))
        if isinstance(obj.get("context"), list):
            state.attrs["ollama.context_tokens"] = len(obj["context"])
        self._durations(obj)

    def _durations(self, obj: Mapping[str, Any]) -> None:
        for key in _DURATIONS:
            value = obj.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.state.attrs[f"ollama.{key}_ms"] = round(value / 1_000_000, 3)


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    chunks = settings.streaming_chunks
    if exchange.connection.provider != "ollama" or exchange.request.method != "POST":
        return None
    request_type = OLLAMA_PATHS.get(exchange.request.path.rstrip("/"))
    return OllamaDecoder(request_type, context=context, streaming_chunks=chunks) if request_type is not None else None


#: The endpoints of a local Ollama server's default address, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("ollama", "localhost", 11434, tls=False),
    EndpointSpec("ollama", "127.0.0.1", 11434, tls=False),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
