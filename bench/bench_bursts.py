"""Bursts through the decoder process: how many events of a burst are recorded, how many dropped, how fast.

Run: ``.nox/tests/bin/python bench/bench_bursts.py [--exchanges 10000] [--connections 1] [--against /work/main/src]``

The burst is ``--exchanges`` pipelined HTTP/1.1 chat completions (request and response, about 700 bytes each
way) spread over ``--connections`` connections, handed to a :class:`~oisp.decoder_process.DecoderProcess` as the
relay hands its copies over (pieces of at most 64 KiB) without yielding in between: the whole burst waits in the
proxy's buffer and the decoder process's socket at once. The events go to a JSONL sink. Each row is one run in a
fresh process: the events written, the events the pipeline dropped, the seconds from the first copy to the
decoder process's end (every event written), and events per second.

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


def _child(exchanges: int, connections: int) -> dict[str, float]:
    import anyio

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
        async with DecoderProcess(config) as decoder:
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
        seconds = time.perf_counter() - started
        summary = decoder.pipeline_summary or {}
        written = sum(1 for _ in out.open())
        return {"written": written, "dropped": summary.get("dropped_total", -1), "seconds": seconds,
                "expected": 2 * per_connection * connections,
                "overflowed": decoder.stats.overflowed_connections}

    with tempfile.TemporaryDirectory() as directory:
        return anyio.run(main, Path(directory) / "events.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=10_000, help="pipelined exchanges in the burst")
    parser.add_argument("--connections", type=int, default=1, help="connections the burst is spread over")
    parser.add_argument("--against", type=Path, help="another oisp source tree to compare with, in the same run")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.exchanges, args.connections)))
        return 0
    trees = [("this tree", SRC)] + ([("against", args.against.resolve())] if args.against else [])
    rows = []
    for _ in range(args.rounds):
        for name, src in trees:
            env = {**os.environ, "PYTHONPATH": str(src)}
            out = subprocess.run([sys.executable, str(HERE), "--child", "--exchanges", str(args.exchanges),
                                  "--connections", str(args.connections)], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append((name, src, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"burst: {args.exchanges} pipelined exchanges on {args.connections} connection(s), one JSONL sink")
    print(f"{'tree':<10} {'events expected':>15} {'written':>8} {'dropped':>8} {'undecoded conns':>15} "
          f"{'seconds':>8} {'events/s':>9}")
    for name, _src, result in rows:
        print(f"{name:<10} {result['expected']:>15.0f} {result['written']:>8.0f} {result['dropped']:>8.0f} "
              f"{result['overflowed']:>15.0f} {result['seconds']:>8.2f} {result['written'] / result['seconds']:>9.0f}")
    for name, src, _ in rows[:len(trees)]:
        print(f"  {name}: {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
