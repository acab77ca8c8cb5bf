"""Metadata-only events for an exchange whose body no provider reads: :class:`MetadataDecoder`.

Any exchange with an AI endpoint that no provider plugin claims still yields metadata-level ``ai.request`` and
``ai.response`` events (method, path, status, sizes, timings), with lower confidence. oisp's fallback provider
(:mod:`oisp.providers.metadata`) answers with it last; a plugin may use it for the exchanges of its API it does
not read (and :class:`~oisp.provider_kit.WebSocketSessionDecoder` for a session it cannot follow).
"""

from __future__ import annotations

from collections.abc import Iterable

from oisp.events import AiRequest, AiResponse, Confidence, Event, ProviderInfo, RelatedEvent, ResponseError
from oisp.http.exchange import HttpExchange
from oisp.provider_kit.exchange import latencies, provider_name, request_id_for
from oisp.redaction import redact_url

__all__ = ["MetadataDecoder", "exchange_attrs", "provider_for"]


def exchange_attrs(exchange: HttpExchange) -> dict[str, object]:
    """HTTP facts of an exchange for an event's ``attrs`` (no headers: they may hold credentials)."""
    request = exchange.request
    out: dict[str, object] = {
        "http.method": request.method,
        "http.path": redact_url(request.target),
        "http.version": request.http_version,
        "http.request_body_bytes": request.wire_size,
        "oisp.connection_id": exchange.connection.connection_id,
    }
    if exchange.stream_id is not None:
        out["http.stream_id"] = exchange.stream_id
    if exchange.response is not None:
        out["http.status"] = exchange.response.status
        out["http.response_body_bytes"] = exchange.response.wire_size
        content_type = exchange.response.headers.get("content-type")
        if content_type:
            out["http.response_content_type"] = content_type
    return out


def provider_for(exchange: HttpExchange) -> ProviderInfo:
    """The provider of an exchange: the one the endpoint table named for its connection, else by its host."""
    return ProviderInfo(name=provider_name(exchange), endpoint=redact_url(exchange.request.url))


def _confidence(exchange: HttpExchange) -> Confidence:
    return Confidence(
        level="medium",
        completeness="partial" if exchange.partial else "metadata_only",
        reasons=["known_endpoint", "no_provider_decoder"],
        limitations=list(exchange.partial_reasons) or None,
        content_source="mitm_decryption" if exchange.connection.tls else "plaintext_capture",
        ai_detection_method="known_endpoint",
    )


class MetadataDecoder:
    """Metadata-only events for an exchange no provider understands."""

    def __init__(self) -> None:
        self.request_event_id: str | None = None

    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        event = Event.create(
            AiRequest(request_id=request_id_for(exchange), provider=provider_for(exchange), request_type="other"),
            confidence=_confidence(exchange), attrs=exchange_attrs(exchange),
        )
        self.request_event_id = event.event_id
        return [event]

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        return ()

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        response = exchange.response
        status = response.status if response is not None else None
        success = status is not None and 200 <= status < 400 and not exchange.partial
        total, ttfb = latencies(exchange)
        error = None
        if not success:
            reason = "; ".join(exchange.partial_reasons) or (f"HTTP {status}" if status else "no response")
            error = ResponseError(type="http_error" if status else "incomplete", message=reason,
                                  code=str(status) if status else None)
        related = [RelatedEvent(event_id=self.request_event_id, relationship="caused_by")] \
            if self.request_event_id else None
        return [Event.create(
            AiResponse(request_id=request_id_for(exchange), provider=provider_for(exchange), status_code=status,
                       success=success, error=error, latency_ms=total, time_to_first_token_ms=ttfb),
            confidence=_confidence(exchange), attrs=exchange_attrs(exchange), related_events=related,
        )]
