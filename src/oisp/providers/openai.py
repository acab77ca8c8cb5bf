"""The OpenAI provider plugin: OpenAI, Azure OpenAI, and every API that speaks the OpenAI dialect.

Claims POSTs to the dialect's endpoints on hosts the endpoint table names for a dialect provider
(:data:`~oisp.providers.openai_common.OPENAI_DIALECT`), under any path prefix (``/v1``, ``/openai/v1``,
``/inference/v1``, none, or Azure's ``/openai/deployments/{deployment}``), and decodes them:

* ``.../chat/completions``: :class:`~oisp.providers.openai_chat.ChatCompletionsDecoder`;
* ``.../completions``: :class:`~oisp.providers.openai_chat.TextCompletionsDecoder` (also Mistral's FIM);
* ``.../responses``: :class:`~oisp.providers.openai_responses.ResponsesDecoder`;
* ``.../embeddings``: :class:`~oisp.providers.openai_embeddings.EmbeddingsDecoder`;
* WebSockets (HTTP/1.1 upgrades, HTTP/2 extended ``CONNECT``) to ``.../realtime`` and ``.../responses``:
  :class:`~oisp.providers.openai_realtime.RealtimeDecoder` and
  :class:`~oisp.providers.openai_realtime.ResponsesWebSocketDecoder`.

Every other exchange (``GET /v1/models``, files, images, audio, ``/v1/responses/{id}``, Ollama's native
``/api/...``) is left to the other providers and, last, to the metadata provider.
"""

from __future__ import annotations

from collections.abc import Iterable

from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import DecoderContext
from oisp.providers.openai_chat import (
    ChatCompletionsDecoder,
    TextCompletionsDecoder,
    chat_request_facts,
    completion_request_facts,
)
from oisp.providers.openai_common import OPENAI_DIALECT, OpenAIDialectDecoder, Route, openai_usage, route_for
from oisp.providers.openai_embeddings import EmbeddingsDecoder
from oisp.providers.openai_realtime import RealtimeDecoder, ResponsesWebSocketDecoder, WebSocketSessionDecoder
from oisp.providers.openai_responses import ResponsesDecoder

__all__ = [
    "ENDPOINTS",
    "OPENAI_DIALECT",
    "ChatCompletionsDecoder",
    "EmbeddingsDecoder",
    "OpenAIChatDecoder",
    "RealtimeDecoder",
    "ResponsesDecoder",
    "ResponsesWebSocketDecoder",
    "TextCompletionsDecoder",
    "chat_request_facts",
    "completion_request_facts",
    "decoder_for",
    "openai_usage",
    "websocket_decoder_for",
]

#: The name this module's chat decoder had first; kept for plugins that import it.
OpenAIChatDecoder = ChatCompletionsDecoder

_DECODERS: dict[str, type[OpenAIDialectDecoder]] = {
    "chat": ChatCompletionsDecoder,
    "completions": TextCompletionsDecoder,
    "responses": ResponsesDecoder,
    "embeddings": EmbeddingsDecoder,
}


def decoder_for(route: Route, settings: DecoderSettings | None = None,
                context: DecoderContext | None = None) -> OpenAIDialectDecoder:
    """A fresh decoder for one exchange of ``route``."""
    settings = settings or DecoderSettings()
    return _DECODERS[route.api](route, context=context, streaming_chunks=settings.streaming_chunks)


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    websocket = websocket_decoder_for(exchange, settings, context)
    if websocket is not None:
        return websocket
    route = route_for(exchange)
    return decoder_for(route, settings, context) if route is not None else None


def websocket_decoder_for(exchange: HttpExchange, settings: DecoderSettings | None = None,
                          context: DecoderContext | None = None) -> WebSocketSessionDecoder | None:
    """The decoder of a WebSocket upgrade to the Realtime API (``.../realtime``) or to the Responses API
    (``.../responses``) on a dialect host; None for anything else."""
    request = exchange.request
    if exchange.connection.provider not in OPENAI_DIALECT or not request.asks_websocket:
        return None
    path = request.path.rstrip("/")
    chunks = (settings or DecoderSettings()).streaming_chunks
    if path.endswith("/realtime"):
        return RealtimeDecoder(exchange, context=context, streaming_chunks=chunks)
    if path.endswith("/responses"):
        return ResponsesWebSocketDecoder(context=context, streaming_chunks=chunks)
    return None


#: The endpoints of the OpenAI API and the services that speak its dialect, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("openai", "api.openai.com"),
    EndpointSpec("azure_openai", "*.openai.azure.com"),
    EndpointSpec("mistral", "api.mistral.ai"),
    EndpointSpec("groq", "api.groq.com"),
    EndpointSpec("together", "api.together.xyz"),
    EndpointSpec("together", "api.together.ai"),
    EndpointSpec("fireworks", "api.fireworks.ai"),
    EndpointSpec("perplexity", "api.perplexity.ai"),
    EndpointSpec("openrouter", "openrouter.ai"),
    EndpointSpec("openrouter", "api.openrouter.ai"),
    EndpointSpec("deepseek", "api.deepseek.com"),
    EndpointSpec("xai", "api.x.ai"),
    EndpointSpec("lmstudio", "localhost", 1234, tls=False),
    EndpointSpec("lmstudio", "127.0.0.1", 1234, tls=False),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
