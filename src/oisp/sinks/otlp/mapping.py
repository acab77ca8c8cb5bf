"""OISP events -> OpenTelemetry GenAI semantic convention attributes: pure functions, no OpenTelemetry import.

Attribute names follow the GenAI semantic conventions (``gen_ai.*``, spans of kind CLIENT named
``{gen_ai.operation.name} {gen_ai.request.model}``, ``execute_tool {gen_ai.tool.name}`` spans); ``docs/export.md``
has the whole table. Structured values the conventions define (``gen_ai.input.messages``,
``gen_ai.output.messages``, ``gen_ai.system_instructions``, ``gen_ai.tool.definitions``) are JSON strings in
the conventions' shapes, as span attributes hold no nested maps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from oisp.events import (
    AgentToolCall,
    AgentToolResult,
    AiEmbedding,
    AiRequest,
    AiResponse,
    Event,
    Message,
    ProviderInfo,
    Redacted,
    ToolCall,
)

__all__ = [
    "DURATION_BUCKETS",
    "TOKEN_BUCKETS",
    "AttrValue",
    "Attributes",
    "embedding_attributes",
    "metric_attributes",
    "operation_name",
    "process_key",
    "provider_name",
    "request_attributes",
    "resource_attributes",
    "response_attributes",
    "safe_attributes",
    "safe_text",
    "server_attributes",
    "span_name",
    "tool_call_attributes",
    "tool_result_attributes",
    "trace_id_for",
    "ts_ns",
]

AttrValue = str | bool | int | float | Sequence[str] | Sequence[int] | Sequence[float] | Sequence[bool]
Attributes = dict[str, AttrValue]

#: Explicit bucket boundaries the conventions advise for ``gen_ai.client.token.usage``.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: ... and for ``gen_ai.client.operation.duration`` and ``gen_ai.client.operation.time_to_first_chunk`` (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

#: oisp provider names -> ``gen_ai.provider.name`` well-known values (others are reported by their oisp name).
_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure_openai": "azure.ai.openai",
    "azure": "azure.ai.openai",
    "aws_bedrock": "aws.bedrock",
    "bedrock": "aws.bedrock",
    "cohere": "cohere",
    "mistral": "mistral_ai",
    "mistral_ai": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "perplexity": "perplexity",
    "xai": "x_ai",
    "x_ai": "x_ai",
    "ibm_watsonx": "ibm.watsonx.ai",
}

#: oisp ``request_type`` -> ``gen_ai.operation.name``.
_OPERATIONS = {
    "chat": "chat",
    "completion": "text_completion",
    "text_completion": "text_completion",
    "embedding": "embeddings",
    "embeddings": "embeddings",
    "generate_content": "generate_content",
}

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def ts_ns(ts: datetime) -> int:
    """Nanoseconds since the epoch of an event time (microsecond precision, as OISP has it)."""
    return int(ts.timestamp() * 1_000_000) * 1_000


# --- names ---------------------------------------------------------------------------------------
def provider_name(provider: ProviderInfo | None) -> str | None:
    """``gen_ai.provider.name`` for an oisp provider: the conventions' value where it has one (Google by its
    endpoint: Vertex AI or the Gemini API), else oisp's own name."""
    if provider is None or not provider.name:
        return None
    name = provider.name.lower()
    if name in _PROVIDERS:
        return _PROVIDERS[name]
    if name in ("google", "gemini", "vertex_ai", "gcp"):
        host = _host(provider.endpoint) or ""
        if "aiplatform.googleapis.com" in host or name == "vertex_ai":
            return "gcp.vertex_ai"
        if "generativelanguage.googleapis.com" in host or name == "gemini":
            return "gcp.gemini"
        return "gcp.gen_ai"
    return name


def operation_name(request_type: str | None) -> str:
    """``gen_ai.operation.name`` for an oisp ``request_type`` (``chat`` when unknown)."""
    if not request_type:
        return "chat"
    return _OPERATIONS.get(request_type, request_type)


def span_name(operation: str, model: str | None) -> str:
    """``{gen_ai.operation.name} {gen_ai.request.model}``, or the operation alone without a model."""
    return f"{operation} {model}" if model else operation


