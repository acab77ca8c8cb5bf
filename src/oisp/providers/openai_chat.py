"""Chat Completions (``/chat/completions``) and legacy text completions (``/completions``) in the OpenAI dialect.

Streamed answers are SSE chunks (``data: {...}`` lines, ``data: [DONE]`` at the end). What differs between
the APIs that speak the dialect, and is handled here:

* tool calls: OpenAI streams each call's arguments in fragments keyed by ``index`` (parallel calls interleave);
  Mistral, Groq, Ollama and others send each call whole, some without ``index``, some all with index 0;
  Hugging Face's TGI sends one call as an object instead of a list; ``arguments`` may be an object;
* usage: OpenAI sends it in an extra last chunk (``stream_options.include_usage``); most others put it in
  the last chunk unasked; Groq nests it in ``x_groq``; DeepSeek counts cache hits its own way;
* reasoning: ``reasoning_content`` (DeepSeek, xAI), ``reasoning`` (OpenRouter, Groq, Ollama), Mistral's
  ``thinking`` content parts;
* errors inside a 200 stream: ``data: {"error": {...}}`` (OpenRouter adds ``finish_reason: error``), or an
  ``event: error`` SSE event;
* Azure: empty first chunks that only carry ``prompt_filter_results``, ``content_filter_results`` per choice,
  ``finish_reason: content_filter``; OpenRouter: ``: OPENROUTER PROCESSING`` comments and the upstream
  ``provider``; Perplexity: ``citations`` and ``search_results``; Perplexity also repeats the whole message
  next to each delta, which must not be counted twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from oisp.framing import SseEvent
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import RequestFacts, ToolResultFacts, content_facts, json_or_none, message
from oisp.providers.openai_common import (
    OpenAIDialectDecoder,
    as_index,
    as_list,
    as_mapping,
    canonical_json,
    error_from_body,
    openai_usage,
    request_parameters,
    tool_definitions,
    tool_result_content,
)
from oisp.redaction import sha256_text

__all__ = ["ChatCompletionsDecoder", "TextCompletionsDecoder", "chat_request_facts", "completion_request_facts"]


# --- requests ----------------------------------------------------------------------------------------------

def _assistant_calls(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tool calls an assistant message (sent back by the client) carries, without their arguments."""
    out = []
    for call in as_list(raw.get("tool_calls")):
        if not isinstance(call, Mapping):
            continue
        function = as_mapping(call.get("function"))
        arguments = function.get("arguments")
        out.append({k: v for k, v in {
            "id": call.get("id"), "name": function.get("name"),
            "arguments_hash": sha256_text(arguments if isinstance(arguments, str) else canonical_json(arguments))
            if arguments is not None else None,
        }.items() if v is not None})
    legacy = raw.get("function_call")
    if isinstance(legacy, Mapping):
        out.append({"name": legacy.get("name")})
    return out


def chat_request_facts(body: Any) -> RequestFacts:
    """The facts of a chat completions request body: messages (text joined, images counted and hashed),
    system prompt (``system`` and ``developer`` messages), tools, parameters, and the tool results the client
    sends back (``tool`` messages), named after the call they answer when the conversation shows it."""
    if not isinstance(body, Mapping):
        return RequestFacts(request_type="chat")
    messages = []
    results = []
    system: list[str] = []
    call_names: dict[str, str] = {}
    for raw in as_list(body.get("messages")):
        if not isinstance(raw, Mapping):
            continue
        role = str(raw.get("role") or "user")
        content = raw.get("content")
        extra: dict[str, Any] = {}
        calls = _assistant_calls(raw)
        if calls:
            extra["tool_calls"] = calls
            call_names.update({c["id"]: c["name"] for c in calls if c.get("id") and c.get("name")})
        for key in ("reasoning_content", "reasoning", "refusal"):
            if isinstance(raw.get(key), str) and raw[key]:
                extra[key] = raw[key]
        tool_call_id = raw.get("tool_call_id")
        name = raw.get("name")
        messages.append(message(role, content, tool_call_id=str(tool_call_id) if tool_call_id else None,
                                name=str(name) if isinstance(name, str) else None, **extra))
        if role in ("system", "developer"):
            text = content_facts(content).text
            if text:
                system.append(text)
        if role == "tool" and tool_call_id:
            call_id = str(tool_call_id)
            results.append(ToolResultFacts(call_id=call_id, content=tool_result_content(content),
                                           name=name if isinstance(name, str) else call_names.get(call_id)))
    stream_options = as_mapping(body.get("stream_options"))
    request_attrs: dict[str, Any] = {}
    if stream_options.get("include_usage"):
        request_attrs["openai.include_usage"] = True
    return RequestFacts(
        request_type="chat", model=str(body["model"]) if body.get("model") else None,
        streaming=bool(body.get("stream")), messages=messages,
        system_prompt="\n".join(system) if system else None,
        tools=tool_definitions(body.get("tools") or body.get("functions")),
        tool_choice=body.get("tool_choice", body.get("function_call")),
        parameters=request_parameters(body), tool_results=results, attrs=request_attrs,
    )


