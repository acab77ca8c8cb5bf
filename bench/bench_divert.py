"""Benchmark of the transparent path: diverted (Interceptor + a relaying test proxy) against direct.

Runs as root, entirely inside network namespaces it creates (client ── veth ── upstream), and removes them
when done. Measures, for a direct and a diverted connection to "api.openai.com:443" (an echo server in the
upstream namespace):

- round-trip latency of small messages on an open connection (median, p99), and the added latency;
- connection setup (connect + first server byte), median and p99;
- echo throughput of a bulk transfer, with the veth's segmentation offload on (large GSO packets) and off
  (every packet at most 1500 bytes, which shows the per-packet cost of the Python translation loop);
- packets per second the interceptor translated during each bulk run, and packets per CPU-second of the
  interceptor's process (its utime + stime from /proc: the figure that a loaded, shared machine changes least).

The test proxy (tests/interception/_agent.py) accepts each diverted connection in the interceptor's process,
asks the interceptor where it was going and connects upstream there (what a real proxy does in-process), then
hands both sockets to a relay in a child process (thread-per-direction Python), so that relaying threads do not
compete with the packet thread for the GIL. Until this change the relay ran in threads of the interceptor's
process, which put both on one GIL and counted the relay's CPU as the interceptor's; ``--in-process-relay``
adds that measurement as a column ("diverted, relay in-proc"), comparable with numbers taken before. The
diverted numbers still include the test proxy's work, so they are an upper bound on what the interception
itself adds.

With ``--baseline CHECKOUT``, the diverted measurement is made a second time with the interceptor of another
checkout of oisp (its ``src/`` first on ``PYTHONPATH``, e.g. the main branch), so before and after a change are
compared in one run. ``--rounds N`` repeats every measurement N times, alternating direct and diverted, and
reports the median (the bulk rows: the best) of the rounds.

usage: sudo .venv/bin/python bench/bench_divert.py [--bulk-mb 100] [--rtts 2000] [--conns 200] [--rounds 1]
                                                   [--baseline CHECKOUT] [--in-process-relay]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import Lab, Namespace, lab_unavailable_reason, read_line  # noqa: E402

HELPERS = REPO / "tests" / "interception"
PROXY_PORT = 15001


def _client(ns: Namespace, *args: str, timeout: float = 600) -> dict[str, Any]:
    res = ns.run(ns.python(str(HELPERS / "_client.py"), *args), timeout=timeout, check=False)
    if res.returncode != 0:
        raise SystemExit(f"client {args} failed: {res.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def _start(ns: Namespace, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    proc = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    **kwargs)
    return proc


def _agent_stats(agent: subprocess.Popen[str]) -> dict[str, Any]:
    assert agent.stdin is not None
    agent.stdin.write("stats\n")
    agent.stdin.flush()
    while True:
        event: dict[str, Any] = json.loads(read_line(agent, timeout=30))
        if event.get("event") == "stats":
            return event


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(ns: Namespace, args: argparse.Namespace, agent: subprocess.Popen[str] | None,
             dev: str, agent_pid: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group, argv, n in (("rtt", ("pingpong", "api.openai.com", "443", str(args.rtts), "64"), args.rtts),
                           ("connect", ("connect", "api.openai.com", "443", str(args.conns)), args.conns)):
        stats_before = _agent_stats(agent) if agent else {}
        out[group] = _client(ns, *argv)
        if not agent:
            continue
        # The packet thread per batch: wake-up (capture of its first packet to its receipt) and busy time
        # (receipt to re-injection done); batches per round trip or connection.
        stats_after = _agent_stats(agent)
        batches = stats_after.get("batches", 0) - stats_before.get("batches", 0)
        for key, counter in (("wake_us", "capture_delay_us"), ("busy_us", "batch_busy_us")):
            total = stats_after.get(counter, 0) - stats_before.get(counter, 0)
            out[group][key] = total / batches if batches and counter in stats_after else None
        out[group]["batches_per"] = batches / n if "batches" in stats_after else None
        out[group]["swaps"] = stats_after.get("filter_swaps", 0) - stats_before.get("filter_swaps", 0)
    for label, segs in (("gso", None), ("mtu", "1")):
        if segs is not None:
            subprocess.run(["ip", "netns", "exec", ns.name, "ip", "link", "set", "dev", dev, "gso_max_segs", segs],
                           check=True, timeout=20)
        size = args.bulk_mb * 1_000_000 if segs is None else args.bulk_mb * 1_000_000 // 4
        stats_before = _agent_stats(agent) if agent else {}
        before = stats_before.get("translated_packets", 0)
        cpu_before = _cpu_seconds(agent_pid) if agent_pid else 0.0
        bulk = _client(ns, "bulk", "api.openai.com", "443", str(size))
        cpu = _cpu_seconds(agent_pid) - cpu_before if agent_pid else 0.0
        stats_after = _agent_stats(agent) if agent else {}
        after = stats_after.get("translated_packets", 0)
        handle_before, handle_after = stats_before.get("network_handle", {}), stats_after.get("network_handle", {})
        lost = {k: v - handle_before.get(k, 0) for k, v in handle_after.items()
                if k in ("dropped", "ringbuf_full", "queue_full", "too_big")}
        if any(lost.values()):
            print(f"  {label}: packets lost in the diverter: {lost}", file=sys.stderr, flush=True)
        if not bulk["intact"]:
            raise SystemExit(f"bulk transfer corrupted: {bulk}")
        out[f"bulk_{label}"] = {**bulk, "mb_s": 2 * size / bulk["seconds"] / 1e6,
                                "pps": (after - before) / bulk["seconds"] if agent else None,
                                "pp_cpu_s": (after - before) / cpu if agent and cpu > 0 else None,
                                "fast_share": 100 * (stats_after.get("fast_path_packets", 0)
                                                     - stats_before.get("fast_path_packets", 0)) / (after - before)
                                if agent and after > before and "fast_path_packets" in stats_after else None,
                                "cpu_us_per_mb": cpu * 1e6 / (2 * size / 1e6) if agent else None}
        if segs is not None:
            subprocess.run(["ip", "netns", "exec", ns.name, "ip", "link", "set", "dev", dev, "gso_max_segs",
                            "65535"], check=True, timeout=20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk-mb", type=int, default=100, help="bulk transfer size, MB each way")
    parser.add_argument("--rtts", type=int, default=2000, help="round trips for the latency measurement")
    parser.add_argument("--conns", type=int, default=200, help="connections for the setup-time measurement")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement, alternating the columns")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="add a column: the interceptor of another oisp checkout (its src/ on PYTHONPATH)")
    parser.add_argument("--in-process-relay", action="store_true",
                        help="add a column: this interceptor with the test proxy relaying in its own process's "
                             "threads (how this bench measured before the relay got its own process)")
    args = parser.parse_args()
    reason = lab_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")

    with Lab() as lab:
        client, upstream = lab.namespace(), lab.namespace()
        link = lab.link(client, upstream)
        client.set_hosts({"api.openai.com": [link.ip4_b]})
        server = _start(upstream, upstream.python(str(HELPERS / "_servers.py"), "echo", "::", "443"))
        assert read_line(server, timeout=15) == "ready"

        columns = ["direct", "diverted"] + (["baseline"] if args.baseline else []) + (
            ["relay in-proc"] if args.in_process_relay else [])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in columns}
        for round_ in range(args.rounds):
            for name in columns:
                print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                if name == "direct":
                    runs[name].append(_measure(client, args, None, link.dev_a))
                    continue
                env = None
                if name == "baseline":
                    env = {**(lab.env or os.environ),
                           "PYTHONPATH": os.pathsep.join([str(Path(args.baseline).resolve() / "src"), str(REPO)])}
                config = json.dumps({"targets": ["api.openai.com"], "options": {"sniff_dns": False},
                                     "relay": "thread" if name == "relay in-proc" else "process"})
                agent = _start(client, client.python(str(HELPERS / "_agent.py"), str(PROXY_PORT), config),
                               **({"env": env} if env else {}))
                ready = json.loads(read_line(agent, timeout=30))
                if ready.get("event") != "ready":
                    raise SystemExit(f"agent did not start: {ready}")
                runs[name].append(_measure(client, args, agent, link.dev_a, int(ready["pid"])))
                assert agent.stdin is not None
                agent.stdin.write("quit\n")
                agent.stdin.flush()
                agent.wait(timeout=60)

    rows = [
        ("RTT 64 B, median (us)", "rtt", "median_us"),
        ("RTT 64 B, p99 (us)", "rtt", "p99_us"),
        ("RTT: batches received per round trip", "rtt", "batches_per"),
        ("RTT: capture to receipt, mean per batch (us)", "rtt", "wake_us"),
        ("RTT: receipt to re-injected, mean per batch (us)", "rtt", "busy_us"),
        ("connect+first byte, median (us)", "connect", "median_us"),
        ("connect+first byte, p99 (us)", "connect", "p99_us"),
        ("setup: batches received per connection", "connect", "batches_per"),
        ("setup: NETWORK handle reopened (filter swaps)", "connect", "swaps"),
        ("setup: capture to receipt, mean per batch (us)", "connect", "wake_us"),
        ("setup: receipt to re-injected, mean per batch (us)", "connect", "busy_us"),
        ("echo throughput, GSO on (MB/s)", "bulk_gso", "mb_s"),
        ("echo throughput, 1500 B packets (MB/s)", "bulk_mtu", "mb_s"),
        ("translated packets/s, GSO on", "bulk_gso", "pps"),
        ("translated packets/s, 1500 B packets", "bulk_mtu", "pps"),
        ("translated packets per CPU-s, GSO on", "bulk_gso", "pp_cpu_s"),
        ("translated packets per CPU-s, 1500 B", "bulk_mtu", "pp_cpu_s"),
        ("interceptor process CPU per MB, 1500 B (us)", "bulk_mtu", "cpu_us_per_mb"),
        ("fast-path share of translated, 1500 B (%)", "bulk_mtu", "fast_share"),
    ]

    def value(name: str, group: str, key: str) -> float | None:
        values = [run[group][key] for run in runs[name] if run[group].get(key) is not None]
        if not values:
            return None
        return max(values) if key in ("mb_s", "pps", "pp_cpu_s") else statistics.median(values)

    header = f"\n{'measure':44} {'direct':>12}"
    for name in columns[1:]:
        header += f" {name:>14} {'added':>10}"
    print(header)
    print("-" * (len(header) - 1))
    for title, group, key in rows:
        d = value("direct", group, key)
        line = f"{title:44} " + (f"{d:12.1f}" if d is not None else f"{'-':>12}")
        for name in columns[1:]:
            v = value(name, group, key)
            added = f"{v - d:+10.1f}" if d is not None and v is not None and key.endswith("_us") else f"{'':10}"
            line += f" {v:14.1f} {added}" if v is not None else f" {'-':>14} {'':10}"
        print(line)
    in_proc = " (in the relay in-proc column: in threads of the interceptor process)" if args.in_process_relay else ""
    print(f"\nbulk: {args.bulk_mb} MB each way with GSO, {args.bulk_mb // 4} MB at 1500 B; "
          f"{args.rtts} round trips; {args.conns} connections; all transfers verified by SHA-256; "
          f"{args.rounds} round(s), direct and diverted alternated (latency: median of the rounds, throughput: "
          f"best); baseline: {args.baseline or 'none'}; the test proxy relays in a child process"
          f"{in_proc}; CPU: the interceptor's process (interceptor + the test proxy's accept/lookup/connect)")


if __name__ == "__main__":
    main()
