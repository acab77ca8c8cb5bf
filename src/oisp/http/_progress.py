"""The protocol-independent half of passive decoding: one exchange's progress, its bodies, the listener calls.

Both decoders (:mod:`oisp.http.h1`, :mod:`oisp.http.h2`) turn wire events into calls on :class:`ExchangeProgress`,
which keeps the exchange model, the body captures and the listener contract (order, exactly one ``end``,
listener errors contained) in one place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Final, Literal

from oisp.errors import ConfigurationError
from oisp.http.encoding import ContentDecoder
from oisp.http.exchange import ExchangeListener, Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.http.websocket import OP_CLOSE, FrameReader, WebSocketMessage, negotiated_deflate

logger = logging.getLogger(__name__)

CONNECTION_CLOSED_BEFORE_REQUEST = "connection closed before request complete"
CONNECTION_CLOSED_BEFORE_RESPONSE = "connection closed before response complete"

_QUOTED_BYTES: Final = re.compile(r":?\s*(?:bytearray\(|memoryview\(|b['\"]|['\"])")


def describe_protocol_error(exc: Exception) -> str:
    """An h11/hyperframe/hpack error message without the offending bytes (h11 quotes whole header lines, which
    may carry credentials), fit for partial reasons and logs."""
    return _QUOTED_BYTES.split(str(exc), maxsplit=1)[0] or type(exc).__name__


def check_body_cap(body_cap: int) -> int:
    """``body_cap`` if it is usable, else :class:`~oisp.errors.ConfigurationError`."""
    if isinstance(body_cap, bool) or not isinstance(body_cap, int) or body_cap < 0:
        raise ConfigurationError(f"body_cap must be a number of bytes >= 0, got {body_cap!r}")
    return body_cap


def decode_field_text(raw: bytes) -> str:
    """A header name or value as text: UTF-8 when it is valid UTF-8, otherwise Latin-1 (lossless)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def make_headers(fields: Iterable[tuple[bytes, bytes]]) -> Headers:
    """:class:`Headers` from raw ``(name, value)`` byte pairs, wire order kept."""
    return Headers([(decode_field_text(name), decode_field_text(value)) for name, value in fields])


class GuardedListener:
    """Calls an :class:`ExchangeListener`, logging and swallowing whatever it raises."""

    def __init__(self, listener: ExchangeListener) -> None:
        self._listener = listener

    def request(self, exchange: HttpExchange) -> None:
        try:
            self._listener.request(exchange)
        except Exception:
            logger.exception("exchange listener failed in request() for exchange %d", exchange.exchange_id)

    def response_start(self, exchange: HttpExchange) -> None:
        try:
            self._listener.response_start(exchange)
        except Exception:
            logger.exception("exchange listener failed in response_start() for exchange %d", exchange.exchange_id)

    def response_data(self, exchange: HttpExchange, data: bytes) -> None:
        try:
            self._listener.response_data(exchange, data)
        except Exception:
            logger.exception("exchange listener failed in response_data() for exchange %d", exchange.exchange_id)

    def end(self, exchange: HttpExchange) -> None:
        try:
            self._listener.end(exchange)
        except Exception:
            logger.exception("exchange listener failed in end() for exchange %d", exchange.exchange_id)

    def websocket_message(self, exchange: HttpExchange, message: WebSocketMessage) -> None:
        """The optional ``websocket_message`` of the listener (listeners without it ignore WebSockets)."""
        method = getattr(self._listener, "websocket_message", None)
        if method is None:
            return
        try:
            method(exchange, message)
        except Exception:
            logger.exception("exchange listener failed in websocket_message() for exchange %d",
                             exchange.exchange_id)