def completion_request_facts(body: Any) -> RequestFacts:
    """The facts of a legacy completions request: each prompt (a string, a list of strings, or token arrays)
    becomes a user message; ``suffix`` (fill-in-the-middle) is kept with the prompt."""
    if not isinstance(body, Mapping):
        return RequestFacts(request_type="completion")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt) if isinstance(prompt, list) else []
    messages = []
    suffix = body.get("suffix") if isinstance(body.get("suffix"), str) else None
    for item in prompts:
        if isinstance(item, str):
            messages.append(message("user", item, suffix=suffix))
        elif isinstance(item, list):
            messages.append(message("user", None, prompt_token_count=len(item)))
    stream_options = as_mapping(body.get("stream_options"))
    return RequestFacts(
        request_type="completion", model=str(body["model"]) if body.get("model") else None,
        streaming=bool(body.get("stream")), messages=messages, parameters=request_parameters(body),
        extra={"prompt_count": len(prompts)} if len(prompts) > 1 else {},
        attrs={"openai.include_usage": True} if stream_options.get("include_usage") else {},
    )


# --- responses ---------------------------------------------------------------------------------------------

#: Top-level keys of a response (or chunk) kept in the response's ``extra`` when they hold a non-empty list.
_LIST_EXTRAS = ("citations", "search_results", "prompt_filter_results")
#: Top-level string keys kept in ``extra``, and their names there.
_TEXT_EXTRAS = (("provider", "upstream_provider"), ("system_fingerprint", "system_fingerprint"),
                ("service_tier", "service_tier"))

@attrs.define
class _CallSlots:
    """Maps the tool calls of one choice, as a provider streams them, to stable positions.

    A fragment belongs to the call with its ``id`` if that id was seen; else to the call at its ``index``,
    unless that position already holds a call with another id (providers that number every whole call 0);
    a fragment with neither continues the last call. Positions follow first appearance."""

    by_index: dict[int, int] = attrs.field(factory=dict)
    by_id: dict[str, int] = attrs.field(factory=dict)
    ids: dict[int, str] = attrs.field(factory=dict)
    last: int | None = None
    count: int = 0

    def _new(self) -> int:
        self.count += 1
        return self.count - 1

    def slot(self, index: int | None, call_id: str | None) -> int:
        if call_id and call_id in self.by_id:
            slot = self.by_id[call_id]
        elif index is not None:
            known = self.by_index.get(index)
            slot = self._new() if known is None or (call_id and self.ids.get(known, call_id) != call_id) else known
        elif call_id:
            slot = self._new()
        else:
            slot = self.last if self.last is not None else self._new()
        if index is not None:
            self.by_index[index] = slot
        if call_id:
            self.by_id[call_id] = slot
            self.ids.setdefault(slot, call_id)
        self.last = slot
        return slot


def _text_and_thinking(content: Any) -> tuple[str | None, str | None]:
    """Text of a message's content, and the reasoning in it (Mistral's ``thinking`` parts)."""
    if not isinstance(content, list):
        return content_facts(content).text if content is not None else None, None
    thinking = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "thinking":
            thinking.append(content_facts(part.get("thinking")).text or "")
    return content_facts(content).text, "".join(thinking) or None


