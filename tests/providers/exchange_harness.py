"""Drive a provider decoder with a hand-built :class:`HttpExchange`, as the proxy would, and check its events.

``run_exchange`` builds the exchange (request complete, response head, body in the chunks given, end), asks the
real plugin manager which decoder claims it, feeds it and returns every event, each passed through
``spec_gaps.conform`` (as the pipeline does). ``assert_schema_valid`` validates them all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from tests.oisp_schema import SchemaValidator

from oisp.endpoints import EndpointTable
from oisp.event_decoder import EventDecoder
from oisp.events import Event
from oisp.events.spec_gaps import conform
from oisp.hookspecs import ExchangeDecoder
from oisp.http.exchange import ConnectionInfo, Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.plugins import create_plugin_manager
from oisp.provider_kit import DecoderContext

_PLUGINS = create_plugin_manager(entrypoints=False)
_TABLE = EndpointTable(_PLUGINS.endpoints())
_ROUTER = EventDecoder(_PLUGINS, lambda event: None)


def new_run() -> DecoderContext:
    """Start a new decoding run (tool calls, Replicate predictions... of earlier exchanges forgotten); its
    context. ``tests/providers/conftest.py`` starts one per test."""
    global _ROUTER
    _ROUTER = EventDecoder(_PLUGINS, lambda event: None)
    return _ROUTER.context


def make_exchange(method: str, url: str, body: bytes | dict[str, Any] | list[Any] | None = None, *,
                  headers: Sequence[tuple[str, str]] = (), provider: str | None = None,
                  connection_id: str = "c1") -> HttpExchange:
    """An exchange whose request is complete; ``provider`` defaults to what the endpoint table says."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or ""
    if provider is None:
        spec = _TABLE.match(host, port)
        provider = spec.provider if spec else None
    raw = json.dumps(body).encode() if isinstance(body, dict | list) else (body or b"")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc
    request = HttpRequest(method=method, target=target, authority=authority, scheme=parts.scheme,
                          http_version="1.1", headers=Headers([("host", authority), *headers]),
                          body=bytearray(raw), wire_size=len(raw))
    connection = ConnectionInfo(connection_id=connection_id, client_addr=("127.0.0.1", 50000),
                                server_addr=(host, port), tls=tls, provider=provider)
    exchange = HttpExchange(connection=connection, request=request)
    exchange.timings.request_start = time.monotonic_ns()
    exchange.timings.request_end = exchange.timings.request_start
    return exchange


def claim(exchange: HttpExchange) -> tuple[str, ExchangeDecoder]:
    """The plugin that claims the exchange and its decoder (the metadata fallback when none does)."""
    return _ROUTER.decoder_for(exchange)


def respond(exchange: HttpExchange, decoder: ExchangeDecoder, status: int = 200,
            chunks: Iterable[bytes] = (), *, headers: Sequence[tuple[str, str]] = (),
            content_type: str = "application/json") -> list[Event]:
    """Feed the response head, the body chunks and the end; return the events (conformed)."""
    exchange.response = HttpResponse(status=status, reason="", http_version="1.1",
                                     headers=Headers([("content-type", content_type), *headers]))
    exchange.timings.response_headers = time.monotonic_ns()
    events: list[Event] = []
    for chunk in chunks:
        if not chunk:
            continue
        now = time.monotonic_ns()
        if exchange.timings.response_first_byte is None:
            exchange.timings.response_first_byte = now
        exchange.timings.response_chunks.append((now, len(chunk)))
        exchange.response.body += chunk
        exchange.response.wire_size += len(chunk)
        events += decoder.on_response_data(exchange, chunk)
    exchange.timings.response_end = time.monotonic_ns()
    events += decoder.on_end(exchange)
    return [conform(e) for e in events]


def run_exchange(method: str, url: str, body: bytes | dict[str, Any] | list[Any] | None = None, *,
                 status: int = 200, response: bytes | dict[str, Any] | list[Any] | Sequence[bytes] = b"",
                 content_type: str = "application/json", request_headers: Sequence[tuple[str, str]] = (),
                 response_headers: Sequence[tuple[str, str]] = (), provider: str | None = None,
                 expect_plugin: str | None = None, connection_id: str = "c1") -> list[Event]:
    """One whole exchange through the plugin that claims it; ``response`` is a body or a list of chunks."""
    exchange = make_exchange(method, url, body, headers=request_headers, provider=provider,
                             connection_id=connection_id)
    plugin, decoder = claim(exchange)
    if expect_plugin is not None:
        assert plugin == expect_plugin, f"claimed by {plugin}, expected {expect_plugin}"
    events = [conform(e) for e in decoder.on_request(exchange)]
    if isinstance(response, dict | list) and not (isinstance(response, list) and response
                                                  and isinstance(response[0], bytes)):
        chunks: Sequence[bytes] = [json.dumps(response).encode()]
    elif isinstance(response, bytes):
        chunks = [response]
    else:
        chunks = response  # type: ignore[assignment]
    return events + respond(exchange, decoder, status, chunks, headers=response_headers,
                            content_type=content_type)


def of_type(events: Iterable[Event], event_type: str) -> list[Event]:
    return [e for e in events if e.event_type == event_type]


def one(events: Iterable[Event], event_type: str) -> Event:
    found = of_type(events, event_type)
    assert len(found) == 1, f"expected one {event_type}, got {len(found)}: {[e.event_type for e in events]}"
    return found[0]


def data(event: Event) -> dict[str, Any]:
    """The event's data as JSON (what a sink writes)."""
    out = event.to_dict()["data"]
    assert isinstance(out, dict)
    return out


def assert_schema_valid(schema: SchemaValidator, events: Iterable[Event]) -> None:
    for event in events:
        schema.assert_valid(event.to_dict())


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the sorted offsets ``cuts``."""
    pieces = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces
