"""What every API in the OpenAI dialect shares: which exchanges are ours (routing, Azure deployments), sampling
parameters, tool definitions, usage objects, error bodies, and the decoder base class the OpenAI decoders use.

The dialect is spoken by OpenAI itself, Azure OpenAI, and the compatible APIs of Mistral, Groq, Together,
Fireworks, Perplexity, OpenRouter, DeepSeek, xAI, the Hugging Face router, LM Studio and Ollama's ``/v1``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import attrs

from oisp.events import RequestParameters, ResponseError, ToolDefinition
from oisp.framing import SseDecoder
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, ResponseState, StreamFraming, content_facts
from oisp.providers.compatible import COMPATIBLE_PROVIDERS
from oisp.redaction import sha256_text

__all__ = [
    "OPENAI_DIALECT",
    "OpenAIDialectDecoder",
    "Route",
    "as_index",
    "as_list",
    "as_mapping",
    "canonical_json",
    "error_from_body",
    "openai_usage",
    "request_parameters",
    "route_for",
    "tool_definitions",
    "tool_result_content",
]

#: Providers (endpoint-table names) whose APIs speak the OpenAI dialect.
OPENAI_DIALECT = frozenset({
    "openai", "azure_openai", "mistral", "groq", "together", "fireworks", "perplexity", "openrouter", "deepseek",
    "xai", "huggingface", "lmstudio", "ollama", "github_copilot", *COMPATIBLE_PROVIDERS,
})

#: Operation (last path segments) -> API.
_OPERATIONS = (("chat/completions", "chat"), ("completions", "completions"), ("embeddings", "embeddings"),
               ("responses", "responses"))
_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)/(?:extensions/)?(?P<op>.+)$")


@attrs.frozen
class Route:
    """Which API of the dialect an exchange calls."""

    #: ``chat``, ``completions`` (legacy text completions), ``embeddings`` or ``responses``.
    api: str
    #: Azure OpenAI: the deployment named in the path (``/openai/deployments/{deployment}/...``).
    deployment: str | None = None
    #: Azure OpenAI: the ``api-version`` query parameter.
    api_version: str | None = None


def _operation(tail: str) -> str | None:
    for suffix, api in _OPERATIONS:
        if tail == suffix or tail.endswith("/" + suffix):
            return api
    return None


def route_for(exchange: HttpExchange) -> Route | None:
    """The API an exchange calls, when it is a POST to one of the dialect's endpoints we decode; else None
    (other paths, such as ``GET /v1/models`` or ``/v1/responses/{id}``, are left to the metadata provider)."""
    if exchange.connection.provider not in OPENAI_DIALECT or exchange.request.method != "POST":
        return None
    path = exchange.request.path.rstrip("/")
    if exchange.connection.provider == "ollama" and path.startswith("/api/"):
        return None  # Ollama's native API has its own provider
    query = dict(parse_qsl(exchange.request.query, keep_blank_values=True))
    api_version = query.get("api-version")
    match = _AZURE_DEPLOYMENT.match(path)
    if match is not None:
        api = _operation(match["op"])
        return Route(api, deployment=match["deployment"], api_version=api_version) if api else None
    api = _operation(path)
    return Route(api, api_version=api_version) if api else None


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one (bodies are untrusted input)."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def as_index(value: Any) -> int:
    """A non-negative integer index, or 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the text hashed to compare tool schemas across requests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


# --- request side ------------------------------------------------------------------------------------------

#: Request keys kept in ``parameters.extra`` (values that can identify a person are hashed).
_EXTRA_PARAMETERS = (
    "seed", "n", "best_of", "echo", "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty",
    "reasoning_effort", "response_format", "parallel_tool_calls", "service_tier", "store", "modalities",
    "verbosity", "truncation", "background", "max_tool_calls", "prompt_cache_key", "safe_prompt",
    "random_seed", "search_mode", "search_domain_filter", "return_images", "return_related_questions",
    "search_recency_filter", "web_search_options", "transforms", "models", "route", "dimensions",
    "encoding_format",
)
_HASHED_PARAMETERS = ("user", "safety_identifier")
_TOOL_TYPES = {"function": "function", "custom": "function", "file_search": "file_search",
               "code_interpreter": "code_interpreter", "computer_use_preview": "computer_use",
               "computer_use": "computer_use", "computer": "computer_use"}


