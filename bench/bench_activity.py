"""Overhead of agent-activity observation on an agent-like workload, and the latency of its events.

Run (Linux, as root): ``.nox/tests/bin/python bench/bench_activity.py [--rounds 8] [--processes 500]
[--files 5000] [--no-sensitive] [--baseline CHECKOUT]``

The workload is a separate Python process, like an agent's tool runner: it starts ``--processes`` short processes
(``/bin/true``, through ``subprocess.run``) and writes ``--files`` small files, interleaved (one process, then
its share of files), and reports its own wall time. The monitor runs the way a user runs it: in a process of its
own (``Activity`` in an event loop, as ``oisp run --activity`` has it), started before the workload and stopped
after it, so the bench's own process (which only waits) is not the monitor. Each round runs the workload in
every way below, in an order rotated from round to round (drift and the neighbours' load spread over all of
them):

- ``off``: no monitor;
- ``on, not an agent``: the monitor runs (the kernel's process events; file events are watched only while an
  agent exists) but the workload made no AI call, so nothing is reported: what everyone else on the machine pays;
- ``on, agent``: the workload is an agent: every process and file becomes an event, delivered to a callback.

With ``--no-sensitive``, one more way: ``on, agent`` with no sensitive paths, so no open is watched (what
watching the opens costs). With ``--baseline CHECKOUT`` (a checkout of another version of oisp, e.g. main
before a change), the two ``on`` ways run a second time with that checkout's monitor (its ``src`` first on
``PYTHONPATH``): old and new in the same run, interleaved.

The table gives, per way, the median wall time, the spread (min, max, and the interquartile range), and what it
adds to ``off``: the median of the per-round ratios to that round's ``off`` (each ratio compares runs made
seconds apart). Monitor CPU is the monitor process's user+system time from its start to when it has emitted
everything the workload caused. Latency: for every file the workload closes it notes the monotonic time right
after ``close()``; the monitor's callback notes when the file's ``file.write`` arrives; for processes, the kernel's
exec timestamp against the arrival of ``process.exec``.
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

REPO = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import json, os, resource, subprocess, sys, time
processes, files, folder, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.stdin.readline()
closed = {}
per = max(1, files // max(1, processes))
n = 0
def switches():
    return sum(resource.getrusage(who).ru_nivcsw for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
cpu = sum(os.times()[:4])
preempted = switches()
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
cpu = sum(os.times()[:4]) - cpu
preempted = switches() - preempted
with open(report, "w") as f:
    json.dump({"elapsed": elapsed, "cpu": cpu, "preempted": preempted, "closed": closed}, f)
print("done", flush=True)
"""

# the monitor, as a user runs it: its own process, Activity in an event loop; commands on stdin, one a line:
# "agent PID" (PID made an AI call), "sync NS REPORT" (wait until everything before NS is emitted, then write
# what arrived and the CPU used to REPORT), "quit"
MONITOR = r"""
import json, os, sys, time
import anyio, anyio.to_thread
import oisp
from oisp.activity import Activity, ActivitySettings

files, execs, counted = {}, [], [0]
config = ActivitySettings(sensitive_paths=()) if sys.argv[1:] == ["no-sensitive"] else None

def arrived(event):
    now = time.monotonic_ns()
    counted[0] += 1
    if event.event_type == "file.write":
        files[getattr(event.data, "path", "")] = now
    elif event.event_type == "process.exec" and event.ts_mono is not None:
        execs.append(now - event.ts_mono)

def cpu():
    t = os.times()
    return t.user + t.system

async def main():
    async with Activity(emit=arrived, config=config) as activity:
        started = cpu()
        print("ready", oisp.__file__, flush=True)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "agent":
                activity.add_agent(int(words[1]))
            elif words[0] == "sync":
                while activity.watermark_ns() < int(words[1]):
                    await anyio.sleep(0.005)
                with open(words[2], "w") as f:
                    json.dump({"cpu": cpu() - started, "events": counted[0], "files": files, "execs": execs,
                               "lost": activity.stats.lost}, f)
            print("ok", flush=True)

anyio.run(main)
"""


