"""Hugging Face's task inference API (the "serverless inference API"), kept small.

``POST https://api-inference.huggingface.co/models/{model}`` (also ``/pipeline/{task}/{model}``, and its
successor ``https://router.huggingface.co/hf-inference/models/{model}``) with ``{"inputs": ..., "parameters":
{...}, "options": {...}}``. What oisp reads:

* text generation: ``[{"generated_text": ...}]`` (one per returned sequence), or, with ``"stream": true``, the
  text-generation-inference SSE stream of ``token`` objects ending with ``details.finish_reason``;
  summarization and translation (``summary_text``, ``translation_text``) the same way;
* feature extraction (``/pipeline/feature-extraction/``, or a model whose name says it embeds): an
  ``ai.embedding`` with the count and size of the vectors;
* errors: ``{"error": "...", "estimated_time": ...}`` (503 while a model loads) or a list of messages.

The request type is decided from the path, the model name and the parameters, before the response is seen; a
task oisp cannot tell is ``other``. The router's OpenAI-compatible ``.../v1/chat/completions`` is not claimed
here: :mod:`oisp.providers.openai` reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from oisp.events import RequestParameters, ResponseError
from oisp.framing import SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, DecoderContext, RequestFacts, json_or_none, message

__all__ = ["ENDPOINTS", "HuggingFaceTaskDecoder", "task_path"]

_TASK_PATH = re.compile(r"^(?:/hf-inference)?/(?:models|pipeline/([a-z0-9-]+))/(.+)$")
_EMBEDDING_TASKS = frozenset({"feature-extraction", "sentence-similarity"})
_GENERATION_TASKS = frozenset({"text-generation", "text2text-generation", "summarization", "translation"})
_EMBEDDING_MODEL = re.compile(r"sentence-transformers/|embed|(^|[/-])(bge|e5|gte)-|minilm|mpnet", re.IGNORECASE)
_GENERATION_PARAMETERS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "do_sample",
                                    "return_full_text", "num_return_sequences", "repetition_penalty", "stop"})
_TEXT_KEYS = ("generated_text", "summary_text", "translation_text")
_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def task_path(path: str) -> tuple[str | None, str] | None:
    """(task from a ``/pipeline/{task}/`` path or None, model id) of a task API path; None for other paths."""
    match = _TASK_PATH.match(path.rstrip("/"))
    if match is None or "/v1/" in f"{match.group(2)}/" or match.group(2).endswith("/chat/completions"):
        return None
    return match.group(1), match.group(2)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _vector_shape(value: Any) -> tuple[int | None, int | None]:
    """(how many vectors, their size) of a feature-extraction answer: a vector, a list of them, or token-level."""
    if not isinstance(value, list) or not value:
        return None, None
    if all(isinstance(v, int | float) for v in value):
        return 1, len(value)
    first = value[0]
    while isinstance(first, list) and first and isinstance(first[0], list):
        first = first[0]
    return len(value), len(first) if isinstance(first, list) else None


class HuggingFaceTaskDecoder(ApiDecoder):
    """One call of the task inference API."""

    provider = "huggingface"

    def __init__(self, task: str | None, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.model = model

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = body if isinstance(body, Mapping) else {"inputs": body}
        parameters: Mapping[str, Any] = body["parameters"] if isinstance(body.get("parameters"), Mapping) else {}
        inputs = body.get("inputs")
        if self.task in _EMBEDDING_TASKS or (self.task is None and _EMBEDDING_MODEL.search(self.model)
                                             and not _GENERATION_PARAMETERS & parameters.keys()):
            request_type = "embedding"
        elif self.task in _GENERATION_TASKS or _GENERATION_PARAMETERS & parameters.keys() or body.get("stream"):
            request_type = "completion"
        else:
            request_type = "other"
        facts = RequestFacts(request_type=request_type, model=self.model, streaming=bool(body.get("stream")),
                             parameters=self._parameters(parameters))
        if self.task:
            facts.attrs["huggingface.task"] = self.task
        if request_type == "embedding":
            source = inputs.get("sentences") if isinstance(inputs, Mapping) else inputs
            facts.extra["input_count"] = len(source) if isinstance(source, list) else 1
        elif isinstance(inputs, str):
            facts.messages = [message("user", inputs)]
        elif isinstance(inputs, Mapping) and isinstance(inputs.get("text"), str):
            facts.messages = [message("user", inputs["text"])]
        return facts

    @staticmethod
    def _parameters(raw: Mapping[str, Any]) -> RequestParameters | None:
        if not raw:
            return None
        stop = raw.get("stop")
        known = {"temperature": raw.get("temperature"), "top_p": raw.get("top_p"),
                 "max_tokens": raw.get("max_new_tokens", raw.get("max_length")),
                 "stop": [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None}
        extra = {k: v for k, v in raw.items()
                 if k not in ("temperature", "top_p", "max_new_tokens", "max_length", "stop") and v is not None}
        return RequestParameters(**{k: v for k, v in known.items() if v is not None}, extra=extra)

    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        error = body.get("error") if isinstance(body, Mapping) else None
        if isinstance(error, list):
            return ResponseError(type="error", message="; ".join(str(e) for e in error))
        result = super().on_error_json(exchange, body)
        if isinstance(body, Mapping) and isinstance(body.get("estimated_time"), int | float):
            result = ResponseError(type="model_loading", message=result.message, code=result.code,
                                   extra={"estimated_time_s": body["estimated_time"]})
        return result

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        state = self.state
        if self.request is not None and self.request.request_type == "embedding":
            count, dimensions = _vector_shape(body)
            state.embedding_count, state.embedding_dimensions = count, dimensions
            return
        items = body if isinstance(body, list) else [body]
        if items and isinstance(items[0], list):  # a batch: one list per input
            items = [i for group in items for i in (group if isinstance(group, list) else [group])]
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                continue
            text = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
            if text is not None:
                state.add_text(text, index)
                self._finish(_mapping(item.get("details")), index)
            elif "label" in item:
                state.extra.setdefault("labels", []).append({"label": item.get("label"), "score": item.get("score")})

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent):
            return
        chunk, problem = json_or_none(item.data)
        if not isinstance(chunk, Mapping):
            self.state.problems.append(f"stream chunk: {problem or 'not an object'}")
            return
        if chunk.get("error") is not None:
            self.state.error = ResponseError(type=str(chunk.get("error_type") or "error"), message=str(chunk["error"]))
            return
        token = _mapping(chunk.get("token"))
        if not token.get("special") and isinstance(token.get("text"), str):
            self.state.add_text(token["text"])
        details = chunk.get("details")
        if isinstance(details, Mapping):
            self._finish(details, 0)

    def _finish(self, details: Mapping[str, Any], index: int) -> None:
        reason = details.get("finish_reason")
        if reason is not None:
            self.state.finish(_FINISH.get(str(reason), reason), index)
        if index == 0:
            self.state.set_usage(completion_tokens=details.get("generated_tokens"))


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    chunks = settings.streaming_chunks
    if exchange.connection.provider != "huggingface" or exchange.request.method != "POST":
        return None
    found = task_path(exchange.request.path)
    return HuggingFaceTaskDecoder(*found, context=context, streaming_chunks=chunks) if found is not None else None


#: The endpoints of the Hugging Face inference API and router, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("huggingface", "api-inference.huggingface.co"),
    EndpointSpec("huggingface", "router.huggingface.co"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
