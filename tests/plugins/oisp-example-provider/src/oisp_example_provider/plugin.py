"""The Acme LLM API (fictional): ``POST /v2/generate`` with ``{"model", "prompt", "stream"}``; answers
``{"id", "model", "text", "stop", "tokens": {"in", "out"}}`` or, streamed, NDJSON lines ``{"delta": "..."}``
ending with ``{"done": true, "stop": "...", "tokens": {...}}``.

It shows the whole contract: declare the endpoint, claim the exchanges, and let the plugin kit's ``ApiDecoder``
build the events (with the run's ``context``, so tool calls link within one run, and the runner's ``settings``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, DecoderContext, NdjsonValue, RequestFacts, as_mapping, message

HOST = "api.acme-llm.example"


class AcmeDecoder(ApiDecoder):
    provider = "acme"

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = as_mapping(body)
        return RequestFacts(request_type="completion", model=body.get("model"), streaming=bool(body.get("stream")),
                            messages=[message("user", body.get("prompt"))])

    def _tokens(self, body: Mapping[str, Any]) -> None:
        tokens = body.get("tokens") or {}
        self.state.set_usage(prompt_tokens=tokens.get("in"), completion_tokens=tokens.get("out"))

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        self.state.model = body.get("model")
        self.state.provider_request_id = body.get("id")
        self.state.add_text(body.get("text"))
        self.state.finish(body.get("stop"))
        self._tokens(body)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if isinstance(item, NdjsonValue) and isinstance(item.value, Mapping):
            self.state.add_text(item.value.get("delta"))
            if item.value.get("done"):
                self.state.finish(item.value.get("stop"))
                self._tokens(item.value)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return [EndpointSpec("acme", HOST)]


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    if exchange.connection.provider == "acme" and exchange.request.path == "/v2/generate":
        return AcmeDecoder(context=context, streaming_chunks=settings.streaming_chunks)
    return None
