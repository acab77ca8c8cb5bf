"""Payloads of the ``ai.*`` events: requests, responses, streaming chunks and embeddings."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field, json_key

__all__ = [
    "AiEmbedding",
    "AiRequest",
    "AiResponse",
    "AiStreamingChunk",
    "AuthInfo",
    "Choice",
    "ChunkDelta",
    "Message",
    "ModelInfo",
    "ProviderInfo",
    "Redacted",
    "RedactionMarker",
    "RequestParameters",
    "ResponseError",
    "ToolCall",
    "ToolDefinition",
    "Usage",
]


@attrs.frozen(kw_only=True)
class RedactionMarker(Record):
    """Why and how a value was redacted: the body of a ``{"$redacted": {...}}`` marker."""

    reason: str
    detector: str | None = None
    original_length: int | None = None
    hash: str | None = None
    preview: str | None = None
    redaction_profile: str | None = None
    findings: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Redacted(Record):
    """A value that was replaced by a redaction marker (serialized as ``{"$redacted": {...}}``)."""

    marker: RedactionMarker = json_key("$redacted", default=attrs.NOTHING)
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ProviderInfo(Record):
    """Which AI provider, and which of its endpoints, a call went to."""

    name: str | None = None
    endpoint: str | None = None
    region: str | None = None
    organization_id: str | None = None
    project_id: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ModelInfo(Record):
    """The model a call named or was answered by."""

    id: str | None = None
    name: str | None = None
    family: str | None = None
    version: str | None = None
    capabilities: dict[str, bool] | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AuthInfo(Record):
    """How a call authenticated: never the secret, only its public prefix and a hash."""

    type: str | None = None
    account_type: str | None = None
    key_prefix: str | None = None
    key_hash: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Message(Record):
    """One message of a conversation (request messages, or a response choice's message)."""

    role: str
    content: str | Redacted | None = None
    content_hash: str | None = None
    content_length: int | None = None
    has_images: bool | None = None
    image_count: int | None = None
    tool_call_id: str | None = None
    name: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ToolDefinition(Record):
    """A tool the client offered the model."""

    name: str | None = None
    type: str | None = None
    description: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ToolCall(Record):
    """A tool call the model made in a response."""

    id: str | None = None
    name: str | None = None
    type: str | None = None
    arguments: str | dict[str, Any] | Redacted | None = None
    arguments_hash: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Usage(Record):
    """Token usage and, when a pricing bundle is configured, cost.

    ``cache_creation_tokens`` is not in the OISP v0.1 schema (which allows additional keys here): see
    ``docs/spec-gaps.md``.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_creation_tokens: int | None = None
    input_cost_usd: float | None = None
    output_cost_usd: float | None = None
    total_cost_usd: float | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class RequestParameters(Record):
    """Sampling parameters of a request."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AiRequest(Record):
    """``ai.request``: a call to an AI API, as the client sent it."""

    request_id: str | None = None
    conversation_id: str | None = None
    provider: ProviderInfo | None = None
    model: ModelInfo | None = None
    auth: AuthInfo | None = None
    request_type: str | None = None
    streaming: bool | None = None
    messages: list[Message] | None = None
    messages_count: int | None = None
    has_system_prompt: bool | None = None
    system_prompt_hash: str | None = None
    tools: list[ToolDefinition] | None = None
    tools_count: int | None = None
    tool_choice: str | None = None
    parameters: RequestParameters | None = None
    has_rag_context: bool | None = None
    has_images: bool | None = None
    image_count: int | None = None
    estimated_tokens: int | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ResponseError(Record):
    """What went wrong with a call (HTTP error or an error inside a stream)."""

    type: str | None = None
    message: str | None = None
    code: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class Choice(Record):
    """One choice of a response."""

    index: int | None = None
    message: Message | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AiResponse(Record):
    """``ai.response``: the answer to an ``ai.request`` (linked by ``request_id``)."""

    request_id: str | None = None
    conversation_id: str | None = None
    provider_request_id: str | None = None
    provider: ProviderInfo | None = None
    model: ModelInfo | None = None
    status_code: int | None = None
    success: bool | None = None
    error: ResponseError | None = None
    choices: list[Choice] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_calls_count: int | None = None
    usage: Usage | None = None
    latency_ms: int | None = None
    time_to_first_token_ms: int | None = None
    was_cached: bool | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ChunkDelta(Record):
    """What one streaming chunk added."""

    content: str | None = None
    role: str | None = None
    tool_calls: list[ToolCall] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AiStreamingChunk(Record):
    """``ai.streaming_chunk``: one chunk of a streamed response (off by default: they are many)."""

    request_id: str | None = None
    chunk_index: int | None = None
    delta: ChunkDelta | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AiEmbedding(Record):
    """``ai.embedding``: an embedding call, request and response together."""

    provider: ProviderInfo | None = None
    model: ModelInfo | None = None
    input_count: int | None = None
    total_tokens: int | None = None
    dimensions: int | None = None
    latency_ms: int | None = None
    extra: dict[str, Any] = extra_field()
