"""OpenAI Chat Completions, and every API that speaks its dialect.

``/v1/chat/completions`` (and ``/chat/completions`` under any prefix: Azure deployments, Fireworks'
``/inference/v1``, Perplexity without ``/v1``, OpenRouter, Groq, Together, Mistral, DeepSeek, xAI, the Hugging
Face router, LM Studio and Ollama's ``/v1``): request messages, tools and parameters; responses whole or
streamed as SSE, with tool calls whose arguments arrive in fragments by ``index``, usage in the last chunk,
reasoning content, and errors inside a 200 stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oisp.events import RequestParameters, ToolDefinition
from oisp.framing import SseEvent
from oisp.hookspecs import ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.providers.base import (
    ApiDecoder,
    RequestFacts,
    ResponseState,
    ToolResultFacts,
    content_facts,
    json_or_none,
    message,
)
from oisp.redaction import sha256_text

__all__ = ["OpenAIChatDecoder", "chat_request_facts", "openai_usage"]

#: Providers whose chat endpoint speaks the OpenAI dialect.
OPENAI_DIALECT = frozenset({
    "openai", "azure_openai", "mistral", "groq", "together", "fireworks", "perplexity", "openrouter", "deepseek",
    "xai", "huggingface", "lmstudio", "ollama",
})


def _parameters(body: Mapping[str, Any]) -> RequestParameters | None:
    stop = body.get("stop")
    values = {
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "max_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
        "frequency_penalty": body.get("frequency_penalty"), "presence_penalty": body.get("presence_penalty"),
        "stop": [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None,
    }
    extra = {k: body[k] for k in ("seed", "n", "reasoning_effort", "response_format", "top_k", "user",
                                  "parallel_tool_calls", "logprobs", "service_tier") if body.get(k) is not None}
    if "user" in extra:
        extra["user"] = sha256_text(str(extra["user"]))
    if all(v is None for v in values.values()) and not extra:
        return None
    return RequestParameters(**{k: v for k, v in values.items() if v is not None}, extra=extra)


def _tools(body: Mapping[str, Any]) -> list[ToolDefinition]:
    tools = []
    for tool in body.get("tools") or body.get("functions") or []:
        if not isinstance(tool, Mapping):
            continue
        function: Mapping[str, Any] = tool["function"] if isinstance(tool.get("function"), Mapping) else tool
        parameters = function.get("parameters")
        tools.append(ToolDefinition(
            name=function.get("name"), type=str(tool.get("type", "function")), description=function.get("description"),
            extra={"parameters_hash": sha256_text(_canonical(parameters))} if parameters is not None else {},
        ))
    return tools


def _canonical(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def chat_request_facts(body: Any) -> RequestFacts:
    """The facts of an OpenAI-style chat request body."""
    if not isinstance(body, Mapping):
        return RequestFacts(request_type="chat")
    messages = []
    results = []
    system: list[str] = []
    for raw in body.get("messages") or []:
        if not isinstance(raw, Mapping):
            continue
        role = str(raw.get("role", "user"))
        content = raw.get("content")
        extra: dict[str, Any] = {}
        if raw.get("tool_calls"):
            extra["tool_calls"] = [
                {"id": c.get("id"), "name": (c.get("function") or {}).get("name")}
                for c in raw["tool_calls"] if isinstance(c, Mapping)
            ]
        if raw.get("reasoning_content"):
            extra["reasoning_content"] = raw["reasoning_content"]
        messages.append(message(role, content, tool_call_id=raw.get("tool_call_id"), name=raw.get("name"),
                                **extra))
        if role in ("system", "developer"):
            text = content_facts(content).text
            if text:
                system.append(text)
        if role == "tool" and raw.get("tool_call_id"):
            results.append(ToolResultFacts(call_id=str(raw["tool_call_id"]), content=content, name=raw.get("name")))
    stream_options: Mapping[str, Any] = body["stream_options"] if isinstance(body.get("stream_options"), Mapping) \
        else {}
    return RequestFacts(
        request_type="chat", model=body.get("model"), streaming=bool(body.get("stream")), messages=messages,
        system_prompt="\n".join(system) if system else None, tools=_tools(body), tool_choice=body.get("tool_choice"),
        parameters=_parameters(body), tool_results=results,
        attrs={"openai.include_usage": True} if stream_options.get("include_usage") else {},
    )


def openai_usage(state: ResponseState, usage: Any) -> None:
    """Read an OpenAI-style ``usage`` object (with DeepSeek's cache hit/miss counts)."""
    if not isinstance(usage, Mapping):
        return
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, Mapping) else None
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")
    state.set_usage(
        prompt_tokens=usage.get("prompt_tokens", usage.get("input_tokens")),
        completion_tokens=usage.get("completion_tokens", usage.get("output_tokens")),
        total_tokens=usage.get("total_tokens"),
        cached_tokens=cached,
        reasoning_tokens=completion_details.get("reasoning_tokens") if isinstance(completion_details, Mapping)
        else None,
    )


