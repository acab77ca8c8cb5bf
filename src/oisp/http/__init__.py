"""Sans-io HTTP: the :class:`HttpExchange` model and passive HTTP/1.1 and HTTP/2 decoders.

:func:`make_decoder` picks the decoder for a connection; the proxy feeds it a copy of both directions and an
:class:`ExchangeListener` receives each exchange as it progresses (and, after an upgrade to WebSocket, each
:class:`WebSocketMessage`).
"""

from oisp.http.encoding import ContentDecoder
from oisp.http.exchange import (
    DEFAULT_BODY_CAP,
    ConnectionInfo,
    ExchangeListener,
    ExchangeTimings,
    Headers,
    HttpExchange,
    HttpRequest,
    HttpResponse,
)
from oisp.http.h1 import Http1Decoder
from oisp.http.h2 import Http2Decoder
from oisp.http.passive import PassiveDecoder, make_decoder
from oisp.http.websocket import WebSocketMessage

__all__ = [
    "DEFAULT_BODY_CAP",
    "ConnectionInfo",
    "ContentDecoder",
    "ExchangeListener",
    "ExchangeTimings",
    "Headers",
    "Http1Decoder",
    "Http2Decoder",
    "HttpExchange",
    "HttpRequest",
    "HttpResponse",
    "PassiveDecoder",
    "WebSocketMessage",
    "make_decoder",
]