class ChatCompletionsDecoder(OpenAIDialectDecoder):
    """Chat completions, whole or streamed, from any API of the dialect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots: dict[int, _CallSlots] = {}

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        facts = chat_request_facts(body)
        facts.model = self.default_model(body)
        facts.attrs.update(self.route_attrs())
        return facts

    # shared by whole bodies and chunks
    def _common(self, body: Mapping[str, Any]) -> None:
        # Called for every chunk of a stream: rare keys are tested for presence before anything else.
        state = self.state
        model = body.get("model")
        if model and type(model) is str:
            state.model = model
        request_id = body.get("id")
        if request_id and type(request_id) is str:
            state.provider_request_id = request_id
        usage = body.get("usage")
        if usage:
            openai_usage(state, usage)
        if "x_groq" in body and isinstance(body["x_groq"], Mapping):
            openai_usage(state, body["x_groq"].get("usage"))
        for key in _LIST_EXTRAS:
            if key in body and isinstance(body[key], list) and body[key]:
                state.extra[key] = body[key]
        for key, name in _TEXT_EXTRAS:
            if key in body and isinstance(body[key], str):
                state.extra[name] = body[key]
        if body.get("error") is not None:
            state.error = error_from_body(body)

    def _choice_extras(self, raw: Mapping[str, Any], index: int) -> None:
        filters = raw.get("content_filter_results")
        if isinstance(filters, Mapping) and filters:
            self.state.extra.setdefault("content_filter_results", {})[str(index)] = filters
        if raw.get("native_finish_reason") is not None:
            self.state.extra.setdefault("native_finish_reason", {})[str(index)] = raw["native_finish_reason"]
        if isinstance(raw.get("error"), Mapping):  # OpenRouter reports a failed choice inside it
            self.state.error = error_from_body(raw)

    def _tool_calls(self, calls: Any, index: int) -> None:
        if type(calls) is dict:  # TGI sends one call as an object
            calls = [calls]
        if type(calls) is not list:
            return
        slots = self._slots.get(index)
        if slots is None:
            slots = self._slots[index] = _CallSlots()
        for call in calls:
            if type(call) is not dict:
                continue
            function = call.get("function")
            if type(function) is not dict:
                function = {}
            position = call.get("index")
            call_id = call.get("id")
            if not call_id or type(call_id) is not str:
                call_id = None
            slot = slots.slot(position if type(position) is int else None, call_id)
            arguments = function.get("arguments")
            kind = call.get("type")
            self.state.tool_call(
                slot, choice=index, id=call_id, name=function.get("name") or None,
                arguments=arguments if type(arguments) is str else None,
                parsed=arguments if isinstance(arguments, dict | list) else None,
                type=kind if type(kind) is str else None,
            )

    def _legacy_function_call(self, call: Any, index: int) -> None:
        if isinstance(call, Mapping):
            slot = self._slots.setdefault(index, _CallSlots()).slot(None, None)
            arguments = call.get("arguments")
            self.state.tool_call(slot, choice=index, name=call.get("name") or None,
                                 arguments=arguments if isinstance(arguments, str) else None, type="function")

    def _message(self, msg: Mapping[str, Any], index: int) -> None:
        state = self.state
        content = msg.get("content")
        if type(content) is str:  # the common case of a stream: one piece of text
            state.add_text(content, index)
            if len(msg) == 1:
                return
        else:
            text, thinking = _text_and_thinking(content)
            state.add_text(text, index)
            state.add_thinking(thinking, index)
        role = msg.get("role")
        if role and isinstance(role, str):
            state.choice(index).role = role
        for key in ("reasoning_content", "reasoning"):
            if key in msg and isinstance(msg[key], str):
                state.add_thinking(msg[key], index)
                break
        refusal = msg.get("refusal")
        if refusal and isinstance(refusal, str):
            refusals = state.extra.setdefault("refusal", {})
            refusals[str(index)] = refusals.get(str(index), "") + refusal
        if "tool_calls" in msg:
            self._tool_calls(msg["tool_calls"], index)
        if "function_call" in msg:
            self._legacy_function_call(msg["function_call"], index)

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        if not isinstance(body, Mapping):
            self.state.problems.append("response body: not a JSON object")
            return
        self._common(body)
        for raw in as_list(body.get("choices")):
            if not isinstance(raw, Mapping):
                continue
            index = as_index(raw.get("index"))
            msg = as_mapping(raw.get("message"))
            self.state.choice(index).role = "assistant"
            self._message(msg, index)
            self.state.finish(raw.get("finish_reason"), index)
            self._choice_extras(raw, index)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent):
            return
        data = item.data
        if data == "[DONE]" or not data.strip() or data.strip() == "[DONE]":
            return
        chunk, problem = json_or_none(data)
        if item.event == "error":
            self.state.error = error_from_body(chunk) or error_from_body({"error": data})
            return
        if problem is not None or type(chunk) is not dict:
            self.state.problems.append(f"stream chunk: {problem or 'not a JSON object'}")
            return
        self._common(chunk)
        choices = chunk.get("choices")
        for raw in choices if type(choices) is list else ():
            if type(raw) is not dict:
                continue
            index = raw.get("index", 0)
            if type(index) is not int:
                index = as_index(index)
            # The delta is what is new; Perplexity also repeats the whole message so far beside it.
            delta = raw["delta"] if "delta" in raw else raw.get("message")
            if type(delta) is dict:
                self._message(delta, index)
            if raw.get("finish_reason") is not None:
                self.state.finish(raw["finish_reason"], index)
            if "content_filter_results" in raw or "native_finish_reason" in raw or "error" in raw:
                self._choice_extras(raw, index)


class TextCompletionsDecoder(ChatCompletionsDecoder):
    """Legacy text completions (``choices[].text``), whole or streamed; also Mistral's fill-in-the-middle
    (``/v1/fim/completions``), whose choices carry chat messages."""

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        facts = completion_request_facts(body)
        facts.model = self.default_model(body)
        facts.attrs.update(self.route_attrs())
        return facts

    def _choices(self, body: Mapping[str, Any]) -> None:
        for raw in as_list(body.get("choices")):
            if not isinstance(raw, Mapping):
                continue
            index = as_index(raw.get("index"))
            if isinstance(raw.get("text"), str):
                self.state.add_text(raw["text"], index)
            else:
                msg = raw.get("delta", raw.get("message"))
                if isinstance(msg, Mapping):
                    self._message(msg, index)
            self.state.finish(raw.get("finish_reason"), index)
            self._choice_extras(raw, index)

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        if not isinstance(body, Mapping):
            self.state.problems.append("response body: not a JSON object")
            return
        self._common(body)
        self._choices(body)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent) or item.data.strip() in ("[DONE]", ""):
            return
        chunk, problem = json_or_none(item.data)
        if item.event == "error":
            self.state.error = error_from_body(chunk) or error_from_body({"error": item.data})
            return
        if problem is not None or not isinstance(chunk, Mapping):
            self.state.problems.append(f"stream chunk: {problem or 'not a JSON object'}")
            return
        self._common(chunk)
        self._choices(chunk)
