"""Passive HTTP/1.1 decoding with h11: :class:`Http1Decoder`.

Two h11 connections read the two directions. Client bytes go to an h11 *server* connection, which parses
requests; server bytes go to an h11 *client* connection, which parses responses.

Requests are parsed as fast as they arrive, independently of the responses: when one request is complete, the
bytes h11 holds after it (a pipelined request) seed a fresh server-role connection. h11 would otherwise pause
until our side "sent" a response, so pipelined requests would pile up in its buffer; a fresh connection per
request keeps request bodies streaming and reports each request as soon as it is complete. The one exception
is a request that may switch protocols (``Upgrade``, ``CONNECT``): what follows it is held until its response
says whether the connection still speaks HTTP/1.1.

Responses are matched to requests in order. The response parser is told about the request it is reading the
response for by replaying that request's head (body framing removed; the output is discarded) with h11's
``send()``, which is how h11 learns about ``HEAD`` (no body), ``CONNECT`` and ``Upgrade``. After each complete
response both sides are ``DONE`` and ``start_next_cycle()`` readies the parser for the next one. Informational
responses (``100 Continue``, ``103 Early Hints``) are skipped; a ``101`` (or a 2xx answer to ``CONNECT``) ends
the exchange and HTTP decoding: the connection then carries another protocol. When that protocol is WebSocket
(a ``101`` with ``Upgrade: websocket`` to a request that asked for it), the exchange stays open and the rest of
both directions is read as WebSocket frames (:mod:`oisp.http.websocket`), each message handed to the listener's
``websocket_message``; the exchange ends with the connection.

Most traffic is simpler than all that: a whole ``content-length`` request (or response) arriving in one piece.
Such a message is decoded directly, with h11's own grammar (its ABNF regular expressions, the same header
checks), without going through the h11 state machines; a message that is incomplete, or has anything the
direct way does not handle (chunked, ``Connection: close``, upgrades, HEAD, 1xx/204/304, HTTP/1.0, bare LF
line ends, folded lines, ...), goes to h11 as before. The response parser is therefore told about a request
(primed) only when h11 is about to read its response.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs
import h11

from oisp.http._progress import (
    CONNECTION_CLOSED_BEFORE_REQUEST,
    CONNECTION_CLOSED_BEFORE_RESPONSE,
    ExchangeProgress,
    GuardedListener,
    WebSocketProgress,
    check_body_cap,
    describe_protocol_error,
    make_headers,
)
from oisp.http.exchange import (
    DEFAULT_BODY_CAP,
    ConnectionInfo,
    ExchangeListener,
    Headers,
    HttpExchange,
    HttpRequest,
    HttpResponse,
)

__all__ = ["Http1Decoder"]

logger = logging.getLogger(__name__)

#: Largest request or response head accepted (h11's default of 16 KiB is tight for cookie-heavy clients).
MAX_HEAD_SIZE: Final = 64 * 1024
#: Bytes held after a request that may switch protocols, waiting for the server's answer.
_MAX_HELD_AFTER_UPGRADE: Final = 1024 * 1024
#: Server bytes held while no request is known to match them with (the two directions' copies may reach the
#: decoder slightly out of causal order; beyond this the server is not speaking HTTP to a request).
_MAX_UNSOLICITED: Final = 1024 * 1024

_BODY_FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding"})
# h11 exports this state at runtime but leaves it out of ``__all__``.
_MIGHT_SWITCH_PROTOCOL: Final = h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]


try:  # h11's own grammar, so the direct way accepts exactly what h11 would (it is not public API)
    from h11._abnf import header_field as _HEADER_FIELD
    from h11._abnf import request_line as _REQUEST_LINE
    from h11._abnf import status_line as _STATUS_LINE
except ImportError:  # pragma: no cover - a future h11 moved it: no direct way, h11 decodes everything
    _HEADER_FIELD = _REQUEST_LINE = _STATUS_LINE = "(?!)"  # matches nothing
try:  # h11's body readers, to skip body bytes past the cap (see ``_skip_body``; not public API either)
    from h11._readers import ChunkedReader as _CHUNKED_READER
    from h11._readers import ContentLengthReader as _LENGTH_READER
except ImportError:  # pragma: no cover - a future h11 moved them: skips end decoding, marked partial
    _CHUNKED_READER = _LENGTH_READER = None  # type: ignore[assignment,misc]
_HEADER_FIELD_RE: Final = re.compile(_HEADER_FIELD.encode("ascii"))
_REQUEST_LINE_RE: Final = re.compile(_REQUEST_LINE.encode("ascii"))
_STATUS_LINE_RE: Final = re.compile(_STATUS_LINE.encode("ascii"))
_CONTENT_LENGTH_RE: Final = re.compile(rb"[0-9]{1,20}")
#: Header fields the direct way declines (it leaves such messages to h11): framing and connection management.
_NOT_SIMPLE: Final = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


@attrs.frozen
class _SimpleHead:
    """A request head decoded the direct way (HTTP/1.1, kept alive, no upgrade): what h11 would need of it."""

    method: bytes
    target: bytes
    fields: list[tuple[bytes, bytes]]
    http_version: bytes = b"1.1"


@attrs.define
class _Pending:
    """An exchange whose response is not complete yet, with the request head its response parser needs."""

    progress: ExchangeProgress
    head: h11.Request | _SimpleHead


class Http1Decoder:
    """Passive decoder of one HTTP/1.x connection (keep-alive, pipelining, chunked, upgrades); see the module
    docstring for how it uses h11. Implements :class:`oisp.http.passive.PassiveDecoder`."""

    def __init__(
        self,
        connection: ConnectionInfo,
        listener: ExchangeListener,
        *,
        body_cap: int = DEFAULT_BODY_CAP,
    ) -> None:
        self._connection = connection
        self._listener = GuardedListener(listener)
        self._body_cap = check_body_cap(body_cap)
        self._scheme = "https" if connection.tls else "http"
        self._error: str | None = None
        self._stopped = False

        # Client -> server: requests.
        self._requests = _request_parser()
        self._client: Literal["reading", "held", "done"] = "reading"
        self._reading: ExchangeProgress | None = None
        self._request_start: int | None = None
        self._held = bytearray()
        self._client_eof = False

        # Server -> client: responses, in request order.
        self._responses = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._response_parser_primed = False
        self._unsolicited = 0
        self._server_eof = False
        self._websocket: WebSocketProgress | None = None

    @property
    def error(self) -> str | None:
        """Why decoding stopped early (malformed traffic); None while decoding is healthy."""
        return self._error

    # -- feeding -------------------------------------------------------------------------------------------

    def feed_client(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the client sent to the server."""
        if self._stopped or not data:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._websocket is not None:
            self._websocket.feed(self._websocket.client, data, now)
            return
        if self._client == "held":
            self._hold(data)
            return
        if self._client == "done":
            logger.debug("connection %s: ignoring %d client bytes after the last request",
                         self._connection.connection_id, len(data))
            return
        if self._reading is None and self._request_start is None and not self._client_eof:
            # Between requests, with a fresh request parser: whole simple requests need no h11.
            data = self._direct_requests(data, now)
            if not data:  # responses h11 already holds may now be read
                if self._response_parser_primed and not self._stopped:
                    self._drive(now)
                return
        if self._reading is None and self._request_start is None:
            self._request_start = now
        self._requests.receive_data(data)
        self._drive(now)

    def feed_server(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the server sent to the client."""
        if self._stopped or not data:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._websocket is not None:
            self._websocket.feed(self._websocket.server, data, now)
            return
        if self._pending and not self._response_parser_primed and self._client != "held" and self._responses_idle():
            data = self._direct_responses(data, now)
            if not data or self._stopped:
                return
        self._prime_response_parser()
        self._responses.receive_data(data)
        if not self._response_parser_primed:
            self._unsolicited += len(data)
            if self._unsolicited > _MAX_UNSOLICITED:
                self._fail("server sent data without a request to answer")
            return
        self._drive(now)

    def skip_client(self, count: int, now_ns: int | None = None) -> None:
        """``count`` bytes of the current request's body went by without being copied (past the body cap; see
        :mod:`oisp.proxy.body_skip`): counted in its size, never read. Where the body cannot have been
        truncated, or h11 is not inside it, decoding stops (the exchange is marked partial)."""
        if self._stopped:
            return
        reading = self._reading
        if not (self._websocket is None and self._client == "reading" and reading is not None
                and _skip_body(self._requests, count) and reading.request_skipped(count)):
            self._fail("request body bytes left out where they were needed")

    def skip_server(self, count: int, now_ns: int | None = None) -> None:
        """``count`` bytes of the current response's body went by without being copied (as :meth:`skip_client`)."""
        if self._stopped:
            return
        current = self._pending[0].progress if self._pending and self._response_parser_primed else None
        if not (self._websocket is None and current is not None and _skip_body(self._responses, count)
                and current.response_skipped(count)):
            self._fail("response body bytes left out where they were needed")

    def client_closed(self, now_ns: int | None = None) -> None:
        """The client finished sending; a request still incomplete is cut, its response may still come."""
        if self._stopped:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        self._client_eof = True
        if self._websocket is not None:
            if self._websocket.server_close_frame:
                self._websocket_end(now)
            return
        if self._client == "reading":
            self._requests.receive_data(b"")
            self._drive(now)

    def server_closed(self, now_ns: int | None = None) -> None:
        """The server finished sending: a close-delimited response ends, every other open exchange is cut."""
        if self._stopped:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        self._server_eof = True
        if self._websocket is not None:
            self._websocket_end(now)
            return
        self._prime_response_parser()
        self._responses.receive_data(b"")
        self._drive(now)
        if not self._stopped:
            self._end_all(CONNECTION_CLOSED_BEFORE_RESPONSE)
            self._stopped = True

    def abort(self, reason: str) -> None:
        """The connection died; every open exchange ends as partial with ``reason``."""
        if self._stopped:
            return
        if self._websocket is not None:
            self._websocket.progress.exchange.mark_partial(reason)
            self._websocket_end(time.monotonic_ns())
            return
        self._end_all(reason, reason)
        self._stopped = True

    # -- the two parsers -----------------------------------------------------------------------------------

    def _drive(self, now: int) -> None:
        """Run both parsers until neither can make progress (one side can unblock the other)."""
        while not self._stopped:
            progressed = self._pump_requests(now)
            if not self._stopped:
                progressed = self._pump_responses(now) or progressed
            if not progressed:
                return

    def _pump_requests(self, now: int) -> bool:
        progressed = False
        while self._client == "reading" and not self._stopped:
            try:
                event = self._requests.next_event()
            except h11.RemoteProtocolError as exc:
                self._request_error(exc)
                return progressed
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return progressed
            progressed = True
            if type(event) is h11.Data:
                if self._reading is not None:
                    self._reading.request_data(event.data)
            elif isinstance(event, h11.Request):
                self._on_request_head(event, now)
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end(event, now)
            elif isinstance(event, h11.ConnectionClosed):
                self._client = "done"
        return progressed

    def _request_error(self, exc: h11.RemoteProtocolError) -> None:
        if self._client_eof:
            self._client = "done"
            if self._reading is not None:
                reading, self._reading = self._reading, None
                reading.request_cut(CONNECTION_CLOSED_BEFORE_REQUEST)
            else:
                logger.debug("connection %s: client closed inside a request head",
                             self._connection.connection_id)
            return
        self._fail(f"malformed HTTP/1.1 request: {describe_protocol_error(exc)}")

    def _on_request_head(self, event: h11.Request, now: int) -> None:
        self._open_exchange(event.method, event.target, event.http_version, event.headers.raw_items(), event, now)

    def _open_exchange(self, method: bytes, raw_target: bytes, http_version: bytes,
                       fields: list[tuple[bytes, bytes]], head: h11.Request | _SimpleHead, now: int) -> None:
        headers = make_headers(fields)
        target = raw_target.decode("latin-1")
        scheme = self._scheme
        authority = headers.get("host")
        if target.startswith(("http://", "https://")):
            # Absolute form (a request to a plain HTTP proxy): keep origin form in ``target``.
            parts = urlsplit(target)
            scheme, authority = parts.scheme, parts.netloc or authority
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = HttpRequest(
            method=method.decode("latin-1"),
            target=target,
            authority=authority,
            scheme=scheme,
            http_version=http_version.decode("latin-1"),
            headers=headers,
        )
        exchange = HttpExchange(connection=self._connection, request=request)
        exchange.timings.request_start = now if self._request_start is None else self._request_start
        self._request_start = None
        progress = ExchangeProgress(exchange, self._listener, self._body_cap)
        self._reading = progress
        self._pending.append(_Pending(progress, head))
        if not self._responses_idle():  # server bytes wait for it: h11 reads them (else priming waits)
            self._prime_response_parser()

    def _responses_idle(self) -> bool:
        """Whether the response parser is between responses and holds no bytes (so it may stay unprimed)."""
        responses = self._responses
        return (responses.our_state is h11.IDLE and responses.their_state is h11.IDLE
                and not responses.trailing_data[0])

    # -- the direct way ------------------------------------------------------------------------------------

    def _direct_requests(self, data: bytes, now: int) -> bytes:
        """Decode the whole simple requests at the start of ``data``; returns the bytes left for h11."""
        while data:
            parsed = _simple_message(data, request=True)
            if parsed is None:
                return data
            first, fields, start, length = parsed
            match = _REQUEST_LINE_RE.fullmatch(first)
            if match is None or match["http_version"] != b"1.1" or match["method"] == b"CONNECT":
                return data
            method, target = match["method"], match["target"]
            self._open_exchange(method, target, b"1.1", fields, _SimpleHead(method, target, fields), now)
            reading, self._reading = self._reading, None
            assert reading is not None
            if length:
                reading.request_data(data[start:start + length])
            reading.request_done(None, now)
            data = data[start + length:]
            if self._stopped:
                return b""
        return data

    def _direct_responses(self, data: bytes, now: int) -> bytes:
        """Decode the whole simple responses at the start of ``data``; returns the bytes left for h11."""
        while data and self._pending and not self._stopped:
            head = self._pending[0].head
            if not _simple_request_head(head):
                return data
            parsed = _simple_message(data, request=False)
            if parsed is None:
                return data
            first, fields, start, length = parsed
            match = _STATUS_LINE_RE.fullmatch(first)
            if match is None or match["http_version"] != b"1.1":
                return data
            status = int(match["status_code"])
            if status < 200 or status in (204, 304):
                return data
            current = self._pending[0].progress
            reason = match["reason"]
            current.response_head(HttpResponse(status=status, reason=reason.decode("latin-1") if reason else "",
                                               http_version="1.1", headers=make_headers(fields)), now)
            if length:
                current.response_data(data[start:start + length], now)
            current.response_done(None, now)
            self._pending.popleft()
            data = data[start + length:]
        return data

    def _on_request_end(self, event: h11.EndOfMessage, now: int) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.request_done(make_headers(event.headers.raw_items()) if event.headers else None, now)
        state = self._requests.their_state
        if state is h11.DONE:
            self._next_request_parser(now)
        elif state is _MIGHT_SWITCH_PROTOCOL:
            self._client = "held"
        else:
            # MUST_CLOSE: the request said this is the last one (Connection: close, HTTP/1.0).
            self._client = "done"

    def _next_request_parser(self, now: int, extra: bytes = b"") -> None:
        data, _ = self._requests.trailing_data
        self._requests = _request_parser()
        self._client = "reading"
        data += extra
        if data:
            self._requests.receive_data(data)
            self._request_start = now
        if self._client_eof:
            self._requests.receive_data(b"")

    def _hold(self, data: bytes) -> None:
        if len(self._held) + len(data) > _MAX_HELD_AFTER_UPGRADE:
            logger.info("connection %s: too much client data while waiting for an upgrade decision; "
                        "no more requests are decoded", self._connection.connection_id)
            self._client = "done"
            self._held = bytearray()
            return
        self._held += data

    def _prime_response_parser(self) -> None:
        """Tell the response parser which request it reads the response to, when it is free to."""
        if self._response_parser_primed or not self._pending:
            return
        responses = self._responses
        if responses.our_state is not h11.IDLE or responses.their_state is not h11.IDLE:
            return  # the previous response closed the connection: no more responses will be parsed
        head = self._pending[0].head
        raw_fields = head.headers.raw_items() if isinstance(head, h11.Request) else head.fields
        fields = [(name, value) for name, value in raw_fields if name.lower() not in _BODY_FRAMING_FIELDS]
        if head.http_version != b"1.1":
            # h11 only writes HTTP/1.1; an HTTP/1.0 request is replayed as its 1.1 equivalent.
            fields.append((b"connection", b"close"))
            if b"host" not in (name.lower() for name, _ in fields):
                fields.append((b"host", b"unknown"))
        try:
            responses.send(h11.Request(method=head.method, target=head.target, headers=fields))
            responses.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            self._fail(f"cannot follow HTTP/1.1 request: {describe_protocol_error(exc)}")
            return
        self._response_parser_primed = True
        self._unsolicited = 0

    def _pump_responses(self, now: int) -> bool:
        progressed = False
        while self._response_parser_primed and not self._stopped:
            try:
                event = self._responses.next_event()
            except h11.RemoteProtocolError as exc:
                if self._server_eof:
                    self._fail_open(CONNECTION_CLOSED_BEFORE_RESPONSE)
                else:
                    self._fail(f"malformed HTTP/1.1 response: {describe_protocol_error(exc)}")
                return progressed
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return progressed
            progressed = True
            current = self._pending[0].progress
            if type(event) is h11.Data:  # the hot path first
                current.response_data(event.data, now)
            elif isinstance(event, h11.InformationalResponse):
                if self._responses.their_state is h11.SWITCHED_PROTOCOL:
                    self._switched(current, _response(event), now)
                else:
                    logger.debug("connection %s: skipping informational response %d",
                                 self._connection.connection_id, event.status_code)
            elif isinstance(event, h11.Response):
                if self._responses.their_state is h11.SWITCHED_PROTOCOL:
                    self._switched(current, _response(event), now)
                else:
                    current.response_head(_response(event), now)
            elif isinstance(event, h11.EndOfMessage):
                self._on_response_end(current, event, now)
            elif isinstance(event, h11.ConnectionClosed):
                return progressed
        return progressed

    def _on_response_end(self, current: ExchangeProgress, event: h11.EndOfMessage, now: int) -> None:
        current.response_done(make_headers(event.headers.raw_items()) if event.headers else None, now)
        self._pending.popleft()
        self._response_parser_primed = False
        if self._client == "held" and self._requests.their_state is _MIGHT_SWITCH_PROTOCOL:
            # The server declined the protocol switch: what the client sent next is HTTP/1.1 again.
            held, self._held = bytes(self._held), bytearray()
            self._next_request_parser(now, held)
        if self._responses.our_state is h11.DONE and self._responses.their_state is h11.DONE:
            self._responses.start_next_cycle()
            self._prime_response_parser()

    def _switched(self, current: ExchangeProgress, response: HttpResponse, now: int) -> None:
        if response.status == 101 and self._client == "held" and len(self._pending) == 1 \
                and _asks_websocket(current.exchange.request.headers) and _asks_websocket(response.headers):
            self._start_websocket(current, response, now)
            return
        current.response_head(response, now)
        current.response_done(None, now)
        current.end("protocol switched before request complete")
        logger.debug("connection %s: protocol switched (%d); HTTP decoding stops",
                     self._connection.connection_id, response.status)
        self._end_all(CONNECTION_CLOSED_BEFORE_RESPONSE)
        self._stopped = True

    # -- WebSocket ---------------------------------------------------------------------------------------------

    def _start_websocket(self, current: ExchangeProgress, response: HttpResponse, now: int) -> None:
        """Read the rest of the connection as WebSocket frames, on behalf of ``current`` (which stays open)."""
        current.response_head(response, now)
        websocket = WebSocketProgress(current, self._listener, response, self._body_cap,
                                      self._connection.connection_id)
        client_bytes = self._requests.trailing_data[0] + bytes(self._held)
        server_bytes = self._responses.trailing_data[0]
        self._held = bytearray()
        self._pending.clear()
        self._reading = None
        self._response_parser_primed = False
        self._client = "done"
        self._websocket = websocket
        if client_bytes:
            websocket.feed(websocket.client, client_bytes, now)
        if server_bytes:
            websocket.feed(websocket.server, server_bytes, now)
        if self._client_eof:
            self.client_closed(now)

    def _websocket_end(self, now: int) -> None:
        websocket, self._websocket = self._websocket, None
        self._stopped = True
        if websocket is not None:
            websocket.end(now)

    # -- ending ----------------------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Malformed traffic: open exchanges end as partial, decoding of this connection stops."""
        logger.warning("connection %s: %s; HTTP decoding of this connection stops",
                       self._connection.connection_id, reason)
        self._error = reason
        self._end_all(reason, reason)
        self._stopped = True

    def _fail_open(self, reason: str) -> None:
        """The connection ended mid-message: open exchanges end as partial, decoding stops (not an error)."""
        self._end_all(reason)
        self._stopped = True

    def _end_all(self, missing_response: str, missing_request: str = CONNECTION_CLOSED_BEFORE_REQUEST) -> None:
        open_exchanges = [pending.progress for pending in self._pending]
        if self._reading is not None and self._reading not in open_exchanges:
            open_exchanges.append(self._reading)
        self._pending.clear()
        self._reading = None
        for progress in open_exchanges:
            progress.end_cut(missing_response, missing_request)


