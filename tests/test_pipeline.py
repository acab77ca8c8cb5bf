"""The pipeline: enrichment, redaction, fan-out with bounded per-sink queues, counted drops, isolation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import anyio
import pytest

from oisp.errors import OispError
from oisp.events import AiRequest, Confidence, Event, Host, Message, ProviderInfo
from oisp.pipeline import Pipeline, local_host
from oisp.sinks.memory import MemorySink

CONF = Confidence(level="high", completeness="full")
KEY = "sk-proj-" + "Zz9" * 12


def request(i: int, content: str = "hi") -> Event:
    return Event.create(AiRequest(request_id=f"r{i}", messages=[Message(role="user", content=content)]),
                        confidence=CONF)


class BlockingSink:
    """Blocks in write until released: a sink that is slow for as long as the test wants."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.events: list[Event] = []

    def write(self, events: Sequence[Event]) -> None:
        self.entered.set()
        self.release.wait(timeout=30)
        self.events.extend(events)

    def close(self) -> None:
        self.release.set()


class FailingSink:
    def __init__(self) -> None:
        self.calls = 0

    def write(self, events: Sequence[Event]) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self) -> None:
        pass


def test_local_host_describes_this_machine() -> None:
    host = local_host()
    assert host.hostname and host.os in {"linux", "darwin", "windows", "freebsd", "other"}


def test_events_are_enriched_redacted_conformed_and_reach_every_sink_in_order() -> None:
    a, b = MemorySink(), MemorySink()

    async def main() -> Pipeline:
        async with Pipeline({"a": a, "b": b}, host=Host(hostname="box")) as pipeline:
            for i in range(50):
                pipeline.emit(request(i, f"key {KEY}"))
            pipeline.emit(Event.create(AiRequest(provider=ProviderInfo(name="xai")), confidence=CONF))
        return pipeline

    pipeline = anyio.run(main)
    for sink in (a, b):
        assert [e.data.request_id for e in sink.events[:50]] == [f"r{i}" for i in range(50)]  # type: ignore[attr-defined]
        assert all(e.host == Host(hostname="box") for e in sink.events)
        assert KEY not in "".join(e.to_json() for e in sink.events)
        assert sink.events[-1].to_dict()["data"]["provider"]["name"] == "other"
        assert sink.closed
    assert pipeline.stats.sinks["a"].delivered == 51 and pipeline.stats.dropped == 0


def test_a_slow_sink_never_blocks_emit_or_other_sinks_and_its_drops_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    slow, fast = BlockingSink(), MemorySink()

    async def main() -> Pipeline:
        async with Pipeline({"slow": slow, "fast": fast}, queue_size=10, batch_size=5) as pipeline:
            pipeline.emit(request(-1))
            await anyio.to_thread.run_sync(slow.entered.wait, 10)  # slow is now stuck in write
            for i in range(40):
                pipeline.emit(request(i))
                # the fast sink gets each event while the slow one is stuck
                assert len(await anyio.to_thread.run_sync(fast.wait_for, i + 2, 10)) == i + 2
            slow.release.set()
        return pipeline

    with caplog.at_level(logging.WARNING, logger="oisp.pipeline"):
        pipeline = anyio.run(main)
    stats = pipeline.stats.sinks["slow"]
    assert stats.dropped > 0
    assert stats.delivered + stats.dropped == 41
    assert len(slow.events) == stats.delivered
    assert pipeline.stats.sinks["fast"].dropped == 0
    assert any("dropped" in r.message for r in caplog.records)


def test_a_failing_sink_is_counted_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    bad, good = FailingSink(), MemorySink()

    async def main() -> Pipeline:
        async with Pipeline({"bad": bad, "good": good}) as pipeline:
            for i in range(20):
                pipeline.emit(request(i))
        return pipeline

    with caplog.at_level(logging.ERROR, logger="oisp.pipeline"):
        pipeline = anyio.run(main)
    assert len(good.events) == 20
    assert pipeline.stats.sinks["bad"].failed == 20
    assert "disk full" in (pipeline.stats.sinks["bad"].last_error or "")
    assert any("sink bad failed" in r.message for r in caplog.records)