def _host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def server_attributes(provider: ProviderInfo | None) -> Attributes:
    """``server.address`` and ``server.port`` from the provider's endpoint URL."""
    if provider is None or not provider.endpoint:
        return {}
    try:
        parts = urlsplit(provider.endpoint)
        port = parts.port
    except ValueError:
        return {}
    if not parts.hostname:
        return {}
    out: Attributes = {"server.address": parts.hostname}
    port = port or {"https": 443, "http": 80}.get(parts.scheme)
    if port is not None:
        out["server.port"] = port
    return out


# --- spans of AI calls ---------------------------------------------------------------------------
def request_attributes(request: AiRequest, *, content: bool) -> Attributes:
    """Span attributes an ``ai.request`` gives: operation, provider, model, parameters, server; with
    ``content`` the input messages, system instructions and tool definitions."""
    out: Attributes = {"gen_ai.operation.name": operation_name(request.request_type)}
    provider = provider_name(request.provider)
    if provider:
        out["gen_ai.provider.name"] = provider
    if request.model is not None and request.model.id:
        out["gen_ai.request.model"] = request.model.id
    if request.conversation_id:
        out["gen_ai.conversation.id"] = request.conversation_id
    if request.streaming is not None:
        out["gen_ai.request.stream"] = request.streaming
    params = request.parameters
    if params is not None:
        for key, value in (("max_tokens", params.max_tokens), ("temperature", params.temperature),
                           ("top_p", params.top_p), ("frequency_penalty", params.frequency_penalty),
                           ("presence_penalty", params.presence_penalty)):
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"gen_ai.request.{key}"] = value
        if params.stop and all(isinstance(s, str) for s in params.stop):
            out["gen_ai.request.stop_sequences"] = list(params.stop)
        for key in ("top_k", "seed"):
            value = params.extra.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"gen_ai.request.{key}"] = value
    out.update(server_attributes(request.provider))
    if request.request_id:
        out["oisp.request_id"] = request.request_id
    if content:
        if request.messages:
            out["gen_ai.input.messages"] = _json([_input_message(m) for m in request.messages])
        system = request.extra.get("system_prompt")
        if isinstance(system, str | Redacted | Mapping):
            out["gen_ai.system_instructions"] = _json([{"type": "text", "content": _text(system)}])
        if request.tools:
            out["gen_ai.tool.definitions"] = _json([
                {k: v for k, v in (("type", tool.type or "function"), ("name", tool.name),
                                   ("description", tool.description)) if v is not None}
                for tool in request.tools
            ])
    return out


def response_attributes(response: AiResponse, *, content: bool) -> tuple[Attributes, str | None, str | None]:
    """Span attributes an ``ai.response`` gives, and its ``error.type`` and error description (both None on
    success): response id and model, finish reasons, token usage, time to first chunk, HTTP status; with
    ``content`` the output messages."""
    out: Attributes = {}
    if response.provider_request_id:
        out["gen_ai.response.id"] = response.provider_request_id
    if response.model is not None and response.model.id:
        out["gen_ai.response.model"] = response.model.id
    reasons = [c.finish_reason for c in response.choices or [] if c.finish_reason]
    if not reasons and response.finish_reason:
        reasons = [response.finish_reason]
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    usage = response.usage
    if usage is not None:
        for key, value in (("gen_ai.usage.input_tokens", usage.prompt_tokens),
                           ("gen_ai.usage.output_tokens", usage.completion_tokens),
                           ("gen_ai.usage.cache_read.input_tokens", usage.cached_tokens),
                           ("gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_tokens),
                           ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens)):
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
        if isinstance(usage.total_cost_usd, int | float) and not isinstance(usage.total_cost_usd, bool):
            out["oisp.usage.total_cost_usd"] = float(usage.total_cost_usd)
    if response.time_to_first_token_ms is not None:
        out["gen_ai.response.time_to_first_chunk"] = response.time_to_first_token_ms / 1000
    if response.status_code is not None:
        out["http.response.status_code"] = response.status_code
    if response.request_id:
        out["oisp.request_id"] = response.request_id
    error_type: str | None = None
    description: str | None = None
    if response.success is False or response.error is not None:
        error = response.error
        error_type = (error.type if error is not None and error.type else None) or (
            str(response.status_code) if response.status_code is not None else "_OTHER")
        description = error.message if error is not None and isinstance(error.message, str) else None
        out["error.type"] = error_type
    if content:
        messages = _output_messages(response)
        if messages:
            out["gen_ai.output.messages"] = _json(messages)
    return out, error_type, description


