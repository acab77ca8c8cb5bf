"""Events per second each export sink sustains, and the latency from event to delivery, in one run and one table:
``jsonl`` (a local file, the baseline), ``otlp grpc`` and ``otlp http`` (the ``otlp`` sink with traces, logs and
metrics, to a real OTLP receiver built from opentelemetry-proto + grpcio), ``kafka`` (to librdkafka's mock
cluster on loopback) and ``webhook`` (to an HTTPS receiver on loopback). The receivers run in processes of their
own, so they never take the GIL from the sink they measure.

Run: ``.venv/bin/python bench/bench_export.py [--quick] [--events N] [--rate R] [--seconds S] [--sinks a,b]``

The events are a realistic mix, per AI call: an ``ai.request``, its ``ai.response``, a tool call and its result,
and a ``network.connect`` (so the OTLP sink pairs spans and records metrics, as it does in use); each event's
JSON text is made beforehand, as the pipeline makes it once for all sinks. A sink is driven the way the
pipeline's sink worker drives it: one thread calling ``write()`` with batches. Two measurements per sink, each
with a fresh sink that has delivered one warm-up event (connections made, a Kafka producer id obtained):

* **events/s**: ``--events`` events written in batches of 256 as fast as ``write`` takes them; the clock runs
  from the first write until the last event has *arrived*: written to the file (jsonl), its log record received
  (otlp: the signal that carries every event), consumed back from the topic (kafka), received by the endpoint
  (webhook).
* **latency**: ``--rate`` events/s offered (default 10,000, the target) for ``--seconds`` seconds, a batch every
  10 ms; each event's latency runs from when its batch was due (a sink that cannot keep up falls behind, and its
  events are late) to its arrival, as above: p50, p99 and the maximum. ``lost``: events that never arrived.

Targets (issue 12): each sink >= 10,000 events/s, event-to-delivery p99 <= 1 s, nothing lost. The webhook sink
fsyncs every batch into its spool (its default; the spool is in a temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.events.samples, tests.sinks.kafka_mock (the mock cluster, through ctypes)

from oisp.events import Event, Host  # noqa: E402
from oisp.hookspecs import Sink  # noqa: E402
from oisp.plugins import create_plugin_manager  # noqa: E402
from oisp.sinks.jsonl import JsonlSink  # noqa: E402
from oisp.sinks.webhook import WebhookSink  # noqa: E402

_EVENT_ID = re.compile(rb'"event_id":"([^"]+)"')
BATCH = 256
TARGET_RATE = 10_000
TARGET_P99 = 1.0
SINKS = ("jsonl", "otlp grpc", "otlp http", "kafka", "webhook")


def make_events(count: int) -> list[Event]:
    """``count`` events, per AI call an ``ai.request``, its ``ai.response``, a tool call, its result and a
    ``network.connect``; their JSON made once, as the pipeline makes it for every sink."""
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
            event.remember_json(event.to_json())
            events.append(event)
    return events[:count]


class Arrivals:
    """Arrival time (``time.monotonic()``) of each event id, filled from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[str, float] = {}

    def add(self, ids: list[str], when: float) -> None:
        with self.lock:
            for event_id in ids:
                self.times.setdefault(event_id, when)

    def count(self) -> int:
        return len(self.times)

    def wait(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


class Target:
    """One sink under test: makes fresh sinks and records arrivals of what they deliver."""

    name = ""

    def new(self, arrivals: Arrivals) -> Sink:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ReceiverProcess:
    """A receiver in its own process that prints its port, then ``<monotonic time> <event_id> ...`` per delivery."""

    def __init__(self, *command: str) -> None:
        self.process = subprocess.Popen([sys.executable, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1, cwd=ROOT)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.arrivals: Arrivals | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            when, _, ids = line.rstrip("\n").partition(" ")
            if self.arrivals is not None:
                self.arrivals.add(ids.split(), float(when))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)
        self._reader.join(10)


class JsonlTarget(Target):
    name = "jsonl"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def new(self, arrivals: Arrivals) -> Sink:
        inner = JsonlSink(self.directory / f"{uuid.uuid4().hex}.jsonl")

        class Recording:
            def write(self, events: Any) -> None:
                inner.write(events)
                arrivals.add([e.event_id for e in events], time.monotonic())  # on disk (page cache) now

            def close(self) -> None:
                inner.close()

        return Recording()


class OtlpTarget(Target):
    """The ``otlp`` sink, all three signals, to a receiver process of its own per sink."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.name = "otlp grpc" if protocol == "grpc" else "otlp http"
        self._receivers: list[_ReceiverProcess] = []

    def new(self, arrivals: Arrivals) -> Sink:
        receiver = _ReceiverProcess(str(Path(__file__).with_name("_otlp_receiver.py")), self.protocol)
        receiver.arrivals = arrivals
        self._receivers.append(receiver)
        return create_plugin_manager().create_sink("otlp", {
            "endpoint": f"http://127.0.0.1:{receiver.port}", "protocol": self.protocol})

    def close(self) -> None:
        for receiver in self._receivers:
            receiver.close()


class KafkaTarget(Target):
    name = "kafka"

    def __init__(self) -> None:
        from tests.sinks.kafka_mock import MockCluster

        self.cluster = MockCluster()
        self._consumers: list[tuple[threading.Event, threading.Thread]] = []

    def new(self, arrivals: Arrivals) -> Sink:
        import confluent_kafka

        from oisp.sinks.kafka import KafkaSink

        topic = f"bench-{uuid.uuid4().hex[:8]}"
        self.cluster.create_topic(topic, partitions=4)
        stop = threading.Event()
        ready = threading.Event()

        def consume() -> None:
            consumer = confluent_kafka.Consumer({
                "bootstrap.servers": self.cluster.bootstrap_servers, "group.id": topic,
                "auto.offset.reset": "earliest", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
            consumer.subscribe([topic], on_assign=lambda c, p: ready.set())
            while not stop.is_set():
                messages = consumer.consume(1000, 0.05)
                ready.set()
                if messages:
                    now = time.monotonic()
                    ids = []
                    for m in messages:
                        found = _EVENT_ID.search(m.value() or b"") if m.error() is None else None
                        if found:
                            ids.append(found.group(1).decode())
                    arrivals.add(ids, now)
            consumer.close()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(30)
        self._consumers.append((stop, thread))
        return KafkaSink(self.cluster.bootstrap_servers, topic=topic)

    def close(self) -> None:
        for stop, thread in self._consumers:
            stop.set()
            thread.join(10)
        self.cluster.close()


class WebhookTarget(Target):
    name = "webhook"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        self.receiver = _ReceiverProcess(str(Path(__file__).with_name("_webhook_receiver.py")), str(cert_file),
                                         str(key_file))

    def new(self, arrivals: Arrivals) -> Sink:
        self.receiver.arrivals = arrivals
        return WebhookSink(f"https://127.0.0.1:{self.receiver.port}/ingest",
                           spool_dir=self.directory / uuid.uuid4().hex, ca_file=self.ca_file,
                           secret="bench-secret", batch_size=500)  # noqa: S106

    def close(self) -> None:
        self.receiver.close()


def started_sink(target: Target, arrivals: Arrivals) -> Sink:
    """A new sink of ``target`` that has delivered one event already: a connection is made, a Kafka producer has
    its producer id and the topic's metadata (half a second to a second), a consumer is assigned its partitions;
    the runs measure the steady state, not that."""
    sink = target.new(arrivals)
    sink.write(make_events(1))
    if not arrivals.wait(1, timeout=60):
        raise RuntimeError(f"{target.name}: the warm-up event did not arrive")
    return sink


def throughput(target: Target, events: list[Event]) -> tuple[float, int]:
    """(events/s from the first write to the last arrival, events that did not arrive)."""
    arrivals = Arrivals()
    sink = started_sink(target, arrivals)
    started = time.monotonic()
    for start in range(0, len(events), BATCH):
        sink.write(events[start:start + BATCH])
    arrivals.wait(len(events) + 1, timeout=120)
    sink.close()
    arrived = [arrivals.times[e.event_id] for e in events if e.event_id in arrivals.times]
    if not arrived:
        return 0.0, len(events)
    return len(arrived) / (max(arrived) - started), len(events) - len(arrived)


def latency(target: Target, events: list[Event], rate: float) -> tuple[float, float, float, int]:
    """(p50, p99, max) seconds from when each event was due to its arrival, offering ``rate`` events/s in a batch
    every 10 ms; and the events that did not arrive."""
    arrivals = Arrivals()
    sink = started_sink(target, arrivals)
    step = max(1, int(rate) // 100)
    due: dict[str, float] = {}
    begin = time.monotonic()
    for i in range(0, len(events), step):
        when = begin + i / rate
        pause = when - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        batch = events[i:i + step]
        for event in batch:
            due[event.event_id] = when
        sink.write(batch)
    arrivals.wait(len(events) + 1, timeout=60)
    sink.close()
    delays = sorted(arrivals.times[i] - when for i, when in due.items() if i in arrivals.times)
    if not delays:
        return float("inf"), float("inf"), float("inf"), len(events)
    return (statistics.median(delays), delays[min(len(delays) - 1, int(len(delays) * 0.99))], delays[-1],
            len(events) - len(delays))


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the events, 1 s of offered load")
    parser.add_argument("--events", type=int, default=50_000, help="events of the events/s run (default 50000)")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="offered events/s of the latency run (10000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of the latency run (default 5)")
    parser.add_argument("--sinks", default=",".join(SINKS), help=f"which sinks, comma-separated ({', '.join(SINKS)})")
    args = parser.parse_args()
    count, seconds = args.events, args.seconds
    if args.quick:
        count, seconds = count // 5, 1.0
    names = [name.strip() for name in args.sinks.split(",") if name.strip()]
    unknown = set(names) - set(SINKS)
    if unknown:
        parser.error(f"unknown sinks {sorted(unknown)}; choose from {', '.join(SINKS)}")

    load_before = _load()
    events = make_events(count)
    paced = make_events(int(args.rate * seconds))
    size = sum(len(e.to_json()) + 1 for e in events) / len(events)
    # The prepared events are millions of objects a running oisp never holds at once: out of the collector's
    # sight, so its full collections do not stall the sinks at random.
    gc.collect()
    gc.freeze()

    rows: list[tuple[str, float, float, float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="oisp-bench-export-") as tmp:
        makers: dict[str, Callable[[], Target]] = {
            "jsonl": lambda: JsonlTarget(Path(tmp)),
            "otlp grpc": lambda: OtlpTarget("grpc"),
            "otlp http": lambda: OtlpTarget("http/protobuf"),
            "kafka": KafkaTarget,
            "webhook": lambda: WebhookTarget(Path(tmp)),
        }
        for name in names:
            target = makers[name]()
            try:
                rate, lost = throughput(target, events)
                p50, p99, worst, late_lost = latency(target, paced, args.rate)
            finally:
                target.close()
            rows.append((name, rate, p50, p99, worst, lost + late_lost))
            print(f"  {name}: done", file=sys.stderr, flush=True)

    print(f"\n{count:,} events of {size:.0f} B on average (a mix per AI call: request, response, tool call, tool "
          f"result, connect) in batches of {BATCH} for events/s; latency offering {args.rate:,.0f} events/s for "
          f"{seconds:g} s (a batch every 10 ms). {os.cpu_count()} CPUs, load average before {load_before}, "
          f"after {_load()}\n")
    header = (f"{'sink':<10} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>5}  "
              f"target (>= {TARGET_RATE:,}/s, p99 <= {TARGET_P99 * 1000:.0f} ms, nothing lost)")
    print(header)
    print("-" * len(header))
    for name, rate, p50, p99, worst, lost in rows:
        ok = rate >= TARGET_RATE and p99 <= TARGET_P99 and lost == 0
        print(f"{name:<10} {rate:>10,.0f} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f} {worst * 1000:>8.1f} {lost:>5}  "
              f"{'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