def test_full_ingress_queue_drops_are_counted_not_silent() -> None:
    sink = MemorySink()

    async def main() -> Pipeline:
        async with Pipeline({"m": sink}, queue_size=5) as pipeline:
            for i in range(20):  # no checkpoint: the processing task cannot run in between
                pipeline.emit(request(i))
        return pipeline

    pipeline = anyio.run(main)
    assert pipeline.stats.dropped_ingress == 15
    assert len(sink.events) == 5
    assert pipeline.summary()["dropped_total"] == 15


def test_a_failing_enricher_drops_only_that_event() -> None:
    sink = MemorySink()

    def picky(event: Event) -> Event:
        if event.data.request_id == "r3":  # type: ignore[attr-defined]
            raise ValueError("boom")
        return event

    async def main() -> Pipeline:
        async with Pipeline({"m": sink}, enrichers=[picky]) as pipeline:
            for i in range(6):
                pipeline.emit(request(i))
        return pipeline

    pipeline = anyio.run(main)
    assert [e.data.request_id for e in sink.events] == ["r0", "r1", "r2", "r4", "r5"]  # type: ignore[attr-defined]
    assert pipeline.stats.failed_processing == 1


def test_emit_after_close_is_an_error() -> None:
    async def main() -> None:
        async with Pipeline({"m": MemorySink()}) as pipeline:
            pass
        with pytest.raises(OispError, match="closed"):
            pipeline.emit(request(0))

    anyio.run(main)


def test_listeners_see_processed_events() -> None:
    seen: list[Event] = []

    async def main() -> None:
        async with Pipeline({}) as pipeline:
            pipeline.add_listener(seen.append)
            pipeline.emit(request(0, KEY))

    anyio.run(main)
    assert len(seen) == 1 and KEY not in seen[0].to_json()


def test_a_producer_that_can_wait_never_makes_the_pipeline_drop() -> None:
    """wait_for_room() is the decoder process's backpressure: emit never has to drop behind it."""
    sink = MemorySink()
    backlogs: list[int] = []

    async def main() -> None:
        async with Pipeline({"memory": sink}, queue_size=8, batch_size=2) as pipeline:
            for i in range(200):
                pipeline.emit(request(i))
                await pipeline.wait_for_room()
                backlogs.append(pipeline.backlog)
        assert pipeline.stats.dropped == 0

    anyio.run(main)
    assert [e.data.request_id for e in sink.events] == [f"r{i}" for i in range(200)]  # type: ignore[attr-defined]
    assert max(backlogs) <= 4


@pytest.mark.parametrize("profile", ["default", "metadata-only"])
@pytest.mark.parametrize("name", sorted(__import__("tests.events.samples", fromlist=["ALL"]).ALL))
def test_the_fast_path_gives_what_redact_then_conform_gives(name: str, profile: str) -> None:
    """Pipeline.process encodes each event once, on its own dict path; it must say exactly what the plain steps
    (redaction on the event, then conformance, then to_json) say."""
    import json

    from tests.events.samples import ALL

    from oisp.events.spec_gaps import conform
    from oisp.redaction import Redactor

    event = ALL[name]()
    event = event.with_context(process=event.process, attrs={**(event.attrs or {}), "token": KEY})
    pipeline = Pipeline({}, redactor=Redactor(profile=profile), host=local_host())
    fast = pipeline.process(event)
    plain = conform(Redactor(profile=profile)(event.with_context(host=local_host())))
    assert json.loads(fast.to_json()) == json.loads(plain.to_json())
    assert KEY not in fast.to_json()


