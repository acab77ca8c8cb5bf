"""AWS Bedrock Runtime (``bedrock-runtime.{region}.amazonaws.com``): Converse, ConverseStream, InvokeModel and
InvokeModelWithResponseStream.

``POST /model/{modelId}/{operation}``: the model id comes from the path, percent-decoded (``anthropic.claude-3-5-
sonnet-20240620-v1%3A0``), and may be a foundation model, a cross-region inference profile (``us.anthropic...``)
or an ARN (its ``/`` encoded as ``%2F``, or not); the region comes from the host (else from an ARN).

* **Converse** (``/converse``) and **ConverseStream** (``/converse-stream``) are the same for every model:
  ``messages`` of content blocks (``text``, ``image``, ``document``, ``toolUse``, ``toolResult`` with its
  ``toolUseId``, ``reasoningContent``), ``system`` blocks, ``inferenceConfig`` and ``toolConfig``. The answer is
  ``output.message``, ``stopReason``, ``usage`` and ``metrics.latencyMs``, or an
  ``application/vnd.amazon.eventstream`` of ``messageStart``, ``contentBlockStart`` (a tool use's id and name),
  ``contentBlockDelta`` (text, tool input fragments, reasoning), ``contentBlockStop``, ``messageStop`` and
  ``metadata`` events; exceptions arrive as ``:message-type: exception`` messages.
* **InvokeModel** (``/invoke``) and **InvokeModelWithResponseStream** (``/invoke-with-response-stream``) carry
  the model provider's own JSON; a stream's ``chunk`` events hold it base64-encoded in ``{"bytes": ...}``.
  Anthropic Messages bodies (``anthropic_version: bedrock-2023-05-31``) are read by
  :mod:`oisp.providers.anthropic` (see :class:`_AnthropicReader`); Amazon Nova bodies have the Converse shape;
  Amazon Titan, Meta Llama, Mistral, Cohere, AI21 and the OpenAI-style bodies of other models are read for the
  model, text, finish reason and usage. Bedrock's own counts (the ``X-Amzn-Bedrock-*-Token-Count`` headers, a
  stream's ``amazon-bedrock-invocationMetrics``) fill in what a body does not say. Embedding models (Titan,
  Cohere, Nova embeddings) become ``ai.embedding`` events.

Usage: Bedrock counts ``inputTokens`` without the cached part; as for Anthropic, oisp reports ``prompt_tokens``
as the whole prompt (``inputTokens + cacheReadInputTokens + cacheWriteInputTokens``), ``cached_tokens`` and
``cache_creation_tokens`` as its parts. A damaged eventstream (a CRC that does not match) fails the response,
as it fails the AWS SDKs, and marks it partial. Authentication is SigV4: the framework keeps the access key id's
prefix and hash only; signatures and session tokens never reach an event.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import attrs

from oisp.events import Message, ProviderInfo, RequestParameters, ResponseError, ToolDefinition
from oisp.framing import EventStreamMessage, SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    MessageParts,
    RequestFacts,
    ResponseState,
    ToolResultFacts,
    as_int,
    as_list,
    as_mapping,
    as_number,
    as_str,
    base64_digest,
    canonical_json,
    json_or_none,
    message,
    parameters_or_none,
    with_images,
)
from oisp.providers.anthropic import MessagesDecoder, messages_request_facts
from oisp.providers.openai_chat import chat_request_facts
from oisp.providers.openai_common import openai_usage
from oisp.redaction import sha256_text

__all__ = ["ENDPOINTS", "OPERATIONS", "BedrockDecoder", "bedrock_route", "converse_request_facts", "model_family"]

#: Path operation -> (API, streamed?).
OPERATIONS: Mapping[str, tuple[str, bool]] = {
    "converse": ("converse", False),
    "converse-stream": ("converse", True),
    "invoke": ("invoke", False),
    "invoke-with-response-stream": ("invoke", True),
}

_PATH = re.compile(r"^/model/(.+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_HOST = re.compile(r"^bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_ARN = re.compile(r"^arn:aws[a-z-]*:bedrock:([a-z0-9-]*):[0-9]*:(.+)$")
_GEO_PREFIXES = ("us.", "eu.", "apac.", "us-gov.", "global.", "ca.", "jp.", "au.", "apne.")
_CONVERSE_EVENTS = frozenset({"messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop",
                              "messageStop", "metadata"})
_TOOL_CHOICES = {"auto": "auto", "any": "required"}
_GUARDRAIL_HEADERS = {"x-amzn-bedrock-guardrailidentifier": "aws.bedrock.guardrail_id",
                      "x-amzn-bedrock-guardrailversion": "aws.bedrock.guardrail_version",
                      "x-amzn-bedrock-trace": "aws.bedrock.trace",
                      "x-amzn-bedrock-performanceconfig-latency": "aws.bedrock.latency_mode"}


# --- routing -------------------------------------------------------------------------------------------------

@attrs.frozen
class BedrockRoute:
    """What the path and host of a Bedrock Runtime call say."""

    api: str
    streaming: bool
    model_id: str
    region: str | None


def bedrock_route(exchange: HttpExchange) -> BedrockRoute | None:
    """The operation, model id and region of a Bedrock Runtime call (None for other paths)."""
    match = _PATH.match(exchange.request.path)
    if match is None:
        return None
    api, streaming = OPERATIONS[match.group(2)]
    model_id = unquote(match.group(1))
    host = (exchange.request.authority or exchange.connection.server_addr[0] or "").rsplit(":", 1)[0].lower()
    region_match = _HOST.match(host)
    region = region_match.group(1) if region_match else None
    arn = _ARN.match(model_id)
    if region is None and arn is not None and arn.group(1):
        region = arn.group(1)
    return BedrockRoute(api, streaming, model_id, region)


def model_family(model_id: str) -> str | None:
    """The model provider named by a Bedrock model id (``anthropic``, ``amazon``, ``meta``, ...), through
    inference profiles and ARNs; None when the id does not say (provisioned and custom model ARNs)."""
    arn = _ARN.match(model_id)
    name = arn.group(2).rsplit("/", 1)[-1] if arn else model_id
    for prefix in _GEO_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    family, dot, _ = name.partition(".")
    return family.lower() if dot and family else None


# --- Converse requests ---------------------------------------------------------------------------------------

def _image_digest(block: Mapping[str, Any]) -> str:
    source = as_mapping(block.get("source"))
    if "bytes" in source:
        return base64_digest(source.get("bytes"))
    location = as_mapping(source.get("s3Location"))
    if as_str(location.get("uri")):
        return sha256_text(str(location["uri"]))
    return sha256_text(canonical_json(source))


def _tool_result(block: Mapping[str, Any]) -> Any:
    """A ``toolResult``'s content as reported: its JSON when that is all it holds, else its text."""
    parts = [p for p in as_list(block.get("content")) if isinstance(p, Mapping)]
    json_parts = [p["json"] for p in parts if "json" in p]
    texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
    if json_parts and not texts:
        return json_parts[0] if len(json_parts) == 1 else json_parts
    return "\n".join(texts + [canonical_json(j) for j in json_parts])


