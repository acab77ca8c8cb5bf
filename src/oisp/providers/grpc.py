"""gRPC, gRPC-Web and Connect calls on AI endpoints, at the metadata level: :class:`GrpcExchangeDecoder`.

Which exchanges: a request whose ``content-type`` is ``application/grpc`` (``+proto``, ``+json``, ...),
``application/grpc-web`` / ``application/grpc-web-text``, ``application/connect+proto`` / ``+json`` (Connect
streaming), or ``application/proto`` (Connect unary; ``application/json`` too, when the request carries
``Connect-Protocol-Version``). The service and method come from the path (``/package.Service/Method``).

What is decoded: the enveloped messages of both directions (:mod:`oisp.framing.grpc`: compressed flag, gzip,
one message at most ``max_message_size``, a stream cut short is partial), and the call's status from wherever
its protocol puts it (HTTP/2 trailers or a trailers-only response head, the gRPC-Web trailers block in the body,
the Connect end-stream message, the HTTP status and JSON error of a Connect unary call).

Which events: an ``ai.request`` when the request head is known and an ``ai.response`` when the call ends, like
the metadata provider's (``completeness`` ``metadata_only``, or ``partial``), with the call's facts in ``attrs``
under the OpenTelemetry RPC names (``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``)
and oisp's own (``oisp.grpc.*``: protocol, encodings, message counts and sizes). ``success`` is gRPC status 0;
any other status is ``error`` with ``type`` ``grpc_error`` and ``code`` the status name. The messages' content
is not interpreted: without the schema, protobuf bytes say nothing reliable.

Plugins that know a service's schema subclass :class:`GrpcExchangeDecoder` (claiming the exchange with
``oisp_exchange_decoder``, using :func:`grpc_call_of`) and override :meth:`~GrpcExchangeDecoder.on_grpc_message`
and :meth:`~GrpcExchangeDecoder.on_grpc_end` (see :class:`oisp.hookspecs.GrpcMessageDecoder`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final, Literal

import attrs

from oisp.events import AiRequest, AiResponse, Confidence, Event, RelatedEvent, ResponseError
from oisp.framing import (
    DEFAULT_MAX_ITEM_SIZE,
    FramingError,
    FramingErrorKind,
    GrpcFrameDecoder,
    GrpcMessage,
    parse_trailer_block,
)
from oisp.hookspecs import ExchangeDecoder, hookimpl
from oisp.http.exchange import Headers, HttpExchange
from oisp.provider_kit import exchange_attrs, provider_for, request_id_for

__all__ = [
    "GRPC_STATUS_NAMES",
    "GrpcCall",
    "GrpcCallMessage",
    "GrpcExchangeDecoder",
    "GrpcStatus",
    "grpc_call_of",
]

logger = logging.getLogger(__name__)

GrpcProtocol = Literal["grpc", "grpc-web", "grpc-web-text", "connect", "connect-unary"]

#: gRPC status codes by number (Connect's error codes are the same, lower-cased, ``canceled`` with one L).
GRPC_STATUS_NAMES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
_CONNECT_CODES: Final = {name.lower(): number for number, name in enumerate(GRPC_STATUS_NAMES)} | {"canceled": 1}
#: How much of a status message is kept (the pipeline's redaction runs on it like on any text).
_MAX_STATUS_MESSAGE: Final = 512
#: How much of a Connect unary error body (JSON) is read for its code.
_MAX_ERROR_BODY: Final = 64 * 1024


@attrs.frozen
class GrpcCall:
    """What the request head says of a call: protocol, service, method, message encoding."""

    protocol: GrpcProtocol
    #: ``package.Service`` (None when the path is not ``/<service>/<method>``).
    service: str | None
    method: str | None
    #: The content type's codec: ``proto`` or ``json``.
    codec: str
    #: The request's message encoding (``grpc-encoding`` or ``connect-content-encoding``), None for none.
    encoding: str | None

    @property
    def rpc_system(self) -> str:
        """The OpenTelemetry ``rpc.system`` value: ``grpc`` or ``connect_rpc``."""
        return "connect_rpc" if self.protocol.startswith("connect") else "grpc"


@attrs.frozen
class GrpcCallMessage:
    """One message of a call, as handed to :meth:`GrpcExchangeDecoder.on_grpc_message`."""

    call: GrpcCall
    direction: Literal["client", "server"]
    #: 0-based position among the messages of its direction.
    index: int
    #: The message bytes, decompressed (protobuf or JSON, as ``call.codec`` says).
    payload: bytes = attrs.field(repr=False)
    #: Its size on the wire (compressed, if it was).
    wire_size: int
    compressed: bool
    #: ``time.monotonic_ns()`` when the bytes that completed it arrived (client messages of a request still
    #: streaming: when oisp read them).
    timestamp_ns: int


@attrs.frozen
class GrpcStatus:
    """How a call ended: its gRPC status (None when none was seen), message and where the status came from."""

    code: int | None
    message: str | None = None
    #: ``trailers``, ``headers`` (trailers-only), ``trailers-block`` (gRPC-Web), ``end-stream`` (Connect),
    #: ``http`` (Connect unary), or None.
    source: str | None = None

    @property
    def name(self) -> str | None:
        """``OK``, ``NOT_FOUND``... (``CODE_<n>`` for a number outside the table)."""
        if self.code is None:
            return None
        return GRPC_STATUS_NAMES[self.code] if 0 <= self.code < len(GRPC_STATUS_NAMES) else f"CODE_{self.code}"


def _media_type(headers: Headers) -> str:
    return (headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def grpc_call_of(exchange: HttpExchange) -> GrpcCall | None:
    """The gRPC/Connect call an exchange carries, from its request head; None when it is not one."""
    request = exchange.request
    media = _media_type(request.headers)
    protocol: GrpcProtocol
    codec = "proto"
    if media.startswith("application/grpc-web-text"):
        protocol, rest = "grpc-web-text", media[len("application/grpc-web-text"):]
    elif media.startswith("application/grpc-web"):
        protocol, rest = "grpc-web", media[len("application/grpc-web"):]
    elif media.startswith("application/grpc"):
        protocol, rest = "grpc", media[len("application/grpc"):]
    elif media.startswith("application/connect+"):
        protocol, rest = "connect", media[len("application/connect"):]
    elif media == "application/proto" or media.startswith("application/proto+"):
        protocol, rest = "connect-unary", ""
    elif media == "application/json" and request.headers.get("connect-protocol-version") is not None:
        protocol, rest, codec = "connect-unary", "", "json"
    else:
        return None
    if rest:
        if not rest.startswith("+"):
            return None
        codec = rest[1:] or "proto"
    if request.method != "POST":
        return None  # Connect GET (idempotent unary calls in the query string) is not read
    parts = [part for part in request.path.split("/") if part]
    service, method = (parts[-2], parts[-1]) if len(parts) >= 2 else (None, None)
    header = "connect-content-encoding" if protocol == "connect" else "grpc-encoding"
    encoding = None if protocol == "connect-unary" else request.headers.get(header)
    return GrpcCall(protocol=protocol, service=service, method=method, codec=codec, encoding=encoding)


@attrs.define
class _Side:
    """One direction of a call: its framer and what went through it."""

    framer: GrpcFrameDecoder | None = None
    messages: int = 0
    #: Decompressed payload bytes.
    message_bytes: int = 0
    #: Envelope payload bytes on the wire.
    wire_bytes: int = 0
    first_ns: int | None = None
    closed: bool = False


class GrpcExchangeDecoder:
    """Metadata-level events of one gRPC/gRPC-Web/Connect call, and its messages for subclasses that know the
    schema (see the module docstring). An :class:`~oisp.hookspecs.ExchangeDecoder` and a
    :class:`~oisp.hookspecs.GrpcMessageDecoder`."""

    #: Whether the metadata-level ``ai.request``/``ai.response`` are emitted; a subclass that builds its own
    #: events from the messages sets it to False.
    emit_metadata_events: bool = True

    def __init__(self, call: GrpcCall, *, max_message_size: int = DEFAULT_MAX_ITEM_SIZE) -> None:
        self.call = call
        self.max_message_size = max_message_size
        self.client = _Side()
        self.server = _Side()
        #: The request body bytes already framed (the body grows while a streaming request goes on).
        self._request_fed = 0
        self._trailers_block: list[tuple[str, str]] | None = None
        self._end_stream: dict[str, Any] | None = None
        self.problems: list[str] = []
        self.request_event_id: str | None = None
        self.response_encoding: str | None = None

    # --- for subclasses ------------------------------------------------------------------------------------
    def on_grpc_message(self, exchange: HttpExchange, message: GrpcCallMessage) -> Iterable[Event]:
        """One message of either direction (override to decode a known schema); the default returns nothing."""
        return ()

    def on_grpc_end(self, exchange: HttpExchange, status: GrpcStatus) -> Iterable[Event]:
        """The call ended with ``status`` (override to finish events); the default returns nothing."""
        return ()

    # --- ExchangeDecoder -----------------------------------------------------------------------------------
    def on_request(self, exchange: HttpExchange) -> Iterable[Event]:
        text = self.call.protocol == "grpc-web-text"
        if self.call.protocol != "connect-unary":
            self.client.framer = GrpcFrameDecoder(encoding=self.call.encoding, max_item_size=self.max_message_size,
                                                  text=text)
        events: list[Event] = []
        if self.emit_metadata_events:
            event = Event.create(
                AiRequest(request_id=request_id_for(exchange), provider=provider_for(exchange), request_type="other"),
                confidence=self._confidence(exchange), attrs={**exchange_attrs(exchange), **self._call_attrs()},
            )
            self.request_event_id = event.event_id
            events.append(event)
        events += self._feed_request(exchange, final=exchange.timings.request_end is not None)
        return events

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]:
        events = self._feed_request(exchange, final=False)
        side = self.server
        chunks = exchange.timings.response_chunks  # when this piece arrived (decoding may come later)
        now = chunks[-1][0] if chunks else time.monotonic_ns()
        if side.framer is None and not side.closed:
            response = exchange.response
            if response is None or self.call.protocol == "connect-unary" or not self._response_is_enveloped(exchange):
                side.closed = True
                if self.call.protocol == "connect-unary" and response is not None and response.status == 200:
                    side.first_ns = now
            else:
                header = "connect-content-encoding" if self.call.protocol == "connect" else "grpc-encoding"
                self.response_encoding = response.headers.get(header)
                side.framer = GrpcFrameDecoder(encoding=self.response_encoding, max_item_size=self.max_message_size,
                                               text=self.call.protocol == "grpc-web-text")
        if side.framer is not None:
            events += self._take(exchange, "server", side.framer.feed(data), now)
        return events

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]:
        events = self._feed_request(exchange, final=True)
        now = exchange.timings.response_end or time.monotonic_ns()
        if self.server.framer is not None:
            events += self._take(exchange, "server", self.server.framer.close(), now)
        response = exchange.response
        if self.call.protocol == "connect-unary" and response is not None and response.status == 200:
            if response.truncated:
                self.problems.append("response message over the body cap not read")
            else:  # the body is the one message
                events += self._take(exchange, "server", [GrpcMessage(0, bytes(response.body), response.wire_size, 0)],
                                     self.server.first_ns or now)
        status = self._status(exchange)
        events += self._safely(self.on_grpc_end, exchange, status)
        if self.emit_metadata_events:
            events.append(self._response_event(exchange, status))
        return events

    # --- framing -------------------------------------------------------------------------------------------
    def _response_is_enveloped(self, exchange: HttpExchange) -> bool:
        """Whether the response body holds messages (an error answered as HTML or JSON does not)."""
        assert exchange.response is not None
        media = _media_type(exchange.response.headers)
        return media.startswith(("application/grpc", "application/connect+")) or (
            not media and exchange.response.status == 200)

    def _feed_request(self, exchange: HttpExchange, *, final: bool) -> list[Event]:
        side = self.client
        if side.closed:
            return []
        body = exchange.request.body
        now = exchange.timings.request_end or time.monotonic_ns()
        if side.framer is None:  # connect unary: the body is the one message
            if not final:
                return []
            side.closed = True
            if exchange.request.truncated:
                return []
            return self._take(exchange, "client", [GrpcMessage(0, bytes(body), exchange.request.wire_size, 0)], now)
        events: list[Event] = []
        if len(body) > self._request_fed:
            chunk = bytes(body[self._request_fed:])
            self._request_fed = len(body)
            events += self._take(exchange, "client", side.framer.feed(chunk), now)
        if final:
            side.closed = True
            events += self._take(exchange, "client", side.framer.close(), now)
        return events

    def _take(self, exchange: HttpExchange, direction: Literal["client", "server"],
              items: list[GrpcMessage | FramingError], now: int) -> list[Event]:
        side = self.client if direction == "client" else self.server
        events: list[Event] = []
        for item in items:
            if isinstance(item, FramingError):
                self.problems.append(f"{direction} messages: {item.message}")
                if item.kind is not FramingErrorKind.INCOMPLETE and not item.fatal:
                    side.messages += 1
                continue
            if item.trailers:
                self._trailers_block = parse_trailer_block(item.payload)
                continue
            if item.end_stream:
                self._end_stream = _json_object(item.payload)
                continue
            if side.first_ns is None:
                side.first_ns = now
            message = GrpcCallMessage(call=self.call, direction=direction, index=side.messages, payload=item.payload,
                                      wire_size=item.wire_size, compressed=item.compressed, timestamp_ns=now)
            side.messages += 1
            side.message_bytes += item.size
            side.wire_bytes += item.wire_size
            events += self._safely(self.on_grpc_message, exchange, message)
        return events

    def _safely(self, method: Any, exchange: HttpExchange, *args: Any) -> list[Event]:
        """Call a subclass's hook method; a failure is logged and noted, the call's metadata goes on."""
        try:
            return list(method(exchange, *args))
        except Exception as exc:
            logger.error("gRPC decoder %s failed in %s for %s/%s: %s", type(self).__name__, method.__name__,
                         self.call.service, self.call.method, exc, exc_info=True)
            self.problems.append(f"{method.__name__} failed: {type(exc).__name__}")
            return []

    # --- status and events ---------------------------------------------------------------------------------
    def _status(self, exchange: HttpExchange) -> GrpcStatus:
        response = exchange.response
        if response is None:
            return GrpcStatus(None)
        protocol = self.call.protocol
        if protocol == "connect-unary":
            if response.status == 200:
                return GrpcStatus(0, source="http")
            error = _json_object(bytes(response.body[:_MAX_ERROR_BODY])) or {}
            return _connect_status(error, "http")
        if protocol == "connect":
            if self._end_stream is None:
                return GrpcStatus(None)
            end_error = self._end_stream.get("error")
            if isinstance(end_error, dict):
                return _connect_status(end_error, "end-stream")
            return GrpcStatus(0, source="end-stream")
        sources: list[tuple[str, list[tuple[str, str]]]] = []
        if response.trailers is not None:
            sources.append(("trailers", list(response.trailers)))
        if self._trailers_block is not None:
            sources.append(("trailers-block", self._trailers_block))
        sources.append(("headers", list(response.headers)))
        for source, fields in sources:
            found = Headers(fields)
            code = found.get("grpc-status")
            if code is not None:
                message = found.get("grpc-message")
                number = int(code) if code.strip().isdigit() else 2  # an unreadable status is UNKNOWN
                return GrpcStatus(number, _status_message(urllib.parse.unquote(message) if message else None), source)
        return GrpcStatus(None)

    def _call_attrs(self) -> dict[str, Any]:
        call = self.call
        out: dict[str, Any] = {"rpc.system": call.rpc_system, "oisp.grpc.protocol": call.protocol,
                               "oisp.grpc.codec": call.codec}
        if call.service is not None:
            out["rpc.service"] = call.service
        if call.method is not None:
            out["rpc.method"] = call.method
        if call.encoding:
            out["oisp.grpc.request_encoding"] = call.encoding
        return out

    def _confidence(self, exchange: HttpExchange) -> Confidence:
        limitations = [*exchange.partial_reasons, *self.problems]
        return Confidence(
            level="medium",
            completeness="partial" if limitations else "metadata_only",
            reasons=["known_endpoint", "grpc_metadata"],
            limitations=limitations or None,
            content_source="mitm_decryption" if exchange.connection.tls else "plaintext_capture",
            ai_detection_method="known_endpoint",
        )

    def _response_event(self, exchange: HttpExchange, status: GrpcStatus) -> Event:
        response = exchange.response
        http_status = response.status if response is not None else None
        if status.code is None and response is not None and not exchange.partial:
            self.problems.append("the call ended without a status")
        success = status.code == 0 and not exchange.partial
        error = None
        if status.code not in (None, 0):
            error = ResponseError(type="grpc_error", message=status.message, code=status.name)
        elif not success:
            reason = "; ".join([*exchange.partial_reasons, *self.problems]) or (
                f"HTTP {http_status}" if http_status else "no response")
            error = ResponseError(type="http_error" if http_status and http_status != 200 else "incomplete",
                                  message=reason, code=str(http_status) if http_status else None)
        attributes: dict[str, Any] = {
            **exchange_attrs(exchange), **self._call_attrs(),
            "oisp.grpc.request_messages": self.client.messages,
            "oisp.grpc.request_message_bytes": self.client.message_bytes,
            "oisp.grpc.response_messages": self.server.messages,
            "oisp.grpc.response_message_bytes": self.server.message_bytes,
        }
        if status.code is not None:
            attributes["rpc.grpc.status_code"] = status.code
            attributes["oisp.grpc.status"] = status.name
            attributes["oisp.grpc.status_source"] = status.source
        if self.response_encoding:
            attributes["oisp.grpc.response_encoding"] = self.response_encoding
        timings = exchange.timings
        total = ttfm = None
        if timings.request_start is not None:
            if timings.response_end is not None:
                total = max(0, (timings.response_end - timings.request_start) // 1_000_000)
            first = self.server.first_ns or timings.response_headers
            if first is not None:
                ttfm = max(0, (first - timings.request_start) // 1_000_000)
        related = [RelatedEvent(event_id=self.request_event_id, relationship="caused_by")] \
            if self.request_event_id else None
        return Event.create(
            AiResponse(request_id=request_id_for(exchange), provider=provider_for(exchange), status_code=http_status,
                       success=success, error=error, latency_ms=total, time_to_first_token_ms=ttfm),
            confidence=self._confidence(exchange), attrs=attributes, related_events=related,
        )


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _status_message(message: Any) -> str | None:
    return message[:_MAX_STATUS_MESSAGE] if isinstance(message, str) and message else None


def _connect_status(error: dict[str, Any], source: str) -> GrpcStatus:
    code = error.get("code")
    number = _CONNECT_CODES.get(code.lower(), 2) if isinstance(code, str) else 2
    return GrpcStatus(number, _status_message(error.get("message")), source)


@hookimpl
def oisp_exchange_decoder(exchange: HttpExchange) -> ExchangeDecoder | None:
    """Claims every gRPC, gRPC-Web and Connect call on an intercepted endpoint (metadata level)."""
    call = grpc_call_of(exchange)
    return GrpcExchangeDecoder(call) if call is not None else None
