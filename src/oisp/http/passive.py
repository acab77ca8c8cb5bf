"""The shape every passive HTTP decoder has (:class:`PassiveDecoder`) and the choice of one (:func:`make_decoder`).

A passive decoder is fed a *copy* of both directions of one connection, as the proxy relays them, and reports
the HTTP exchanges it sees to an :class:`~oisp.http.exchange.ExchangeListener`. It never touches a socket,
never raises into its caller because of what is on the wire (bad traffic ends the open exchanges as partial and
stops decoding of that connection), and never slows the relay down: the relay does not depend on it.
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

from oisp.http._progress import check_body_cap
from oisp.http.exchange import DEFAULT_BODY_CAP, ConnectionInfo, ExchangeListener
from oisp.http.h1 import Http1Decoder
from oisp.http.h2 import DEFAULT_MAX_TABLE_SIZE, H2_CLIENT_PREFACE, Http2Decoder

__all__ = ["PassiveDecoder", "make_decoder"]


class PassiveDecoder(Protocol):
    """Decodes HTTP exchanges from a copy of one connection's traffic, sans-io.

    Every method takes the bytes (or the event) and an optional monotonic timestamp ``now_ns``
    (``time.monotonic_ns()`` when omitted) that fills the exchanges' :class:`~oisp.http.exchange.ExchangeTimings`.
    None of them raises because of the traffic; after :attr:`error` is set, or the protocol was switched, or
    the connection ended, further calls are ignored. Empty ``data`` is ignored too: the end of a direction is
    signalled by :meth:`client_closed` / :meth:`server_closed`, never by ``b""``.

    Bodies: ``request.body`` / ``response.body`` hold the content-decoded bytes up to the body cap. Past the
    cap nothing more is decoded, stored or delivered (``response_data`` stops), ``wire_size`` keeps counting,
    and the message gets ``truncated=True`` and the exchange the partial reason "<side> body truncated at cap".
    So the chunks a listener receives always add up to ``response.body``.
    """

    @property
    def error(self) -> str | None:
        """Why decoding stopped early (malformed traffic); None while decoding is healthy."""
        ...

    def feed_client(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the client sent to the server."""
        ...

    def feed_server(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the server sent to the client."""
        ...

    def client_closed(self, now_ns: int | None = None) -> None:
        """The client finished sending (EOF or half-close of the client-to-server direction)."""
        ...

    def server_closed(self, now_ns: int | None = None) -> None:
        """The server finished sending; exchanges still waiting for their response end as partial."""
        ...

    def abort(self, reason: str) -> None:
        """The connection died; every open exchange ends as partial with ``reason``."""
        ...


def make_decoder(
    alpn: str | None,
    connection: ConnectionInfo,
    listener: ExchangeListener,
    *,
    body_cap: int = DEFAULT_BODY_CAP,
    max_table_size: int = DEFAULT_MAX_TABLE_SIZE,
) -> PassiveDecoder:
    """The passive decoder for a connection whose negotiated ALPN protocol is ``alpn``.

    ``"h2"`` gives an HTTP/2 decoder and ``"http/1.1"``/``"http/1.0"`` an HTTP/1.1 one. Without ALPN (plain
    TCP, or TLS without ALPN) or with a protocol oisp does not know, the first client bytes decide: the HTTP/2
    connection preface (prior knowledge, as gRPC without TLS uses) selects HTTP/2, anything else HTTP/1.1.

    ``body_cap`` bounds each stored (content-decoded) body; an invalid one raises
    :class:`~oisp.errors.ConfigurationError` here, never later while feeding. ``max_table_size`` caps the
    HPACK table an HTTP/2 decoder mirrors (see :class:`~oisp.http.h2.Http2Decoder`).
    """
    check_body_cap(body_cap)
    if alpn == "h2":
        return Http2Decoder(connection, listener, body_cap=body_cap, max_table_size=max_table_size)
    if alpn in ("http/1.1", "http/1.0"):
        return Http1Decoder(connection, listener, body_cap=body_cap)
    return _PrefaceSniffingDecoder(connection, listener, body_cap=body_cap, max_table_size=max_table_size)


_Op = tuple[Literal["client", "server", "client_closed", "server_closed"], bytes, int]


class _PrefaceSniffingDecoder:
    """Holds the first bytes until the client shows whether it speaks HTTP/2 (prior knowledge) or HTTP/1.x,
    then replays them, in their original order and with their original timestamps, into the chosen decoder."""

    def __init__(self, connection: ConnectionInfo, listener: ExchangeListener, *, body_cap: int,
                 max_table_size: int = DEFAULT_MAX_TABLE_SIZE) -> None:
        self._connection = connection
        self._listener = listener
        self._body_cap = body_cap
        self._max_table_size = max_table_size
        self._inner: PassiveDecoder | None = None
        self._client_head = b""
        self._held: list[_Op] = []

    @property
    def error(self) -> str | None:
        """Why decoding stopped early; None while healthy."""
        return self._inner.error if self._inner is not None else None

    def feed_client(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the client sent to the server."""
        if self._inner is not None:
            self._inner.feed_client(data, now_ns)
            return
        self._held.append(("client", data, _now(now_ns)))
        self._client_head += data[: len(H2_CLIENT_PREFACE)]
        head = self._client_head[: len(H2_CLIENT_PREFACE)]
        if head != H2_CLIENT_PREFACE[: len(head)]:
            self._choose(http2=False)
        elif len(head) == len(H2_CLIENT_PREFACE):
            self._choose(http2=True)

    def feed_server(self, data: bytes, now_ns: int | None = None) -> None:
        """Bytes the server sent to the client. An HTTP server never speaks first, so this settles on HTTP/1.1."""
        if self._inner is None:
            self._held.append(("server", data, _now(now_ns)))
            self._choose(http2=False)
        else:
            self._inner.feed_server(data, now_ns)

    def client_closed(self, now_ns: int | None = None) -> None:
        """The client finished sending."""
        if self._inner is None:
            self._held.append(("client_closed", b"", _now(now_ns)))
            self._choose(http2=False)
        else:
            self._inner.client_closed(now_ns)

    def server_closed(self, now_ns: int | None = None) -> None:
        """The server finished sending."""
        if self._inner is None:
            self._held.append(("server_closed", b"", _now(now_ns)))
            self._choose(http2=False)
        else:
            self._inner.server_closed(now_ns)

    def abort(self, reason: str) -> None:
        """The connection died."""
        if self._inner is None:
            self._choose(http2=False)
        assert self._inner is not None
        self._inner.abort(reason)

    def _choose(self, *, http2: bool) -> None:
        inner: PassiveDecoder
        if http2:
            inner = Http2Decoder(self._connection, self._listener, body_cap=self._body_cap,
                                 max_table_size=self._max_table_size)
        else:
            inner = Http1Decoder(self._connection, self._listener, body_cap=self._body_cap)
        self._inner = inner
        held, self._held = self._held, []
        for kind, data, now in held:
            if kind == "client":
                inner.feed_client(data, now)
            elif kind == "server":
                inner.feed_server(data, now)
            elif kind == "client_closed":
                inner.client_closed(now)
            else:
                inner.server_closed(now)


def _now(now_ns: int | None) -> int:
    return time.monotonic_ns() if now_ns is None else now_ns
