"""The model APIs of coding agents and assistants that sign in with an account instead of an API key.

* **GitHub Copilot** (``api.githubcopilot.com`` and the plan-specific ``api.individual``/``api.business``/
  ``api.enterprise`` hosts, and the ``proxy.*`` hosts of inline completions): OpenAI-compatible
  (``/chat/completions``, ``/responses``, ``/v1/engines/{engine}/completions``); the OpenAI provider decodes them
  (``github_copilot`` is in :data:`~oisp.providers.openai_common.OPENAI_DIALECT`). GitHub's MCP server on the
  same host (``/mcp/``) is the MCP provider's.
* **Codex with ChatGPT sign-in** (``chatgpt.com``, ``/backend-api/codex/responses``): the Responses API, over HTTP
  (SSE) or WebSocket, decoded by the OpenAI Responses decoders; events name the provider ``openai``. Nothing else
  of ``chatgpt.com`` is decoded beyond metadata.
* **Gemini CLI / Gemini Code Assist** (``cloudcode-pa.googleapis.com``, ``/v1internal:{method}``): each request
  wraps a Gemini request (``{"model", "project", "request": {...}}``) and each answer (or stream event) a Gemini
  response (``{"response": {...}, "traceId"}``); :class:`CodeAssistDecoder` unwraps them for the Gemini decoder.
  Events name the provider ``google`` with ``google.api = "code_assist"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import ProviderInfo
from oisp.framing import SseDecoder
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, DecoderContext, RequestFacts, StreamFraming
from oisp.providers.google import GeminiDecoder, GoogleRoute
from oisp.providers.openai_common import Route
from oisp.providers.openai_realtime import ResponsesWebSocketDecoder
from oisp.providers.openai_responses import ResponsesDecoder
from oisp.redaction import redact_url

__all__ = [
    "CODEX_PATH_PREFIX",
    "CODING_AGENT_ENDPOINTS",
    "CodeAssistDecoder",
    "CodexResponsesDecoder",
    "CodexWebSocketDecoder",
    "code_assist_method",
]

#: The Codex CLI's model API under ChatGPT sign-in.
CODEX_PATH_PREFIX = "/backend-api/codex/"
_CODE_ASSIST_PREFIX = "/v1internal:"
_CODE_ASSIST_CHAT = frozenset({"generateContent", "streamGenerateContent", "countTokens"})

_P = EndpointSpec
CODING_AGENT_ENDPOINTS: tuple[EndpointSpec, ...] = (
    _P("github_copilot", "api.githubcopilot.com"),
    _P("github_copilot", "api.individual.githubcopilot.com"),
    _P("github_copilot", "api.business.githubcopilot.com"),
    _P("github_copilot", "api.enterprise.githubcopilot.com"),
    _P("github_copilot", "proxy.individual.githubcopilot.com"),
    _P("github_copilot", "proxy.business.githubcopilot.com"),
    _P("github_copilot", "proxy.enterprise.githubcopilot.com"),
    _P("github_copilot", "copilot-proxy.githubusercontent.com"),
    _P("chatgpt", "chatgpt.com"),
    _P("gemini_code_assist", "cloudcode-pa.googleapis.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return CODING_AGENT_ENDPOINTS


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    provider = exchange.connection.provider
    chunks = (settings or DecoderSettings()).streaming_chunks
    request = exchange.request
    if provider == "chatgpt" and request.path.startswith(CODEX_PATH_PREFIX):
        path = request.path.rstrip("/")
        if not path.endswith("/responses"):
            return None
        if request.asks_websocket:
            return CodexWebSocketDecoder(context=context, streaming_chunks=chunks)
        if request.method == "POST":
            return CodexResponsesDecoder(Route("responses"), context=context, streaming_chunks=chunks)
        return None
    if provider == "gemini_code_assist" and request.method == "POST":
        method = code_assist_method(request.path)
        if method in _CODE_ASSIST_CHAT:
            return CodeAssistDecoder(method, context=context, streaming_chunks=chunks)
    return None


# --- Codex (ChatGPT sign-in) ---------------------------------------------------------------------------------

class CodexResponsesDecoder(ResponsesDecoder):
    """The Responses API as Codex calls it with ChatGPT sign-in (``/backend-api/codex/responses``)."""

    provider = "openai"

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        facts = super().parse_request(exchange, body)
        facts.attrs.update(_codex_attrs(exchange))
        self.state.attrs.update(_codex_attrs(exchange))
        return facts


class CodexWebSocketDecoder(ResponsesWebSocketDecoder):
    """The Responses API over WebSocket as Codex speaks it with ChatGPT sign-in."""

    def response_decoder(self) -> ApiDecoder:
        return CodexResponsesDecoder(Route("responses"), context=self.context, streaming_chunks=self.streaming_chunks)


def _codex_attrs(exchange: HttpExchange) -> dict[str, Any]:
    out: dict[str, Any] = {"openai.api": "chatgpt_codex"}
    headers = exchange.request.headers
    for header, key in (("chatgpt-account-id", "openai.chatgpt_account_id_present"),):
        if headers.get(header):
            out[key] = True
    originator = headers.get("originator")
    if originator:
        out["openai.originator"] = originator
    return out


# --- Gemini Code Assist --------------------------------------------------------------------------------------

def code_assist_method(path: str) -> str | None:
    """The method of a Code Assist path (``/v1internal:streamGenerateContent`` -> ``streamGenerateContent``)."""
    if not path.startswith(_CODE_ASSIST_PREFIX):
        return None
    method = path[len(_CODE_ASSIST_PREFIX):]
    return method if method.isalpha() else None


class CodeAssistDecoder(GeminiDecoder):
    """A Gemini request wrapped by Code Assist (Gemini CLI with Google sign-in); see the module docstring."""

    def __init__(self, method: str, *, context: DecoderContext | None = None, streaming_chunks: bool = False) -> None:
        super().__init__(GoogleRoute(version="v1internal", method=method, model="", collection="models"),
                         context=context, streaming_chunks=streaming_chunks)
        self.project: str | None = None

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        outer: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
        model = outer.get("model")
        self.route = attrs.evolve(self.route, model=model if isinstance(model, str) else "")
        project = outer.get("project")
        self.project = project if isinstance(project, str) else None
        facts = super().parse_request(exchange, outer.get("request", {}))
        extra = {"google.api": "code_assist"}
        prompt_id = outer.get("user_prompt_id")
        if isinstance(prompt_id, str):
            extra["google.user_prompt_id"] = prompt_id
        facts.attrs.update(extra)
        self.state.attrs.update(extra)
        return facts

    def provider_info(self, exchange: HttpExchange) -> ProviderInfo:
        return ProviderInfo(name="google", endpoint=redact_url(exchange.request.url), project_id=self.project)

    def stream_framing(self, exchange: HttpExchange) -> StreamFraming | None:
        if self.route.method == "streamGenerateContent":
            return SseDecoder()
        return None

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        super().on_response_json(exchange, self._unwrap(body))

    def _generate_response(self, body: Mapping[str, Any]) -> None:
        unwrapped = self._unwrap(body)
        super()._generate_response(unwrapped if isinstance(unwrapped, Mapping) else {})

    def _unwrap(self, body: Any) -> Any:
        if isinstance(body, Mapping) and isinstance(body.get("response"), Mapping):
            trace = body.get("traceId")
            if isinstance(trace, str):
                self.state.provider_request_id = self.state.provider_request_id or trace
            return body["response"]
        return body
