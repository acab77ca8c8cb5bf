"""Building blocks for provider plugins of JSON-over-WebSocket APIs: :class:`WebSocketSessionDecoder`.

Such APIs (the OpenAI Realtime API, the Responses API's WebSocket mode, Gemini Live) exchange JSON events over
one long connection, on which each model response is one request/response cycle. A
:class:`WebSocketSessionDecoder` claims the upgraded exchange (it is an :class:`~oisp.hookspecs.ExchangeDecoder`
with ``on_websocket_message``), and for each model response builds a *synthetic exchange* — the upgrade
request's head, a request body built from the client's messages, the server's events as an SSE response
stream — and runs an ordinary :class:`~oisp.provider_kit.ApiDecoder` on it. Each response thereby gets its own
``request_id`` and the same events and links as an HTTP call. Their ``attrs`` say ``oisp.transport: websocket``;
``status_code`` is absent (there is no HTTP status per response).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import Event
from oisp.http.exchange import Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.http.websocket import OP_BINARY, OP_TEXT, WebSocketMessage
from oisp.provider_kit.api_decoder import ApiDecoder
from oisp.provider_kit.context import DecoderContext
from oisp.provider_kit.metadata import MetadataDecoder

__all__ = ["OpenResponse", "WebSocketSessionDecoder", "base64_size"]


def base64_size(value: Any) -> int:
    """How many bytes a base64 string decodes to (without decoding it)."""
    if not isinstance(value, str):
        return 0
    text = value.strip()
    return max(0, len(text) * 3 // 4 - (len(text) - len(text.rstrip("="))))


@attrs.define
class OpenResponse:
    """A response in progress: its synthetic exchange and decoder."""

    exchange: HttpExchange
    decoder: ApiDecoder
    response_id: str | None = None
    output_audio_bytes: int = 0
    #: Token counts beyond OISP's names (audio and text tokens), for the response's ``usage``.
    usage_extra: dict[str, int] = attrs.field(factory=dict)


class WebSocketSessionDecoder:
    """Base of JSON-over-WebSocket session decoders: one synthetic exchange per model response (see the module
    docstring). Subclasses read client and server events (:meth:`client_event`, :meth:`server_event`) and call
    :meth:`open_response`, :meth:`response_event` and :meth:`close_response`."""

    def __init__(self, *, context: DecoderContext | None = None, streaming_chunks: bool = False) -> None:
        #: The run's state, handed to each response's decoder (tool calls link across responses and exchanges).
        self.context = context if context is not None else DecoderContext()
        self.streaming_chunks = streaming_chunks
        self.open: list[OpenResponse] = []
        self.problems: list[str] = []

    # --- ExchangeDecoder ---------------------------------------------------------------------------
    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        return ()

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        return ()

    def on_websocket_message(self, exchange: HttpExchange, message: WebSocketMessage) -> Iterable[Event]:
        if message.opcode not in (OP_TEXT, OP_BINARY) or message.problem is not None:
            return ()
        if message.truncated:
            self.problems.append(f"{message.direction} message over the body cap ({message.size} bytes) not read")
            return ()
        try:
            event = json.loads(message.payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ()
        if type(event) is not dict:
            return ()
        if message.direction == "client":
            return self.client_event(exchange, event, message.timestamp_ns)
        return self.server_event(exchange, event, message.timestamp_ns)

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        """The connection ended: responses still open end as partial. An upgrade the server refused is reported
        like any exchange nobody decodes (the metadata provider's events)."""
        if not exchange.websocket:
            fallback = MetadataDecoder()
            return [*fallback.on_request(exchange), *fallback.on_end(exchange)]
        events: list[Event] = []
        now = exchange.timings.response_end
        reasons = exchange.partial_reasons or ["connection closed before the response was done"]
        for item in list(self.open):
            for reason in reasons:
                item.exchange.mark_partial(reason)
            events += self.close_response(item, now)
        return events

    # --- for subclasses -----------------------------------------------------------------------------
    def response_decoder(self) -> ApiDecoder:
        """The decoder of one response (used when :meth:`open_response` is given none)."""
        raise NotImplementedError

    def client_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        raise NotImplementedError

    def server_event(self, exchange: HttpExchange, event: dict[str, Any], now: int) -> Iterable[Event]:
        raise NotImplementedError

    def open_response(self, exchange: HttpExchange, body: Mapping[str, Any], now: int,
                      request_attrs: Mapping[str, Any] | None = None, decoder: ApiDecoder | None = None) \
            -> tuple[OpenResponse, list[Event]]:
        """Start a response whose request body is ``body``, read by ``decoder`` (by default
        :meth:`response_decoder`'s); returns it and its request events."""
        request = exchange.request
        synthetic = HttpExchange(connection=exchange.connection, request=HttpRequest(
            method=request.method, target=request.target, authority=request.authority, scheme=request.scheme,
            http_version=request.http_version, headers=request.headers,
            body=bytearray(json.dumps(body, ensure_ascii=False).encode()),
        ))
        synthetic.timings.request_start = synthetic.timings.request_end = now
        synthetic.response = HttpResponse(status=200, reason="", http_version=request.http_version,
                                          headers=Headers([("content-type", "text/event-stream")]))
        synthetic.timings.response_headers = now
        item = OpenResponse(synthetic, decoder or self.response_decoder())
        self.open.append(item)
        events = list(item.decoder.on_request(synthetic))
        attributes = {"oisp.transport": "websocket", "http.status": 101, **(request_attrs or {})}
        return item, [e.with_context(attrs={**(e.attrs or {}), **attributes})
                      if e.event_type == "ai.request" else e for e in events]

    def response_event(self, item: OpenResponse, event: Mapping[str, Any], now: int) -> list[Event]:
        """Feed one server event (already in the Responses API's shape) to a response."""
        data = json.dumps(event, ensure_ascii=False).encode()
        timings = item.exchange.timings
        if timings.response_first_byte is None:
            timings.response_first_byte = now
        timings.response_chunks.append((now, len(data)))
        return list(item.decoder.on_response_data(item.exchange, b"data: " + data + b"\n\n"))

    def close_response(self, item: OpenResponse, now: int | None, response_attrs: Mapping[str, Any] | None = None) \
            -> list[Event]:
        """End a response: its ``ai.response`` and ``agent.tool_call`` events."""
        if item in self.open:
            self.open.remove(item)
        item.exchange.timings.response_end = now
        state = item.decoder.state
        state.attrs.update({"oisp.transport": "websocket", "http.status": 101, **(response_attrs or {})})
        state.problems += self.problems
        self.problems = []
        events = list(item.decoder.on_end(item.exchange))
        for index, event in enumerate(events):
            if event.event_type == "ai.response":  # no HTTP status of its own; token details beyond OISP's
                data: Any = event.data
                changes: dict[str, Any] = {"status_code": None}
                if data.usage is not None and item.usage_extra:
                    changes["usage"] = attrs.evolve(data.usage, extra={**data.usage.extra, **item.usage_extra})
                events[index] = event.with_context(data=attrs.evolve(data, **changes))
        return events

    def response_for(self, event: Mapping[str, Any]) -> OpenResponse | None:
        """The open response a server event belongs to: by ``response_id`` (or ``response.id``), else the oldest."""
        response = event.get("response")
        response_id = event.get("response_id") or (response.get("id") if isinstance(response, Mapping) else None)
        if isinstance(response_id, str):
            for item in self.open:
                if item.response_id == response_id:
                    return item
            for item in self.open:
                if item.response_id is None:
                    item.response_id = response_id
                    return item
            return None
        return self.open[0] if self.open else None
