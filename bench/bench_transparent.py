"""Benchmark of bulk transfers in transparent mode: direct, through ``oisp run --mode transparent``, and through
mitmproxy in its Linux transparent mode, measured in one run.

Runs as root, entirely inside network namespaces it creates (client ── veth ── upstream), and removes them when
done, as the transparent end-to-end tests do. The upstream namespace runs a TLS server standing in for
api.openai.com (tests/interception/_ai_upstream.py). In the client namespace, curl (run as the user ``nobody``)
uploads a body of ``--mib`` MiB with a POST and downloads as much with a GET, over HTTPS, in turn:

- **direct**: nothing in between; curl trusts the test CA;
- **oisp**: ``oisp run --mode transparent`` on the client's veth (the real proxy: diverter, relay, decoder
  process); curl trusts oisp's CA;
- **mitmproxy**: ``mitmdump --mode transparent`` with an iptables ``REDIRECT`` of port 443 for the user
  ``nobody`` in the client namespace only (nat table, OUTPUT chain: curl's packets, not mitmproxy's own);
  curl trusts mitmproxy's CA. Left out, with the reason printed, when iptables or mitmproxy is not available
  (mitmproxy gets its own virtual environment, as in bench_proxy.py).

Each transfer's throughput is its size over curl's transfer time (total minus pre-transfer: TCP and TLS setup
excluded); every download is checked by SHA-256 and every upload by the size the server received. Columns are
alternated in rounds; the best and the median of the rounds are printed, with the share of direct and the ratio
to mitmproxy, and the CPU per MiB of the proxy's processes (all of oisp's: relay and decoder process).

usage: sudo .venv/bin/python bench/bench_transparent.py [--mib 24] [--rounds 3] [--small-packets]
                                                        [--no-mitmproxy]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import trustme

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_proxy import DEFAULT_MITM_VENV, MITMPROXY_VERSION, ensure_mitmproxy  # noqa: E402
from tests.netns import Lab, Namespace, lab_unavailable_reason, poll_until, read_line  # noqa: E402

HELPERS = REPO / "tests" / "interception"
MIB = 1 << 20
NOBODY = 65534
MITM_PORT = 18080
PATTERN = bytes(range(256)) * 4096  # what _ai_upstream.py sends for GET /bulk/N


def _cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
        return float(total)
    except psutil.NoSuchProcess:
        return 0.0


def _curl(ns: Namespace, ca: Path, args: list[str], timeout: float = 600) -> dict[str, float]:
    fmt = '{"pre": %{time_pretransfer}, "total": %{time_total}, "up": %{size_upload}, "down": %{size_download}, ' \
          '"code": %{http_code}}'
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "curl", "-sS", "--http1.1",
            "--cacert", str(ca), "-w", fmt, *args]
    res = ns.run(argv, timeout=timeout, check=False)
    if res.returncode != 0:
        raise SystemExit(f"curl {args} failed ({res.returncode}): {res.stderr[-1500:]}")
    out: dict[str, float] = json.loads(res.stdout[res.stdout.rindex("{"):])
    return out


def _transfer(ns: Namespace, ca: Path, work: Path, size: int, proxy_pid: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    upload, download = work / "upload.bin", work / "down" / "download.bin"  # "down" belongs to nobody
    cpu = _cpu(proxy_pid) if proxy_pid else 0.0
    up = _curl(ns, ca, ["-o", "/dev/null", "--data-binary", f"@{upload}", "-H",
                        "content-type: application/octet-stream", "https://api.openai.com/v1/files"])
    if up["code"] != 200 or up["up"] != size:
        raise SystemExit(f"upload failed: {up}")
    result["up_mb_s"] = size / (up["total"] - up["pre"]) / 1e6
    result["up_cpu_ms_per_mib"] = (_cpu(proxy_pid) - cpu) * 1000 / (size / MIB) if proxy_pid else None
    cpu = _cpu(proxy_pid) if proxy_pid else 0.0
    down = _curl(ns, ca, ["-o", str(download), f"https://api.openai.com/bulk/{size}"])
    if down["code"] != 200 or down["down"] != size:
        raise SystemExit(f"download failed: {down}")
    expected = hashlib.sha256((PATTERN * (size // len(PATTERN) + 1))[:size]).hexdigest()
    if hashlib.sha256(download.read_bytes()).hexdigest() != expected:
        raise SystemExit("download corrupted")
    download.unlink()
    result["down_mb_s"] = size / (down["total"] - down["pre"]) / 1e6
    result["down_cpu_ms_per_mib"] = (_cpu(proxy_pid) - cpu) * 1000 / (size / MIB) if proxy_pid else None
    return result


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_oisp(ns: Namespace, work: Path, dev: str, test_ca: Path) -> tuple[subprocess.Popen[str], Path]:
    log = work / "oisp.log"
    with log.open("w") as f:
        proc = ns.popen(ns.python("-m", "oisp.cli.main", "run", "--mode", "transparent", "--confdir",
                                  str(work / "oisp-conf"), "--upstream-ca", str(test_ca), "--output",
                                  str(work / "events.jsonl"), "--stdout", "none", "--interface", dev),
                        stdout=subprocess.DEVNULL, stderr=f, text=True)
    poll_until(lambda: "diverting connections" in log.read_text() or proc.poll() is not None, timeout=90,
               what="oisp to start diverting")
    if proc.poll() is not None:
        raise SystemExit(f"oisp exited: {log.read_text()[-3000:]}")
    ca = work / "oisp-ca.pem"
    shutil.copy(work / "oisp-conf" / "oisp-ca.pem", ca)
    ca.chmod(0o644)
    return proc, ca


def _start_mitmproxy(ns: Namespace, work: Path, mitmdump: Path, test_ca: Path) -> tuple[subprocess.Popen[str], Path]:
    confdir = work / "mitm-conf"
    log = work / "mitm.log"
    with log.open("w") as f:
        proc = ns.popen([str(mitmdump), "--mode", "transparent", "--listen-port", str(MITM_PORT), "--set",
                         f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={test_ca}", "-q"],
                        stdout=subprocess.DEVNULL, stderr=f, text=True)
    ca_file = confdir / "mitmproxy-ca-cert.pem"
    def listening() -> bool:
        out = ns.run(["ss", "-Htln", f"sport = :{MITM_PORT}"], timeout=20, check=False).stdout
        return bool(out.strip()) or proc.poll() is not None

    poll_until(lambda: ca_file.exists() and listening(), timeout=60, what="mitmproxy to listen")
    if proc.poll() is not None:
        raise SystemExit(f"mitmproxy exited: {log.read_text()[-3000:]}")
    ca = work / "mitm-ca.pem"
    shutil.copy(ca_file, ca)
    ca.chmod(0o644)
    return proc, ca


def _iptables(ns: Namespace, action: str) -> None:
    ns.run(["iptables", "-t", "nat", action, "OUTPUT", "-p", "tcp", "--dport", "443", "-m", "owner", "--uid-owner",
            str(NOBODY), "-j", "REDIRECT", "--to-ports", str(MITM_PORT)], timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=24, help="MiB uploaded and downloaded per transfer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the columns")
    parser.add_argument("--small-packets", action="store_true",
                        help="no segmentation offload on the client's veth (every packet at most 1500 bytes)")
    parser.add_argument("--no-mitmproxy", action="store_true", help="leave mitmproxy out")
    parser.add_argument("--mitmproxy-venv", type=Path, default=DEFAULT_MITM_VENV)
    args = parser.parse_args()
    reason = lab_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    size = args.mib * MIB

    columns = ["direct", "oisp"]
    mitm_reason = "--no-mitmproxy"
    mitmdump: Path | None = None
    if not args.no_mitmproxy:
        if shutil.which("iptables") is None:
            mitm_reason = "iptables is not installed (apt-get install iptables), needed for its REDIRECT"
        else:
            mitmdump, mitm_reason = ensure_mitmproxy(args.mitmproxy_venv)
        if mitmdump is not None:
            columns.append("mitmproxy")

    work = Path(tempfile.mkdtemp(prefix="oisp-bench-transparent-"))
    work.chmod(0o755)
    try:
        ca = trustme.CA()
        cert = ca.issue_cert("api.openai.com")
        cert_file, key_file, test_ca = work / "up.pem", work / "up.key", work / "test-ca.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        ca.cert_pem.write_to_path(str(test_ca))
        test_ca.chmod(0o644)
        (work / "upload.bin").write_bytes(PATTERN[::-1] * (size // len(PATTERN)) + PATTERN[: size % len(PATTERN)])
        (work / "upload.bin").chmod(0o644)
        download_dir = work / "down"
        download_dir.mkdir()
        shutil.chown(download_dir, NOBODY, NOBODY)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in columns}
        with Lab() as lab:
            client, upstream = lab.namespace(), lab.namespace()
            link = lab.link(client, upstream)
            client.set_hosts({"api.openai.com": [link.ip4_b]})
            if args.small_packets:
                client.run(["ip", "link", "set", "dev", link.dev_a, "gso_max_segs", "1"], timeout=20)
            server = upstream.popen(upstream.python(str(HELPERS / "_ai_upstream.py"), str(cert_file),
                                                    str(key_file)),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert read_line(server, timeout=30) == "ready"
            for round_ in range(args.rounds):
                for name in columns:
                    print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    if name == "direct":
                        runs[name].append(_transfer(client, test_ca, work, size, None))
                        continue
                    if name == "oisp":
                        proc, proxy_ca = _start_oisp(client, work, link.dev_a, test_ca)
                    else:
                        assert mitmdump is not None
                        proc, proxy_ca = _start_mitmproxy(client, work, mitmdump, test_ca)
                        _iptables(client, "-A")
                    try:
                        runs[name].append(_transfer(client, proxy_ca, work, size, proc.pid))
                    finally:
                        if name == "mitmproxy":
                            _iptables(client, "-D")
                        _stop(proc)
            _stop(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def stat(name: str, key: str, how: str) -> float | None:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        if not values:
            return None
        return max(values) if how == "best" else statistics.median(values)

    print(f"\n{'measure':34}" + "".join(f"{c:>26}" for c in columns))
    for title, key, how in (("upload, best (MB/s)", "up_mb_s", "best"), ("upload, median (MB/s)", "up_mb_s", "median"),
                            ("download, best (MB/s)", "down_mb_s", "best"),
                            ("download, median (MB/s)", "down_mb_s", "median"),
                            ("upload, CPU per MiB (ms)", "up_cpu_ms_per_mib", "median"),
                            ("download, CPU per MiB (ms)", "down_cpu_ms_per_mib", "median")):
        line = f"{title:34}"
        direct = stat("direct", key, how)
        mitm = stat("mitmproxy", key, how) if "mitmproxy" in columns else None
        for name in columns:
            v = stat(name, key, how)
            cell = "-" if v is None else f"{v:.1f}"
            if v is not None and name != "direct" and "mb_s" in key and direct:
                cell += f" ({100 * v / direct:.0f} %" + (f", {v / mitm:.2f}x mitm)" if mitm and name == "oisp"
                                                         else ")")
            line += f"{cell:>26}"
        print(line)
    print(f"\n{args.mib} MiB up and down per transfer over HTTPS (curl, HTTP/1.1, as nobody), {args.rounds} round(s) "
          f"alternating the columns; veth {'without' if args.small_packets else 'with'} segmentation offload; "
          f"CPU: the proxy's processes; mitmproxy {MITMPROXY_VERSION}: "
          f"{'transparent, iptables REDIRECT in the client namespace' if 'mitmproxy' in columns else mitm_reason}")


if __name__ == "__main__":
    main()