def embedding_attributes(embedding: AiEmbedding) -> Attributes:
    """Span attributes of an ``ai.embedding`` (request and response in one event)."""
    out: Attributes = {"gen_ai.operation.name": "embeddings"}
    provider = provider_name(embedding.provider)
    if provider:
        out["gen_ai.provider.name"] = provider
    if embedding.model is not None and embedding.model.id:
        out["gen_ai.request.model"] = embedding.model.id
    if embedding.total_tokens is not None:
        out["gen_ai.usage.input_tokens"] = embedding.total_tokens
    if embedding.dimensions is not None:
        out["gen_ai.embeddings.dimension.count"] = embedding.dimensions
    out.update(server_attributes(embedding.provider))
    return out


# --- tool spans ----------------------------------------------------------------------------------
def tool_call_attributes(call: AgentToolCall, *, content: bool) -> Attributes:
    """``execute_tool`` span attributes an ``agent.tool_call`` gives."""
    out: Attributes = {"gen_ai.operation.name": "execute_tool"}
    if call.tool.name:
        out["gen_ai.tool.name"] = call.tool.name
    if call.call_id:
        out["gen_ai.tool.call.id"] = call.call_id
    if call.tool.type:
        out["gen_ai.tool.type"] = call.tool.type
    if call.tool.description:
        out["gen_ai.tool.description"] = call.tool.description
    if call.agent is not None and call.agent.name:
        out["gen_ai.agent.name"] = call.agent.name
    if content and call.arguments is not None:
        out["gen_ai.tool.call.arguments"] = _json(call.arguments)
    return out


def tool_result_attributes(result: AgentToolResult, *, content: bool) -> tuple[Attributes, str | None]:
    """``execute_tool`` span attributes an ``agent.tool_result`` adds, and its ``error.type`` (None on success)."""
    out: Attributes = {}
    if result.tool is not None and result.tool.name:
        out["gen_ai.tool.name"] = result.tool.name
    error_type: str | None = None
    if result.success is False or result.error is not None:
        error_type = (result.error.type if result.error is not None and result.error.type else None) or "_OTHER"
        out["error.type"] = error_type
    if content and result.result is not None:
        out["gen_ai.tool.call.result"] = _json(_plain(result.result))
    return out, error_type


# --- metrics -------------------------------------------------------------------------------------
_METRIC_KEYS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
                "server.address", "server.port", "error.type")


def metric_attributes(span_attributes: Mapping[str, Any]) -> Attributes:
    """The attributes the conventions give GenAI client metrics, taken from a span's attributes."""
    return {k: span_attributes[k] for k in _METRIC_KEYS if k in span_attributes}


# --- resource and trace ids ----------------------------------------------------------------------
def resource_attributes(event: Event, service_name: str) -> Attributes:
    """``service.name``, ``host.name`` and the ``process.*`` attributes of the process oisp attributed the event
    to (the resource of its spans and log records)."""
    out: Attributes = {"service.name": service_name}
    if event.host is not None and event.host.hostname:
        out["host.name"] = event.host.hostname
    if event.host is not None and event.host.arch:
        out["host.arch"] = event.host.arch
    process = event.process
    if process is not None:
        for key, value in (("process.pid", process.pid), ("process.parent_pid", process.ppid),
                           ("process.executable.path", process.exe), ("process.executable.name", process.name),
                           ("process.command_line", process.cmdline), ("process.working_directory", process.cwd),
                           ("process.creation.time", process.start_time)):
            if value is not None:
                out[key] = value
        if process.cmdline_args and all(isinstance(a, str) for a in process.cmdline_args):
            out["process.command_args"] = list(process.cmdline_args)
    if event.actor is not None and event.actor.user:
        out["process.owner"] = event.actor.user
    return out


def process_key(event: Event) -> str:
    """What identifies the agent process of an event (host, pid and start time), '' when oisp does not know."""
    process = event.process
    if process is None or process.pid is None:
        return ""
    host = event.host.hostname if event.host is not None and event.host.hostname else ""
    return f"process:{host}:{process.pid}:{process.start_time or ''}"


