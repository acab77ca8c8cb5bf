"""The linker as a pipeline stage: held while the watermark is behind, released by polling, flushed at close."""

from __future__ import annotations

import anyio
import pytest
from tests.activity.test_linking import MS, SHELL, WRITE, Transcript, caused_by

from oisp.activity.link_stage import LinkingStage
from oisp.config import parse_config
from oisp.errors import ConfigurationError
from oisp.events import Event
from oisp.pipeline import Pipeline
from oisp.sinks.memory import MemorySink


class FakeClock:
    """The stage's clock and the activity watermark, moved by the test (kernel times in the same ms units)."""

    def __init__(self) -> None:
        self.now = 0
        self.mark = 0

    def clock(self) -> int:
        return self.now

    def watermark(self) -> int:
        return self.mark


def test_a_held_tool_result_is_released_by_polling_when_the_watermark_passes() -> None:
    sink = MemorySink()
    times = FakeClock()
    stage = LinkingStage(watermark=times.watermark, clock=times.clock, hold_ms=10_000, poll_interval=0.001)
    t = Transcript()
    request = t.request(10)
    response, (shell, write) = t.response(request, 15, [SHELL, WRITE])
    effect = t.write(4000, 16, "/work/proj/notes/plan.md")
    second = t.request(30)
    result = t.result(write, 30)

    async def main() -> None:
        released = anyio.Event()

        def listen(event: Event) -> None:
            if event.event_type == "agent.tool_result":
                released.set()

        async with Pipeline({"s": sink}, stages=[stage]) as pipeline:
            pipeline.add_listener(listen)
            times.now = 31 * MS
            times.mark = 16 * MS
            for event in (request, response, shell, write, effect, second, result):
                pipeline.emit(event)
            with anyio.fail_after(5):
                while stage.linker.pending < 1 or len(sink.events) < 7:
                    await anyio.wait_all_tasks_blocked()
            assert not released.is_set()  # the watermark (16) is behind the request carrying it (30)
            times.mark = 131 * MS  # 100 ms past the request: file events may be stamped that late
            with anyio.fail_after(5):
                await released.wait()

    anyio.run(main)
    by_type = {e.event_type: e for e in sink.events}
    assert caused_by(by_type["file.write"]) == [write.event_id]
    assert by_type["agent.tool_result"].data.side_effects == [  # type: ignore[attr-defined]
        {"type": "file_created", "target": "/work/proj/notes/plan.md", "event_id": effect.event_id}]
    assert [e.data.extra["action"] for e in sink.events if e.event_type == "agent.session"] == [  # type: ignore[attr-defined]
        "start", "end"]  # the end from the flush at close
    assert all(e.host is not None for e in sink.events)  # events the stage made or changed were processed


def test_at_close_held_events_are_flushed() -> None:
    sink = MemorySink()
    stage = LinkingStage(watermark=lambda: 0, hold_ms=60_000)
    t = Transcript()
    request = t.request(10)
    response, (write,) = t.response(request, 15, [WRITE])

    async def main() -> None:
        async with Pipeline({"s": sink}, stages=[stage]) as pipeline:
            for event in (request, response, write, t.request(30), t.result(write, 30)):
                pipeline.emit(event)

    anyio.run(main)
    assert [e.event_type for e in sink.events].count("agent.tool_result") == 1
    assert stage.linker.pending == 0


def test_link_hold_ms_is_read_from_the_activity_table() -> None:
    assert parse_config({"activity": {"link_hold_ms": 100}}).activity_link_hold_ms == 100
    assert parse_config({}).activity_link_hold_ms == 250
    with pytest.raises(ConfigurationError, match="activity.link_hold_ms"):
        parse_config({"activity": {"link_hold_ms": -1}})
    with pytest.raises(ValueError):
        LinkingStage(hold_ms=-1)


def test_the_watermark_counts_once_the_pipeline_took_the_events_emitted_before_it() -> None:
    from oisp.activity.link_stage import FedWatermark
    from oisp.pipeline import PipelineStats

    class Source:
        mark = 0

        def watermark_ns(self) -> int:
            return self.mark

    class Queue:
        stats = PipelineStats()

    queue, source = Queue(), Source()
    watermark = FedWatermark(queue, source)
    queue.stats.emitted, queue.stats.processed, source.mark = 5, 5, 100
    assert watermark() == 100  # everything emitted was taken
    # The source emits 3 events (still queued) and moves its watermark to 200.
    queue.stats.emitted, source.mark = 8, 200
    assert watermark() == 100
    queue.stats.processed = 7
    assert watermark() == 100
    queue.stats.processed, queue.stats.dropped_ingress = 7, 1  # the last one was dropped: taken all the same
    assert watermark() == 200
