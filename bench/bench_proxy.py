"""What the proxy costs a client: oisp next to a direct connection and next to mitmproxy, measured in one run.

Run ``.venv/bin/python bench/bench_proxy.py`` (about three minutes on 2 cores; ``--quick`` for a short run,
``--help`` for the options). Everything stays on loopback and in temporary directories:

* the upstream (``_proxy_upstream.py``, its own process) is a lean TLS server for api.openai.com with a
  certificate from a throwaway CA (trustme), speaking HTTP/1.1 and HTTP/2;
* oisp is the real CLI, ``oisp run --mode explicit ... --stdout none --output events.jsonl``, so events really
  are decoded and written; it reaches the upstream through ``--resolve api.openai.com:443:127.0.0.1:PORT``.
  It decodes in a separate *decoder process* (its child, ``python -m oisp.decoder_process``), so everything
  measured of oisp is measured of the family, the relay process and its children: CPU shares are summed (and
  the decoder process's is shown on its own), peak RSS is added up process by process, and before each
  measurement the whole family must be idle;
* with ``--inline``, one more column: the same ``oisp run`` with ``--decoder inline`` (decoding, pipeline and
  sinks in the proxy's one process, as before the decoder process), to compare the two designs in one run;
* mitmproxy 11.0.2 (the newest for Python 3.11; its pins clash with oisp's, so it gets its own virtual
  environment, created on first use in ``~/.cache/oisp-bench/mitmproxy-11.0.2``) runs as ``mitmdump`` in
  regular (explicit) mode with its defaults otherwise (HTTP/2 on, no flow file, ``-q``) plus a small addon
  that does what ``--resolve`` does for oisp (connect to the upstream's address when the target is
  api.openai.com:443; SNI and certificate checks still use api.openai.com) and that streams
  ``text/event-stream`` responses, without which mitmproxy holds every SSE chunk until the stream ends;
* the clients (``_proxy_client.py``, one process per measurement) CONNECT to api.openai.com:443 through the
  proxy, or go straight to the upstream for the direct column;
* with ``--relay-only``, one more column: oisp's proxy configured like ``oisp run`` but with nothing decoded
  (``_oisp_relay_only.py``), which separates the cost of interception from the cost of decoding and events;
  with ``--baseline`` as well, the relay-only proxy of that checkout gets a column too;
* ``--cold-only`` measures only the cold requests (a new connection per request), alternating the targets over
  ``--rounds`` rounds, and prints each round's median and the CPU time each cold connection cost the proxy;
* ``--profile`` samples oisp (relay and decoder process, ``py-spy record --subprocesses``) under load
  afterwards and prints where its CPU time goes.

At the end, every ``oisp run`` is stopped with SIGTERM, which waits for its decoder process to catch up and
write every event (up to five minutes), and the report gives, per oisp column, the lines in its events file
and the one-line summary oisp printed on its way out.

Results and their discussion: ``docs/performance.md``.

"Added" is the proxy's number minus the direct number measured in the same run (medians from medians, p99 from
p99). Measurements alternate between the columns (direct, oisp, mitmproxy, ...) in rounds so slow drift in
machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trustme

import oisp
from oisp.tls import CertificateAuthority

HERE = Path(__file__).resolve().parent
MITMPROXY_VERSION = "11.0.2"
DEFAULT_MITM_VENV = Path.home() / ".cache" / "oisp-bench" / f"mitmproxy-{MITMPROXY_VERSION}"
MIB = 1 << 20
RELAY_ONLY = "oisp-relay"
#: ``--relay-only`` with ``--baseline DIR``: the relay-only proxy from the other checkout too.
RELAY_ONLY_BASELINE = "oisp-relay-baseline"
INLINE = "oisp-inline"
#: ``--variant``: the same ``oisp run`` with other ``[capture]`` settings, measured in the same run.
VARIANT = "oisp-variant"
#: ``--baseline DIR``: the same ``oisp run`` from another checkout (before/after a change, in one run).
BASELINE = "oisp-baseline"
#: How long a stopping ``oisp run`` may take: its decoder process may still be catching up on the events.
OISP_STOP_TIMEOUT = 300.0
TITLES = {"mitmproxy": f"mitmproxy {MITMPROXY_VERSION}", RELAY_ONLY: "oisp relay only", INLINE: "oisp inline"}

MITM_ADDON = '''
"""Connect to the benchmark upstream for api.openai.com:443 (oisp: --resolve); stream SSE responses."""

UPSTREAM = ("127.0.0.1", {port})


class BenchRouting:
    def server_connect(self, data):
        if tuple(data.server.address or ()) == ("api.openai.com", 443):
            data.server.address = UPSTREAM

    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [BenchRouting()]
'''

MITM_LEAF = '''
import statistics, sys, tempfile, time
from mitmproxy import certs
from cryptography import x509
store = certs.CertStore.from_store(tempfile.mkdtemp(), "mitmproxy", 2048)
runs = int(sys.argv[1])
for i in range(20):
    store.get_cert(f"w{i}.example.com", [x509.DNSName(f"w{i}.example.com")])
samples = []
for i in range(runs):
    host = f"l{i}.example.com"
    start = time.perf_counter_ns()
    store.get_cert(host, [x509.DNSName(host)])
    samples.append(time.perf_counter_ns() - start)
print(statistics.median(samples))
'''


# -- processes ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ensure_mitmproxy(venv: Path) -> tuple[Path | None, str]:
    """(mitmdump path, "") when mitmproxy is usable, else (None, why not)."""
    mitmdump, python = venv / "bin" / "mitmdump", venv / "bin" / "python"
    check = [str(python), "-c", "import mitmproxy.version as v; print(v.VERSION)"]
    if mitmdump.exists():
        found = subprocess.run(check, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == MITMPROXY_VERSION:
            return mitmdump, ""
    print(f"creating {venv} with mitmproxy {MITMPROXY_VERSION} (once; takes a minute) ...", file=sys.stderr)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mitmproxy=={MITMPROXY_VERSION}"], check=True,
                       capture_output=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return None, f"could not set up mitmproxy {MITMPROXY_VERSION} in {venv}: {' / '.join(tail)}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"could not create {venv}: {exc}"
    found = subprocess.run(check, capture_output=True, text=True)
    if found.returncode != 0:
        return None, f"mitmproxy in {venv} does not import: {found.stderr.strip()[-300:]}"
    return mitmdump, ""


@dataclass
class Target:
    """One column: how clients reach api.openai.com, and which process to watch."""

    name: str
    proxy: tuple[str, int] | None
    pid: int


@dataclass
class OispRun:
    """One ``oisp run`` column: its process, its log (stderr, where the exit summary ends up) and its events."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    events: Path