class Monitor:
    """A monitor process (this checkout's oisp, or the one under ``src`` of ``checkout``)."""

    def __init__(self, checkout: Path | None, *, sensitive: bool = True) -> None:
        env = dict(os.environ)
        if checkout is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(checkout / "src"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, "-c", MONITOR] + ([] if sensitive else ["no-sensitive"]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self._line()
        if not line.startswith("ready"):
            raise RuntimeError(f"the monitor did not start: {line!r}")
        self.module = line.split(maxsplit=1)[1].strip()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._line()
        if answer.strip() != "ok":
            raise RuntimeError(f"the monitor failed on {command!r}: {answer!r}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_workload(processes: int, files: int, monitor: Monitor | None,
                 as_agent: bool) -> tuple[float, float, dict]:
    """One run of the workload; (its wall time, its CPU time with its children's, what the monitor saw: {}
    without one)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        report, seen = Path(folder) / "report.json", Path(folder) / "seen.json"
        work = Path(folder) / "w"
        work.mkdir()
        child = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(processes), str(files), str(work), str(report)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        if monitor is not None and as_agent:
            monitor.send(f"agent {child.pid}")
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        assert line.strip() == "done", line
        child.wait()
        data = json.loads(report.read_text())
        observed: dict = {}
        if monitor is not None:
            monitor.send(f"sync {time.monotonic_ns()} {seen}")
            observed = json.loads(seen.read_text())
            arrivals = observed.pop("files")
            observed["file_latency"] = [arrivals[p] - t for p, t in data["closed"].items() if p in arrivals]
            observed["files_seen"] = sum(1 for p in data["closed"] if p in arrivals)
        observed["preempted"] = data["preempted"]
        return float(data["elapsed"]), float(data["cpu"]), observed


def _percentiles(values_ns: list[int]) -> str:
    if not values_ns:
        return "-"
    ms = sorted(v / 1e6 for v in values_ns)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return f"p50 {q[49]:.1f}  p90 {q[89]:.1f}  p99 {q[98]:.1f}  max {ms[-1]:.1f} ms"


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--processes", type=int, default=500)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--no-sensitive", action="store_true",
                        help="also an 'on, agent' way with no sensitive paths (no opens watched: what they cost)")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                        help="also run the 'on' ways with the monitor of this checkout of oisp (its src/)")
    args = parser.parse_args()
    if sys.platform != "linux" or os.geteuid() != 0:
        sys.exit("bench_activity needs Linux and root (kernel process events and fanotify)")
    ways: list[tuple[str, Path | None, bool | None]] = [
        ("off", None, None), ("on, not an agent", None, False), ("on, agent", None, True)]
    if args.no_sensitive:
        ways.append(("on, agent, no opens", None, True))
    if args.baseline is not None:
        base = args.baseline.resolve()
        ways += [("baseline, not an agent", base, False), ("baseline, agent", base, True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    work_cpu: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    preempted: dict[str, list[int]] = {name: [] for name, _, _ in ways}
    cpu_ratios: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    per_event: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    latency: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name, _, _ in ways}
    counts: dict[str, list[tuple[int, int, int]]] = {name: [] for name, _, _ in ways}
    modules: dict[str, str] = {}
    for r in range(args.rounds):
        order = ways[r % len(ways):] + ways[:r % len(ways)]
        this: dict[str, float] = {}
        this_cpu: dict[str, float] = {}
        for name, checkout, as_agent in order:
            monitor = None
            if as_agent is not None:
                monitor = Monitor(checkout, sensitive=not name.endswith("no opens"))
                modules[name] = monitor.module
            try:
                elapsed, used, observed = run_workload(args.processes, args.files, monitor, bool(as_agent))
            finally:
                if monitor is not None:
                    monitor.close()
            this[name] = elapsed
            this_cpu[name] = used
            times[name].append(elapsed)
            work_cpu[name].append(used)
            preempted[name].append(observed.pop("preempted"))
            if observed:
                cpu[name].append(observed["cpu"])
                if observed["events"]:
                    per_event[name].append(observed["cpu"] / observed["events"])
                latency[name][0].extend(observed["file_latency"])
                latency[name][1].extend(observed["execs"])
                counts[name].append((observed["events"], observed["files_seen"], observed["lost"]))
        for name in this:
            ratios[name].append(this[name] / this["off"])
            cpu_ratios[name].append(this_cpu[name] / this_cpu["off"])
        print(f"round {r + 1}: " + ", ".join(f"{n} {t:.3f}" for n, t in this.items()), file=sys.stderr, flush=True)
    print(f"workload: {args.processes} processes + {args.files} files; {args.rounds} rounds, the ways interleaved "
          f"(order rotated each round); monitor in its own process")
    print(f"{'activity':<24} {'median s':>8} {'added':>8} {'min s':>7} {'max s':>7} {'IQR s':>6}   "
          f"{'workload CPU s':>14} {'added':>7} {'preempted':>9}   {'monitor CPU s':>13} {'CPU/event us':>12} "
          f"{'events':>7} {'writes seen':>11}")
    for name, _, as_agent in ways:
        values = times[name]
        added = "" if name == "off" else f"{(statistics.median(ratios[name]) - 1) * 100:+.1f}%"
        monitor_cpu = f"{statistics.median(cpu[name]):.3f}" if cpu[name] else "-"
        each = f"{statistics.median(per_event[name]) * 1e6:.0f}" if per_event[name] and as_agent else "-"
        events = f"{statistics.median(c[0] for c in counts[name]):.0f}" if counts[name] else "-"
        seen = f"{statistics.median(c[1] for c in counts[name]):.0f}" if counts[name] and as_agent else "-"
        added_cpu = "" if name == "off" else f"{(statistics.median(cpu_ratios[name]) - 1) * 100:+.1f}%"
        print(f"{name:<24} {statistics.median(values):>8.3f} {added:>8} {min(values):>7.3f} {max(values):>7.3f} "
              f"{_iqr(values):>6.3f}   {statistics.median(work_cpu[name]):>14.3f} {added_cpu:>7} "
              f"{statistics.median(preempted[name]):>9.0f}   "
              f"{monitor_cpu:>13} {each:>12} {events:>7} {seen:>11}")
    print("(added: median over rounds of the way's time / the same round's 'off'; workload CPU: user+system of the "
          "workload and its children, where the kernel's cost of queueing events is charged; preempted: the "
          "workload's involuntary context switches; monitor CPU: the monitor process from its start until it had "
          "emitted everything)")
    for name, _, as_agent in ways:
        if as_agent:
            lost = sum(c[2] for c in counts[name])
            files_ns, execs_ns = latency[name]
            print(f"\n{name}: kernel queue overflows {lost}")
            print(f"  file.write latency (close -> callback):          {_percentiles(files_ns)}")
            print(f"  process.exec latency (kernel exec -> callback):  {_percentiles(execs_ns)}")
    for name, module in modules.items():
        if name.startswith("baseline"):
            print(f"\nbaseline monitor: {module}")
            break


if __name__ == "__main__":
    main()
