"""The provider plugin kit: what oisp's own providers are built from, and all a third-party provider needs.

oisp's built-in providers import only from this kit and from public modules (:mod:`oisp.events`,
:mod:`oisp.framing`, :mod:`oisp.hookspecs`, :mod:`oisp.http.exchange`, :mod:`oisp.redaction`), exactly what a
provider plugin of another package can. ``docs/provider-plugins.md`` is the guide.

The decoder
    :class:`ApiDecoder` does the common work of "JSON request, JSON or streamed response" APIs (events, links,
    stream framing, errors, usage); a provider says what its bodies look like (:class:`RequestFacts` from the
    request, :class:`ResponseState` filled from the response). :class:`WebSocketSessionDecoder` does the same
    for JSON-over-WebSocket sessions; :class:`MetadataDecoder` reports an exchange whose body is not read.
Per-run state
    :class:`DecoderContext`, handed to ``oisp_exchange_decoder``: the run's :class:`ToolCallRegistry` and a table
    per provider (``context.state(key, factory)``), never process-global.
Content
    :class:`MessageParts` (what a walk over a message's content blocks found, made into a
    :class:`~oisp.events.Message` the same way for every provider), :func:`message`, :func:`content_facts`,
    readers of untrusted JSON (:func:`as_mapping`, :func:`as_list`, :func:`as_str`, :func:`as_int`,
    :func:`field`) and hashing (:func:`canonical_json`, :func:`base64_digest`, :func:`sha256_text`).
Tool calls
    :func:`tool_type_for`, :func:`synthesized_call_id` for APIs whose calls have no id, :class:`PendingCalls` to
    match results to calls by name.
Exchange facts and framing
    :func:`request_id_for`, :func:`latencies`, :func:`auth_from_exchange` (key prefix and hash only),
    :func:`json_or_none`, :func:`normalize_finish_reason`; the incremental stream framings (:class:`SseDecoder`,
    :class:`NdjsonDecoder`, :class:`JsonArrayDecoder`, :class:`EventStreamDecoder`); redaction helpers
    (:func:`redact_url`, :func:`key_fingerprint`).
"""

from __future__ import annotations

from oisp.framing import (
    EventStreamDecoder,
    EventStreamMessage,
    FramingError,
    JsonArrayDecoder,
    JsonArrayElement,
    NdjsonDecoder,
    NdjsonValue,
    SseDecoder,
    SseEvent,
)
from oisp.provider_kit.api_decoder import (
    ApiDecoder,
    RequestFacts,
    ResponseState,
    StreamFraming,
    ToolResultFacts,
    normalize_finish_reason,
)
from oisp.provider_kit.content import (
    ContentFacts,
    MessageParts,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    base64_digest,
    canonical_json,
    content_facts,
    field,
    message,
    parameters_or_none,
    with_images,
)
from oisp.provider_kit.context import DecoderContext
from oisp.provider_kit.exchange import auth_from_exchange, json_or_none, latencies, provider_name, request_id_for
from oisp.provider_kit.metadata import MetadataDecoder, exchange_attrs, provider_for
from oisp.provider_kit.tool_calls import (
    CallRecord,
    FirstReports,
    Outcome,
    PendingCalls,
    ToolCallRegistry,
    synthesized_call_id,
    tool_type_for,
)
from oisp.provider_kit.websocket import OpenResponse, WebSocketSessionDecoder, base64_size
from oisp.redaction import key_fingerprint, redact_url, sha256_text

__all__ = [
    "ApiDecoder",
    "CallRecord",
    "ContentFacts",
    "DecoderContext",
    "EventStreamDecoder",
    "EventStreamMessage",
    "FirstReports",
    "FramingError",
    "JsonArrayDecoder",
    "JsonArrayElement",
    "MessageParts",
    "MetadataDecoder",
    "NdjsonDecoder",
    "NdjsonValue",
    "OpenResponse",
    "Outcome",
    "PendingCalls",
    "RequestFacts",
    "ResponseState",
    "SseDecoder",
    "SseEvent",
    "StreamFraming",
    "ToolCallRegistry",
    "ToolResultFacts",
    "WebSocketSessionDecoder",
    "as_int",
    "as_list",
    "as_mapping",
    "as_number",
    "as_str",
    "auth_from_exchange",
    "base64_digest",
    "base64_size",
    "canonical_json",
    "content_facts",
    "exchange_attrs",
    "field",
    "json_or_none",
    "key_fingerprint",
    "latencies",
    "message",
    "normalize_finish_reason",
    "parameters_or_none",
    "provider_for",
    "provider_name",
    "redact_url",
    "request_id_for",
    "sha256_text",
    "synthesized_call_id",
    "tool_type_for",
    "with_images",
]
