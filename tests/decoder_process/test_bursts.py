"""Bursts in the decoder process: thousands of exchanges in one batch of copies must all become events (the
decoder process pauses decoding while the pipeline catches up), and one connection flooding cannot cost another
connection's events."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.decoder_process.test_decoder_process import REQUEST, RESPONSE, _config, _events, _info

from oisp.decoder_process import DecoderProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.timeout(400)  # 20,000 events through the decoder process: about 10 s on an idle machine
async def test_ten_thousand_pipelined_exchanges_in_one_batch_are_all_events(tmp_path: Path) -> None:
    count = 10_000
    out = tmp_path / "events.jsonl"
    async with DecoderProcess(_config(out)) as decoder:
        flood = decoder.open_feed(_info(1), "http/1.1", body_cap=1 << 20)
        bystander = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
        assert flood is not None and bystander is not None
        # all pushed before the event loop runs: the decoder process gets them as one burst
        flood.push("client", REQUEST * count, time.monotonic_ns())
        bystander.push("client", REQUEST, time.monotonic_ns())
        flood.push("server", RESPONSE * count, time.monotonic_ns())
        bystander.push("server", RESPONSE, time.monotonic_ns())
        flood.finish()
        bystander.finish()
    assert decoder.stats.overflowed_connections == 0 and decoder.stats.exit_code == 0
    summary = decoder.pipeline_summary
    assert summary is not None and summary["dropped_total"] == 0, summary
    events = _events(out)
    assert sum(e.event_type == "ai.request" for e in events) == count + 1
    assert sum(e.event_type == "ai.response" for e in events) == count + 1
    assert summary["processed"] == 2 * (count + 1)


async def test_a_connection_over_its_budget_is_a_loss_the_live_view_is_told(tmp_path: Path) -> None:
    """One connection that outruns its budget stops being decoded (partial, counted, shown); its neighbour's
    events are all there."""
    from oisp.cli.live import LiveView

    out = tmp_path / "events.jsonl"
    live = LiveView()
    async with DecoderProcess(_config(out), connection_limit=64 * 1024, on_losses=live.set_losses) as decoder:
        flood = decoder.open_feed(_info(1), "http/1.1", body_cap=1 << 20)
        bystander = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
        assert flood is not None and bystander is not None
        for _ in range(40):  # 40 copies of 16 KiB before the event loop runs: past the 64 KiB budget
            flood.push("client", REQUEST * 40, time.monotonic_ns())
        bystander.push("client", REQUEST, time.monotonic_ns())
        bystander.push("server", RESPONSE, time.monotonic_ns())
        flood.finish()
        bystander.finish()
    assert flood.failure is not None and bystander.failure is None
    assert decoder.stats.overflowed_connections == 1
    assert (live.dropped_events, live.undecoded_connections) == (0, 1)
    assert "LOST: 0 events dropped, 1 connections not decoded" in str(live.render().renderables[-1])
    events = _events(out)
    mine = [e for e in events if e.source is not None and "c-test.2" in e.to_json()]
    assert {e.event_type for e in mine} >= {"ai.request", "ai.response"}
