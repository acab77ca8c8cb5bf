"""Helpers for transcript-style decoder tests: a recording listener, connection facts, real HTTP/2 bytes."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import h2.config
import h2.connection
import h2.events

from oisp.http import ConnectionInfo, HttpExchange, make_decoder
from oisp.http.passive import PassiveDecoder

Direction = Literal["client", "server"]
Wire = list[tuple[Direction, bytes]]


def connection(*, tls: bool = True, alpn: str | None = "http/1.1") -> ConnectionInfo:
    return ConnectionInfo(
        connection_id="c1",
        client_addr=("127.0.0.1", 50000),
        server_addr=("203.0.113.5", 443),
        sni="api.example.com",
        alpn=alpn,
        tls=tls,
    )


class Recorder:
    """An ExchangeListener that records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bytes]] = []
        self.exchanges: list[HttpExchange] = []

    def request(self, exchange: HttpExchange) -> None:
        self.calls.append(("request", exchange.exchange_id, b""))
        self.exchanges.append(exchange)

    def response_start(self, exchange: HttpExchange) -> None:
        self.calls.append(("response_start", exchange.exchange_id, b""))

    def response_data(self, exchange: HttpExchange, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.calls.append(("response_data", exchange.exchange_id, data))

    def end(self, exchange: HttpExchange) -> None:
        self.calls.append(("end", exchange.exchange_id, b""))

    def kinds(self, exchange: HttpExchange) -> list[str]:
        """The call kinds one exchange got, consecutive response_data calls collapsed."""
        kinds: list[str] = []
        for kind, exchange_id, _ in self.calls:
            if exchange_id == exchange.exchange_id and not (kinds and kinds[-1] == kind == "response_data"):
                kinds.append(kind)
        return kinds

    def delivered(self, exchange: HttpExchange) -> bytes:
        return b"".join(d for k, i, d in self.calls if k == "response_data" and i == exchange.exchange_id)

    def assert_contract(self) -> None:
        """Every exchange: request once, first; response_start at most once; end exactly once, last."""
        for exchange in self.exchanges:
            kinds = [k for k, i, _ in self.calls if i == exchange.exchange_id]
            assert kinds[0] == "request", kinds
            assert kinds.count("request") == 1, kinds
            assert kinds.count("response_start") <= 1, kinds
            assert kinds.count("end") == 1, kinds
            assert kinds[-1] == "end", kinds
            if "response_data" in kinds:
                assert kinds.index("response_start") < kinds.index("response_data")
            assert self.delivered(exchange) == bytes(exchange.response.body if exchange.response else b"")


def summary(exchange: HttpExchange) -> dict[str, Any]:
    """Everything about an exchange except its id and timings, for comparisons."""
    request, response = exchange.request, exchange.response
    return {
        "stream_id": exchange.stream_id,
        "partial": exchange.partial,
        "reasons": list(exchange.partial_reasons),
        "request": (request.method, request.target, request.authority, request.scheme, request.http_version,
                    list(request.headers), bytes(request.body), request.wire_size, request.truncated,
                    list(request.trailers) if request.trailers is not None else None),
        "response": None if response is None else (
            response.status, response.reason, response.http_version, list(response.headers),
            bytes(response.body), response.wire_size, response.truncated,
            list(response.trailers) if response.trailers is not None else None),
    }


class Clock:
    def __init__(self) -> None:
        self._ticks = itertools.count(1_000)

    def __call__(self) -> int:
        return next(self._ticks)


def run(
    wire: Iterable[tuple[str, bytes]],
    *,
    alpn: str | None = "http/1.1",
    body_cap: int | None = None,
    close: Sequence[Literal["client", "server"]] = (),
    tls: bool = True,
) -> tuple[Recorder, PassiveDecoder]:
    """Feed a transcript to a fresh decoder; then close the given directions, in order."""
    recorder = Recorder()
    kwargs = {} if body_cap is None else {"body_cap": body_cap}
    decoder = make_decoder(alpn, connection(tls=tls, alpn=alpn), recorder, **kwargs)
    clock = Clock()
    for direction, data in wire:
        if direction == "client":
            decoder.feed_client(data, clock())
        else:
            decoder.feed_server(data, clock())
    for direction in close:
        if direction == "client":
            decoder.client_closed(clock())
        else:
            decoder.server_closed(clock())
    return recorder, decoder


def split_wire(wire: Wire, cuts: Sequence[int]) -> Wire:
    """The same transcript with every message cut at the given relative positions (0..1000 per mille)."""
    out: Wire = []
    cut_iter = itertools.cycle(cuts or [0])
    for direction, data in wire:
        points = sorted({next(cut_iter) * len(data) // 1000 for _ in range(3)} - {0, len(data)})
        start = 0
        for point in [*points, len(data)]:
            out.append((direction, data[start:point]))
            start = point
    return out


def coalesce(wire: Wire) -> Wire:
    """Consecutive pieces of one direction merged (the decoder must not care)."""
    out: Wire = []
    for direction, data in wire:
        if out and out[-1][0] == direction:
            out[-1] = (direction, out[-1][1] + data)
        else:
            out.append((direction, data))
    return out


class H2Pair:
    """A real h2 client and server talking in memory; every byte either sends is recorded in ``wire``."""

    def __init__(
        self,
        *,
        client_settings: dict[int, int] | None = None,
        server_settings: dict[int, int] | None = None,
    ) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.wire: Wire = []
        self.server_events: list[h2.events.Event] = []
        self.client_events: list[h2.events.Event] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        # Changed settings take effect in h2 only once acknowledged, so they go in a second SETTINGS frame.
        if client_settings:
            self.client.update_settings(client_settings)
        if server_settings:
            self.server.update_settings(server_settings)

    def flush(self, *, only: Direction | None = None) -> None:
        """Deliver pending bytes both ways until both are quiet (or only one way)."""
        while True:
            moved = False
            if only in (None, "client"):
                data = self.client.data_to_send()
                if data:
                    moved = True
                    self.wire.append(("client", data))
                    self.server_events += self._receive(self.server, data)
            if only in (None, "server"):
                data = self.server.data_to_send()
                if data:
                    moved = True
                    self.wire.append(("server", data))
                    self.client_events += self._receive(self.client, data)
            if not moved:
                return

    @staticmethod
    def _receive(conn: h2.connection.H2Connection, data: bytes) -> list[h2.events.Event]:
        events = conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id in conn.streams:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return events

    def request(
        self,
        path: str = "/v1/chat",
        *,
        method: str = "POST",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        trailers: Sequence[tuple[str, str]] = (),
        end: bool = True,
    ) -> int:
        stream_id: int = self.client.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":authority", "api.example.com"), (":scheme", "https"),
                  *headers]
        end_on_headers = end and not body and not trailers
        self.client.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in fields],
                                 end_stream=end_on_headers)
        if body:
            self.send_body(self.client, stream_id, body, end=end and not trailers)
        if trailers:
            self.client.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
        return stream_id

    def respond(
        self,
        stream_id: int,
        *,
        status: int = 200,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        trailers: Sequence[tuple[str, str]] = (),
        end: bool = True,
    ) -> None:
        fields = [(":status", str(status)), *headers]
        self.server.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in fields],
                                 end_stream=end and not body and not trailers)
        if body:
            self.send_body(self.server, stream_id, body, end=end and not trailers)
        if trailers:
            self.server.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)

    def send_body(
        self, conn: h2.connection.H2Connection, stream_id: int, body: bytes, *, end: bool, pad: int | None = None
    ) -> None:
        view = memoryview(body)
        while view:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if pad is not None:
                window -= pad + 1
            if window <= 0:
                self.flush()
                continue
            piece, view = view[:window], view[window:]
            conn.send_data(stream_id, bytes(piece), end_stream=end and not view, pad_length=pad)
        if not body and end:
            conn.end_stream(stream_id)
