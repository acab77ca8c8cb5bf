"""Events per second each sink sustains, and the latency from event to delivery, in one run.

Run: ``.venv/bin/python bench/bench_sinks.py [--quick] [--events N] [--rate R] [--seconds S]``

Columns: ``jsonl`` (a file in a temporary directory), ``otlp grpc`` and ``otlp http`` (the ``otlp`` sink, traces,
logs and metrics, to a real OTLP receiver built from opentelemetry-proto + grpcio, running in a subprocess on
127.0.0.1 so it does not share the sink's interpreter). The Kafka and webhook sinks join this table as columns
of their own when they land.

Each sink is driven the way the pipeline drives it: one thread calling ``write()`` with batches of 256 events
(a realistic mix: per AI call an ``ai.request``, its ``ai.response``, a tool call and its result, and a
``network.connect``), prepared beforehand so only the sink is measured; each event's JSON text is made
beforehand too, as the pipeline makes it once for all sinks.

* events/s: ``--events`` events written as fast as the sink takes them; the time runs from the first write until
  the last event is delivered (JSONL: written to the file, which each batch is when ``write()`` returns; OTLP:
  the receiver has the event's log record, the signal that carries every event).
* latency: ``--rate`` events per second offered for ``--seconds`` seconds, in batches every 10 ms; for each
  event, the time from when it was due (its batch's place in the schedule: a sink that cannot keep up falls
  behind and its events are late) until its delivery (p50, p99, max).

Targets (issue 12): each sink >= 10,000 events/s, event-to-delivery p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the OTLP receiver lives with the tests

from oisp.events import Event, Host  # noqa: E402
from oisp.hookspecs import Sink  # noqa: E402
from oisp.plugins import create_plugin_manager  # noqa: E402

BATCH = 256
TARGET_RATE = 10_000
TARGET_P99 = 1.0


# --- the OTLP receiver, in a subprocess ----------------------------------------------------------
def serve(protocol: str, out: str) -> None:
    """``--serve``: run a receiver, print its port, record (monotonic ns, event ids) per logs request until
    standard input closes, then write them to ``out`` as JSON."""
    from tests.sinks.otlp_receiver import Receiver, attributes

    arrivals: list[tuple[int, list[str]]] = []

    def on_logs(request: Any) -> None:
        now = time.monotonic_ns()
        ids = [attributes(record.attributes).get("oisp.event_id", "") for rl in request.resource_logs
               for sl in rl.scope_logs for record in sl.log_records]
        arrivals.append((now, ids))

    receiver = Receiver(protocol, keep=False)
    receiver.on_logs = on_logs
    print(receiver.port, flush=True)
    sys.stdin.read()
    receiver.close()
    Path(out).write_text(json.dumps(arrivals))


class RemoteReceiver:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", protocol, "--out", self.out],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arrivals(self) -> dict[str, int]:
        """Event id -> monotonic ns its log record arrived (stops the receiver)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)
        data = json.loads(Path(self.out).read_text())
        os.unlink(self.out)
        return {event_id: t for t, ids in data for event_id in ids}


# --- events --------------------------------------------------------------------------------------
def make_events(count: int) -> list[Event]:
    from tests.events import samples

    host = Host(hostname="bench-host", os="linux")
    makers = [samples.ai_request, samples.ai_response, samples.agent_tool_call, samples.agent_tool_result,
              samples.network_connect]
    events: list[Event] = []
    call = 0
    while len(events) < count:
        call += 1
        for make in makers:
            event = make()
            data = event.data.to_dict()
            if "request_id" in data:
                data["request_id"] = f"req_{call}"
            if "call_id" in data:
                data["call_id"] = f"call_{call}"
            event = Event.from_dict({**event.to_dict(), "data": data}).with_context(host=host)
            event.remember_json(event.to_json())  # as the pipeline does, once for every sink
            events.append(event)
    return events[:count]


# --- measuring -----------------------------------------------------------------------------------
def batches(events: list[Event]) -> list[list[Event]]:
    return [events[i:i + BATCH] for i in range(0, len(events), BATCH)]