def request_parameters(body: Mapping[str, Any], *, max_tokens_keys: tuple[str, ...] = (
        "max_tokens", "max_completion_tokens")) -> RequestParameters | None:
    """Sampling parameters of a request body (None when it sets none)."""
    stop = body.get("stop")
    max_tokens = next((body[k] for k in max_tokens_keys if isinstance(body.get(k), int)), None)
    values: dict[str, Any] = {
        "temperature": body.get("temperature"), "top_p": body.get("top_p"), "max_tokens": max_tokens,
        "frequency_penalty": body.get("frequency_penalty"), "presence_penalty": body.get("presence_penalty"),
        "stop": [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
        if isinstance(stop, list) else None,
    }
    values = {k: v for k, v in values.items() if v is not None and not isinstance(v, bool)
              and (k in ("stop", "max_tokens") or isinstance(v, int | float))}
    extra = {k: body[k] for k in _EXTRA_PARAMETERS if body.get(k) is not None}
    extra.update({k: sha256_text(str(body[k])) for k in _HASHED_PARAMETERS if body.get(k) is not None})
    if not values and not extra:
        return None
    return RequestParameters(**values, extra=extra)


def tool_definitions(tools: Any) -> list[ToolDefinition]:
    """The tools a request offers: chat-style ``{"type": "function", "function": {...}}``, Responses-style flat
    functions, custom tools, and hosted tools (web search, file search, code interpreter, MCP servers...).
    A tool's JSON schema is kept as a hash (``parameters_hash``), enough to tell tool versions apart."""
    out: list[ToolDefinition] = []
    if not isinstance(tools, list):
        return out
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        raw_type = str(tool.get("type", "function"))
        function: Mapping[str, Any] = tool["function"] if isinstance(tool.get("function"), Mapping) else tool
        name = function.get("name") or tool.get("server_label") or (raw_type if raw_type != "function" else None)
        schema = function.get("parameters", function.get("input_schema", tool.get("format")))
        extra: dict[str, Any] = {}
        if schema is not None:
            extra["parameters_hash"] = sha256_text(canonical_json(schema))
        kind = _TOOL_TYPES.get(raw_type, "other")
        if kind != raw_type:
            extra["tool_type"] = raw_type
        if isinstance(tool.get("server_url"), str):
            extra["server_url"] = tool["server_url"]
        description = function.get("description")
        out.append(ToolDefinition(name=str(name) if name is not None else None, type=kind,
                                  description=description if isinstance(description, str) else None, extra=extra))
    return out


def tool_result_content(content: Any) -> Any:
    """A tool result as a client sent it back: strings and JSON stay; arrays of content parts become their
    text (images are counted by the message, never copied into the result)."""
    if isinstance(content, list) and all(isinstance(p, Mapping) and "type" in p for p in content):
        return content_facts(content).text or ""
    return content


# --- response side -----------------------------------------------------------------------------------------

def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def openai_usage(state: ResponseState, usage: Any) -> None:
    """Read a usage object of the dialect into ``state``: chat's ``prompt_tokens``/``completion_tokens`` with
    ``*_tokens_details``, the Responses API's ``input_tokens``/``output_tokens``, DeepSeek's
    ``prompt_cache_hit_tokens``. Missing or null objects are ignored."""
    if not isinstance(usage, Mapping):
        return
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, Mapping) else {}
    completion_details = completion_details if isinstance(completion_details, Mapping) else {}
    cached = _int(prompt_details.get("cached_tokens"))
    if cached is None:
        cached = _int(usage.get("prompt_cache_hit_tokens"))
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    state.set_usage(
        prompt_tokens=prompt if prompt is not None else usage.get("input_tokens"),
        completion_tokens=completion if completion is not None else usage.get("output_tokens"),
        total_tokens=usage.get("total_tokens"),
        cached_tokens=cached,
        reasoning_tokens=completion_details.get("reasoning_tokens"),
        cache_creation_tokens=prompt_details.get("cache_write_tokens"),
    )


def error_from_body(body: Any) -> ResponseError | None:
    """The error a body of the dialect reports, in any of its shapes: ``{"error": {...}}`` (OpenAI, Azure with
    ``innererror``), ``{"error": "text"}`` (Hugging Face), ``{"detail": ...}``, ``{"message": ...}``,
    or a Responses API ``error`` event. None when the body reports no error."""
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping):
        extra: dict[str, Any] = {}
        for key in ("param", "innererror", "metadata", "status"):
            if error.get(key) is not None:
                extra[key] = error[key]
        return ResponseError(type=_str(error.get("type") or error.get("code") or "error"),
                             message=_str(error.get("message")), code=_str(error.get("code")), extra=extra)
    if isinstance(error, str) and error:
        return ResponseError(type=_str(body.get("error_type")) or "error", message=error)
    if body.get("type") == "error" and body.get("message") is not None:  # Responses API stream event
        return ResponseError(type="error", message=_str(body.get("message")), code=_str(body.get("code")))
    detail = body.get("detail")
    if detail is not None:
        text = detail if isinstance(detail, str) else canonical_json(detail)
        return ResponseError(type="error", message=text)
    if isinstance(body.get("message"), str) and body.get("object") != "chat.completion":
        return ResponseError(type=_str(body.get("type")) or "error", message=body["message"],
                             code=_str(body.get("code")))
    return None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class OpenAIDialectDecoder(ApiDecoder):
    """Common behaviour of the dialect's decoders: Azure deployment and ``api-version``, error bodies."""

    def __init__(self, route: Route | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.route = route or Route("chat")

    def route_attrs(self) -> dict[str, Any]:
        """``attrs`` of the request event that say which deployment and API version an Azure call used."""
        out: dict[str, Any] = {}
        if self.route.deployment is not None:
            out["azure.deployment"] = self.route.deployment
        if self.route.api_version is not None:
            out["openai.api_version"] = self.route.api_version
        return out

    def default_model(self, body: Any) -> str | None:
        """The model a request names; an Azure deployment stands in when the body has none."""
        model = body.get("model") if isinstance(body, Mapping) else None
        return str(model) if model else self.route.deployment

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        return error_from_body(body) or ResponseError(type="http_error")

    def stream_framing(self, exchange: HttpExchange) -> StreamFraming | None:
        """SSE by content type; also SSE when a streamed request is answered with a content type that is not JSON
        (local servers that send ``text/plain`` or none)."""
        framing = super().stream_framing(exchange)
        if framing is None and self.request is not None and self.request.streaming:
            response = exchange.response
            content_type = (response.headers.get("content-type") or "") if response is not None else ""
            if "json" not in content_type.lower():
                return SseDecoder()
        return framing
