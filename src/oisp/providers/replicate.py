"""Replicate predictions: created by one call, answered by later ones.

A prediction is created with ``POST /v1/predictions`` (``version`` + ``input``), ``POST
/v1/models/{owner}/{name}/predictions`` or ``POST /v1/deployments/{owner}/{name}/predictions``. The create call
emits the ``ai.request``. Its answer is a prediction object (``id``, ``status``, ``urls.get``, ``urls.stream``);
only a *finished* prediction (``succeeded``, ``failed``, ``canceled``) becomes an ``ai.response``:

* in sync mode (``Prefer: wait``) the create call's own answer is usually the outcome: a finished prediction,
  or one still ``processing`` whose output is there (the official client takes that as the answer and stops;
  so does oisp); only ``starting`` means the wait ran out;
* otherwise the client learns the outcome later: by polling ``GET /v1/predictions/{id}`` (``output`` is a string
  or a list of strings, ``metrics`` has ``input_token_count``, ``output_token_count``, ``predict_time``), by
  cancelling (``POST /v1/predictions/{id}/cancel``) or by reading the SSE stream at ``urls.stream`` (``output``
  events carry text, ``error`` and ``done`` end it). The stream's host (``stream.replicate.com`` and the like) is
  not in the built-in endpoint table, so it is only seen when configured as a ``replicate`` endpoint; polling
  on ``api.replicate.com`` always is.

The run's :class:`PredictionTable` (:func:`predictions`, kept in the decoder context, bounded, thread-safe)
remembers, per prediction id, the create call's ``ai.request``, so the first finished view of a prediction,
whichever exchange brings it, emits the one ``ai.response`` with the
create call's ``request_id`` and a ``caused_by`` link to its event. Later views of the same prediction emit
nothing, nor do views of a prediction still running. A finished prediction whose creation oisp did not see still
gets an ``ai.response``, with the poll's own request id.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs

from oisp.events import (
    AiResponse,
    AiStreamingChunk,
    Event,
    Message,
    ModelInfo,
    RelatedEvent,
    RequestParameters,
    ResponseError,
)
from oisp.framing import SseEvent
from oisp.hookspecs import DecoderSettings, EndpointSpec, ExchangeDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import (
    ApiDecoder,
    DecoderContext,
    FirstReports,
    RequestFacts,
    json_or_none,
    message,
    request_id_for,
)

__all__ = ["ENDPOINTS", "FINISHED", "PredictionTable", "ReplicateDecoder", "predictions"]

#: Prediction statuses after which nothing changes.
FINISHED = frozenset({"succeeded", "failed", "canceled"})

_CREATE = re.compile(r"^/v1/(?:predictions|models/([^/]+/[^/]+)/predictions|deployments/([^/]+/[^/]+)/predictions)$")
_PREDICTION = re.compile(r"^/v1/predictions/([A-Za-z0-9_-]+)(/cancel|/stream)?$")
_IMAGE_KEYS = re.compile(r"image|img|photo|mask")
_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_tokens",
               "max_new_tokens": "max_tokens", "max_length": "max_tokens", "max_completion_tokens": "max_tokens",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
_EXTRA_PARAMETERS = ("top_k", "seed", "min_tokens", "min_new_tokens", "repetition_penalty", "length_penalty",
                     "prompt_template", "num_outputs", "aspect_ratio", "output_format")


@attrs.define
class _Created:
    request_id: str
    request_event_id: str
    started_ns: int
    model: str | None
    reported: bool = False

    @property
    def known(self) -> bool:
        return bool(self.request_id)


class PredictionTable:
    """Predictions seen being created (prediction id -> the create call's request), and stream URLs -> ids.

    Bounded (oldest forgotten first) and thread-safe: the proxy decodes connections concurrently.
    """

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._created = FirstReports(lambda: _Created("", "", 0, None, reported=True), max_entries)
        self._streams: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def created(self, prediction_id: str, record: _Created, stream_url: str | None) -> None:
        self._created.put(prediction_id, record)
        if stream_url:
            with self._lock:
                self._streams[_url_key(stream_url)] = prediction_id
                while len(self._streams) > self.max_entries:
                    self._streams.popitem(last=False)

    def get(self, prediction_id: str) -> _Created | None:
        """The creation of a prediction, if seen (without claiming its outcome)."""
        return self._created.get(prediction_id)

    def id_for_stream(self, url: str) -> str | None:
        with self._lock:
            return self._streams.get(_url_key(url))

    def finish(self, prediction_id: str) -> tuple[bool, _Created | None]:
        """(report it?, its creation if seen): a prediction's outcome is reported the first time it is seen."""
        return self._created.claim(prediction_id)


def predictions(context: DecoderContext) -> PredictionTable:
    """The prediction table of a decoding run."""
    return context.state("replicate.predictions", PredictionTable)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _url_key(url: str) -> str:
    """``host/path`` of a URL (scheme, port, query and a trailing slash ignored)."""
    without_scheme = url.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    host, _, path = without_scheme.partition("/")
    return f"{host.split(':', 1)[0].lower()}/{path}"


def _text_of(value: Any) -> str | None:
    """A prediction's output as text: strings joined (tokens with nothing, URLs with newlines)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        urls = value and all(v.startswith(("http://", "https://", "data:")) for v in value)
        return ("\n" if urls else "").join(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _images(value: Any) -> list[dict[str, str]]:
    values = value if isinstance(value, list) else [value]
    return [{"type": "image", "url": v} for v in values
            if isinstance(v, str) and v.startswith(("http://", "https://", "data:"))]


def _messages(inputs: Mapping[str, Any]) -> tuple[list[Message], str | None, str]:
    """Messages, system prompt and request type of a prediction's input (LLM conventions; others: ``other``)."""
    system = inputs.get("system_prompt", inputs.get("system"))
    system = system if isinstance(system, str) else None
    images = [part for key, value in inputs.items() if _IMAGE_KEYS.search(key) for part in _images(value)]
    messages = [message("system", system)] if system is not None else []
    raw = inputs.get("messages")
    if isinstance(raw, str):
        raw, _ = json_or_none(raw)
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping):
                messages.append(message(str(item.get("role", "user")), item.get("content")))
        if images:
            messages.append(message("user", images))
        return messages, system, "chat"
    prompt = inputs.get("prompt", inputs.get("text", inputs.get("input")))
    if isinstance(prompt, str) or images:
        content: Any = [prompt, *images] if isinstance(prompt, str) and images else images or prompt
        messages.append(message("user", content))
        return messages, system, "completion"
    return messages, system, "other"


