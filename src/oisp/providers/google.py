"""Google: the Gemini API (``generativelanguage.googleapis.com``) and Gemini on Vertex AI
(``aiplatform.googleapis.com``, ``{region}-aiplatform.googleapis.com``).

Claims POSTs on hosts the endpoint table names ``google`` whose path names a model and a method::

    /v1beta/models/gemini-2.5-flash:generateContent
    /v1beta/tunedModels/my-model:streamGenerateContent?alt=sse
    /v1/projects/{project}/locations/{region}/publishers/google/models/{model}:generateContent
    /v1/projects/{project}/locations/{region}/endpoints/{endpoint}:streamGenerateContent

==================================================  ===========================================================
method                                              events
==================================================  ===========================================================
``generateContent``                                 chat: ``ai.request``, ``ai.response``, tool calls and results
``streamGenerateContent``                           the same, streamed as SSE (``?alt=sse``) or as one JSON array
                                                    whose elements arrive one by one (no ``alt``)
``embedContent``, ``batchEmbedContents``,           ``ai.request`` and ``ai.embedding``
``predict`` of an embedding model (Vertex AI)
``countTokens``                                     ``request_type`` ``other``; the count is the response's
                                                    ``extra.counted_input_tokens``
``rawPredict``, ``streamRawPredict`` of             read by :class:`oisp.providers.anthropic.MessagesDecoder`
``publishers/anthropic`` (Claude on Vertex AI)
==================================================  ===========================================================

Gemini Live (``BidiGenerateContent`` over WebSocket) is read by :mod:`oisp.providers.google_live`.

The model comes from the path (``tunedModels/...`` and ``endpoints/...`` keep their collection), the response's
``modelVersion`` names the model that answered. On Vertex AI the project and region go to ``provider.project_id``
and ``provider.region``. The API key (``x-goog-api-key`` or ``?key=``) is kept as a prefix and hash only, and
never appears in an endpoint URL or path.

Requests: ``contents`` (role ``model`` → ``assistant``, ``function`` → ``tool``), ``systemInstruction``, parts
with text, thoughts (not part of a message's text), ``inlineData`` (images counted and hashed from their decoded
bytes, other media listed with their MIME type and hash in the message's ``extra.attachments``; never kept),
``fileData`` (MIME type and URI), ``functionCall`` and ``functionResponse``; ``tools[].functionDeclarations``
(and built-in tools: code execution, Google Search, ...), ``toolConfig`` (``AUTO``/``ANY``/``NONE`` → auto,
required, none; allowed function names keep the whole setting), ``generationConfig``. camelCase and snake_case
field names are both read, as the API accepts both.

Responses: candidates (text, thought parts as thinking, function calls), ``finishReason`` as a name or as an
integer-encoded enum (Vertex AI's numbering), a candidate that called functions and stopped is ``tool_calls``,
``usageMetadata``, ``promptFeedback.blockReason`` (a blocked prompt: ``content_filter`` and an error of type
``prompt_blocked``), errors in a failed response and inside a stream.

Usage: ``prompt_tokens`` is ``promptTokenCount`` plus ``toolUsePromptTokenCount``; ``completion_tokens`` is
``candidatesTokenCount`` plus ``thoughtsTokenCount`` (thoughts are output tokens, and are ``reasoning_tokens``, as
OpenAI counts reasoning inside completion tokens); ``cached_tokens`` is ``cachedContentTokenCount``.

Tool call ids: newer API versions give a ``functionCall`` an ``id`` and echo it in the ``functionResponse``; then
that id links a result to its call. Without one, oisp synthesizes ``gemini_<16 hex digits>`` from the
conversation before the call (the roles and texts of the request's ``contents``), the call's position among the
function calls of its turn and its name. When the client sends the conversation back, the ``model`` turn holding
the calls yields the same ids, and each ``functionResponse`` in the turns after it is matched to one of those
calls: by id when it has one, else the first call of the same name not matched yet, else the first unmatched call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from oisp.events import Message, ProviderInfo, RequestParameters, ResponseError, ToolDefinition
from oisp.framing import JsonArrayDecoder, JsonArrayElement, SseDecoder, SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    MessageParts,
    PendingCalls,
    RequestFacts,
    StreamFraming,
    ToolCallRegistry,
    ToolResultFacts,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    base64_digest,
    canonical_json,
    field,
    json_or_none,
    normalize_finish_reason,
    parameters_or_none,
)
from oisp.provider_kit import synthesized_call_id as kit_synthesized_call_id
from oisp.providers.anthropic import MessagesDecoder
from oisp.redaction import redact_url, sha256_text

__all__ = [
    "ENDPOINTS",
    "FINISH_REASON_NAMES",
    "GeminiDecoder",
    "GoogleRoute",
    "contents_request_facts",
    "route_for",
    "synthesized_call_id",
]

_PATH = re.compile(
    r"^/(?P<version>v\d[\w.]*)/"
    r"(?:projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/)?"
    r"(?:publishers/(?P<publisher>[^/]+)/)?"
    r"(?P<collection>models|tunedModels|endpoints)/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$"
)
_REGIONAL_HOST = re.compile(r"^(?P<region>[a-z0-9-]+?)-aiplatform\.googleapis\.com$")

_CHAT = frozenset({"generateContent", "streamGenerateContent"})
_EMBEDDING = frozenset({"embedContent", "batchEmbedContents"})

#: Integer-encoded ``Candidate.FinishReason`` (``$alt=json;enum-encoding=int``), as Vertex AI numbers it.
FINISH_REASON_NAMES: Mapping[int, str] = {
    0: "FINISH_REASON_UNSPECIFIED", 1: "STOP", 2: "MAX_TOKENS", 3: "SAFETY", 4: "RECITATION", 5: "OTHER",
    6: "BLOCKLIST", 7: "PROHIBITED_CONTENT", 8: "SPII", 9: "MALFORMED_FUNCTION_CALL",
}
#: Integer-encoded ``PromptFeedback.BlockReason``.
BLOCK_REASON_NAMES: Mapping[int, str] = {
    0: "BLOCKED_REASON_UNSPECIFIED", 1: "SAFETY", 2: "OTHER", 3: "BLOCKLIST", 4: "PROHIBITED_CONTENT",
    5: "IMAGE_SAFETY",
}
#: Finish reasons the shared table does not know.
_FINISH = {
    "IMAGE_SAFETY": "content_filter", "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter", "UNEXPECTED_TOOL_CALL": "error", "TOO_MANY_TOOL_CALLS": "error",
}
_TOOL_CHOICES = {"AUTO": "auto", "ANY": "required", "NONE": "none", "VALIDATED": "validated"}
#: Built-in tools: request key -> (name, OISP tool definition type).
_BUILTIN_TOOLS = {
    "codeExecution": ("code_execution", "code_interpreter"), "code_execution": ("code_execution", "code_interpreter"),
    "computerUse": ("computer_use", "computer_use"), "computer_use": ("computer_use", "computer_use"),
    "fileSearch": ("file_search", "file_search"), "file_search": ("file_search", "file_search"),
}
_ROLES = {"model": "assistant", "function": "tool", "user": "user", "system": "system", "tool": "tool"}


@attrs.frozen
class GoogleRoute:
    """What the path of a Google AI request names."""

    version: str
    method: str
    model: str
    #: ``models``, ``tunedModels`` or ``endpoints``.
    collection: str
    publisher: str | None = None
    project: str | None = None
    region: str | None = None

    @property
    def vertex(self) -> bool:
        return self.project is not None or self.publisher is not None


def route_for(exchange: HttpExchange) -> GoogleRoute | None:
    """The route of a POST to a Google AI model method, or None."""
    if exchange.connection.provider != "google" or exchange.request.method != "POST":
        return None
    match = _PATH.match(exchange.request.path)
    if match is None:
        return None
    collection = match["collection"]
    model = match["model"] if collection == "models" else f"{collection}/{match['model']}"
    region = match["location"]
    if region is None:
        host = (exchange.request.authority or exchange.connection.server_addr[0]).rsplit(":", 1)[0]
        regional = _REGIONAL_HOST.match(host)
        region = regional["region"] if regional else None
    return GoogleRoute(version=match["version"], method=match["method"], model=model, collection=collection,
                       publisher=match["publisher"], project=match["project"], region=region)


# --- request side ------------------------------------------------------------------------------------------

def _text_parts(parts: Sequence[Any]) -> list[str]:
    return [p["text"] for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str)
            and not p.get("thought")]


#: The key of an empty conversation.
_EMPTY_KEY = hashlib.sha256(b"").hexdigest()


def _next_key(key: str, content: Any) -> str:
    """The key of a conversation extended by one turn (a chain, so a long history is hashed once, not per turn)."""
    if not isinstance(content, Mapping):
        return key
    turn = [str(content.get("role") or "user"), _text_parts(as_list(content.get("parts")))]
    return hashlib.sha256(f"{key}|{canonical_json(turn)}".encode()).hexdigest()


def conversation_key(contents: Sequence[Any]) -> str:
    """A digest of a conversation (the roles and texts of its turns), the seed of synthesized call ids."""
    key = _EMPTY_KEY
    for content in contents:
        key = _next_key(key, content)
    return key


def synthesized_call_id(key: str, position: int, name: str | None) -> str:
    """The id oisp gives a function call that has none: ``gemini_`` and 16 hex digits."""
    return kit_synthesized_call_id("gemini", key, position, name)


def _content_message(content: Mapping[str, Any], call_ids: list[str], result_ids: list[str]) -> Message:
    """A message from a ``Content``; ``call_ids``/``result_ids``: the ids of its function calls and responses."""
    raw_role = str(content.get("role") or "user")
    parts = MessageParts(tool_results=result_ids)
    attachments: list[dict[str, Any]] = []
    for part in as_list(content.get("parts")):
        if not isinstance(part, Mapping):
            continue
        inline = as_mapping(field(part, "inlineData", "inline_data"))
        file_data = as_mapping(field(part, "fileData", "file_data"))
        call = as_mapping(field(part, "functionCall", "function_call"))
        response = as_mapping(field(part, "functionResponse", "function_response"))
        if isinstance(part.get("text"), str):
            if part.get("thought"):
                parts.count("thought")
            else:
                parts.texts.append(part["text"])
        elif inline:
            mime = str(field(inline, "mimeType", "mime_type") or "")
            digest = base64_digest(inline.get("data"))
            if mime.startswith("image/"):
                parts.image_hashes.append(digest)
            else:
                attachments.append({"mime_type": mime or None, "hash": digest})
        elif file_data:
            attachments.append({"mime_type": field(file_data, "mimeType", "mime_type"),
                                "uri": field(file_data, "fileUri", "file_uri")})
        elif call:
            position = len(parts.tool_calls)
            parts.add_call(call_ids[position] if position < len(call_ids) else None, as_str(call.get("name")))
        elif response:
            parts.texts.append(canonical_json(response.get("response")))
    if attachments:
        parts.extra["attachments"] = attachments
    if parts.counts:
        parts.extra["thought_parts"] = parts.counts.pop("thought")
    return parts.message(_ROLES.get(raw_role, raw_role))


def _function_parts(content: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return [as_mapping(field(p, key, _snake(key))) for p in as_list(content.get("parts"))
            if isinstance(p, Mapping) and isinstance(field(p, key, _snake(key)), Mapping)]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _conversation(contents: list[Any], results: list[ToolResultFacts] | None) -> list[Message]:
    """The messages of ``contents``; the function responses are appended to ``results`` (None: not collected)."""
    messages: list[Message] = []
    pending = PendingCalls()
    key = _EMPTY_KEY  # of the turns before this one
    for content in contents:
        if not isinstance(content, Mapping):
            continue
        call_ids: list[str] = []
        result_ids: list[str] = []
        if str(content.get("role") or "user") == "model":
            pending.reset()
            for position, call in enumerate(_function_parts(content, "functionCall")):
                name = as_str(call.get("name"))
                call_id = as_str(call.get("id")) or synthesized_call_id(key, position, name)
                pending.add(call_id, name)
                call_ids.append(call_id)
        else:
            for position, response in enumerate(_function_parts(content, "functionResponse")):
                name = as_str(response.get("name"))
                given = as_str(response.get("id"))
                answered = pending.answer(name) if given is None else None
                call_id = given or (answered[0] if answered else
                                    synthesized_call_id("unmatched:" + key, position, name))
                result_ids.append(call_id)
                if results is not None:
                    value = response.get("response")
                    error = isinstance(value, Mapping) and "error" in value and "output" not in value \
                        and "result" not in value
                    results.append(ToolResultFacts(call_id=call_id, content=value, name=name,
                                                   is_error=True if error else None))
        messages.append(_content_message(content, call_ids, result_ids))
        key = _next_key(key, content)
    return messages


def _system_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        texts = _text_parts(as_list(value.get("parts")))
        return "\n".join(texts) if texts else None
    return None


def _tools(value: Any) -> list[ToolDefinition]:
    out: list[ToolDefinition] = []
    for tool in as_list(value):
        if not isinstance(tool, Mapping):
            continue
        for key, setting in tool.items():
            if key in ("functionDeclarations", "function_declarations"):
                for declaration in as_list(setting):
                    declaration = as_mapping(declaration)
                    schema = field(declaration, "parameters", "parametersJsonSchema", "parameters_json_schema")
                    description = declaration.get("description")
                    out.append(ToolDefinition(
                        name=as_str(declaration.get("name")), type="function",
                        description=description if isinstance(description, str) else None,
                        extra={"parameters_hash": sha256_text(canonical_json(schema))} if schema is not None else {},
                    ))
            else:
                name, kind = _BUILTIN_TOOLS.get(key, (_snake(key), "other"))
                out.append(ToolDefinition(name=name, type=kind, extra={"tool_type": key}))
    return out


def _tool_choice(value: Any) -> Any:
    config = as_mapping(field(as_mapping(value), "functionCallingConfig", "function_calling_config"))
    mode = config.get("mode")
    if not config:
        return None
    allowed = field(config, "allowedFunctionNames", "allowed_function_names")
    if allowed:
        return dict(config)
    if isinstance(mode, str):
        return _TOOL_CHOICES.get(mode.upper(), mode.lower())
    return None


_EXTRA_CONFIG = {
    "topK": "top_k", "top_k": "top_k", "candidateCount": "candidate_count", "candidate_count": "candidate_count",
    "seed": "seed", "responseMimeType": "response_mime_type", "response_mime_type": "response_mime_type",
    "responseModalities": "response_modalities", "response_modalities": "response_modalities",
    "thinkingConfig": "thinking_config", "thinking_config": "thinking_config",
    "responseLogprobs": "response_logprobs", "response_logprobs": "response_logprobs",
    "mediaResolution": "media_resolution", "media_resolution": "media_resolution",
}


def _parameters(config: Mapping[str, Any]) -> RequestParameters | None:
    stop = field(config, "stopSequences", "stop_sequences")
    values: dict[str, Any] = {
        "temperature": as_number(config.get("temperature")), "top_p": as_number(field(config, "topP", "top_p")),
        "max_tokens": as_int(field(config, "maxOutputTokens", "max_output_tokens")),
        "frequency_penalty": as_number(field(config, "frequencyPenalty", "frequency_penalty")),
        "presence_penalty": as_number(field(config, "presencePenalty", "presence_penalty")),
        "stop": [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else None,
    }
    extra = {name: config[key] for key, name in _EXTRA_CONFIG.items() if config.get(key) is not None}
    schema = field(config, "responseSchema", "response_schema", "responseJsonSchema", "response_json_schema")
    if schema is not None:
        extra["response_schema_hash"] = sha256_text(canonical_json(schema))
    return parameters_or_none(values, extra)


def contents_request_facts(body: Any, *, model: str | None = None, streaming: bool = False,
                           request_type: str = "chat", tool_results: bool = True) -> RequestFacts:
    """The facts of a ``generateContent`` request body (``tool_results=False``: function responses are not
    reported, for ``countTokens``, which only measures a conversation)."""
    body = as_mapping(body)
    nested = as_mapping(field(body, "generateContentRequest", "generate_content_request"))
    if nested and "contents" not in body:
        body = nested
    results: list[ToolResultFacts] = []
    messages = _conversation(as_list(body.get("contents")), results if tool_results else None)
    extra: dict[str, Any] = {}
    cached = field(body, "cachedContent", "cached_content")
    if isinstance(cached, str):
        extra["cached_content"] = cached
    return RequestFacts(
        request_type=request_type, model=model, streaming=streaming, messages=messages,
        system_prompt=_system_text(field(body, "systemInstruction", "system_instruction")),
        tools=_tools(body.get("tools")), tool_choice=_tool_choice(field(body, "toolConfig", "tool_config")),
        parameters=_parameters(as_mapping(field(body, "generationConfig", "generation_config"))),
        tool_results=results, extra=extra,
    )


def _embedding_inputs(body: Mapping[str, Any], method: str) -> int | None:
    if method == "batchEmbedContents":
        return len(as_list(body.get("requests")))
    if method == "predict":
        return len(as_list(body.get("instances")))
    return 1 if body.get("content") is not None else None


# --- the decoder -------------------------------------------------------------------------------------------

class GeminiDecoder(ApiDecoder):
    """Every model method of the Gemini API and of Gemini on Vertex AI (see the module's table)."""

    def __init__(self, route: GoogleRoute, *, context: DecoderContext | None = None,
                 registry: ToolCallRegistry | None = None,
                 streaming_chunks: bool = False) -> None:
        super().__init__(context=context, registry=registry, streaming_chunks=streaming_chunks)
        self.route = route
        self._key = _EMPTY_KEY
        #: Candidate index -> function calls seen so far (their positions).
        self._calls: dict[int, int] = {}
        self._finished = False
        self._streamed = False

    @property
    def operation(self) -> str:
        method = self.route.method
        if method in _CHAT:
            return "chat"
        if method in _EMBEDDING or (method == "predict" and "embed" in self.route.model.lower()):
            return "embedding"
        return "count_tokens" if method == "countTokens" else "other"

    # request ----------------------------------------------------------------------------------------
    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        route = self.route
        attributes = {"google.api": "vertex_ai" if route.vertex else "gemini", "google.api_version": route.version,
                      "google.method": route.method}
        self.state.attrs.update(attributes)
        operation = self.operation
        body = as_mapping(body)
        if operation == "chat":
            facts = contents_request_facts(body, model=route.model, streaming=route.method == "streamGenerateContent")
            self._key = conversation_key(as_list(body.get("contents")))
        elif operation == "count_tokens":
            facts = contents_request_facts(body, model=route.model, request_type="other", tool_results=False)
        elif operation == "embedding":
            facts = RequestFacts(request_type="embedding", model=route.model)
            count = _embedding_inputs(body, route.method)
            if count is not None:
                facts.extra["input_count"] = count
        else:
            facts = RequestFacts(request_type="other", model=route.model)
        facts.attrs.update(attributes)
        return facts

    def provider_info(self, exchange: HttpExchange) -> ProviderInfo:
        project = self.route.project or exchange.request.headers.get("x-goog-user-project")
        return ProviderInfo(name=exchange.connection.provider or "google", endpoint=redact_url(exchange.request.url),
                            region=self.route.region, project_id=project)

    def stream_framing(self, exchange: HttpExchange) -> StreamFraming | None:
        response = exchange.response
        content_type = (response.headers.get("content-type") or "").lower() if response is not None else ""
        if "text/event-stream" in content_type or "alt=sse" in exchange.request.query:
            return SseDecoder()
        if self.route.method == "streamGenerateContent":
            return JsonArrayDecoder()
        return None

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        if isinstance(body, list) and body:  # a failed stream without alt=sse: a JSON array of one error
            body = body[0]
        return super().on_error_json(exchange, body)

    # response ---------------------------------------------------------------------------------------
    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        operation = self.operation
        if operation == "embedding":
            self._embedding(as_mapping(body))
        elif operation == "count_tokens":
            body = as_mapping(body)
            counted = as_int(field(body, "totalTokens", "total_tokens"))
            if counted is not None:
                self.state.extra["counted_input_tokens"] = counted
            cached = as_int(field(body, "cachedContentTokenCount", "cached_content_token_count"))
            if cached is not None:
                self.state.extra["counted_cached_tokens"] = cached
        elif operation == "chat":
            for chunk in body if isinstance(body, list) else [body]:  # generateContent answers one object
                self._generate_response(as_mapping(chunk))

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        self._streamed = True
        if isinstance(item, JsonArrayElement):
            value = item.value
        elif isinstance(item, SseEvent):
            value, problem = json_or_none(item.data)
            if problem is not None:
                self.state.problems.append(f"stream event: {problem}")
                return
        else:
            return
        if not isinstance(value, Mapping):
            self.state.problems.append("stream element: not an object")
            return
        self._generate_response(value)

    def _generate_response(self, body: Mapping[str, Any]) -> None:
        state = self.state
        error = as_mapping(body.get("error"))
        if error:
            state.error = ResponseError(type=as_str(error.get("status")) or "error",
                                        message=as_str(error.get("message")),
                                        code=str(error["code"]) if error.get("code") is not None else None)
            return
        state.model = as_str(field(body, "modelVersion", "model_version")) or state.model
        state.provider_request_id = as_str(field(body, "responseId", "response_id")) or state.provider_request_id
        for position, candidate in enumerate(as_list(body.get("candidates"))):
            if isinstance(candidate, Mapping):
                index = as_int(candidate.get("index"))
                self._candidate(position if index is None else index, candidate)
        self._usage(as_mapping(field(body, "usageMetadata", "usage_metadata")))
        feedback = as_mapping(field(body, "promptFeedback", "prompt_feedback"))
        block = field(feedback, "blockReason", "block_reason")
        if block is not None:
            name = BLOCK_REASON_NAMES.get(block, str(block)) if isinstance(block, int) else str(block)
            state.error = ResponseError(type="prompt_blocked", code=name,
                                        message=as_str(field(feedback, "blockReasonMessage", "block_reason_message")))
            state.finish(name)
            self._finished = True

    def _candidate(self, index: int, candidate: Mapping[str, Any]) -> None:
        state = self.state
        content = as_mapping(candidate.get("content"))
        if isinstance(content.get("role"), str):
            state.choice(index).role = _ROLES.get(content["role"], content["role"])
        for part in as_list(content.get("parts")):
            if not isinstance(part, Mapping):
                continue
            call = field(part, "functionCall", "function_call")
            if isinstance(part.get("text"), str):
                if part.get("thought"):
                    state.add_thinking(part["text"], index)
                else:
                    state.add_text(part["text"], index)
            elif isinstance(call, Mapping):
                position = self._calls.get(index, 0)
                self._calls[index] = position + 1
                name = as_str(call.get("name"))
                args = call.get("args")
                state.tool_call(position, choice=index, name=name, type="function",
                                id=as_str(call.get("id")) or synthesized_call_id(self._key, position, name),
                                parsed=args if isinstance(args, Mapping) else {})
            elif field(part, "executableCode", "executable_code") is not None:
                state.extra["executable_code_parts"] = int(state.extra.get("executable_code_parts", 0)) + 1
            elif field(part, "inlineData", "inline_data") is not None:
                inline = as_mapping(field(part, "inlineData", "inline_data"))
                state.extra.setdefault("generated_media", []).append(
                    {"mime_type": field(inline, "mimeType", "mime_type"), "hash": base64_digest(inline.get("data"))})
        reason = field(candidate, "finishReason", "finish_reason")
        if reason is not None:
            state.finish(FINISH_REASON_NAMES.get(reason, str(reason)) if isinstance(reason, int) else str(reason),
                         index)
            self._finished = True
        if field(candidate, "groundingMetadata", "grounding_metadata") is not None:
            state.extra["grounded"] = True

    def _usage(self, usage: Mapping[str, Any]) -> None:
        if not usage:
            return
        prompt = as_int(field(usage, "promptTokenCount", "prompt_token_count"))
        tool_prompt = as_int(field(usage, "toolUsePromptTokenCount", "tool_use_prompt_token_count"))
        candidates = as_int(field(usage, "candidatesTokenCount", "candidates_token_count"))
        thoughts = as_int(field(usage, "thoughtsTokenCount", "thoughts_token_count"))
        if prompt is not None and tool_prompt:
            prompt += tool_prompt
        completion = None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
        self.state.set_usage(
            prompt_tokens=prompt, completion_tokens=completion, reasoning_tokens=thoughts,
            total_tokens=as_int(field(usage, "totalTokenCount", "total_token_count")),
            cached_tokens=as_int(field(usage, "cachedContentTokenCount", "cached_content_token_count")),
        )

    def _embedding(self, body: Mapping[str, Any]) -> None:
        vectors: list[Any] = []
        tokens = 0
        if isinstance(body.get("embedding"), Mapping):
            vectors = [body["embedding"].get("values")]
        elif isinstance(body.get("embeddings"), list):
            vectors = [as_mapping(e).get("values") for e in body["embeddings"]]
        elif isinstance(body.get("predictions"), list):
            for prediction in body["predictions"]:
                embeddings = as_mapping(as_mapping(prediction).get("embeddings"))
                vectors.append(embeddings.get("values"))
                tokens += as_int(as_mapping(embeddings.get("statistics")).get("token_count")) or 0
        vectors = [v for v in vectors if isinstance(v, list)]
        self.state.embedding_count = len(vectors)
        if vectors:
            self.state.embedding_dimensions = len(vectors[0])
        usage = as_mapping(field(body, "usageMetadata", "usage_metadata"))
        prompt = as_int(field(usage, "promptTokenCount", "prompt_token_count"))
        self.state.set_usage(total_tokens=prompt if prompt is not None else tokens or None)

    def on_response_complete(self, exchange: HttpExchange) -> None:
        raw_reasons: dict[int, Any] = {}
        for index, choice in self.state.choices.items():
            raw = choice.finish_raw
            if raw is None:
                continue
            raw_reasons[index] = raw
            reason = _FINISH.get(str(raw)) or normalize_finish_reason(raw)
            if reason == "stop" and choice.tool_calls:
                reason = "tool_calls"  # Gemini says STOP after function calls
            if reason != normalize_finish_reason(raw):
                choice.finish_raw = reason
        if raw_reasons:
            self.state.extra["finish_reason_raw"] = raw_reasons.get(0, next(iter(raw_reasons.values())))
        response = exchange.response
        ok = response is not None and 200 <= response.status < 300
        if ok and self._streamed and not self._finished and self.state.error is None and not exchange.partial:
            self.state.problems.append("stream ended before a finish reason")


def decoder_for(exchange: HttpExchange, settings: DecoderSettings | None = None,
                context: DecoderContext | None = None) -> ApiDecoder | None:
    """A decoder for an exchange with a Google AI model method, or None when this module does not read it."""
    route = route_for(exchange)
    if route is None:
        return None
    chunks = (settings or DecoderSettings()).streaming_chunks
    if route.publisher == "anthropic":  # Claude on Vertex AI: the Messages API, the model in the path
        if route.method not in ("rawPredict", "streamRawPredict"):
            return None
        counting = route.model == "count-tokens"
        return MessagesDecoder(count_tokens=counting, context=context, streaming_chunks=chunks, region=route.region,
                               model=None if counting else route.model, project_id=route.project)
    if route.publisher not in (None, "google"):
        return None  # partner models on Vertex AI speak their own dialects
    if route.method in _CHAT or route.method in _EMBEDDING or route.method in ("countTokens", "predict"):
        if route.method == "predict" and "embed" not in route.model.lower():
            return None
        return GeminiDecoder(route, context=context, streaming_chunks=chunks)
    return None


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    request = exchange.request
    if exchange.connection.provider == "google" and request.asks_websocket:
        from oisp.providers.google_live import GeminiLiveDecoder, is_live_path

        if is_live_path(request.path):
            return GeminiLiveDecoder(exchange, context=context,
                                     streaming_chunks=(settings or DecoderSettings()).streaming_chunks)
        return None
    return decoder_for(exchange, settings, context)


#: The endpoints of the Gemini API and Vertex AI, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("google", "generativelanguage.googleapis.com"),
    EndpointSpec("google", "aiplatform.googleapis.com"),
    EndpointSpec("google", "*-aiplatform.googleapis.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
