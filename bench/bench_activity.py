"""Overhead of agent-activity observation on an agent-like workload, and the latency of its events.

Run (Linux, as root): ``.nox/tests/bin/python bench/bench_activity.py [--rounds 5] [--processes 500] [--files 5000]``

The workload is a separate Python process, like an agent's tool runner: it starts ``--processes`` short processes
(``/bin/true``, through ``subprocess.run``) and writes ``--files`` small files, interleaved (one process, then
its share of files), and reports its own wall time. Each round runs it three ways, in turn, in the same run:

- ``off``: no activity monitor;
- ``on, not an agent``: the monitor runs (kernel process events, fanotify on every local filesystem) but the
  workload made no AI call, so every event is filtered out: what everyone else on the machine pays;
- ``on, agent``: the workload is an agent: every process and file becomes an event, delivered to a callback.

The table gives the median wall time of each way and what it adds to ``off``. Latency: for every file the
workload closes it notes the monotonic time right after ``close()``; the callback notes when the file's
``file.write`` arrives; for processes, the kernel's exec timestamp against the arrival of ``process.exec``.
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
from pathlib import Path

import anyio

from oisp.activity import Activity
from oisp.events import Event

WORKLOAD = r"""
import json, subprocess, sys, time
processes, files, folder, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.stdin.readline()
closed = {}
per = max(1, files // max(1, processes))
n = 0
started = time.perf_counter()
for p in range(processes):
    subprocess.run(["/bin/true"])
    for _ in range(per):
        if n >= files:
            break
        path = f"{folder}/f{n}"
        with open(path, "w") as f:
            f.write("print('hello')\n")
        closed[path] = time.monotonic_ns()
        n += 1
while n < files:
    path = f"{folder}/f{n}"
    with open(path, "w") as f:
        f.write("x")
    closed[path] = time.monotonic_ns()
    n += 1
elapsed = time.perf_counter() - started
with open(report, "w") as f:
    json.dump({"elapsed": elapsed, "closed": closed}, f)
print("done", flush=True)
"""


class Arrivals:
    def __init__(self) -> None:
        self.files: dict[str, int] = {}
        self.execs: list[int] = []
        self.events = 0

    def __call__(self, event: Event) -> None:
        now = time.monotonic_ns()
        self.events += 1
        if event.event_type == "file.write":
            self.files[getattr(event.data, "path", "")] = now
        elif event.event_type == "process.exec" and event.ts_mono is not None:
            self.execs.append(now - event.ts_mono)


async def _workload(processes: int, files: int, activity: Activity | None,
                    as_agent: bool) -> tuple[float, dict[str, int]]:
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        report = Path(folder) / "report.json"
        work = Path(folder) / "w"
        work.mkdir()
        child = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(processes), str(files), str(work), str(report)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        if activity is not None and as_agent:
            activity.add_agent(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = await anyio.to_thread.run_sync(child.stdout.readline)
        assert line.strip() == "done"
        await anyio.to_thread.run_sync(child.wait)
        if activity is not None:
            end = time.monotonic_ns()
            while activity.watermark_ns() < end:
                await anyio.sleep(0.005)
        data = json.loads(report.read_text())
        return float(data["elapsed"]), dict(data["closed"])


def _percentiles(values_ns: list[int]) -> str:
    if not values_ns:
        return "-"
    ms = sorted(v / 1e6 for v in values_ns)
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return f"p50 {q[49]:.1f}  p90 {q[89]:.1f}  p99 {q[98]:.1f}  max {ms[-1]:.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=500)
    parser.add_argument("--files", type=int, default=5000)
    args = parser.parse_args()
    if sys.platform != "linux" or os.geteuid() != 0:
        sys.exit("bench_activity needs Linux and root (kernel process events and fanotify)")
    times: dict[str, list[float]] = {"off": [], "on, not an agent": [], "on, agent": []}
    cpu: dict[str, list[float]] = {way: [] for way in times}
    file_latency: list[int] = []
    exec_latency: list[int] = []
    events = 0
    lost = 0
    for _ in range(args.rounds):
        before = time.process_time()
        elapsed, _closed = await _workload(args.processes, args.files, None, False)
        times["off"].append(elapsed)
        cpu["off"].append(time.process_time() - before)
        for way, as_agent in (("on, not an agent", False), ("on, agent", True)):
            arrivals = Arrivals()
            before = time.process_time()
            async with Activity(emit=arrivals) as activity:
                elapsed, closed = await _workload(args.processes, args.files, activity, as_agent)
            cpu[way].append(time.process_time() - before)
            times[way].append(elapsed)
            if as_agent:
                events += arrivals.events
                lost += activity.stats.lost
                file_latency += [arrivals.files[p] - t for p, t in closed.items() if p in arrivals.files]
                exec_latency += arrivals.execs
    base = statistics.median(times["off"])
    print(f"workload: {args.processes} processes + {args.files} files, {args.rounds} rounds, median wall time")
    print(f"{'activity':<20} {'wall s':>8} {'added':>8}   {'min s':>7} {'max s':>7}   {'bench process CPU s':>19}")
    for way, values in times.items():
        median = statistics.median(values)
        added = "" if way == "off" else f"{(median / base - 1) * 100:+.1f}%"
        print(f"{way:<20} {median:>8.3f} {added:>8}   {min(values):>7.3f} {max(values):>7.3f}   "
              f"{statistics.median(cpu[way]):>19.3f}")
    print("(bench process CPU: the monitor's work plus the bench's own waiting; 'off' is the bench alone)")
    print(f"\nevents delivered (agent rounds): {events}, kernel queue overflows: {lost}")
    print(f"file.write latency (close -> callback):   {_percentiles(file_latency)}")
    print(f"process.exec latency (kernel exec -> callback): {_percentiles(exec_latency)}")


if __name__ == "__main__":
    anyio.run(main)