class CountingSink:
    """Reports its own counters through the optional stats(), as sinks that deliver in the background do."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.seen = 0
        self.closed = False

    def write(self, events: Sequence[Event]) -> None:
        self.seen += len(events)

    def close(self) -> None:
        self.closed = True

    def stats(self) -> dict[str, int]:
        if self.broken:
            raise RuntimeError("no stats today")
        return {"seen": self.seen, "closed": int(self.closed)}


def test_a_sinks_own_counters_are_reported_and_a_failing_stats_costs_nothing() -> None:
    counting, broken, plain = CountingSink(), CountingSink(broken=True), MemorySink()

    async def main() -> Pipeline:
        async with Pipeline({"counting": counting, "broken": broken, "plain": plain}) as pipeline:
            for i in range(30):
                pipeline.emit(request(i))
        return pipeline

    pipeline = anyio.run(main)
    assert pipeline.stats.sinks["counting"].reported == {"seen": 30, "closed": 1}  # refreshed after close too
    assert pipeline.stats.sinks["broken"].reported == {} and pipeline.stats.sinks["broken"].delivered == 30
    assert pipeline.stats.sinks["plain"].reported == {}
    assert pipeline.summary()["sinks"]["counting"]["reported"] == {"seen": 30, "closed": 1}


class HoldingStage:
    """Holds every event until polled (a made-up event goes with the first), or until the flush at close."""

    def __init__(self, wakeup: float | None) -> None:
        self.wakeup = wakeup
        self.held: list[Event] = []
        self.polls = 0

    def feed(self, event: Event) -> list[Event]:
        self.held.append(event)
        return []

    def poll(self) -> list[Event]:
        self.polls += 1
        out = [e.with_context(attrs={**(e.attrs or {}), "stage": "poll"}) for e in self.held]
        if self.held:
            out.append(request(99, f"made by the stage {KEY}"))
        self.held = []
        return out

    def next_wakeup(self) -> float | None:
        return self.wakeup if self.held else None

    def flush(self) -> list[Event]:
        out = [e.with_context(attrs={**(e.attrs or {}), "stage": "flush"}) for e in self.held]
        self.held = []
        return out


def test_a_stage_holds_events_until_polled_and_its_events_are_processed() -> None:
    sink = MemorySink()
    seen: list[Event] = []
    stage = HoldingStage(wakeup=0.001)

    async def main() -> None:
        both = anyio.Event()

        def listen(event: Event) -> None:
            seen.append(event)
            if len(seen) == 2:
                both.set()

        async with Pipeline({"s": sink}, stages=[stage], host=Host(hostname="box")) as pipeline:
            pipeline.add_listener(listen)
            pipeline.emit(request(1))
            with anyio.fail_after(5):
                await both.wait()  # released by the poll while the pipeline runs, not by the close

    anyio.run(main)
    assert [e.attrs.get("stage") if e.attrs else None for e in sink.events] == ["poll", None]
    made = sink.events[1]
    assert made.host == Host(hostname="box") and KEY not in made.to_json()  # processed: enriched and redacted
    assert [e.event_id for e in seen] == [e.event_id for e in sink.events]
    assert stage.polls >= 1


def test_events_a_stage_holds_are_flushed_at_close_through_the_later_stages() -> None:
    sink = MemorySink()
    first, second = HoldingStage(wakeup=None), HoldingStage(wakeup=None)

    async def main() -> None:
        async with Pipeline({"s": sink}, stages=[first]) as pipeline:
            pipeline.add_stage(second)
            for i in range(3):
                pipeline.emit(request(i))

    anyio.run(main)
    assert [e.data.request_id for e in sink.events] == ["r0", "r1", "r2"]  # type: ignore[attr-defined]
    assert all(e.attrs and e.attrs["stage"] == "flush" for e in sink.events)
    assert first.polls == second.polls == 0


class BrokenStage:
    def feed(self, event: Event) -> list[Event]:
        raise RuntimeError("bug")

    def poll(self) -> list[Event]:
        return []

    def next_wakeup(self) -> float | None:
        return None

    def flush(self) -> list[Event]:
        raise RuntimeError("bug")


def test_a_failing_stage_lets_events_pass(caplog: pytest.LogCaptureFixture) -> None:
    sink = MemorySink()

    async def main() -> None:
        async with Pipeline({"s": sink}, stages=[BrokenStage()]) as pipeline:
            pipeline.emit(request(1))

    anyio.run(main)
    assert [e.data.request_id for e in sink.events] == ["r1"]  # type: ignore[attr-defined]
    assert "pipeline stage" in caplog.text
