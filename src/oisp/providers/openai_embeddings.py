"""Embeddings (``POST /v1/embeddings``, Azure ``/openai/deployments/{deployment}/embeddings``) in the OpenAI dialect.

``input`` is a string, a list of strings, one token array or a list of token arrays; each string or token array
is one input. The answer lists one vector per input, as floats or, with ``encoding_format: base64``, as the
base64 of little-endian float32 values (what the ``openai`` SDK asks for by default), so the dimension count
is the decoded length / 4. Events: ``ai.request`` (request type ``embedding``) and ``ai.embedding``; a failed
call gets an ``ai.response`` with its error instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from oisp.http.exchange import HttpExchange
from oisp.provider_kit import RequestFacts, message
from oisp.providers.openai_common import OpenAIDialectDecoder, error_from_body, openai_usage, request_parameters

__all__ = ["EmbeddingsDecoder", "embedding_dimensions", "embeddings_request_facts"]


def _inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [value]  # one token array
        return value
    return []


def embeddings_request_facts(body: Any) -> RequestFacts:
    """The facts of an embeddings request: each input a user message (token arrays by their length only)."""
    if not isinstance(body, Mapping):
        return RequestFacts(request_type="embedding")
    inputs = _inputs(body.get("input"))
    messages = [message("user", item) if isinstance(item, str)
                else message("user", None, input_token_count=len(item) if isinstance(item, list) else None)
                for item in inputs]
    encoding = body.get("encoding_format")
    return RequestFacts(
        request_type="embedding", model=str(body["model"]) if body.get("model") else None, messages=messages,
        parameters=request_parameters(body), extra={"input_count": len(inputs)},
        attrs={"openai.encoding_format": encoding} if isinstance(encoding, str) else {},
    )


def embedding_dimensions(vector: Any) -> int | None:
    """The dimension count of one returned vector: a list of floats, or base64 of float32 values."""
    if isinstance(vector, list):
        return len(vector)
    if isinstance(vector, str):
        try:
            size = len(base64.b64decode(vector, validate=True))
        except (binascii.Error, ValueError):
            return None
        return size // 4 if size % 4 == 0 else None
    return None


class EmbeddingsDecoder(OpenAIDialectDecoder):
    """Embedding calls of any API of the dialect."""

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        facts = embeddings_request_facts(body)
        facts.model = self.default_model(body)
        facts.attrs.update(self.route_attrs())
        return facts

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        state = self.state
        if not isinstance(body, Mapping):
            state.problems.append("response body: not a JSON object")
            return
        if body.get("error") is not None:
            state.error = error_from_body(body)
        if isinstance(body.get("model"), str) and body["model"]:
            state.model = body["model"]
        if isinstance(body.get("id"), str) and body["id"]:
            state.provider_request_id = body["id"]
        openai_usage(state, body.get("usage"))
        data = body.get("data")
        vectors = [item.get("embedding") for item in data if isinstance(item, Mapping)] \
            if isinstance(data, list) else []
        state.embedding_count = len(vectors)
        state.extra["embedding_count"] = len(vectors)
        sizes = {embedding_dimensions(v) for v in vectors}
        sizes.discard(None)
        if len(sizes) == 1:
            state.embedding_dimensions = sizes.pop()
        elif sizes:
            state.problems.append(f"embeddings of different sizes: {sorted(s for s in sizes if s is not None)}")
        if vectors and isinstance(vectors[0], str):
            state.extra["encoding_format"] = "base64"

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        self.state.problems.append("an embeddings response is never streamed; stream item ignored")
