"""OpenAI over WebSocket: the Realtime API (``/v1/realtime``) and the Responses API's WebSocket mode
(``/v1/responses`` upgraded to WebSocket, which Codex uses).

Both are JSON events in WebSocket text messages, and both have one request/response cycle per model response,
so both are decoded the same way: a :class:`WebSocketSessionDecoder` claims the upgraded exchange and, for each
response the model gives, builds the same events an HTTP call would (``ai.request``, ``ai.response``,
``agent.tool_call``, ``agent.tool_result``) by running the Responses API decoder
(:class:`~oisp.providers.openai_responses.ResponsesDecoder`) on a *synthetic exchange*: the upgrade request's
head, a request body built from the client's messages, and the server's events as the response stream. Each
synthetic exchange has its own ``request_id``; events are linked exactly like the HTTP ones. Their ``attrs``
say ``oisp.transport: websocket`` and give the upgrade's path; ``status_code`` is absent (no HTTP status).

Responses over WebSocket
    A client message ``{"type": "response.create", ...}`` carries the body of ``POST /v1/responses``; the
    server answers with the event types of that API's SSE stream, ending with ``response.completed`` (or
    ``response.incomplete``/``response.failed``, or ``error``).

Realtime
    ``session.update`` (and the server's ``session.created``/``session.updated``) set the model, instructions,
    tools and audio formats; ``conversation.item.create`` adds items (messages, ``function_call_output`` tool
    results); ``input_audio_buffer.append`` adds audio. A ``response.create`` (or, with server-side voice
    detection, the server's ``response.created``) starts a request carrying the session's settings and the
    items added since the previous response; ``response.done`` ends it with the output items and the usage,
    whose audio and text token counts go to ``usage`` (``input_audio_tokens``, ``input_text_tokens``,
    ``output_audio_tokens``, ``output_text_tokens``). Spoken answers count by their transcript. Audio is never
    stored: base64 audio is dropped from items and counted (``openai.realtime.input_audio_bytes`` /
    ``output_audio_bytes``, and ``..._audio_ms`` when the format gives the rate).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import attrs

from oisp.events import Event
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import ApiDecoder, DecoderContext, OpenResponse, WebSocketSessionDecoder, base64_size
from oisp.providers.openai_common import Route
from oisp.providers.openai_responses import ResponsesDecoder

__all__ = ["RealtimeDecoder", "ResponsesWebSocketDecoder", "WebSocketSessionDecoder"]

logger = logging.getLogger(__name__)

_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "response.done", "error"})
#: Bytes per second of the Realtime API's audio formats (beta names and GA MIME types; PCM at its rate).
_AUDIO_RATES = {"pcm16": 48_000, "audio/pcm": 48_000, "g711_ulaw": 8_000, "g711_alaw": 8_000,
                "audio/pcmu": 8_000, "audio/pcma": 8_000}
_AUDIO_DELTAS = frozenset({"response.audio.delta", "response.output_audio.delta"})
_TEXT_DELTAS = {"response.text.delta": "response.output_text.delta",
                "response.audio_transcript.delta": "response.output_text.delta",
                "response.output_audio_transcript.delta": "response.output_text.delta"}


class _OpenAISessionDecoder(WebSocketSessionDecoder):
    def response_decoder(self) -> ApiDecoder:
        return ResponsesDecoder(Route("responses"), context=self.context, streaming_chunks=self.streaming_chunks)


class ResponsesWebSocketDecoder(_OpenAISessionDecoder):
    """The Responses API over WebSocket: ``response.create`` messages and the SSE stream's event types."""

    def client_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        if event.get("type") != "response.create":
            return ()
        body = {k: v for k, v in event.items() if k != "type"}
        if isinstance(body.get("response"), Mapping) and "input" not in body:
            body = dict(body["response"])
        body.setdefault("stream", True)
        _, events = self.open_response(exchange, body, now)
        return events

    def server_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        kind = event.get("type")
        item = self.response_for(event) if kind != "error" else (self.open[0] if self.open else None)
        if item is None:
            return ()
        events = self.response_event(item, event, now)
        if kind in _TERMINAL:
            events += self.close_response(item, now)
        return events


@attrs.define
class _Session:
    model: str | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    temperature: Any = None
    max_output_tokens: Any = None
    modalities: Any = None
    input_rate: int | None = None
    output_rate: int | None = None