def _parameters(inputs: Mapping[str, Any]) -> RequestParameters | None:
    values: dict[str, Any] = {}
    for key, name in _PARAMETERS.items():
        if isinstance(inputs.get(key), int | float) and not isinstance(inputs.get(key), bool):
            values.setdefault(name, inputs[key])
    stop = inputs.get("stop_sequences", inputs.get("stop"))
    if isinstance(stop, str) and stop:
        values["stop"] = [s for s in stop.split(",") if s]
    elif isinstance(stop, list):
        values["stop"] = [str(s) for s in stop]
    extra = {k: inputs[k] for k in _EXTRA_PARAMETERS if inputs.get(k) is not None}
    if not values and not extra:
        return None
    return RequestParameters(**values, extra=extra)


def _ms_between(start: Any, end: Any) -> int | None:
    try:
        first = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        last = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0, int((last - first).total_seconds() * 1000))


def _seconds_to_ms(value: Any) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * 1000)
    return None


class ReplicateDecoder(ApiDecoder):
    """One Replicate exchange: a prediction's creation (``create=True``), or a later view of it (a poll, a
    cancel, its SSE stream)."""

    provider = "replicate"

    def __init__(self, *, create: bool, prediction_id: str | None = None,
                 table: PredictionTable | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.create = create
        self.prediction_id = prediction_id
        self.table = table if table is not None else predictions(self.context)
        self._status: str | None = None
        self._timing: dict[str, int] = {}
        self._stream_url: str | None = None

    # --- request ---------------------------------------------------------------------------------
    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        if not self.create:  # a view of a prediction: its request was the create call
            self.request = RequestFacts(request_type="other")
            return []
        return super().on_request(exchange)

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        body = body if isinstance(body, Mapping) else {}
        inputs: Mapping[str, Any] = body["input"] if isinstance(body.get("input"), Mapping) else {}
        match = _CREATE.match(exchange.request.path.rstrip("/"))
        model = (match.group(1) or match.group(2)) if match else None
        facts_attrs: dict[str, Any] = {}
        version = body.get("version")
        if isinstance(version, str):
            if ":" in version:
                model, facts_attrs["replicate.version"] = version.split(":", 1)
            else:
                facts_attrs["replicate.version"] = version
                model = model or version
        if match and match.group(2):
            facts_attrs["replicate.deployment"] = match.group(2)
        prefer = exchange.request.headers.get("prefer")
        if prefer:
            facts_attrs["replicate.prefer"] = prefer
        if body.get("webhook"):
            facts_attrs["replicate.webhook"] = True  # the URL itself may carry a secret: presence only
        messages, system, request_type = _messages(inputs)
        return RequestFacts(request_type=request_type, model=model, streaming=bool(body.get("stream")),
                            messages=messages, system_prompt=system, parameters=_parameters(inputs),
                            attrs=facts_attrs)

    # --- response --------------------------------------------------------------------------------
    def on_error_json(self, exchange: HttpExchange, body: Any) -> ResponseError:
        if isinstance(body, Mapping) and (body.get("detail") or body.get("title")):
            status = body.get("status")
            return ResponseError(type=str(body.get("title") or "error"), message=str(body.get("detail") or ""),
                                 code=str(status) if status is not None else None)
        return super().on_error_json(exchange, body)

    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        if not isinstance(body, Mapping):
            self.state.problems.append("response body is not a prediction object")
            return
        state = self.state
        self.prediction_id = str(body["id"]) if body.get("id") else self.prediction_id
        state.provider_request_id = self.prediction_id
        state.model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else state.model
        self._status = str(body.get("status")) if body.get("status") is not None else None
        urls = _mapping(body.get("urls"))
        self._stream_url = urls.get("stream") if isinstance(urls.get("stream"), str) else None
        if isinstance(body.get("version"), str):
            state.attrs["replicate.version"] = body["version"]
        if self._status is not None:
            state.attrs["replicate.status"] = self._status
        text = _text_of(body.get("output"))
        if text:
            state.add_text(text)
        if self._status == "failed":
            state.error = ResponseError(type="prediction_failed", message=_text_of(body.get("error")))
        elif self._status == "canceled":
            state.error = ResponseError(type="canceled", message="the prediction was canceled")
        if self._status in FINISHED:
            state.finish({"succeeded": "stop", "failed": "error"}.get(self._status, self._status))
        metrics = _mapping(body.get("metrics"))
        state.set_usage(prompt_tokens=metrics.get("input_token_count"),
                        completion_tokens=metrics.get("output_token_count"))
        for key in ("predict_time", "total_time"):
            if _seconds_to_ms(metrics.get(key)) is not None:
                state.attrs[f"replicate.{key}_ms"] = _seconds_to_ms(metrics.get(key))
        if isinstance(metrics.get("tokens_per_second"), int | float):
            state.attrs["replicate.tokens_per_second"] = metrics["tokens_per_second"]
        latency = _ms_between(body.get("created_at"), body.get("completed_at")) \
            if body.get("created_at") and body.get("completed_at") else None
        if latency is not None:
            self._timing["latency_ms"] = latency
        ttft = _seconds_to_ms(metrics.get("time_to_first_token"))
        if ttft is not None:
            self._timing["time_to_first_token_ms"] = ttft

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent):
            return
        state = self.state
        if item.event == "output":
            state.add_text(item.data)
        elif item.event == "error":
            detail, _ = json_or_none(item.data)
            text = detail.get("detail") if isinstance(detail, Mapping) else item.data
            state.error = ResponseError(type="prediction_failed", message=str(text) if text else None)
            state.finish("error")
        elif item.event == "done":
            done, _ = json_or_none(item.data)
            reason = done.get("reason") if isinstance(done, Mapping) else None
            self._status = "canceled" if reason == "canceled" else "failed" if reason == "error" else "succeeded"
            if reason == "canceled":
                state.error = ResponseError(type="canceled", message="the prediction was canceled")
            state.finish({"succeeded": "stop", "failed": "error"}.get(self._status, self._status))
            state.attrs["replicate.status"] = self._status

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        chunks = list(super().on_response_data(exchange, data))
        created = self.table.get(self.prediction_id) if chunks and self.prediction_id and not self.create else None
        if created is None:
            return chunks
        # streaming chunks of a prediction's stream belong to its create call's request
        return [e.with_context(data=attrs.evolve(e.data, request_id=created.request_id))
                if isinstance(e.data, AiStreamingChunk) else e for e in chunks]

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        if not self.create and self.state.provider_request_id is None:
            self.state.provider_request_id = self.prediction_id
        events = list(super().on_end(exchange))
        response = exchange.response
        ok = response is not None and 200 <= response.status < 300 and not exchange.partial
        finished = self._status in FINISHED or (self._framing is not None and self.state.error is not None)
        prefer = (exchange.request.headers.get("prefer") or "").lower()
        if self.create and self._status == "processing" and prefer.startswith("wait"):
            # Sync mode answers "processing" once the output is there (only "starting" means the wait ran
            # out); the official client takes that as the answer and does not poll, so oisp does too.
            finished = True
        if self.create and self.prediction_id and ok and not finished and self._request_event is not None:
            # Still running: the outcome comes with a later poll, cancel or stream.
            self.table.created(self.prediction_id, _Created(
                request_id_for(exchange), self._request_event.event_id,
                exchange.timings.request_start or time.monotonic_ns(), self.request.model if self.request else None,
            ), self._stream_url)
            return []
        if self.create:
            if self.prediction_id:
                self.table.finish(self.prediction_id)
            return events
        if not finished:
            return []  # a view of a running prediction (or a stream cut short: the next poll tells)
        report, created = self.table.finish(self.prediction_id) if self.prediction_id else (True, None)
        if not report:
            return []
        return [self._linked(event, created) for event in events]

    def _linked(self, event: Event, created: _Created | None) -> Event:
        """The ai.response of a view of a prediction, as the answer to its create call."""
        if not isinstance(event.data, AiResponse):
            return event
        fields: dict[str, Any] = dict(self._timing)
        related = event.related_events
        if created is not None:
            fields["request_id"] = created.request_id
            related = [RelatedEvent(event_id=created.request_event_id, relationship="caused_by")]
            if "latency_ms" not in fields:
                fields["latency_ms"] = (time.monotonic_ns() - created.started_ns) // 1_000_000
            if event.data.model is None and created.model:
                fields["model"] = ModelInfo(id=created.model)
        return event.with_context(data=attrs.evolve(event.data, **fields), related_events=related)


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange, settings: DecoderSettings,
                          context: DecoderContext) -> ExchangeDecoder | None:
    chunks = settings.streaming_chunks
    if exchange.connection.provider != "replicate":
        return None
    request = exchange.request
    path = request.path.rstrip("/")
    if request.method == "POST" and _CREATE.match(path):
        return ReplicateDecoder(create=True, context=context, streaming_chunks=chunks)
    match = _PREDICTION.match(path)
    if request.method == "POST" and match and match.group(2) == "/cancel":
        return ReplicateDecoder(create=False, prediction_id=match.group(1), context=context, streaming_chunks=chunks)
    if request.method != "GET":
        return None
    stream_id = predictions(context).id_for_stream(request.url)
    if stream_id is not None:
        return ReplicateDecoder(create=False, prediction_id=stream_id, context=context, streaming_chunks=chunks)
    if match and match.group(2) != "/cancel":
        return ReplicateDecoder(create=False, prediction_id=match.group(1), context=context, streaming_chunks=chunks)
    if "text/event-stream" in (request.headers.get("accept") or ""):
        # a stream oisp did not see created
        return ReplicateDecoder(create=False, context=context, streaming_chunks=chunks)
    return None


#: The endpoints of the Replicate API, declared through ``oisp_endpoints``.
ENDPOINTS: tuple[EndpointSpec, ...] = (
    EndpointSpec("replicate", "api.replicate.com"),
)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return ENDPOINTS