def _converse_message(raw: Mapping[str, Any], names: dict[str, str], results: list[ToolResultFacts]) -> Message:
    role = str(raw.get("role") or "user")
    content = raw.get("content")
    if isinstance(content, str):  # not Converse, but some Nova and OpenAI-style bodies say it this way
        return message(role, content)
    parts = MessageParts()
    for block in as_list(content):
        if not isinstance(block, Mapping):
            continue
        if isinstance(block.get("text"), str):
            parts.texts.append(block["text"])
        elif "image" in block:
            parts.image_hashes.append(_image_digest(as_mapping(block["image"])))
        elif "toolUse" in block:
            use = as_mapping(block["toolUse"])
            call_id, name = as_str(use.get("toolUseId")), as_str(use.get("name"))
            parts.add_call(call_id, name)
            if call_id and name:
                names[call_id] = name
        elif "toolResult" in block:
            result = as_mapping(block["toolResult"])
            call_id = as_str(result.get("toolUseId"))
            value = _tool_result(result)
            parts.add_text(value if isinstance(value, str) else canonical_json(value))
            parts.image_hashes += [_image_digest(as_mapping(p["image"])) for p in as_list(result.get("content"))
                                   if isinstance(p, Mapping) and "image" in p]
            if call_id is not None:
                parts.tool_results.append(call_id)
                status = result.get("status")
                results.append(ToolResultFacts(call_id=call_id, content=value, name=names.get(call_id),
                                               is_error=status == "error" if isinstance(status, str) else None))
        elif "reasoningContent" in block:
            reasoning = as_mapping(as_mapping(block["reasoningContent"]).get("reasoningText"))
            parts.thinking += [str(reasoning["text"])] if as_str(reasoning.get("text")) else []
        elif "guardContent" in block:
            parts.add_text(as_mapping(as_mapping(block["guardContent"]).get("text")).get("text"))
        else:
            for kind in ("document", "video", "audio"):  # and cachePoint markers, not content
                if kind in block:
                    parts.count(kind)
    return parts.message(role)


