"""Compare the events of one exchange decoded twice (for instance from two chunkings of the same response body):
everything but what differs between runs by nature (event ids, timestamps, measured latencies)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tests.providers.exchange_harness import make_exchange, respond

from oisp.events import Event
from oisp.events.spec_gaps import conform
from oisp.hookspecs import ExchangeDecoder

_VOLATILE = ("event_id", "ts", "ts_mono")
#: Measured, or numbered per exchange (request ids carry the exchange's serial number).
_PER_RUN = ("latency_ms", "time_to_first_token_ms", "request_id")


def normalized(events: Sequence[Event]) -> list[dict[str, Any]]:
    """The events as dicts, with ids replaced by their position in ``events``, timings and request ids removed."""
    positions = {e.event_id: i for i, e in enumerate(events)}
    out = []
    for event in events:
        raw = event.to_dict()
        for key in _VOLATILE:
            raw.pop(key, None)
        for key in _PER_RUN:
            raw["data"].pop(key, None)
        (raw.get("attrs") or {}).pop("oisp.request_id", None)
        for related in raw.get("related_events") or []:
            related["event_id"] = positions.get(related["event_id"], "elsewhere")
        out.append(raw)
    return out


def decode_in_chunks(make_decoder: Callable[[], ExchangeDecoder], method: str, url: str, body: bytes,
                     response: bytes, cuts: Sequence[int], *, content_type: str,
                     request_headers: Sequence[tuple[str, str]] = (), status: int = 200) -> list[Event]:
    """A fresh decoder fed the request, then ``response`` cut at ``cuts``; its events, conformed."""
    exchange = make_exchange(method, url, body, headers=request_headers)
    decoder = make_decoder()
    events = [conform(e) for e in decoder.on_request(exchange)]
    pieces = []
    start = 0
    for cut in [*sorted(cuts), len(response)]:
        pieces.append(response[start:cut])
        start = cut
    return events + respond(exchange, decoder, status, pieces, content_type=content_type)