def _simple_message(data: bytes, *, request: bool) -> tuple[bytes, list[tuple[bytes, bytes]], int, int] | None:
    """(start line, header fields, body offset, body length) of the whole simple message at the start of
    ``data``, or None when there is none: the head (CRLF line ends only, at most MAX_HEAD_SIZE) and its
    ``content-length`` body must be complete, every header line must match h11's grammar, and the fields must
    say nothing about framing or the connection beyond one ``content-length`` and ``connection: keep-alive``
    (a request needs exactly one ``host``, a response a ``content-length``)."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE)
    if end < 0:
        return None
    head = data[:end]
    if head.count(b"\n") != head.count(b"\r\n"):
        return None
    lines = head.split(b"\r\n")
    fields: list[tuple[bytes, bytes]] = []
    length: int | None = None
    hosts = 0
    for line in lines[1:]:
        match = _HEADER_FIELD_RE.fullmatch(line)
        if match is None:
            return None
        name, value = match["field_name"], match["field_value"]
        fields.append((name, value))
        lname = name.lower()
        if lname == b"content-length":
            if length is not None or _CONTENT_LENGTH_RE.fullmatch(value) is None:
                return None
            length = int(value)
        elif lname == b"host":
            hosts += 1
        elif lname == b"connection":
            if value.lower() != b"keep-alive":
                return None
        elif lname in _NOT_SIMPLE:
            return None
    if request:
        if hosts != 1:
            return None
        length = length or 0
    elif length is None:
        return None
    start = end + 4
    if len(data) - start < length:
        return None
    return lines[0], fields, start, length


def _skip_body(parser: h11.Connection, count: int) -> bool:
    """Advance h11's reader of a ``content-length`` body or a chunk's data by ``count`` bytes it will not see;
    False (nothing changed) unless it is inside such a body with more than ``count`` bytes left to read and
    nothing buffered. h11 has no public way to do this: its reader's state is used, checked for its type."""
    if parser.their_state is not h11.SEND_BODY or _LENGTH_READER is None or _CHUNKED_READER is None:
        return False
    reader: Any = getattr(parser, "_reader", None)
    buffered: Any = getattr(parser, "_receive_buffer", None)
    if buffered is None or len(buffered):
        return False
    if type(reader) is _LENGTH_READER:
        if reader._remaining > count:
            reader._remaining -= count
            return True
    elif (type(reader) is _CHUNKED_READER and not reader._reading_trailer and not reader._bytes_to_discard
            and reader._bytes_in_chunk > count):
        reader._bytes_in_chunk -= count
        return True
    return False


def _simple_request_head(head: h11.Request | _SimpleHead) -> bool:
    """Whether a response to this request is framed like any other (not HEAD, not CONNECT, no upgrade, HTTP/1.1
    kept alive), so a simple response to it may be decoded the direct way."""
    if head.http_version != b"1.1" or head.method in (b"HEAD", b"CONNECT"):
        return False
    if isinstance(head, _SimpleHead):
        return True
    for name, value in head.headers:  # h11 lower-cases the names
        if name in (b"upgrade", b"connection") and (name == b"upgrade" or b"close" in value.lower()):
            return False
    return True


def _asks_websocket(headers: Headers) -> bool:
    """Whether a head's ``Upgrade`` field names WebSocket."""
    return any(token.strip().lower() == "websocket" for value in headers.get_all("upgrade")
               for token in value.split(","))


def _request_parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)


def _response(event: h11.Response | h11.InformationalResponse) -> HttpResponse:
    return HttpResponse(
        status=event.status_code,
        reason=event.reason.decode("latin-1"),
        http_version=event.http_version.decode("latin-1"),
        headers=make_headers(event.headers.raw_items()),
    )
