"""What the proxy saw of one HTTP request/response pair: :class:`HttpExchange` and its parts.

Exchanges are built incrementally by the passive decoders (:mod:`oisp.http.h1`, :mod:`oisp.http.h2`) and handed
to an :class:`ExchangeListener` as they progress: request complete, response head, each response body chunk,
end. Bodies are stored content-decoded (gzip, deflate, br, zstd removed) and capped; what was cut is recorded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from oisp.events import Actor, App, ProcessInfo

__all__ = [
    "DEFAULT_BODY_CAP",
    "ConnectionInfo",
    "ExchangeListener",
    "ExchangeTimings",
    "Headers",
    "HttpExchange",
    "HttpRequest",
    "HttpResponse",
]

#: Default cap of a captured (decoded) body: 16 MiB per message.
DEFAULT_BODY_CAP = 16 * 1024 * 1024

_exchange_ids = itertools.count(1)


@attrs.define
class Headers:
    """HTTP header fields in wire order; names compared case-insensitively, duplicates kept."""

    fields: list[tuple[str, str]] = attrs.field(factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        lname = name.lower()
        size = len(lname)
        for key, value in self.fields:
            # An ASCII name of another length cannot match: most fields are passed without lower-casing them.
            if (len(key) == size or not key.isascii()) and key.lower() == lname:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        lname = name.lower()
        size = len(lname)
        return [value for key, value in self.fields
                if (len(key) == size or not key.isascii()) and key.lower() == lname]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


@attrs.define
class ConnectionInfo:
    """Facts about the client connection an exchange travelled on."""

    connection_id: str
    client_addr: tuple[str, int]
    #: Where the client meant to connect (original destination in transparent mode, CONNECT target, ...).
    server_addr: tuple[str, int]
    mode: str = "explicit"
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    #: True when TLS was terminated by the proxy (False for plain HTTP such as Ollama).
    tls: bool = False
    process: ProcessInfo | None = None
    actor: Actor | None = None
    app: App | None = None
    #: The provider the endpoint table names for this destination (``openai``), if it is an AI endpoint.
    provider: str | None = None


@attrs.define
class ExchangeTimings:
    """Monotonic timestamps (``time.monotonic_ns()``) of an exchange's milestones; None until reached."""

    #: When the first byte of the request was fed (HTTP/2: its HEADERS frame).
    request_start: int | None = None
    #: When the request was complete (last body byte, trailers, END_STREAM).
    request_end: int | None = None
    #: When the final (non-1xx) response head was complete.
    response_headers: int | None = None
    #: When the first byte of the response *body* arrived (time to first token); None for an empty body.
    response_first_byte: int | None = None
    #: When the response was complete.
    response_end: int | None = None
    #: (timestamp, decoded size) of each response body chunk as it arrived.
    response_chunks: list[tuple[int, int]] = attrs.field(factory=list)


@attrs.define
class HttpRequest:
    """A request head and its (decoded, capped) body."""

    method: str
    target: str
    authority: str | None
    scheme: str
    http_version: str
    headers: Headers
    body: bytearray = attrs.field(factory=bytearray)
    #: Body bytes seen on the wire (after transfer coding, before content decoding), including cut ones.
    wire_size: int = 0
    truncated: bool = False
    #: HTTP/2 trailers, or HTTP/1.1 chunked trailers.
    trailers: Headers | None = None
    #: HTTP/2 extended CONNECT (RFC 8441): the ``:protocol`` pseudo-header (``websocket``); None otherwise.
    protocol: str | None = None

    @property
    def asks_websocket(self) -> bool:
        """Whether the request opens a WebSocket: an HTTP/1.1 ``GET`` with ``Upgrade: websocket``, or an HTTP/2
        extended ``CONNECT`` with ``:protocol`` ``websocket`` (RFC 8441)."""
        if self.method == "CONNECT":
            return (self.protocol or "").lower() == "websocket"
        return self.method == "GET" and any(token.strip().lower() == "websocket"
                                            for value in self.headers.get_all("upgrade") for token in value.split(","))

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        """The query string of the target (without ``?``), or ``""``."""
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def url(self) -> str:
        """``scheme://authority/target``."""
        return f"{self.scheme}://{self.authority or ''}{self.target}"


@attrs.define
class HttpResponse:
    """A response head and its (decoded, capped) body."""

    status: int
    reason: str
    http_version: str
    headers: Headers
    body: bytearray = attrs.field(factory=bytearray)
    wire_size: int = 0
    truncated: bool = False
    trailers: Headers | None = None


@attrs.define
class HttpExchange:
    """One request and its response, with connection facts, timings, and what was incomplete."""

    connection: ConnectionInfo
    request: HttpRequest
    response: HttpResponse | None = None
    timings: ExchangeTimings = attrs.field(factory=ExchangeTimings)
    #: HTTP/2 stream id; None for HTTP/1.
    stream_id: int | None = None
    #: Set when the exchange did not complete normally (reset, truncated, connection closed early...).
    partial: bool = False
    partial_reasons: list[str] = attrs.field(factory=list)
    exchange_id: int = attrs.field(factory=lambda: next(_exchange_ids))
    #: True once a ``101`` switched the connection to the WebSocket protocol (messages follow; see
    #: :class:`ExchangeListener`).
    websocket: bool = False

    def mark_partial(self, reason: str) -> None:
        """Record that the exchange is incomplete, and why (reasons are kept in order, once each)."""
        self.partial = True
        if reason not in self.partial_reasons:
            self.partial_reasons.append(reason)


class ExchangeListener(Protocol):
    """Receives an exchange as it progresses. Calls for one exchange come in this order:
    ``request`` once, ``response_start`` at most once, ``response_data`` for each body chunk, ``end`` once.

    ``end`` is called for every exchange that got a ``request`` call, also when it was cut short (then
    ``exchange.partial`` is set). Listener errors must not escape: decoders call listeners on the proxy's copy
    of the traffic, and a failing listener never affects forwarding.

    WebSockets: a listener may also have a method ``websocket_message(exchange, message)`` (optional; decoders
    look it up with ``getattr``). After a ``101`` to ``Upgrade: websocket`` the exchange stays open: the
    decoder calls ``response_start``, then ``websocket_message`` with each
    :class:`~oisp.http.websocket.WebSocketMessage` of either direction in the order they completed, then
    ``end`` when the connection ends (``exchange.websocket`` is True for such an exchange). An HTTP/2 extended
    ``CONNECT`` (RFC 8441) answered 2xx works the same way, on its stream.
    """

    def request(self, exchange: HttpExchange) -> None: ...

    def response_start(self, exchange: HttpExchange) -> None: ...

    def response_data(self, exchange: HttpExchange, data: bytes) -> None: ...

    def end(self, exchange: HttpExchange) -> None: ...
