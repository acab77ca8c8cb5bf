"""Cost of linking agent activity to tool calls: the pipeline with and without the linking stage, same run.

Run: ``.venv/bin/python bench/bench_linking.py [--repeat 3] [--turns 20]``

An agent-like stream: per turn an ``ai.request``, its ``ai.response`` with two tool calls (a shell command and a
file write), then the agent's tree at work (a fork and an exec of ``sh -c``, 100 exec'd children of it, 1,000
file writes spread over the shell's children and the agent itself), then the next request carrying both tool
results. The events go through a :class:`oisp.pipeline.Pipeline` into a sink that drops them, without stages
(activity off) and with a :class:`~oisp.activity.link_stage.LinkingStage` (the watermark always ahead, so what
is measured is the linking, not the waiting); and through the sans-io :class:`~oisp.activity.linking.Linker`
alone. The best of ``--repeat`` runs is printed, in microseconds per event and events per second.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import anyio

from oisp.activity.link_stage import LinkingStage
from oisp.activity.linking import Linker
from oisp.events import Confidence, Event, ProcessInfo, RelatedEvent
from oisp.events.agent import AgentToolCall, AgentToolResult, ToolInfo
from oisp.events.ai import AiRequest, AiResponse, ToolCall
from oisp.events.file import FileWrite
from oisp.events.process import ProcessExec
from oisp.pipeline import Pipeline

CONF = Confidence(level="high", completeness="full")
AGENT = 1000


class NullSink:
    def write(self, events: Sequence[Event]) -> None:
        pass

    def close(self) -> None:
        pass


def workload(turns: int) -> list[Event]:
    events: list[Event] = []
    t = time.monotonic_ns()
    agent = ProcessInfo(pid=AGENT, ppid=1, exe="/usr/bin/python3", name="python3")
    pid = 2000
    previous: list[Event] = []
    for turn in range(turns):
        t += 1_000_000
        request = Event.create(AiRequest(request_type="chat"), confidence=CONF, process=agent, ts_mono=t)
        events.append(request)
        events += [Event.create(AgentToolResult(call_id=c.data.call_id or "", result="ok"), confidence=CONF,  # type: ignore[attr-defined]
                                process=agent, ts_mono=t,
                                related_events=[RelatedEvent(event_id=c.event_id, relationship="parent")])
                   for c in previous]
        command = f"make -C build{turn} all"
        calls = [ToolCall(id=f"sh{turn}", name="run_shell", arguments={"command": command}),
                 ToolCall(id=f"wr{turn}", name="write_file", arguments={"path": f"notes{turn}.md", "content": "x"})]
        t += 1_000_000
        response = Event.create(AiResponse(tool_calls=calls), confidence=CONF, process=agent, ts_mono=t,
                                related_events=[RelatedEvent(event_id=request.event_id, relationship="caused_by")])
        events.append(response)
        previous = [Event.create(AgentToolCall(tool=ToolInfo(name=c.name), call_id=c.id,
                                               arguments=c.arguments if isinstance(c.arguments, dict) else None),
                                 confidence=CONF, process=agent, ts_mono=t,
                                 related_events=[RelatedEvent(event_id=response.event_id, relationship="caused_by")])
                    for c in calls]
        events += previous
        pid += 1
        shell = pid
        t += 1_000
        events.append(Event.create(ProcessExec(exe="/bin/sh", args=["sh", "-c", command]), confidence=CONF,
                                   process=ProcessInfo(pid=shell, ppid=AGENT, exe="/bin/sh"), ts_mono=t))
        children = []
        for _ in range(100):
            pid += 1
            t += 1_000
            children.append(pid)
            events.append(Event.create(ProcessExec(exe="/usr/bin/cc", args=["cc", "-c", f"f{pid}.c"]),
                                       confidence=CONF, process=ProcessInfo(pid=pid, ppid=shell, exe="/usr/bin/cc"),
                                       ts_mono=t))
        for i in range(1000):
            t += 1_000
            writer = AGENT if i % 10 == 0 else children[i % len(children)]
            path = f"/work/notes{turn}.md" if writer == AGENT else f"/work/build{turn}/f{i}.o"
            events.append(Event.create(FileWrite(path=path, created=True), confidence=CONF,
                                       process=ProcessInfo(pid=writer, exe="/usr/bin/cc"), ts_mono=t))
    return events


async def through_pipeline(events: list[Event], stage: LinkingStage | None) -> float:
    pipeline = Pipeline({"null": NullSink()}, stages=[stage] if stage else ())
    started = time.perf_counter()
    async with pipeline:
        for i in range(0, len(events), 1000):
            pipeline.emit_many(events[i:i + 1000])
            await pipeline.wait_for_room()
    return time.perf_counter() - started


def linker_alone(events: list[Event]) -> float:
    linker = Linker()
    far = 1 << 62
    started = time.perf_counter()
    for event in events:
        linker.feed(event, event.ts_mono or 0, far)
    linker.flush(far)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--turns", type=int, default=20)
    args, _ = parser.parse_known_args()
    events = workload(args.turns)
    runs = {"pipeline, no stage (activity off)": lambda: anyio.run(through_pipeline, events, None),
            "pipeline + linking stage": lambda: anyio.run(through_pipeline, events,
                                                          LinkingStage(watermark=lambda: 1 << 62)),
            "linker alone (sans-io)": lambda: linker_alone(events)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, run in runs.items():  # interleaved, so that load on the machine hits every variant alike
            best[name] = min(best[name], run())
    print(f"{len(events)} events ({args.turns} turns), best of {args.repeat}")
    print(f"{'variant':<36} {'us/event':>9} {'events/s':>10}")
    for name, seconds in best.items():
        print(f"{name:<36} {seconds * 1e6 / len(events):>9.2f} {len(events) / seconds:>10.0f}")


if __name__ == "__main__":
    main()