class OpenAIChatDecoder(ApiDecoder):
    """Chat Completions, whole or streamed."""

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        return chat_request_facts(body)

    def _common(self, body: Mapping[str, Any]) -> None:
        state = self.state
        state.model = body.get("model") or state.model
        state.provider_request_id = body.get("id") or state.provider_request_id
        openai_usage(state, body.get("usage"))
        if isinstance(body.get("citations"), list):
            state.extra["citations"] = body["citations"]
        if isinstance(body.get("provider"), str):
            state.extra["upstream_provider"] = body["provider"]
        error = body.get("error")
        if isinstance(error, Mapping):
            state.error = self.on_error_json(None, body)  # type: ignore[arg-type]

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        if not isinstance(body, Mapping):
            return
        self._common(body)
        for raw in body.get("choices") or []:
            if not isinstance(raw, Mapping):
                continue
            index = int(raw.get("index", 0))
            msg = raw.get("message") or {}
            choice = self.state.choice(index)
            choice.role = msg.get("role") or "assistant"
            self.state.add_text(content_facts(msg.get("content")).text, index)
            self.state.add_thinking(msg.get("reasoning_content") or msg.get("reasoning"), index)
            for position, call in enumerate(msg.get("tool_calls") or []):
                function = call.get("function") or {}
                self.state.tool_call(position, choice=index, id=call.get("id"), name=function.get("name"),
                                     arguments=function.get("arguments"), type=call.get("type"))
            self.state.finish(raw.get("finish_reason"), index)
            if isinstance(raw.get("content_filter_results"), Mapping):
                self.state.extra.setdefault("content_filter_results", {})[index] = raw["content_filter_results"]

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent) or item.data.strip() == "[DONE]":
            return
        chunk, problem = json_or_none(item.data)
        if problem is not None or not isinstance(chunk, Mapping):
            self.state.problems.append(f"stream chunk: {problem or 'not an object'}")
            return
        self._common(chunk)
        for raw in chunk.get("choices") or []:
            if not isinstance(raw, Mapping):
                continue
            index = int(raw.get("index", 0))
            delta = raw.get("delta") or raw.get("message") or {}
            if delta.get("role"):
                self.state.choice(index).role = delta["role"]
            self.state.add_text(content_facts(delta.get("content")).text if delta.get("content") else None, index)
            self.state.add_thinking(delta.get("reasoning_content") or delta.get("reasoning"), index)
            for position, call in enumerate(delta.get("tool_calls") or []):
                function = call.get("function") or {}
                # Parallel calls stream in fragments keyed by index; providers that send whole calls omit it.
                slot = call.get("index", position) if isinstance(call.get("index", position), int) else position
                self.state.tool_call(slot, choice=index, id=call.get("id"), name=function.get("name"),
                                     arguments=function.get("arguments"), type=call.get("type"))
            self.state.finish(raw.get("finish_reason"), index)


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange) -> ExchangeDecoder | None:
    if exchange.connection.provider not in OPENAI_DIALECT:
        return None
    if exchange.request.method == "POST" and exchange.request.path.rstrip("/").endswith("/chat/completions"):
        return OpenAIChatDecoder()
    return None