def _converse_tools(config: Mapping[str, Any]) -> list[ToolDefinition]:
    tools = []
    for tool in as_list(config.get("tools")):
        spec = as_mapping(as_mapping(tool).get("toolSpec"))
        if spec:
            schema = as_mapping(spec.get("inputSchema")).get("json")
            description = spec.get("description")
            tools.append(ToolDefinition(
                name=as_str(spec.get("name")), type="function",
                description=description if isinstance(description, str) else None,
                extra={"parameters_hash": sha256_text(canonical_json(schema))} if schema is not None else {}))
        elif isinstance(tool, Mapping) and "systemTool" in tool:
            tools.append(ToolDefinition(name=as_str(as_mapping(tool["systemTool"]).get("name")), type="other",
                                        extra={"tool_type": "systemTool"}))
    return tools


def _converse_tool_choice(config: Mapping[str, Any]) -> Any:
    choice = as_mapping(config.get("toolChoice"))
    for key, value in _TOOL_CHOICES.items():
        if key in choice:
            return value
    if "tool" in choice:
        return {"type": "tool", "name": as_mapping(choice["tool"]).get("name")}
    return None


def _parameters(config: Mapping[str, Any], extra_fields: Mapping[str, Any]) -> RequestParameters | None:
    """``inferenceConfig`` (Converse's camelCase, and Nova's snake_case inside InvokeModel)."""
    stop = config.get("stopSequences", config.get("stop_sequences"))
    max_tokens = as_int(config.get("maxTokens", config.get("max_new_tokens", config.get("max_tokens"))))
    values: dict[str, Any] = {
        "temperature": as_number(config.get("temperature")),
        "top_p": as_number(config.get("topP", config.get("top_p"))),
        "max_tokens": max_tokens,
        "stop": [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else None,
    }
    extra = {k: v for k, v in extra_fields.items() if v is not None}
    if config.get("top_k", config.get("topK")) is not None:
        extra["top_k"] = config.get("top_k", config.get("topK"))
    return parameters_or_none(values, extra)


def converse_request_facts(body: Any) -> RequestFacts:
    """The facts of a Converse request body (the model is in the path, not the body); Nova's InvokeModel bodies
    have the same shape."""
    body = as_mapping(body)
    names: dict[str, str] = {}
    results: list[ToolResultFacts] = []
    messages = [_converse_message(raw, names, results) for raw in as_list(body.get("messages"))
                if isinstance(raw, Mapping)]
    system_blocks = body.get("system")
    system_texts = [b["text"] for b in as_list(system_blocks)
                    if isinstance(b, Mapping) and isinstance(b.get("text"), str)]
    if isinstance(system_blocks, str):
        system_texts = [system_blocks]
    tool_config = as_mapping(body.get("toolConfig"))
    facts_attrs: dict[str, Any] = {}
    guardrail = as_mapping(body.get("guardrailConfig"))
    if as_str(guardrail.get("guardrailIdentifier")):
        facts_attrs["aws.bedrock.guardrail_id"] = guardrail["guardrailIdentifier"]
        if guardrail.get("guardrailVersion") is not None:
            facts_attrs["aws.bedrock.guardrail_version"] = str(guardrail["guardrailVersion"])
    if isinstance(body.get("promptVariables"), Mapping):
        facts_attrs["aws.bedrock.prompt_variables"] = sorted(body["promptVariables"])
    latency = as_mapping(body.get("performanceConfig")).get("latency")
    if isinstance(latency, str):
        facts_attrs["aws.bedrock.latency_mode"] = latency
    return RequestFacts(
        request_type="chat", messages=messages, system_prompt="\n".join(system_texts) if system_texts else None,
        tools=_converse_tools(tool_config), tool_choice=_converse_tool_choice(tool_config),
        parameters=_parameters(as_mapping(body.get("inferenceConfig")),
                               as_mapping(body.get("additionalModelRequestFields"))),
        tool_results=results, attrs=facts_attrs,
    )


# --- InvokeModel requests ------------------------------------------------------------------------------------

_MAX_TOKENS_KEYS = ("max_tokens", "max_gen_len", "max_tokens_to_sample", "maxTokenCount", "max_new_tokens",
                    "maxTokens")
_EXTRA_KEYS = ("top_k", "k", "seed", "return_likelihoods", "num_generations", "truncate", "input_type",
               "dimensions", "normalize", "embedding_types", "embeddingTypes")


def _prompt_parameters(body: Mapping[str, Any]) -> RequestParameters | None:
    """Sampling parameters of the model-native prompt bodies (top level, or Titan's ``textGenerationConfig``)."""
    config = as_mapping(body.get("textGenerationConfig")) or body
    stop = next((config[k] for k in ("stop", "stop_sequences", "stopSequences") if k in config), None)
    max_tokens = next((as_int(config[k]) for k in _MAX_TOKENS_KEYS if as_int(config.get(k)) is not None), None)
    values: dict[str, Any] = {
        "temperature": as_number(config.get("temperature")),
        "top_p": as_number(config.get("top_p", config.get("topP", config.get("p")))),
        "max_tokens": max_tokens,
        "stop": [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        if isinstance(stop, list) else None,
    }
    extra = {k: config[k] for k in _EXTRA_KEYS if config.get(k) is not None}
    return parameters_or_none(values, extra)


def _embedding_inputs(body: Mapping[str, Any]) -> int:
    for key in ("texts", "images", "inputs"):
        if isinstance(body.get(key), list):
            return len(body[key])
    return 1


def _is_converse_shaped(body: Mapping[str, Any]) -> bool:
    """Nova (and Converse-like) bodies: messages whose content is a list of un-typed blocks (``{"text": ...}``)."""
    if body.get("schemaVersion") or "inferenceConfig" in body:
        return True
    for raw in as_list(body.get("messages")):
        for block in as_list(as_mapping(raw).get("content")):
            if isinstance(block, Mapping):
                return "type" not in block
    return False


def invoke_request_facts(body: Any, family: str | None, model_id: str) -> RequestFacts:
    """The facts of an InvokeModel body, in whatever shape its model provider uses."""
    body = as_mapping(body)
    if "embed" in model_id.lower():
        facts = RequestFacts(request_type="embedding", parameters=_prompt_parameters(body))
        facts.extra["input_count"] = _embedding_inputs(body)
        return facts
    if family == "anthropic" or "anthropic_version" in body:
        if "messages" in body:
            facts = messages_request_facts(body)
        else:  # Claude's legacy text completions
            facts = RequestFacts(request_type="completion", parameters=_prompt_parameters(body))
        for key in ("anthropic_version", "anthropic_beta"):
            if body.get(key) is not None:
                facts.attrs[f"anthropic.{key.removeprefix('anthropic_')}"] = body[key]
    elif isinstance(body.get("messages"), list) and _is_converse_shaped(body):
        facts = converse_request_facts(body)
    elif isinstance(body.get("messages"), list):
        facts = chat_request_facts(body)
    elif isinstance(body.get("message"), str):  # Cohere Command R
        history = [message(_cohere_role(m.get("role")), m.get("message")) for m in as_list(body.get("chat_history"))
                   if isinstance(m, Mapping)]
        preamble = as_str(body.get("preamble"))
        messages = ([message("system", preamble)] if preamble else []) + history + [message("user", body["message"])]
        facts = RequestFacts(request_type="chat", messages=messages, system_prompt=preamble,
                             parameters=_prompt_parameters(body))
    else:
        facts = RequestFacts(request_type="completion", parameters=_prompt_parameters(body))
    prompt = body.get("prompt", body.get("inputText"))
    if isinstance(prompt, str) and not facts.messages:
        images = [base64_digest(i) for i in as_list(body.get("images"))]
        facts.messages = [with_images(message("user", prompt), images)]
    facts.streaming = False
    facts.model = None
    return facts


def _cohere_role(role: Any) -> str:
    return {"USER": "user", "CHATBOT": "assistant", "SYSTEM": "system", "TOOL": "tool"}.get(str(role), "user")


# --- responses -----------------------------------------------------------------------------------------------

def converse_usage(state: ResponseState, usage: Any) -> None:
    """Converse's ``usage`` (also the ``metadata`` event's, and Nova's, which names the cache counts
    ``cacheReadInputTokenCount`` and ``cacheWriteInputTokenCount``)."""
    usage = as_mapping(usage)
    inputs, output = as_int(usage.get("inputTokens")), as_int(usage.get("outputTokens"))
    read = as_int(usage.get("cacheReadInputTokens", usage.get("cacheReadInputTokenCount")))
    write = as_int(usage.get("cacheWriteInputTokens", usage.get("cacheWriteInputTokenCount")))
    prompt = inputs + (read or 0) + (write or 0) if inputs is not None else None
    state.set_usage(prompt_tokens=prompt, completion_tokens=output, cached_tokens=read, cache_creation_tokens=write)
    total = as_int(usage.get("totalTokens"))
    if total is not None:
        state.set_usage(total_tokens=max(total, (prompt or 0) + (output or 0)))


class _AnthropicReader:
    """Adapter to :mod:`oisp.providers.anthropic`, whose response readers are methods of its
    ``MessagesDecoder``: a reader instance that shares this decoder's :class:`ResponseState` is fed the bodies,
    and the native stream events as the SSE events it expects."""

    def __init__(self, state: ResponseState) -> None:
        self.reader = MessagesDecoder()
        self.reader.state = state
        self.stopped = False

    def response(self, exchange: HttpExchange, body: Mapping[str, Any]) -> None:
        self.reader.on_response_json(exchange, body)

    def stream_event(self, exchange: HttpExchange, event: Mapping[str, Any]) -> None:
        kind = str(event.get("type") or "message")
        self.stopped = self.stopped or kind in ("message_stop", "error")
        self.reader.on_stream_item(exchange, SseEvent(event=kind, data=json.dumps(event)))


class BedrockDecoder(ApiDecoder):
    """One Bedrock Runtime call."""

    provider = "aws_bedrock"

    def __init__(self, route: BedrockRoute, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.route = route
        self.family = model_family(route.model_id)
        self._anthropic: _AnthropicReader | None = None
        self._blocks: dict[int, str] = {}  # Converse stream: content block index -> kind
        self._stopped = False
        self._fallback_usage: dict[str, int] = {}

    # --- request ---------------------------------------------------------------------------------
    def provider_info(self, exchange: HttpExchange) -> ProviderInfo:
        return attrs.evolve(super().provider_info(exchange), region=self.route.region)

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = as_mapping(body)
        if self.route.api == "converse":
            facts = converse_request_facts(body)
        else:
            if self.family is None and "anthropic_version" in body:
                self.family = "anthropic"
            facts = invoke_request_facts(body, self.family, self.route.model_id)
        facts.model = self.route.model_id
        facts.streaming = self.route.streaming
        facts.attrs["aws.bedrock.operation"] = exchange.request.path.rsplit("/", 1)[-1]
        if self.family:
            facts.attrs["aws.bedrock.model_provider"] = self.family
        for header, key in _GUARDRAIL_HEADERS.items():
            value = exchange.request.headers.get(header)
            if value:
                facts.attrs[key] = value
        return facts

    # --- errors ----------------------------------------------------------------------------------
    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        body = as_mapping(body)
        header = exchange.response.headers.get("x-amzn-errortype") if exchange.response is not None else None
        kind = (header.split(":", 1)[0] if header else None) or as_str(body.get("__type")) or "error"
        text = as_str(body.get("message")) or as_str(body.get("Message"))
        extra = {k: body[k] for k in ("originalStatusCode", "resourceName") if body.get(k) is not None}
        return ResponseError(type=kind.rsplit("#", 1)[-1], message=text,
                             code=str(exchange.response.status) if exchange.response is not None else None,
                             extra=extra)

    # --- whole responses -------------------------------------------------------------------------
    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        body = as_mapping(body)
        if self.route.api == "converse" or "output" in body:
            self._converse_output(body)
        else:
            self._invoke_output(exchange, body)

    def _converse_output(self, body: Mapping[str, Any]) -> None:
        state = self.state
        msg = as_mapping(as_mapping(body.get("output")).get("message"))
        if as_str(msg.get("role")):
            state.choice(0).role = str(msg["role"])
        for index, block in enumerate(as_list(msg.get("content"))):
            block = as_mapping(block)
            if isinstance(block.get("text"), str):
                state.add_text(block["text"])
            elif "toolUse" in block:
                use = as_mapping(block["toolUse"])
                state.tool_call(index, id=as_str(use.get("toolUseId")), name=as_str(use.get("name")),
                                parsed=use.get("input") if use.get("input") is not None else {}, type="function")
            elif "reasoningContent" in block:
                reasoning = as_mapping(block["reasoningContent"])
                state.add_thinking(as_str(as_mapping(reasoning.get("reasoningText")).get("text")))
                if "redactedContent" in reasoning:
                    state.extra["redacted_reasoning_blocks"] = int(state.extra.get("redacted_reasoning_blocks", 0)) + 1
        state.finish(as_str(body.get("stopReason")))
        converse_usage(state, body.get("usage"))
        self._metrics(body.get("metrics"))
        if body.get("trace") is not None:
            state.attrs["aws.bedrock.trace"] = True

    def _metrics(self, metrics: Any) -> None:
        latency = as_int(as_mapping(metrics).get("latencyMs"))
        if latency is not None:
            self.state.attrs["aws.bedrock.latency_ms"] = latency

    def _invoke_output(self, exchange: HttpExchange, body: Mapping[str, Any]) -> None:
        state = self.state
        self._invocation_metrics(body)
        if self.request is not None and self.request.request_type == "embedding":
            self._embedding(body)
            return
        if self.family == "anthropic" and ("content" in body or body.get("type") == "message"):
            self._anthropic_reader().response(exchange, body)
            return
        self._native_fields(body, whole=True)
        if isinstance(body.get("results"), list):  # Titan text
            for index, result in enumerate(body["results"]):
                result = as_mapping(result)
                state.add_text(as_str(result.get("outputText")), index)
                state.finish(result.get("completionReason"), index)
            state.set_usage(prompt_tokens=body.get("inputTextTokenCount"),
                            completion_tokens=sum(as_int(as_mapping(r).get("tokenCount")) or 0
                                                  for r in body["results"]) or None)
        for index, generation in enumerate(as_list(body.get("generations"))):  # Cohere Command
            generation = as_mapping(generation)
            state.add_text(as_str(generation.get("text")), index)
            state.finish(generation.get("finish_reason"), index)
        for index, completion in enumerate(as_list(body.get("completions"))):  # AI21 Jurassic
            completion = as_mapping(completion)
            state.add_text(as_str(as_mapping(completion.get("data")).get("text")), index)
            state.finish(as_mapping(completion.get("finishReason")).get("reason"), index)

    def _native_fields(self, body: Mapping[str, Any], *, whole: bool) -> None:
        """What whole bodies and stream chunks of the prompt-style models share (Llama, Mistral, Cohere, Claude
        text completions, OpenAI-style choices)."""
        state = self.state
        if as_str(body.get("model")):
            state.model = body["model"]
        if isinstance(body.get("generation"), str):  # Meta Llama
            state.add_text(body["generation"])
            state.finish(body.get("stop_reason"))
            state.set_usage(prompt_tokens=body.get("prompt_token_count"),
                            completion_tokens=body.get("generation_token_count"))
        if isinstance(body.get("completion"), str):  # Claude text completions
            state.add_text(body["completion"])
            state.finish(body.get("stop_reason"))
        for index, output in enumerate(as_list(body.get("outputs"))):  # Mistral
            output = as_mapping(output)
            state.add_text(as_str(output.get("text")), index)
            state.finish(output.get("stop_reason"), index)
        for choice in as_list(body.get("choices")):  # OpenAI style: Mistral Large, Jamba, DeepSeek, gpt-oss
            self._choice(as_mapping(choice))
        if isinstance(body.get("text"), str) and ("finish_reason" in body or "is_finished" in body
                                                   or body.get("event_type") == "text-generation"):
            state.add_text(body["text"])  # Cohere Command R, and Cohere Command stream chunks
        ended = body.get("event_type") == "stream-end" or bool(body.get("is_finished")) \
            or (whole and "text" in body)
        if ended:
            state.finish(body.get("finish_reason"))
        if "usage" in body:
            openai_usage(state, body["usage"])

    def _choice(self, choice: Mapping[str, Any]) -> None:
        state = self.state
        index = as_int(choice.get("index")) or 0
        msg = as_mapping(choice.get("message")) or as_mapping(choice.get("delta"))
        content = msg.get("content")
        state.add_text(content if isinstance(content, str) else None, index)
        state.add_text(as_str(choice.get("text")), index)
        state.add_thinking(as_str(msg.get("reasoning_content")), index)
        for position, call in enumerate(as_list(msg.get("tool_calls"))):
            call = as_mapping(call)
            function = as_mapping(call.get("function"))
            arguments = function.get("arguments")
            slot = as_int(call.get("index"))
            state.tool_call(slot if slot is not None else position, choice=index, id=as_str(call.get("id")),
                            name=as_str(function.get("name")),
                            arguments=arguments if isinstance(arguments, str) else None,
                            parsed=arguments if isinstance(arguments, Mapping) else None)
        state.finish(choice.get("finish_reason") or choice.get("stop_reason"), index)

    def _embedding(self, body: Mapping[str, Any]) -> None:
        state = self.state
        vectors: Any = body.get("embeddings")
        if isinstance(vectors, Mapping):  # Cohere's embedding_types: {"float": [[...]], ...}
            vectors = next((v for v in vectors.values() if isinstance(v, list)), None)
        if not isinstance(vectors, list) and isinstance(body.get("embedding"), list):
            vectors = [body["embedding"]]
        if isinstance(vectors, list) and vectors:
            first = vectors[0]
            if isinstance(first, Mapping):  # Nova: [{"embeddingType": ..., "embedding": [...]}]
                first = first.get("embedding")
            state.embedding_count = len(vectors)
            state.embedding_dimensions = len(first) if isinstance(first, list) else None
        state.set_usage(prompt_tokens=body.get("inputTextTokenCount"))

    def _invocation_metrics(self, body: Mapping[str, Any]) -> None:
        metrics = as_mapping(body.get("amazon-bedrock-invocationMetrics"))
        for key, name in (("inputTokenCount", "prompt_tokens"), ("outputTokenCount", "completion_tokens"),
                          ("cacheReadInputTokenCount", "cached_tokens"),
                          ("cacheWriteInputTokenCount", "cache_creation_tokens")):
            value = as_int(metrics.get(key))
            if value is not None:
                self._fallback_usage[name] = value
        for key, name in (("invocationLatency", "aws.bedrock.latency_ms"),
                          ("firstByteLatency", "aws.bedrock.first_byte_latency_ms")):
            if as_int(metrics.get(key)) is not None:
                self.state.attrs[name] = metrics[key]

    def _anthropic_reader(self) -> _AnthropicReader:
        if self._anthropic is None:
            self._anthropic = _AnthropicReader(self.state)
        return self._anthropic

    # --- streams ---------------------------------------------------------------------------------
    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, EventStreamMessage):
            return
        state = self.state
        if item.message_type in ("exception", "error"):
            payload, _ = json_or_none(item.payload)
            body = as_mapping(payload)
            kind = item.exception_type or _header(item, ":error-code") or "error"
            text = as_str(body.get("message")) or as_str(body.get("Message")) or _header(item, ":error-message")
            state.error = ResponseError(type=kind, message=text, extra={
                k: body[k] for k in ("originalStatusCode", "originalMessage") if body.get(k) is not None})
            self._stopped = True
            return
        payload, problem = json_or_none(item.payload)
        if problem is not None or not isinstance(payload, Mapping):
            state.problems.append(f"eventstream {item.event_type} event: {problem or 'not an object'}")
            return
        if self.route.api == "converse":
            self._converse_event(str(item.event_type), payload)
        elif item.event_type == "chunk":
            self._chunk(exchange, payload)

    def _converse_event(self, kind: str, event: Mapping[str, Any]) -> None:
        state = self.state
        index = as_int(event.get("contentBlockIndex"))
        if kind == "messageStart" and as_str(event.get("role")):
            state.choice(0).role = str(event["role"])
        elif kind == "contentBlockStart" and index is not None:
            use = as_mapping(as_mapping(event.get("start")).get("toolUse"))
            if use:
                self._blocks[index] = "toolUse"
                state.tool_call(index, id=as_str(use.get("toolUseId")), name=as_str(use.get("name")),
                                type="function")
        elif kind == "contentBlockDelta" and index is not None:
            delta = as_mapping(event.get("delta"))
            if isinstance(delta.get("text"), str):
                state.add_text(delta["text"])
            elif "toolUse" in delta:
                self._blocks.setdefault(index, "toolUse")
                state.tool_call(index, arguments=as_str(as_mapping(delta["toolUse"]).get("input")))
            elif "reasoningContent" in delta:
                state.add_thinking(as_str(as_mapping(delta["reasoningContent"]).get("text")))
        elif kind == "contentBlockStop" and index is not None and self._blocks.get(index) == "toolUse":
            call = state.choice(0).tool_calls.get(index)
            if call is not None:
                text = "".join(call.arguments)
                parsed, problem = json_or_none(text) if text.strip() else ({}, None)
                if problem is not None:
                    state.problems.append(f"toolUse input of block {index}: {problem}")
                else:
                    call.parsed = parsed
        elif kind == "messageStop":
            state.finish(as_str(event.get("stopReason")))
            self._stopped = True
        elif kind == "metadata":
            converse_usage(state, event.get("usage"))
            self._metrics(event.get("metrics"))
            if event.get("trace") is not None:
                state.attrs["aws.bedrock.trace"] = True

    def _chunk(self, exchange: HttpExchange, payload: Mapping[str, Any]) -> None:
        raw = payload.get("bytes")
        try:
            decoded = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            self.state.problems.append("chunk: bytes are not base64")
            return
        event, problem = json_or_none(decoded)
        if problem is not None or not isinstance(event, Mapping):
            self.state.problems.append(f"chunk: {problem or 'not an object'}")
            return
        self._invocation_metrics(event)
        if self.family == "anthropic" and "type" in event:
            self._anthropic_reader().stream_event(exchange, event)
            return
        converse_keys = _CONVERSE_EVENTS & event.keys()
        if converse_keys:  # Nova: each chunk is one Converse-style event under its name
            for kind in converse_keys:
                self._converse_event(kind, as_mapping(event[kind]))
            return
        self._native_fields(event, whole=False)
        if isinstance(event.get("outputText"), str):  # Titan
            self.state.add_text(event["outputText"], as_int(event.get("index")) or 0)
            self.state.finish(event.get("completionReason"), as_int(event.get("index")) or 0)
            self.state.set_usage(prompt_tokens=event.get("inputTextTokenCount"),
                                 completion_tokens=event.get("totalOutputTextTokenCount"))

    def on_response_complete(self, exchange: HttpExchange) -> None:
        state = self.state
        response = exchange.response
        if response is not None and 200 <= response.status < 300:
            headers = response.headers
            for header, name in (("x-amzn-bedrock-input-token-count", "prompt_tokens"),
                                 ("x-amzn-bedrock-output-token-count", "completion_tokens"),
                                 ("x-amzn-bedrock-cache-read-input-token-count", "cached_tokens"),
                                 ("x-amzn-bedrock-cache-write-input-token-count", "cache_creation_tokens")):
                value = headers.get(header)
                if value is not None and value.strip().isdigit():
                    self._fallback_usage.setdefault(name, int(value))
            latency = headers.get("x-amzn-bedrock-invocation-latency")
            if latency is not None and latency.strip().isdigit():
                state.attrs.setdefault("aws.bedrock.latency_ms", int(latency))
            if self._fallback_usage and "prompt_tokens" not in state.usage:
                prompt = self._fallback_usage.get("prompt_tokens")
                if prompt is not None:  # Bedrock's count, like Converse's, leaves out the cached part
                    prompt += self._fallback_usage.get("cached_tokens", 0) \
                        + self._fallback_usage.get("cache_creation_tokens", 0)
                state.set_usage(**{**self._fallback_usage, "prompt_tokens": prompt})
            elif self._fallback_usage:
                state.set_usage(**{k: v for k, v in self._fallback_usage.items() if k not in state.usage})
        eventstream_problems = [p for p in state.problems if p.startswith("eventstream ")]
        if eventstream_problems and state.error is None:
            # The AWS SDKs reject a damaged message (a CRC that does not match): the call failed for the client.
            state.error = ResponseError(type="eventstream_error", message=eventstream_problems[0])
        streamed = self._framing is not None and response is not None and 200 <= response.status < 300
        ends_known = self.route.api == "converse" or self._anthropic is not None
        stopped = self._stopped or (self._anthropic is not None and self._anthropic.stopped)
        if streamed and ends_known and not stopped and not exchange.partial and state.error is None:
            state.problems.append("stream ended before its last event")


def _header(item: EventStreamMessage, name: str) -> str | None:
    value = item.headers.get(name)
    return value if isinstance(value, str) else None


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    if exchange.connection.provider != "aws_bedrock" or exchange.request.method != "POST":
        return None
    route = bedrock_route(exchange)
    if route is None:
        return None
    return BedrockDecoder(route, context=context, streaming_chunks=settings.streaming_chunks)


#: The endpoints of the Bedrock runtime of every AWS region, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("aws_bedrock", "bedrock-runtime.*.amazonaws.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