def run_column(name: str, make: Callable[[], tuple[Sink, Callable[[], dict[str, int]] | None]],
               events: list[Event], rate: int, seconds: float) -> dict[str, Any]:
    # throughput: as fast as the sink takes them
    sink, delivered = make()
    written: dict[str, int] = {}
    start = time.monotonic_ns()
    for batch in batches(events):
        sink.write(batch)
        now = time.monotonic_ns()
        for event in batch:
            written[event.event_id] = now
    sink.close()
    arrivals = delivered() if delivered else written
    missing = len(events) - sum(1 for e in events if e.event_id in arrivals)
    last = max(arrivals[e.event_id] for e in events if e.event_id in arrivals)
    throughput = len(events) / ((last - start) / 1e9)

    # latency at an offered rate
    paced = make_events(int(rate * seconds))
    sink, delivered = make()
    handed: dict[str, int] = {}
    step = max(1, rate // 100)  # a batch every 10 ms
    begin = time.monotonic()
    for i in range(0, len(paced), step):
        due = begin + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        batch = paced[i:i + step]
        sink.write(batch)
        done = time.monotonic_ns()
        for event in batch:
            handed[event.event_id] = int(due * 1e9)  # when it was due: a sink that falls behind is late
            if delivered is None:
                written[event.event_id] = done
    sink.close()
    got = delivered() if delivered else written
    latencies = sorted((got[e.event_id] - handed[e.event_id]) / 1e9 for e in paced if e.event_id in got)
    missing += len(paced) - len(latencies)
    return {
        "name": name, "events_per_s": throughput,
        "p50": statistics.median(latencies), "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1], "missing": missing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the events, 2 s of paced load")
    parser.add_argument("--events", type=int, default=50_000, help="events of the events/s run (default 50000)")
    parser.add_argument("--rate", type=int, default=TARGET_RATE, help="offered events/s of the latency run")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of the latency run (default 5)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.out)
        return
    if args.quick:
        args.events //= 5
        args.seconds = 2.0

    plugins = create_plugin_manager()
    events = make_events(args.events)
    tmp = tempfile.TemporaryDirectory()
    counter = iter(range(1_000_000))

    def jsonl() -> tuple[Sink, None]:
        return plugins.create_sink("jsonl", {"path": f"{tmp.name}/events-{next(counter)}.jsonl"}), None

    def otlp(protocol: str, **options: Any) -> Callable[[], tuple[Sink, Callable[[], dict[str, int]]]]:
        def make() -> tuple[Sink, Callable[[], dict[str, int]]]:
            receiver = RemoteReceiver(protocol)
            sink = plugins.create_sink("otlp", {"endpoint": receiver.endpoint, "protocol": protocol, **options})
            return sink, receiver.arrivals
        return make

    columns: list[tuple[str, Callable[[], Any]]] = [
        ("jsonl", jsonl), ("otlp grpc", otlp("grpc")), ("otlp http", otlp("http/protobuf")),
        # what the log records alone cost (every event is one): spans and metrics are the rest
        ("otlp grpc, logs only", otlp("grpc", traces=False, metrics=False)),
    ]
    print(f"{args.events} events (batches of {BATCH}); latency at {args.rate} events/s for {args.seconds:g} s; "
          f"{os.cpu_count()} cores")
    results = []
    for name, make in columns:
        results.append(run_column(name, make, events, args.rate, args.seconds))
    header = f"{'sink':<21} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>5}  target"
    print(header)
    print("-" * len(header))
    for r in results:
        ok = r["events_per_s"] >= TARGET_RATE and r["p99"] <= TARGET_P99 and r["missing"] == 0
        print(f"{r['name']:<21} {r['events_per_s']:>10,.0f} {r['p50'] * 1000:>8.1f} {r['p99'] * 1000:>8.1f} "
              f"{r['max'] * 1000:>8.1f} {r['missing']:>5}  {'met' if ok else 'MISSED'}")
    print(f"targets: >= {TARGET_RATE:,} events/s, p99 <= {TARGET_P99 * 1000:.0f} ms, nothing lost. "
          "kafka and webhook columns join when those sinks land.")
    tmp.cleanup()


if __name__ == "__main__":
    main()