def trace_id_for(event: Event, conversation_id: str | None = None, *, run: str = "") -> int | None:
    """The trace an event's spans belong to: the event's own W3C trace context when it carries one, else one
    derived from the conversation id, else from the agent process (host, pid, start time), else from the client
    connection (one process's too; its id is unique within one run of oisp only, so ``run`` tells runs
    apart); None when oisp cannot tell (the span gets a trace of its own)."""
    context = event.trace_context
    if context is not None and context.trace_id and _HEX32.match(context.trace_id.lower()):
        value = int(context.trace_id, 16)
        if value:
            return value
    if conversation_id:
        key = f"conversation:{conversation_id}"
    else:
        key = process_key(event)
        connection = (event.attrs or {}).get("oisp.connection_id")
        if not key and isinstance(connection, str) and connection:
            host = event.host.hostname if event.host is not None and event.host.hostname else ""
            key = f"connection:{run}:{host}:{connection}"
        if not key:
            return None
    return _hashed_id(key)


@functools.lru_cache(maxsize=4096)
def _hashed_id(key: str) -> int:
    """A 128-bit trace id derived from ``key`` (cached: one agent's events all derive the same one)."""
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:16])
    return value or 1


def parent_span_id(event: Event) -> int | None:
    """The span id of the event's own W3C trace context (the caller's span), when it carries one."""
    context = event.trace_context
    if context is None or not context.span_id or not _HEX16.match(context.span_id.lower()):
        return None
    return int(context.span_id, 16) or None


# --- valid UTF-8 ---------------------------------------------------------------------------------
def safe_text(text: str) -> str:
    """``text``, with lone surrogates (undecodable bytes a decoder kept) written as ``\\udcff``: protobuf strings
    must be valid UTF-8, and one bad string would fail the whole export batch."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_attributes(attributes: Mapping[str, Any]) -> Attributes:
    """``attributes`` with every string (and string in a list) made valid UTF-8 by :func:`safe_text`."""
    out: Attributes = {}
    for key, value in attributes.items():
        if isinstance(value, str):
            value = safe_text(value)
        elif isinstance(value, list | tuple) and value and isinstance(value[0], str):
            value = [safe_text(v) for v in value]
        out[safe_text(key)] = value
    return out


# --- content -------------------------------------------------------------------------------------
def _json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (undecodable bytes kept): escaped, it is valid UTF-8 again
        return json.dumps(value, separators=(",", ":"), default=str)
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, Redacted):
        return value.to_dict()
    return value


def _text(value: Any) -> Any:
    if isinstance(value, Redacted):
        return f"[redacted: {value.marker.reason}]"
    if isinstance(value, Mapping) and "$redacted" in value:
        marker = value["$redacted"]
        return f"[redacted: {marker.get('reason', '') if isinstance(marker, Mapping) else ''}]"
    return value


def _input_message(message: Message) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if message.role == "tool" or (message.tool_call_id and message.role != "assistant"):
        parts.append({"type": "tool_call_response", "id": message.tool_call_id, "response": _text(message.content)})
    elif message.content is not None:
        parts.append({"type": "text", "content": _text(message.content)})
    for call in message.extra.get("tool_calls") or ():
        if isinstance(call, Mapping):
            parts.append({"type": "tool_call", "id": call.get("id"), "name": call.get("name"),
                          "arguments": _text(call.get("arguments"))})
    out: dict[str, Any] = {"role": message.role, "parts": parts}
    if message.name:
        out["name"] = message.name
    return out


def _tool_call_part(call: ToolCall) -> dict[str, Any]:
    arguments: Any = _text(call.arguments)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"type": "tool_call", "id": call.id, "name": call.name, "arguments": arguments}


def _output_messages(response: AiResponse) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    calls = [_tool_call_part(call) for call in response.tool_calls or []]
    for index, choice in enumerate(response.choices or []):
        parts: list[dict[str, Any]] = []
        if choice.message is not None and choice.message.content is not None:
            parts.append({"type": "text", "content": _text(choice.message.content)})
        if index == 0:
            parts += calls
        messages.append({"role": choice.message.role if choice.message is not None else "assistant",
                         "parts": parts, "finish_reason": choice.finish_reason or response.finish_reason or ""})
    if not messages and calls:
        messages.append({"role": "assistant", "parts": calls, "finish_reason": response.finish_reason or ""})
    return messages