class RealtimeDecoder(_OpenAISessionDecoder):
    """The OpenAI Realtime API (beta and GA event names)."""

    def __init__(self, exchange: HttpExchange, *, context: DecoderContext | None = None,
                 streaming_chunks: bool = False) -> None:
        super().__init__(context=context, streaming_chunks=streaming_chunks)
        query = dict(parse_qsl(exchange.request.query))
        self.session = _Session(model=query.get("model") or query.get("deployment"), input_rate=48_000,
                                output_rate=48_000)
        #: Items added since the last response (Responses API shapes, audio removed).
        self.items: list[dict[str, Any]] = []
        self.input_audio_bytes = 0

    # --- session and items ---------------------------------------------------------------------------
    def _session(self, session: Any) -> None:
        if not isinstance(session, Mapping):
            return
        s = self.session
        if isinstance(session.get("model"), str):
            s.model = session["model"]
        if isinstance(session.get("instructions"), str):
            s.instructions = session["instructions"]
        if isinstance(session.get("tools"), list):
            s.tools = session["tools"]
        for key in ("tool_choice", "temperature"):
            if key in session:
                setattr(s, key, session[key])
        for key in ("max_response_output_tokens", "max_output_tokens"):
            if key in session:
                s.max_output_tokens = session[key]
        for key in ("modalities", "output_modalities"):
            if key in session:
                s.modalities = session[key]
        s.input_rate = _rate(session.get("input_audio_format"), session, "input") or s.input_rate
        s.output_rate = _rate(session.get("output_audio_format"), session, "output") or s.output_rate

    def _item(self, item: Any) -> None:
        if not isinstance(item, Mapping):
            return
        clean = dict(item)
        if isinstance(item.get("content"), list):
            parts = []
            for part in item["content"]:
                if isinstance(part, Mapping) and "audio" in part:
                    self.input_audio_bytes += base64_size(part.get("audio"))
                    part = {k: v for k, v in part.items() if k != "audio"}
                    if isinstance(part.get("transcript"), str):
                        part = {"type": "input_text", "text": part["transcript"]}
                parts.append(part)
            clean["content"] = parts
        self.items.append(clean)

    def _request_body(self, response: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.session
        overrides = response if isinstance(response, Mapping) else {}
        body: dict[str, Any] = {"model": s.model, "stream": True}
        for key, value in (("instructions", s.instructions), ("tools", s.tools), ("tool_choice", s.tool_choice),
                           ("temperature", s.temperature), ("max_output_tokens", s.max_output_tokens)):
            if value is not None:
                body[key] = value
        for key in ("instructions", "tools", "tool_choice", "temperature"):
            if key in overrides:
                body[key] = overrides[key]
        items = list(self.items) if overrides.get("conversation") != "none" else []
        if isinstance(overrides.get("input"), list):
            before = self.items
            self.items = []
            for item in overrides["input"]:
                self._item(item)
            items += self.items
            self.items = before
        body["input"] = items
        self.items = []
        attributes: dict[str, Any] = {}
        if self.input_audio_bytes:
            attributes["openai.realtime.input_audio_bytes"] = self.input_audio_bytes
            if s.input_rate:
                attributes["openai.realtime.input_audio_ms"] = self.input_audio_bytes * 1000 // s.input_rate
        self.input_audio_bytes = 0
        modalities = overrides.get("modalities") or overrides.get("output_modalities") or s.modalities
        if isinstance(modalities, list):
            attributes["openai.realtime.modalities"] = [str(m) for m in modalities]
        return body, attributes

    # --- events ----------------------------------------------------------------------------------------
    def client_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self.input_audio_bytes += base64_size(event.get("audio"))
        elif kind == "session.update":
            self._session(event.get("session"))
        elif kind == "conversation.item.create":
            self._item(event.get("item"))
        elif kind == "response.create":
            body, attributes = self._request_body(event.get("response"))
            _, events = self.open_response(exchange, body, now, attributes)
            return events
        return ()

    def server_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        kind = event.get("type")
        if not isinstance(kind, str):
            return ()
        if kind in ("session.created", "session.updated"):
            self._session(event.get("session"))
            return ()
        if kind == "error":
            item = self.open[0] if self.open else None
            if item is None:
                return ()
            return self.response_event(item, event, now) + self.close_response(item, now)
        if not kind.startswith("response."):
            return ()
        events: list[Event] = []
        item = self.response_for(event)
        if item is None and kind == "response.created":  # server-side voice detection started a response
            body, attributes = self._request_body(None)
            item, events = self.open_response(exchange, body, now, attributes)
            response = event.get("response")
            if isinstance(response, Mapping) and isinstance(response.get("id"), str):
                item.response_id = response["id"]
        if item is None:
            return events
        if kind in _AUDIO_DELTAS:
            item.output_audio_bytes += base64_size(event.get("delta"))
            return events
        if kind in _TEXT_DELTAS:
            events += self.response_event(item, {**event, "type": _TEXT_DELTAS[kind]}, now)
        elif kind == "response.done":
            response = event.get("response")
            events += self.response_event(item, {"type": _terminal_type(response),
                                                 "response": _responses_shape(response, item)}, now)
            audio: dict[str, Any] = {}
            if item.output_audio_bytes:
                audio["openai.realtime.output_audio_bytes"] = item.output_audio_bytes
                if self.session.output_rate:
                    audio["openai.realtime.output_audio_ms"] = \
                        item.output_audio_bytes * 1000 // self.session.output_rate
            events += self.close_response(item, now, audio)
        elif kind in ("response.created", "response.function_call_arguments.delta", "response.output_item.added",
                      "response.output_item.done"):
            events += self.response_event(item, _item_shape(event), now)
        return events


def _rate(value: Any, session: Mapping[str, Any], side: str) -> int | None:
    """Bytes per second of an audio format: the beta's format names, or GA's ``audio.{input,output}.format``."""
    if isinstance(value, str):
        return _AUDIO_RATES.get(value)
    audio = session.get("audio")
    spec = audio.get(side) if isinstance(audio, Mapping) else None
    fmt = spec.get("format") if isinstance(spec, Mapping) else None
    if isinstance(fmt, Mapping) and isinstance(fmt.get("type"), str):
        rate = fmt.get("rate")
        if fmt["type"] == "audio/pcm" and isinstance(rate, int) and rate > 0:
            return rate * 2
        return _AUDIO_RATES.get(fmt["type"])
    return None


def _terminal_type(response: Any) -> str:
    status = response.get("status") if isinstance(response, Mapping) else None
    if status == "failed":
        return "response.failed"
    if status in ("incomplete", "cancelled"):
        return "response.incomplete"
    return "response.completed"


def _content_shape(part: Any) -> Any:
    """A realtime output content part as the Responses API's ``output_text`` (spoken answers by transcript)."""
    if not isinstance(part, Mapping):
        return part
    text = part.get("text") if isinstance(part.get("text"), str) else part.get("transcript")
    if isinstance(text, str):
        return {"type": "output_text", "text": text}
    return {k: v for k, v in part.items() if k != "audio"}


def _item_shape(event: Mapping[str, Any]) -> dict[str, Any]:
    item = event.get("item")
    if not isinstance(item, Mapping) or not isinstance(item.get("content"), list):
        return dict(event)
    return {**event, "item": {**item, "content": [_content_shape(p) for p in item["content"]]}}


def _responses_shape(response: Any, item: OpenResponse) -> Any:
    """A realtime ``response.done`` response as a Responses API response (output parts, usage details)."""
    if not isinstance(response, Mapping):
        return response
    out = dict(response)
    if isinstance(response.get("output"), list):
        out["output"] = [{**item, "content": [_content_shape(p) for p in item["content"]]}
                         if isinstance(item, Mapping) and isinstance(item.get("content"), list) else item
                         for item in response["output"]]
    usage = response.get("usage")
    if isinstance(usage, Mapping):
        inputs = usage.get("input_token_details")
        outputs = usage.get("output_token_details")
        inputs = inputs if isinstance(inputs, Mapping) else {}
        outputs = outputs if isinstance(outputs, Mapping) else {}
        out["usage"] = {**usage, "input_tokens_details": inputs, "output_tokens_details": outputs}
        for prefix, details in (("input", inputs), ("output", outputs)):
            for kind in ("audio", "text"):
                value = details.get(f"{kind}_tokens")
                if isinstance(value, int) and not isinstance(value, bool):
                    item.usage_extra[f"{prefix}_{kind}_tokens"] = value
    if response.get("status") == "cancelled":
        out["incomplete_details"] = {"reason": "cancelled"}
    out.setdefault("object", "realtime.response")
    return out
