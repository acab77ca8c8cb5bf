"""Bursts through the decoder process: how many events of a burst are recorded, how many dropped, how fast.

Run: ``.nox/tests/bin/python bench/bench_bursts.py [--exchanges 10000] [--connections 8] [--shards 1,2,3]
[--against /work/main/src]``

The burst is ``--exchanges`` pipelined HTTP/1.1 chat completions (request and response, about 700 bytes each
way) spread over ``--connections`` connections, handed to a :class:`~oisp.decoder_process.DecoderProcess` as the
relay hands its copies over (pieces of at most 64 KiB) without yielding in between: the whole burst waits in the
proxy's buffer and the decoder process's socket at once. The events go to a JSONL sink. Each row is one run in a
fresh process: the events written, the events dropped (by any decoder process, or lost on the way to the
first), the connections whose decoding stopped early, the seconds from the first copy to the decoder processes'
end (every event written), exchanges per second, and the CPU seconds the decoder processes used (user + system,
all of them together: the figure that does not depend on how busy the machine is).

``--shards 1,2,3`` runs the burst with each number of decoder processes (``[capture] decoder_processes``), the
connections spread over them by their ids' hash: one row each, in the same run. The *capacity* printed at the end
is the highest exchanges/s of a row in which nothing was dropped and every connection was decoded to the end.

``--against SRC`` runs the same burst with another oisp source tree (e.g. the main branch's ``src``) in the same
invocation, so the two rows compare on the same machine at the same time; ``--rounds`` alternates them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"


def _child(exchanges: int, connections: int, shards: int) -> dict[str, float]:
    import inspect
    import resource

    import anyio
    import psutil

    from oisp.config import Config
    from oisp.decoder_process import DecoderProcess
    from oisp.http.exchange import ConnectionInfo

    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body) + body)
    answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}).encode()
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(answer)
                + answer)

    def pieces(data: bytes) -> list[bytes]:
        return [data[i:i + 65536] for i in range(0, len(data), 65536)]

    async def main(out: Path) -> dict[str, float]:
        config = Config(sinks=({"kind": "jsonl", "path": str(out)},))
        per_connection = exchanges // connections
        options = {"processes": shards} if "processes" in inspect.signature(DecoderProcess).parameters else {}
        async with DecoderProcess(config, **options) as decoder:
            pids = [p for p in getattr(decoder, "pids", [decoder.pid]) if p is not None]
            starts = [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]  # their start-up, not counted
            start_cpu = sum(starts)
            started = time.perf_counter()
            feeds = []
            for n in range(connections):
                info = ConnectionInfo(connection_id=f"c-bench.{n}", client_addr=("127.0.0.1", 40000 + n),
                                      server_addr=("api.openai.com", 443), mode="explicit", tls=True,
                                      provider="openai")
                feed = decoder.open_feed(info, "http/1.1", body_cap=1 << 20)
                assert feed is not None
                feeds.append(feed)
            for feed in feeds:
                for piece in pieces(request * per_connection):
                    feed.push("client", piece, time.monotonic_ns())
                for piece in pieces(response * per_connection):
                    feed.push("server", piece, time.monotonic_ns())
                feed.finish()
            # once every event is written (the file is polled): each decoder process's CPU, the first's apart (it
            # writes every shard's events: what is left of its core bounds what more shards can add)
            expected = 2 * per_connection * connections
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and (not out.exists() or sum(1 for _ in out.open()) < expected):
                await anyio.sleep(0.05)
            cpu_each = [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]
        seconds = time.perf_counter() - started
        summary = decoder.pipeline_summary or {}
        written = sum(1 for _ in out.open())
        stats = decoder.stats
        shards_dropped = sum(s.dropped_events for s in decoder.shard_stats()[1:]) if options else 0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the decoder processes, reaped by now
        return {"written": written, "dropped": summary.get("dropped_total", -1) + shards_dropped,
                "seconds": seconds, "expected": 2 * per_connection * connections,
                "exchanges": per_connection * connections,
                "overflowed": stats.overflowed_connections + stats.lost_connections,
                "shards": shards if options else 1, "cpu": usage.ru_utime + usage.ru_stime - start_cpu,
                "cpu_first": cpu_each[0] - starts[0]}

    with tempfile.TemporaryDirectory() as directory:
        return anyio.run(main, Path(directory) / "events.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=10_000, help="pipelined exchanges in the burst")
    parser.add_argument("--connections", type=int, default=1, help="connections the burst is spread over")
    parser.add_argument("--against", type=Path, help="another oisp source tree to compare with, in the same run")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    parser.add_argument("--shards", default="1", help="numbers of decoder processes to run, comma-separated "
                        "(the tree of --against runs with one: it may not have more)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.exchanges, args.connections, int(args.shards))))
        return 0
    counts = [int(n) for n in str(args.shards).split(",") if n.strip()]
    runs = [("this tree", SRC, n) for n in counts]
    if args.against:
        runs.append(("against", args.against.resolve(), 1))
    rows = []
    for _ in range(args.rounds):
        for name, src, shards in runs:
            env = {**os.environ, "PYTHONPATH": str(src)}
            out = subprocess.run([sys.executable, str(HERE), "--child", "--exchanges", str(args.exchanges),
                                  "--connections", str(args.connections), "--shards", str(shards)], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append((name, src, json.loads(out.stdout.strip().splitlines()[-1])))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"burst: {args.exchanges} pipelined exchanges on {args.connections} connection(s), one JSONL sink; "
          f"{cpus} CPUs, load average {load:.1f}")
    print(f"{'tree':<10} {'shards':>6} {'events expected':>15} {'written':>8} {'dropped':>8} {'undecoded conns':>15} "
          f"{'seconds':>8} {'exch/s':>7} {'CPU s':>7} {'CPU us/exch':>11} {'first us/exch':>13}")
    capacity: dict[str, float] = {}
    for name, _src, result in rows:
        rate = result["exchanges"] / result["seconds"]
        print(f"{name:<10} {result['shards']:>6.0f} {result['expected']:>15.0f} {result['written']:>8.0f} "
              f"{result['dropped']:>8.0f} {result['overflowed']:>15.0f} {result['seconds']:>8.2f} {rate:>7.0f} "
              f"{result['cpu']:>7.1f} {result['cpu'] / result['exchanges'] * 1e6:>11.0f} "
              f"{result['cpu_first'] / result['exchanges'] * 1e6:>13.0f}")
        if result["dropped"] == 0 and result["overflowed"] == 0 and result["written"] == result["expected"]:
            key = f"{name}, {result['shards']:.0f} shard(s)"
            capacity[key] = max(capacity.get(key, 0.0), rate)
    for key, rate in capacity.items():
        print(f"  capacity ({key}): {rate:.0f} exchanges/s with nothing dropped")
    for name, src in dict.fromkeys((name, src) for name, src, _ in rows):
        print(f"  {name}: {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