class BodyCapture:
    """Stores one message body: counts wire bytes, removes content codings, caps, and records what was cut.

    Past the cap nothing more is decoded or stored (so nothing more is delivered either), but ``wire_size``
    keeps counting every byte that went by.
    """

    def __init__(
        self,
        message: HttpRequest | HttpResponse,
        exchange: HttpExchange,
        cap: int,
        side: Literal["request", "response"],
    ) -> None:
        self._message = message
        self._exchange = exchange
        self._side = side
        encodings = message.headers.get_all("content-encoding")
        self._decoder = ContentDecoder(", ".join(encodings) if encodings else None, cap)
        if self._decoder.unsupported is not None:
            exchange.mark_partial(
                f"{side} body has unsupported content-encoding {self._decoder.unsupported!r}; stored as sent"
            )

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take the next body piece (transfer coding already removed); returns the newly stored bytes."""
        self._message.wire_size += len(data)
        out = self._decoder.decode(data)
        if out:
            self._message.body += out
        if self._decoder.stopped:
            self._note_stop()
        return out

    @property
    def truncated(self) -> bool:
        """Whether the body reached the cap: nothing more of it is stored."""
        return self._message.truncated

    def skip(self, count: int) -> None:
        """``count`` more body bytes went by past the cap, not seen (counted in ``wire_size`` only)."""
        self._message.wire_size += count

    def finish(self) -> None:
        """The body ended on the wire; records a content coding that ended early."""
        self._decoder.finish()
        self._note_stop()

    def _note_stop(self) -> None:
        if self._decoder.truncated and not self._message.truncated:
            self._message.truncated = True
            self._exchange.mark_partial(f"{self._side} body truncated at cap")
        if self._decoder.error is not None:
            self._exchange.mark_partial(f"{self._side} body: {self._decoder.error}")


class ExchangeProgress:
    """One exchange on its way through a decoder, and the listener calls it is owed.

    The exchange ends (``listener.end``) once both the request and the response are complete, or when
    :meth:`end` is called with a reason. ``request`` is always delivered before ``response_start`` and
    ``end``: if the response (or the end) comes before the request is complete, the request is delivered
    early, as far as it got.
    """

    def __init__(self, exchange: HttpExchange, listener: GuardedListener, body_cap: int) -> None:
        self.exchange = exchange
        self._listener = listener
        self._body_cap = body_cap
        self._request_body = BodyCapture(exchange.request, exchange, body_cap, "request")
        self._response_body: BodyCapture | None = None
        self.request_delivered = False
        #: Hold the request back from the listener when it completes: it is delivered with the response head
        #: or the end instead (see the HTTP/2 decoder's reset-flood handling).
        self.defer_request = False
        self.request_complete = False
        self.response_complete = False
        self.ended = False

    def request_data(self, data: bytes | bytearray | memoryview) -> None:
        """A piece of the request body."""
        if not self.request_complete:
            self._request_body.feed(data)

    def request_skipped(self, count: int) -> bool:
        """``count`` request body bytes past the cap went by uncopied; False (nothing counted) unless the request
        body is still coming and already truncated (only then can the decoder's result not depend on them)."""
        if self.request_complete or not self._request_body.truncated:
            return False
        self._request_body.skip(count)
        return True

    def response_skipped(self, count: int) -> bool:
        """As :meth:`request_skipped`, for the response body."""
        body = self._response_body
        if body is None or self.response_complete or not body.truncated:
            return False
        body.skip(count)
        return True

    def request_done(self, trailers: Headers | None, now: int) -> None:
        """The request ended normally (after its body and trailers)."""
        if self.request_complete:
            return
        self._request_body.finish()
        if trailers:
            self.exchange.request.trailers = trailers
        self.exchange.timings.request_end = now
        self.request_complete = True
        if not self.defer_request:
            self.deliver_request()
        if self.response_complete:
            self.end()

    def request_cut(self, reason: str) -> None:
        """The request will not complete; the response may still come."""
        if self.request_complete:
            return
        self.exchange.mark_partial(reason)
        self.request_complete = True
        if not self.defer_request:
            self.deliver_request()
        if self.response_complete:
            self.end()

    def deliver_request(self) -> None:
        """Hand the request to the listener unless that was done already."""
        if not self.request_delivered:
            self.request_delivered = True
            self._listener.request(self.exchange)

    def response_head(self, response: HttpResponse, now: int) -> None:
        """The final (non-1xx) response head arrived."""
        if self.ended or self.exchange.response is not None:
            return
        self.exchange.response = response
        self.exchange.timings.response_headers = now
        self._response_body = BodyCapture(response, self.exchange, self._body_cap, "response")
        self.deliver_request()
        self._listener.response_start(self.exchange)

    def response_data(self, data: bytes | bytearray | memoryview, now: int) -> None:
        """A piece of the response body (transfer coding removed); delivered content-decoded."""
        body = self._response_body
        if body is None or self.response_complete or not data:
            return
        timings = self.exchange.timings
        if timings.response_first_byte is None:
            timings.response_first_byte = now
        out = body.feed(data)
        if out:
            timings.response_chunks.append((now, len(out)))
            self._listener.response_data(self.exchange, out)

    def response_done(self, trailers: Headers | None, now: int) -> None:
        """The response ended normally."""
        body = self._response_body
        if body is None or self.response_complete:
            return
        body.finish()
        if trailers:
            assert self.exchange.response is not None
            self.exchange.response.trailers = trailers
        self.exchange.timings.response_end = now
        self.response_complete = True
        if self.request_complete:
            self.end()

    def end(self, reason: str | None = None) -> None:
        """End the exchange (once); with a reason it is marked partial."""
        if self.ended:
            return
        if reason is not None:
            self.exchange.mark_partial(reason)
        self.ended = True
        self.deliver_request()
        self._listener.end(self.exchange)

    def end_cut(self, missing_response: str, missing_request: str) -> None:
        """End an exchange the connection can no longer complete, naming the half that is missing."""
        self.end(missing_response if not self.response_complete else missing_request)


class WebSocketProgress:
    """An exchange switched to WebSocket (HTTP/1.1 ``101``, or a 2xx to an HTTP/2 extended ``CONNECT``): one
    frame reader per direction, each message handed to the listener, the exchange ended once."""

    def __init__(self, progress: ExchangeProgress, listener: GuardedListener, response: HttpResponse,
                 body_cap: int, connection_id: str) -> None:
        self.progress = progress
        self._listener = listener
        self._connection_id = connection_id
        deflate = negotiated_deflate(response.headers)
        self.client = FrameReader("client", masked=True, cap=body_cap, deflate=deflate is not None,
                                  reset_context=deflate is not None and deflate.client_no_context_takeover)
        self.server = FrameReader("server", masked=False, cap=body_cap, deflate=deflate is not None,
                                  reset_context=deflate is not None and deflate.server_no_context_takeover)
        self.server_close_frame = False
        self._reported: set[str] = set()
        progress.exchange.websocket = True
        logger.debug("connection %s: switched to WebSocket%s", connection_id,
                     " (permessage-deflate)" if deflate is not None else "")

    def feed(self, reader: FrameReader, data: bytes, now: int) -> None:
        """Bytes of one direction (``reader`` is :attr:`client` or :attr:`server`)."""
        exchange = self.progress.exchange
        for message in reader.feed(data, now):
            if message.problem is not None or message.truncated:
                exchange.mark_partial(f"websocket {message.direction} message "
                                      f"{message.problem or 'truncated at cap'}")
            if message.opcode == OP_CLOSE and message.direction == "server":
                self.server_close_frame = True
            self._listener.websocket_message(exchange, message)
        if reader.error is not None and reader.error not in self._reported:
            self._reported.add(reader.error)
            logger.info("connection %s: malformed WebSocket traffic from the %s (%s); that direction is no "
                        "longer decoded", self._connection_id, reader.direction, reader.error)
            exchange.mark_partial(f"websocket {reader.direction} frames: {reader.error}")

    def end(self, now: int, reason: str | None = None) -> None:
        """The WebSocket is over (connection or stream ended): an unfinished message makes it partial."""
        if self.progress.ended:
            return
        exchange = self.progress.exchange
        for reader in (self.client, self.server):
            if reader.error is None and reader.in_message:
                exchange.mark_partial(f"connection closed inside a WebSocket {reader.direction} message")
        exchange.timings.response_end = now
        self.progress.end(reason)