@dataclass
class Stack:
    tmp: Path
    upstream_port: int
    cafiles: list[str]
    targets: list[Target]
    upstream_pid: int
    oisp_runs: list[OispRun]
    mitm_missing: str = ""
    mitm_python: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


@contextlib.contextmanager
def running_stack(mitm_venv: Path | None, relay_only: bool, inline: bool,
                  variant: str | None = None, baseline: Path | None = None) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="oisp-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        test_ca = trustme.CA()
        leaf = test_ca.issue_cert("api.openai.com")
        test_ca.cert_pem.write_to_path(str(tmp / "upstream-ca.pem"))
        leaf.private_key_pem.write_to_path(str(tmp / "upstream-key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp / "upstream-cert.pem"))
        processes: list[subprocess.Popen[bytes]] = []
        logs = contextlib.ExitStack()
        try:
            port_file = tmp / "upstream.port"
            upstream_log = tmp / "upstream.log"
            upstream = subprocess.Popen(
                [sys.executable, str(HERE / "_proxy_upstream.py"), str(tmp / "upstream-cert.pem"),
                 str(tmp / "upstream-key.pem"), str(port_file)],
                stdout=subprocess.DEVNULL, stderr=logs.enter_context(upstream_log.open("wb")))
            processes.append(upstream)
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if upstream.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the upstream did not start:\n{upstream_log.read_text()[-3000:]}")
                time.sleep(0.02)
            upstream_port = int(port_file.read_text())

            confdir = tmp / "oisp-conf"
            oisp_ca = CertificateAuthority.load_or_create(confdir)
            oisp_cli = Path(sys.executable).with_name("oisp")
            command = [str(oisp_cli)] if oisp_cli.exists() else [sys.executable, "-m", "oisp.cli.main"]
            help_text = subprocess.run([*command, "run", "--help"], capture_output=True, text=True).stdout
            if "--config" in help_text:  # an empty configuration file: the user's oisp.toml must not count
                (tmp / "oisp.toml").write_text("")
                config = ["--config", str(tmp / "oisp.toml")]
            else:
                config = []
            if inline and "--decoder" not in help_text:
                raise RuntimeError("--inline: this oisp's `oisp run` has no --decoder option")
            cafiles = [str(tmp / "upstream-ca.pem"), str(oisp_ca.cert_path)]
            targets = [Target("direct", None, upstream.pid)]
            oisp_runs: list[OispRun] = []
            variants: list[tuple[str, str, list[str]]] = [("oisp", "", [])]
            if inline:
                variants.append((INLINE, "-inline", ["--decoder", "inline"]))
            if variant is not None:  # the same oisp run with other [capture] settings
                (tmp / "oisp-variant.toml").write_text(f"[capture]\n{variant.replace(';', chr(10))}\n")
                variants.append((VARIANT, "-variant", ["--config", str(tmp / "oisp-variant.toml")]))
                TITLES[VARIANT] = f"oisp {variant}"
            if baseline is not None:  # another checkout's oisp (its src/ first on the path), same settings
                variants.append((BASELINE, "-baseline", []))
                TITLES[BASELINE] = f"oisp {baseline.name} (baseline)"
            for name, stem, extra in variants:
                oisp_port, oisp_log, events = free_port(), tmp / f"oisp{stem}.log", tmp / f"events{stem}.jsonl"
                env = None
                if name == BASELINE and baseline is not None:
                    env = {**os.environ, "PYTHONPATH": str(baseline / "src")}
                program = command if env is None else [sys.executable, "-m", "oisp.cli.main"]
                oisp_proc = subprocess.Popen(
                    [*program, "run", *config, "--mode", "explicit", "--listen", f"127.0.0.1:{oisp_port}",
                     "--confdir", str(confdir), "--output", str(events), "--stdout", "none", "--upstream-ca",
                     str(tmp / "upstream-ca.pem"), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream_port}",
                     *extra], stdout=subprocess.DEVNULL, stderr=logs.enter_context(oisp_log.open("wb")), env=env)
                processes.append(oisp_proc)
                wait_listening(oisp_port, oisp_proc, oisp_log, f"oisp run{' '.join(['', *extra])}")
                targets.append(Target(name, ("127.0.0.1", oisp_port), oisp_proc.pid))
                oisp_runs.append(OispRun(name, oisp_proc, oisp_log, events))

            relays = [(RELAY_ONLY, None)] if relay_only else []
            if relay_only and baseline is not None:  # the relay-only proxy of the other checkout, same script
                relays.append((RELAY_ONLY_BASELINE, baseline))
                TITLES[RELAY_ONLY_BASELINE] = f"relay only {baseline.name} (baseline)"
            for name, checkout in relays:
                relay_port, relay_log = free_port(), tmp / f"{name}.log"
                relay = subprocess.Popen(
                    [sys.executable, str(HERE / "_oisp_relay_only.py"), str(relay_port), str(upstream_port),
                     str(confdir), str(tmp / "upstream-ca.pem")], stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context(relay_log.open("wb")),
                    env=None if checkout is None else {**os.environ, "PYTHONPATH": str(checkout / "src")})
                processes.append(relay)
                wait_listening(relay_port, relay, relay_log, TITLES[name])
                targets.append(Target(name, ("127.0.0.1", relay_port), relay.pid))

            missing = "skipped (--no-mitmproxy)"
            if mitm_venv is not None:
                mitmdump, missing = ensure_mitmproxy(mitm_venv)
                if mitmdump is not None:
                    mitm_port, mitm_log, mitm_conf = free_port(), tmp / "mitmproxy.log", tmp / "mitm-conf"
                    addon = tmp / "bench_routing.py"
                    addon.write_text(MITM_ADDON.format(port=upstream_port))
                    mitm = subprocess.Popen(
                        [str(mitmdump), "--mode", "regular", "--listen-host", "127.0.0.1", "--listen-port",
                         str(mitm_port), "--set", f"confdir={mitm_conf}", "--set",
                         f"ssl_verify_upstream_trusted_ca={tmp / 'upstream-ca.pem'}", "-q", "-s", str(addon)],
                        stdout=subprocess.DEVNULL, stderr=logs.enter_context(mitm_log.open("wb")))
                    processes.append(mitm)
                    wait_listening(mitm_port, mitm, mitm_log, "mitmdump")
                    cafiles.append(str(mitm_conf / "mitmproxy-ca-cert.pem"))
                    targets.append(Target("mitmproxy", ("127.0.0.1", mitm_port), mitm.pid))
            mitm_python = mitm_venv / "bin" / "python" if mitm_venv is not None and not missing else None
            yield Stack(tmp, upstream_port, cafiles, targets, upstream.pid, oisp_runs, missing, mitm_python,
                        processes)
        finally:
            for process in reversed(processes):
                stop(process)
            logs.close()


# -- measuring ----------------------------------------------------------------------------------------------------
def family(pid: int) -> list[int]:
    """The process and its children as they are now (oisp's decoder process exists once oisp listens)."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


class Sampler:
    """Samples RSS and CPU time of some processes in a thread: peak RSS, and CPU share within a time window."""

    def __init__(self, pids: list[int], interval: float) -> None:
        self.processes = {pid: psutil.Process(pid) for pid in pids}
        self.interval = interval
        self.samples: dict[int, list[tuple[float, int, float]]] = {pid: [] for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        for pid, process in self.processes.items():
            with contextlib.suppress(psutil.Error), process.oneshot():
                cpu = process.cpu_times()
                self.samples[pid].append((time.monotonic(), process.memory_info().rss, cpu.user + cpu.system))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> Sampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def baseline_rss(self, pid: int) -> int:
        return self.samples[pid][0][1] if self.samples[pid] else 0

    def peak_rss(self, pid: int) -> int:
        return max((rss for _, rss, _ in self.samples[pid]), default=0)

    def cpu_share(self, pid: int, start: float, end: float) -> float:
        inside = [(t, cpu) for t, _, cpu in self.samples[pid] if start <= t <= end]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def family_share(self, pids: list[int], start: float, end: float) -> float:
        """The CPU share of some processes together (a process family: one process and its children)."""
        return sum(self.cpu_share(pid, start, end) for pid in pids)


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (Linux); then VmHWM is the peak of what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def kernel_peak(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def settle(pids: list[int], idle: float = 0.05, timeout: float = 10.0) -> None:
    """Wait until the processes and their children are idle: a proxy (or oisp's decoder process, catching up)
    may still be writing the events of the previous run."""
    processes = [psutil.Process(pid) for pid in sorted({p for root in pids for p in family(root)})]

    def cpu(process: psutil.Process) -> float:
        try:
            return float(sum(process.cpu_times()[:2]))
        except psutil.Error:  # gone: idle from now on
            return 0.0

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [cpu(p) for p in processes]
        time.sleep(0.1)
        if all(cpu(p) - b < idle * 0.1 for p, b in zip(processes, before, strict=True)):
            return


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes have used so far (those gone count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def client(stack: Stack, target: Target, **cfg: Any) -> dict[str, Any]:
    settle(sorted({target.pid, stack.upstream_pid}))
    cfg.update(upstream=["127.0.0.1", stack.upstream_port], proxy=target.proxy, cafiles=stack.cafiles)
    done = subprocess.run([sys.executable, str(HERE / "_proxy_client.py"), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"client {cfg['kind']} via {target.name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass
class Results:
    """Everything measured, per target name."""

    latency: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    transfer: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    #: Every transfer's MB/s, per (kind, target), in the order measured.
    transfer_runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: CPU seconds the proxy (or, for direct, the upstream) used per transfer, per (kind, target).
    transfer_cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    leaf_ms: dict[str, float] = field(default_factory=dict)
    #: Per target, each round's median cold request (ns), and CPU seconds per cold connection (the proxy's
    #: processes; for direct, the upstream's; "NAME/relay": oisp's relay process alone).
    cold_runs: dict[str, list[float]] = field(default_factory=dict)
    cold_cpu: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measure(stack: Stack, args: argparse.Namespace) -> Results:
    results = Results()
    q = 5 if args.quick else 1
    rounds = 1 if args.quick else args.rounds

    def pooled(key: tuple[str, str], samples: list[int]) -> None:
        results.latency.setdefault(key, []).extend(samples)

    for round_ in range(0 if args.bulk else rounds):
        for target in stack.targets:
            what = "cold requests" if args.cold_only else "keep-alive, cold and SSE latency"
            progress(f"round {round_ + 1}/{rounds}: {what} via {target.name}")
            for alpn, name in () if args.cold_only else (("http/1.1", "h1"), ("h2", "h2")):
                count = args.requests // rounds // (1 if alpn == "http/1.1" else 2) // q
                out = client(stack, target, kind="latency", alpn=alpn, warmup=100, requests=count)
                pooled((name, target.name), out["samples"])
            cold_requests = args.cold // rounds // q
            watched = family(target.pid)
            cpu_before, relay_before = cpu_seconds(watched), cpu_seconds(watched[:1])
            out = client(stack, target, kind="cold", warmup=5, requests=cold_requests, pause=0.002)
            pooled(("cold", target.name), out["samples"])
            results.cold_runs.setdefault(target.name, []).append(statistics.median(out["samples"]))
            connections = cold_requests + 5  # the warm-up ones too
            results.cold_cpu.setdefault(target.name, []).append((cpu_seconds(watched) - cpu_before) / connections)
            if target.proxy and len(watched) > 1:  # oisp: the relay's own share
                results.cold_cpu.setdefault(target.name + "/relay", []).append(
                    (cpu_seconds(watched[:1]) - relay_before) / connections)
            if args.cold_only:
                continue
            out = client(stack, target, kind="sse", chunks=args.sse_chunks // rounds // q, interval_us=2000)
            pooled(("sse", target.name), out["samples"])

    for round_ in range(0 if args.bulk or args.cold_only else rounds):
        for target in stack.targets:
            progress(f"round {round_ + 1}/{rounds}: requests/s via {target.name}")
            settle([target.pid, stack.upstream_pid])
            watched, upstream = family(target.pid), family(stack.upstream_pid)
            with Sampler(sorted({*watched, *upstream}), 0.1) as sampler:
                out = client(stack, target, kind="rps", connections=args.connections, warmup=20,
                             duration=args.duration / q)
            window = out["window"]  # the client's measuring window, in the system-wide monotonic clock
            results.rps.setdefault(target.name, []).append(out["rps"])
            shares = results.cpu.setdefault(target.name, {})
            shares.setdefault("client", []).append(out["client_cpu"])
            role = "proxy" if target.proxy else "upstream"
            shares.setdefault(role, []).append(sampler.family_share(watched, *window))
            if target.proxy and len(watched) > 1:  # oisp: the relay, and its decoder process
                shares.setdefault("relay", []).append(sampler.family_share(watched[:1], *window))
                shares.setdefault("decoder process", []).append(sampler.family_share(watched[1:], *window))
            if target.proxy:
                shares.setdefault("upstream", []).append(sampler.family_share(upstream, *window))

    size = args.mib * MIB
    for round_ in range(0 if args.cold_only else rounds):
        for kind in ("upload", "download"):
            for target in stack.targets:
                progress(f"round {round_ + 1}/{rounds}: {args.mib} MiB {kind} via {target.name}")
                settle([target.pid, stack.upstream_pid])
                watched = family(target.pid)
                kernel = {pid: reset_peak(pid) for pid in watched}
                cpu_before, relay_before = cpu_seconds(watched), cpu_seconds(watched[:1])
                with Sampler(watched, 0.002) as sampler:
                    out = client(stack, target, kind=kind, bytes=size)
                results.transfer_cpu.setdefault((kind, target.name), []).append(cpu_seconds(watched) - cpu_before)
                if target.proxy and len(watched) > 1:  # oisp: the relay's own share
                    results.transfer_cpu.setdefault((kind, target.name + "/relay"), []).append(
                        cpu_seconds(watched[:1]) - relay_before)
                base = added = 0
                for pid in watched:  # per process, the larger of the sampled and the kernel's peak, summed
                    peak = sampler.peak_rss(pid)
                    hwm = kernel_peak(pid) if kernel[pid] else None
                    if hwm is not None:
                        peak = max(peak, hwm)
                    base += sampler.baseline_rss(pid)
                    added += peak - sampler.baseline_rss(pid)
                entry = results.transfer.setdefault((kind, target.name), {"mbps": 0.0, "base": 1e18, "added": 0.0})
                entry["mbps"] = max(entry["mbps"], size / out["seconds"] / 1e6)
                results.transfer_runs.setdefault((kind, target.name), []).append(size / out["seconds"] / 1e6)
                entry["base"] = min(entry["base"], base)
                entry["added"] = max(entry["added"], added)

    if args.bulk or args.cold_only:
        return results
    progress("leaf issuance")
    with tempfile.TemporaryDirectory(prefix="oisp-bench-ca-") as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp), cache_size=args.leaves + 100)
        for i in range(20):
            ca.leaf_for(f"w{i}.example.com")
        samples = []
        for i in range(args.leaves):
            start = time.perf_counter_ns()
            ca.leaf_for(f"l{i}.example.com")
            samples.append(time.perf_counter_ns() - start)
        results.leaf_ms["oisp"] = statistics.median(samples) / 1e6
    if stack.mitm_python is not None:
        done = subprocess.run([str(stack.mitm_python), "-c", MITM_LEAF, str(max(50, args.leaves // 10))],
                              capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            results.leaf_ms["mitmproxy"] = float(done.stdout) / 1e6
        else:
            results.notes.append(f"mitmproxy leaf timing failed: {done.stderr.strip()[-300:]}")
    return results


#: Where oisp's CPU time goes, by the innermost oisp module on each sampled stack (first match wins).
COMPONENTS = (
    ("oisp/proxy/", "TLS and relay (oisp.proxy, incl. ssl and socket calls)"),
    ("oisp/http/", "HTTP decoding (oisp.http)"),
    ("oisp/framing/", "provider decoding (oisp.providers, oisp.event_decoder, oisp.framing)"),
    ("oisp/providers/", "provider decoding (oisp.providers, oisp.event_decoder, oisp.framing)"),
    ("oisp/event_decoder.py", "provider decoding (oisp.providers, oisp.event_decoder, oisp.framing)"),
    ("oisp/redaction.py", "redaction (oisp.redaction)"),
    ("oisp/events/", "event building and serialization (oisp.events)"),
    ("oisp/pipeline.py", "pipeline (oisp.pipeline)"),
    ("oisp/sinks/", "sinks (oisp.sinks)"),
    ("oisp/attribution", "process attribution (oisp.attribution)"),
    ("oisp/decoder_process/", "passing copies to and from the decoder process (oisp.decoder_process)"),
)


def profile_breakdown(raw: Path, root: int) -> tuple[dict[str, int], dict[str, int]]:
    """Samples per component, and per process (relay, decoder process), from a ``py-spy record --subprocesses
    -f raw`` file (busy samples only; each stack starts with a ``process PID:"command"`` frame per generation)."""
    counts: dict[str, int] = {}
    processes: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        pids = [frame.split(":", 1)[0].removeprefix("process ") for frame in frames if frame.startswith("process ")]
        frames = [frame for frame in frames if not frame.startswith("process ")]
        who = "relay" if not pids or pids[-1] == str(root) else "decoder process"
        processes[who] = processes.get(who, 0) + int(number)
        component = "event loop, anyio and the rest"
        for frame in reversed(frames):
            found = next((name for key, name in COMPONENTS if key in frame), None)
            if found is not None:
                component = found
                break
            if "oisp/" in frame:
                component = "other oisp code"
                break
        counts[component] = counts.get(component, 0) + int(number)
    return counts, processes


def profile_oisp(stack: Stack, args: argparse.Namespace) -> list[str]:
    """Run requests/s against oisp under py-spy (relay and decoder process); where each request's CPU time goes."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return ["--profile: py-spy not found (pip install py-spy)"]
    target = next(t for t in stack.targets if t.name == "oisp")
    raw, rate, seconds = stack.tmp / "oisp-profile.txt", 250, 4
    settle([target.pid, stack.upstream_pid])
    spy = subprocess.Popen([py_spy, "record", "--subprocesses", "-p", str(target.pid), "-r", str(rate), "-d",
                            str(seconds + 2), "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    time.sleep(0.5)
    out = client(stack, target, kind="rps", connections=args.connections, warmup=20, duration=seconds)
    _, err = spy.communicate(timeout=60)
    if not raw.exists():
        return [f"--profile: py-spy failed: {err.decode(errors='replace').strip()[-300:]}"]
    counts, processes = profile_breakdown(raw, target.pid)
    total = sum(counts.values())
    if not total:
        return [f"--profile: py-spy recorded no busy samples: {err.decode(errors='replace').strip()[-300:]}"]
    split = ", ".join(f"{who} {processes.get(who, 0) / total:.0%}" for who in ("relay", "decoder process"))
    lines = [f"where oisp's CPU time goes under requests/s load (py-spy --subprocesses: relay and decoder process "
             f"both counted; {total} busy samples at {rate} Hz, {split}; {out['rps']:,.0f} requests/s while "
             f"sampled):"]
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        lines.append(f"  {count / total:6.1%}  {name}")
    return lines


def top_functions(raw: Path, root: int, limit: int = 12) -> list[str]:
    """The innermost frames with the most samples (self time), each with its process (relay or decoder)."""
    counts: dict[tuple[str, str], int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        pids = [frame.split(":", 1)[0].removeprefix("process ") for frame in frames if frame.startswith("process ")]
        who = "relay" if not pids or pids[-1] == str(root) else "decoder"
        leaf = frames[-1].split(" (", 1)[0] + " " + frames[-1].rsplit("/", 1)[-1].rstrip(")")
        counts[(who, leaf)] = counts.get((who, leaf), 0) + int(number)
        total += int(number)
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    return [f"    {n / total:6.1%}  {who:7}  {leaf}" for (who, leaf), n in ranked]


def profile_bulk(stack: Stack, args: argparse.Namespace) -> list[str]:
    """``--bulk --profile``: one upload and one download through oisp under py-spy (relay and decoder process)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return ["--profile: py-spy not found (pip install py-spy)"]
    target = next(t for t in stack.targets if t.name == "oisp")
    lines: list[str] = []
    for kind in ("upload", "download"):
        raw, rate = stack.tmp / f"oisp-profile-{kind}.txt", 500
        settle([target.pid, stack.upstream_pid])
        spy = subprocess.Popen([py_spy, "record", "--subprocesses", "--nonblocking", "-p", str(target.pid), "-r",
                                str(rate), "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        out = client(stack, target, kind=kind, bytes=args.mib * MIB)
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            lines.append(f"--profile: py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
            continue
        counts, processes = profile_breakdown(raw, target.pid)
        total = sum(counts.values()) or 1
        split = ", ".join(f"{who} {processes.get(who, 0)} samples" for who in ("relay", "decoder process"))
        mbps = args.mib * MIB / out["seconds"] / 1e6
        lines.append(f"where oisp's CPU time goes in a {args.mib} MiB {kind} ({mbps:,.0f} MB/s while sampled; "
                     f"py-spy at {rate} Hz, busy samples only: {split}):")
        for name, count in sorted(counts.items(), key=lambda item: -item[1]):
            lines.append(f"  {count / total:6.1%}  {name}")
        lines.append("  busiest functions (self time):")
        lines.extend(top_functions(raw, target.pid))
    return lines


def stop_oisp(stack: Stack) -> list[str]:
    """Stop every ``oisp run`` gracefully (SIGTERM: it drains its decoder process and prints its summary); per
    oisp column, the events it wrote and that summary line."""
    for run in stack.oisp_runs:
        progress(f"stopping {run.name} (SIGTERM; it writes every event first, up to {OISP_STOP_TIMEOUT:.0f} s)")
        stop(run.process, OISP_STOP_TIMEOUT)
    lines = []
    for run in stack.oisp_runs:
        events = 0
        if run.events.exists():
            with run.events.open("rb") as lines_:
                events = sum(1 for _ in lines_)
        log = run.log.read_text(errors="replace").splitlines() if run.log.exists() else []
        summary = next((line for line in reversed(log) if line.startswith("oisp: ")),
                       f"no summary (exit code {run.process.returncode})")
        lines.append(f"{TITLES.get(run.name, run.name)}: {events} lines in its events file; on exit: {summary}")
    return lines


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- report -------------------------------------------------------------------------------------------------------
def ms(ns: float) -> float:
    return ns / 1e6


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "pass" if ok else "FAIL"


def columns(stack: Stack) -> list[str]:
    """Target names in table order; mitmproxy keeps its column when it is missing (cells say n/a)."""
    names = [t.name for t in stack.targets]
    return names if "mitmproxy" in names else [*names, "mitmproxy"]


def bulk_table(results: Results, stack: Stack, args: argparse.Namespace) -> list[tuple[str, ...]]:
    """``--bulk``: upload and download throughput (best and median of the rounds), against direct and mitmproxy."""
    names = columns(stack)
    rows: list[tuple[str, ...]] = []
    for kind in ("upload", "download"):
        runs = {n: results.transfer_runs[(kind, n)] for n in names if (kind, n) in results.transfer_runs}
        for stat, fn in (("best", max), ("median", statistics.median)):
            value = {n: fn(v) for n, v in runs.items()}
            cells = []
            for n in names:
                if n not in value:
                    cells.append("n/a")
                    continue
                cell = f"{value[n]:,.0f} MB/s"
                if n != "direct":
                    cell += f" ({value[n] / value['direct']:.0%}"
                    cell += f", {value[n] / value['mitmproxy']:.2f}x mitm)" if "mitmproxy" in value else ")"
                cells.append(cell)
            oisp_ = value["oisp"]
            ok = oisp_ >= value["direct"] / 2 and ("mitmproxy" not in value or oisp_ >= value["mitmproxy"])
            rows.append((f"{args.mib} MiB {kind}, {stat} of {len(runs['direct'])}", *cells,
                         ">= mitmproxy, >= 50% direct", verdict(ok)))
        cpu = {n: statistics.median(results.transfer_cpu[(kind, n)]) for n in names
               if (kind, n) in results.transfer_cpu}
        cells = [f"{cpu[n] * 1e3 / args.mib:.1f} ms" if n in cpu else "n/a" for n in names]
        for i, n in enumerate(names):
            relay_cpu = results.transfer_cpu.get((kind, n + "/relay"))
            if relay_cpu:
                cells[i] += f" (relay {statistics.median(relay_cpu) * 1e3 / args.mib:.1f})"
        rows.append((f"{args.mib} MiB {kind}, CPU per MiB (median)", *cells, "", "—"))
        entries = {n: results.transfer[(kind, n)] for n in names if (kind, n) in results.transfer}
        cells = ["—"] + [f"+{entries[n]['added'] / 1e6:.1f} MB (of {entries[n]['base'] / 1e6:.0f})"
                         if n in entries else "n/a" for n in names[1:]]
        rows.append((f"{args.mib} MiB {kind}, peak RSS added", *cells, "<= +30 MB",
                     verdict(entries["oisp"]["added"] / 1e6 <= 30)))
    return rows


def table(results: Results, stack: Stack, args: argparse.Namespace) -> list[tuple[str, ...]]:
    if args.bulk:
        return bulk_table(results, stack, args)
    names = columns(stack)
    measured = {t.name for t in stack.targets}
    rows: list[tuple[str, ...]] = []
    oisp_limit = "oisp" if "oisp" in measured else next(n for n in names[1:] if n in measured)

    def added_rows(key: str, label: str, limits: dict[str, float]) -> None:
        direct = results.latency[(key, "direct")]
        for stat, fn in (("median", statistics.median), ("p99", p99)):
            base = fn(direct)
            cells, added = [f"{ms(base):.3f} ms"], {}
            for name in names[1:]:
                if name in measured:
                    added[name] = ms(fn(results.latency[(key, name)]) - base)
                cells.append(f"{added[name]:+.3f} ms" if name in added else "n/a")
            limit = limits.get(stat)
            rows.append((f"{label}, {stat}", *cells, f"<= +{limit:g} ms" if limit is not None else "",
                         verdict(None if limit is None else added[oisp_limit] <= limit)))

    if args.cold_only:
        added_rows("cold", "cold request (new conn.), added", {"median": 1.5})
        return rows
    added_rows("h1", "keep-alive request h1, added", {"median": 0.3})
    added_rows("h2", "keep-alive request h2, added", {"median": 0.3})
    added_rows("cold", "cold request (new conn.), added", {"median": 1.5})

    rps = {name: statistics.mean(values) for name, values in results.rps.items()}
    ratio = rps["oisp"] / rps["mitmproxy"] if "mitmproxy" in rps else None
    cells = [f"{rps[name]:,.0f}" if name in rps else "n/a" for name in names]
    if ratio is not None:
        cells[names.index("oisp")] += f" ({ratio:.2f}x)"
    rows.append((f"requests/s, {args.connections} keep-alive h1 conns", *cells, ">= 3x mitmproxy",
                 verdict(None if ratio is None else ratio >= 3)))

    added_rows("sse", "SSE chunk delay, added", {"p99": 1.0})

    for kind in ("upload", "download"):
        entries = {n: results.transfer[(kind, n)] for n in names if (kind, n) in results.transfer}
        cells = [f"{entries[n]['mbps']:,.0f} MB/s" if n in entries else "n/a" for n in names]
        rows.append((f"{args.mib} MiB {kind}, throughput", *cells, "", "—"))
        cells = ["—"] + [f"+{entries[n]['added'] / 1e6:.1f} MB (of {entries[n]['base'] / 1e6:.0f})"
                         if n in entries else "n/a" for n in names[1:]]
        rows.append((f"{args.mib} MiB {kind}, peak RSS added", *cells, "<= +30 MB",
                     verdict(entries["oisp"]["added"] / 1e6 <= 30)))

    leaf = results.leaf_ms
    cells = ["—"] + [f"{leaf[n]:.3f} ms" if n in leaf else "—" for n in names[1:]]
    rows.append(("leaf certificate, new host, median", *cells, "", "—"))
    return rows


def print_report(results: Results, stack: Stack, args: argparse.Namespace, started: float,
                 load_before: tuple[float, ...], stopped: list[str]) -> None:
    rows = table(results, stack, args)
    header = ("metric", *(TITLES.get(name, name) for name in columns(stack)), "target", "oisp")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    print(f"oisp {oisp.__version__}, Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
          f"{platform.machine()} x{os.cpu_count()} ({platform.processor() or platform.system()}); "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{time.monotonic() - started:.0f} s")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print()
    if args.bulk:
        print(f"one keep-alive TLS connection (HTTP/1.1) per transfer, {args.mib} MiB each, targets alternated in "
              f"{len(results.transfer_runs[('upload', 'direct')])} rounds. CPU per MiB: the proxy's processes "
              f"(oisp: relay and decoder process), for direct the upstream's. MB/s of every run:")
        for (kind, name), runs in results.transfer_runs.items():
            print(f"  {kind:8} {TITLES.get(name, name):18} " + " ".join(f"{v:,.0f}" for v in runs))
    elif not args.cold_only:
        print_latency_counts(results, args)
    if not args.bulk:
        print_cold(results, stack)
    for line in stopped:
        print(line)
    if not any(t.name == "mitmproxy" for t in stack.targets):
        print(f"mitmproxy column missing: {stack.mitm_missing}")
    for note in results.notes:
        print(note)


def print_cold(results: Results, stack: Stack) -> None:
    """Each round's median cold request, and the CPU each cold connection cost (median of the rounds)."""
    print(f"cold requests: {len(results.latency[('cold', 'direct')])} per target, one new connection each "
          f"(CONNECT, TLS, one HTTP/1.1 request), 2 ms apart; each round's median, ms:")
    for target in stack.targets:
        runs = results.cold_runs.get(target.name, [])
        print(f"  {TITLES.get(target.name, target.name):28} " + " ".join(f"{ms(v):.2f}" for v in runs))
    parts = []
    for target in stack.targets:
        cpu = results.cold_cpu.get(target.name)
        if not cpu:
            continue
        part = f"{TITLES.get(target.name, target.name)} {statistics.median(cpu) * 1e3:.2f} ms"
        if results.cold_cpu.get(target.name + "/relay"):
            part += f" (relay {statistics.median(results.cold_cpu[target.name + '/relay']) * 1e3:.2f})"
        parts.append(part)
    print("CPU per cold connection (the proxy's processes; direct: the upstream's), median of rounds: "
          + ", ".join(parts))


def print_latency_counts(results: Results, args: argparse.Namespace) -> None:
    count = {key: len(results.latency[(key, "direct")]) for key in ("h1", "h2", "cold", "sse")}
    print(f"samples per target: keep-alive h1 {count['h1']}, h2 {count['h2']}, cold {count['cold']}, "
          f"SSE chunks {count['sse']} "
          f"(one every 2 ms); requests/s: {args.connections} connections, "
          f"{len(results.rps['direct'])} x {args.duration / (5 if args.quick else 1):g} s")
    for name, measured in results.cpu.items():
        shares = {who: statistics.mean(values) for who, values in measured.items()}
        parts = []
        for who, share in shares.items():
            if who in ("relay", "decoder process"):
                continue
            parts.append(f"{who} {share:.0%}")
            if who == "proxy" and "decoder process" in shares:
                parts[-1] += f" (relay {shares['relay']:.0%}, decoder process {shares['decoder process']:.0%})"
        rps = statistics.mean(results.rps[name])
        proxy = f"; {shares['proxy'] / rps * 1e6:,.0f} µs of proxy CPU per request" if "proxy" in shares else ""
        print(f"CPU during requests/s via {TITLES.get(name, name)} (one core = 100%): {', '.join(parts)}{proxy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of every count and duration, one round")
    parser.add_argument("--requests", type=int, default=3000, help="keep-alive h1 requests per target (h2: half)")
    parser.add_argument("--cold", type=int, default=300, help="cold requests per target")
    parser.add_argument("--sse-chunks", type=int, default=1500, help="SSE chunks per target (one per 2 ms)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections for requests/s")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per requests/s run")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the targets this many times")
    parser.add_argument("--mib", type=int, default=64, help="upload/download size in MiB")
    parser.add_argument("--leaves", type=int, default=2000, help="new-host leaves issued for the leaf timing")
    parser.add_argument("--mitmproxy-venv", type=Path, default=DEFAULT_MITM_VENV,
                        help=f"virtual environment for mitmproxy (created if needed; default {DEFAULT_MITM_VENV})")
    parser.add_argument("--no-mitmproxy", action="store_true", help="leave mitmproxy out")
    parser.add_argument("--inline", action="store_true",
                        help="add a column for oisp run --decoder inline (decoding in the proxy's one process)")
    parser.add_argument("--relay-only", action="store_true",
                        help="add a column for oisp's proxy without decoding (what interception alone costs)")
    parser.add_argument("--variant", metavar="'KEY = VALUE[; ...]'",
                        help="add a column for oisp run with these [capture] settings (TOML), e.g. "
                             "--variant 'decoder_cpu = \"last\"'")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="add a column for the same oisp run from another checkout of oisp (its src/ put first "
                             "on PYTHONPATH), e.g. the main branch, to compare before and after in one run")
    parser.add_argument("--cold-only", action="store_true",
                        help="only the cold requests (a new connection per request), with their CPU per connection")
    parser.add_argument("--bulk", action="store_true",
                        help="only the uploads and downloads (best and median MB/s of --rounds rounds per target)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, sample oisp (relay and decoder process) with py-spy under requests/s load "
                             "and print where the time goes")
    args = parser.parse_args()
    started, load_before = time.monotonic(), os.getloadavg()
    with running_stack(None if args.no_mitmproxy else args.mitmproxy_venv, args.relay_only, args.inline,
                       args.variant, args.baseline) as stack:
        if stack.mitm_missing and not any(t.name == "mitmproxy" for t in stack.targets):
            progress(f"mitmproxy column missing: {stack.mitm_missing}")
        results = measure(stack, args)
        if args.profile:
            progress("profiling oisp under bulk transfers" if args.bulk else "profiling oisp under requests/s load")
            results.notes.extend(profile_bulk(stack, args) if args.bulk else profile_oisp(stack, args))
        stopped = stop_oisp(stack)
        print_report(results, stack, args, started, load_before, stopped)


if __name__ == "__main__":
    main()
