"""Decoding inline (``decoder = "inline"``): the relay's copies are decoded in its own event loop, so a burst on one
connection emits thousands of events before the pipeline runs. Each connection has a budget in the pipeline's
queue: the burst is cut short (counted), a bystander's events are all written."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from tests.decoder_process.test_decoder_process import RESPONSE, _config, _events, _info
from tests.decoder_process.test_shards import _request, _texts

from oisp.cli.run import INLINE_CONNECTION_BUDGET
from oisp.decode_setup import build_event_decoder, build_pipeline
from oisp.http.passive import make_decoder
from oisp.plugins import create_plugin_manager
from oisp.proxy.relay import DecodeFeed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _burst(out: Path, budget: int | None, count: int) -> dict[str, object]:
    plugins = create_plugin_manager()
    config = _config(out)
    pipeline = build_pipeline(plugins, config, connection_budget=budget)
    decoder = build_event_decoder(plugins, config, pipeline.emit, emit_for=pipeline.emit_for)
    async with pipeline:
        feeds = []
        for number in (1, 2):
            info = _info(number)
            feeds.append(DecodeFeed(make_decoder("http/1.1", info, decoder.exchange_listener(info)), 64,
                                    info.connection_id))
        flood, bystander = feeds
        # the copies are queued before the feeds run, as a relay that read them in one go would have
        flood.push("client", _request("flood") * count, time.monotonic_ns())
        flood.push("server", RESPONSE * count, time.monotonic_ns())
        bystander.push("client", _request("c-test.2 message 0"), time.monotonic_ns())
        bystander.push("server", RESPONSE, time.monotonic_ns())
        for feed in feeds:
            feed.finish()
        async with anyio.create_task_group() as tasks:
            for feed in feeds:
                tasks.start_soon(feed.run)
    return pipeline.summary()


@pytest.mark.timeout(300)
async def test_a_burst_on_one_connection_costs_a_bystander_nothing(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    summary = await _burst(out, INLINE_CONNECTION_BUDGET, 12_000)
    events = _events(out)
    assert _texts(events, "c-test.2") == ["c-test.2 message 0"]
    assert sum(e.event_type == "ai.response" and "c-test.2" in e.to_json() for e in events) >= 1
    assert summary["dropped_budget"] > 0 and summary["dropped_ingress"] == 0, summary  # counted, and only the flood's
    assert summary["dropped_total"] == summary["dropped_budget"]
