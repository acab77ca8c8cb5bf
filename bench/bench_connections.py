"""Cost of reporting the other connections of agent processes (``network.connect``, not intercepted).

Run (Linux, as root): ``.nox/tests/bin/python bench/bench_connections.py [--rounds 3] [--connections 2000]``

A workload process opens ``--connections`` TCP connections, one after another, to a server process on loopback
(connect, close). Each round runs it, in turn, in the same run:

- ``off``: no monitor;
- ``flow, not an agent``: the connection source on pydivert's FLOW layer, the workload not an agent: every
  connection on the machine is read and filtered out (what everyone else pays);
- ``flow, agent``: the workload is an agent: each connection becomes an event;
- ``polled, agent``: the fallback (the FLOW layer taken as absent): the agent's sockets listed every 250 ms.

Only the connection source runs (no process or file sources). The monitor's CPU is this process's CPU time
from the workload's start until the monitor's watermark passed its end (the server and the workload are other
processes); the table gives it per connection.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import anyio

from oisp.activity import Activity, ActivitySettings, flow
from oisp.events import Event

SERVER = r"""
import socket, sys
server = socket.create_server(("127.0.0.1", 0), backlog=512)
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    conn.close()
"""

WORKLOAD = r"""
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
started = time.perf_counter()
for _ in range(count):
    with socket.create_connection(("127.0.0.1", port)):
        pass
print(time.perf_counter() - started, flush=True)
"""

SETTINGS = ActivitySettings(processes=False, files=False, connections=True, watch_directories=False)
WAYS = ("off", "flow, not an agent", "flow, agent", "polled, agent")


async def _round(way: str, port: int, count: int) -> tuple[float, float, int]:
    """(workload wall s, monitor CPU s, events) of one run of the workload."""
    events: list[Event] = []
    workload = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(port), str(count)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert workload.stdin is not None and workload.stdout is not None

    async def run() -> float:
        assert workload.stdin is not None and workload.stdout is not None
        workload.stdin.write("go\n")
        workload.stdin.flush()
        line = await anyio.to_thread.run_sync(workload.stdout.readline)
        return float(line)

    if way == "off":
        cpu = time.process_time()
        wall = await run()
        return wall, time.process_time() - cpu, 0
    original = flow.available
    if way.startswith("polled"):
        flow.available = lambda: "forced off by the benchmark"  # type: ignore[assignment]
    try:
        async with Activity(emit=events.append, config=SETTINGS) as activity:
            if way.endswith(", agent"):
                activity.add_agent(workload.pid)
            cpu = time.process_time()
            wall = await run()
            done = time.monotonic_ns()
            with anyio.fail_after(10):
                while activity.watermark_ns() < done:
                    await anyio.sleep(0.005)  # polls the watermark (a condition)
            used = time.process_time() - cpu  # until every connection of the workload was read and emitted
    finally:
        flow.available = original  # type: ignore[assignment]
    workload.wait()
    return wall, used, sum(1 for e in events if e.event_type == "network.connect")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    why = flow.available()
    if why is not None:
        sys.exit(f"the FLOW layer is not available here: {why}")
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    results: dict[str, list[tuple[float, float, int]]] = {way: [] for way in WAYS}
    try:
        for _ in range(args.rounds):
            for way in WAYS:
                results[way].append(await _round(way, port, args.connections))
    finally:
        server.kill()
        server.wait()
    base = statistics.median(w for w, _, _ in results["off"])
    print(f"{args.connections} connections, {args.rounds} rounds (medians)\n")
    print("| way | wall s | added | monitor CPU ms | CPU µs per connection | events (last round) |")
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        wall = statistics.median(w for w, _, _ in results[way])
        cpu = statistics.median(c for _, c, _ in results[way])
        added = "" if way == "off" else f"{(wall - base) / base * 100:+.1f}%"
        print(f"| {way} | {wall:.3f} | {added} | {cpu * 1000:.0f} | {cpu / args.connections * 1e6:.0f} | "
              f"{results[way][-1][2]} |")


if __name__ == "__main__":
    anyio.run(main)
