"""A network-namespace lab for root-only tests and benchmarks: namespaces, veth pairs and confined processes.

Everything the lab creates carries a short random name (``oisp-<hex>``) and is removed by :meth:`Lab.close`,
even when a test fails. Nothing is ever created on or attached to the machine's own interfaces.

Each :class:`Namespace` is a network namespace (``ip netns add``) plus a *holder* process that keeps a private
view of the system for everything run inside it:

- a mount namespace made by ``ip netns exec`` (fresh sysfs for this network namespace, ``/etc/netns/NAME/hosts``
  bound over ``/etc/hosts``), so a bpffs mounted at ``/sys/fs/bpf`` in there is a private instance that never
  touches the machine's ``/sys/fs/bpf``;
- a private tmpfs on ``/run`` (libebpfdivert takes a lock file there);
- a cgroup (``<cgroup2 root>/oisp-<hex>``) and a cgroup namespace rooted at it, with cgroup2 mounted at
  ``/sys/fs/cgroup``: libebpfdivert attaches its FLOW/SOCKET programs to the first cgroup2 mount it finds in
  ``/proc/self/mountinfo``, which in here is this cgroup, so they only ever see the lab's own processes.

``Lab(cgroup2=False)`` makes namespaces with *no* cgroup2 mount at all in their mount namespace (the holder
unmounts any it inherited, in its private copy), as on a cgroup v1 host or under a bare ``ip netns exec``: there
pydivert's FLOW/SOCKET layers cannot open. Such a lab still keeps each namespace's processes in a cgroup of the
machine's cgroup2 hierarchy when there is one (seen only from outside, for teardown), else in a process group.

Commands run inside with :meth:`Namespace.run` / :meth:`Namespace.popen`: each one joins the cgroup, then the
holder's network, mount and cgroup namespaces (``nsenter``). Addresses come from the benchmarking range
198.18.0.0/15 (RFC 2544) and a unique-local IPv6 prefix, assigned only to the lab's own veths.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Lab",
    "Link",
    "Namespace",
    "lab_unavailable_reason",
    "poll_until",
    "read_line",
]

PREFIX = "oisp-"
V4_NET = "198.18"  # RFC 2544 benchmarking range: never routed, never the machine's own
V6_NET = "fd4f:6973:70"  # "Oisp" unique-local prefix
OWNER_DIR = Path("/run/oisp-netns-lab")  # one file per live namespace, holding the creating process id
REPO = Path(__file__).resolve().parent.parent

_HOLDER = r"""
import os, subprocess, sys
def sh(*a):
    subprocess.run(a, check=True, timeout=20)
def cgroup2_mounts():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - cgroup2 " in line]
sh("mount", "-t", "tmpfs", "-o", "mode=755", "oisp-run", "/run")
if sys.argv[1] == "cgroup2":
    sh("mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup")
else:
    # This mount namespace is a private (slave) copy: unmounting here never touches the machine's mounts.
    for mount in reversed(cgroup2_mounts()):
        sh("umount", "-l", mount)
    if cgroup2_mounts():
        sys.exit("cgroup2 mounts remain: " + " ".join(cgroup2_mounts()))
sh("ip", "link", "set", "lo", "up")
print("ready", flush=True)
sys.stdin.read()
"""


def poll_until(check: Callable[[], Any], *, timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Call ``check`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        # Pacing of a bounded poll, not synchronization: the condition is re-checked each round.
        time.sleep(interval)


_line_buffers: weakref.WeakKeyDictionary[subprocess.Popen[Any], bytearray] = weakref.WeakKeyDictionary()


def read_line(proc: subprocess.Popen[Any], *, timeout: float) -> str:
    """The next line ``proc`` writes to stdout, or AssertionError if none comes within ``timeout`` seconds.

    Reads the pipe's file descriptor directly (never through Python's buffered reader, whose buffer a
    ``select`` cannot see), so it must be the only reader of that stdout.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = _line_buffers.setdefault(proc, bytearray())
    deadline = time.monotonic() + timeout
    while True:
        end = buf.find(b"\n")
        if end >= 0:
            line = bytes(buf[:end])
            del buf[:end + 1]
            return line.decode(errors="replace")
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no output from {proc.args!r} within {timeout:.1f}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"{proc.args!r} exited (code {proc.poll()}) before writing a line")
            buf += chunk


def _cgroup2_root() -> Path | None:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            if " - cgroup2 " in line:
                return Path(line.split()[4])
    return None


def lab_unavailable_reason(*, cgroup2: bool = True) -> str | None:
    """Why the lab cannot run here (not root, a missing tool, no cgroup2 when ``cgroup2`` is wanted, no eBPF),
    or None when it can."""
    if sys.platform != "linux":
        return "network-namespace tests need Linux"
    if os.geteuid() != 0:
        return "network-namespace tests need root (CI runs them as root)"
    for tool in ("ip", "nsenter", "unshare", "tc", "mount"):
        if shutil.which(tool) is None:
            return f"network-namespace tests need the {tool!r} command"
    if cgroup2 and _cgroup2_root() is None:
        return "network-namespace tests need a cgroup2 mount (the FLOW/SOCKET layers attach to cgroup2)"
    try:
        from pydivert.bpf import libebpfdivert
    except ImportError as exc:  # pragma: no cover
        return f"pydivert cannot be imported: {exc}"
    if libebpfdivert is None:
        return "pydivert's libebpfdivert could not be loaded"
    return None


def _run(argv: Sequence[str], *, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Namespace:
    """One network namespace of the lab, with its holder process, cgroup and the processes started in it.

    ``cgroup`` is None when the machine has no cgroup2 hierarchy (then each process gets a process group);
    ``cgroup2`` says whether cgroup2 is mounted inside (and a cgroup namespace made).
    """

    name: str
    lab: Lab
    cgroup: Path | None
    cgroup2: bool = True
    holder: subprocess.Popen[str] | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, argv: Sequence[str], *, cwd: str | os.PathLike[str] = REPO) -> list[str]:
        """``argv`` wrapped so that it runs inside this namespace (cgroup, network, mounts, cgroup namespace)."""
        assert self.holder is not None, "namespace is not started"
        join = 'echo $$ > "$0" && ' if self.cgroup is not None else ""
        namespaces = "-n -m -C" if self.cgroup2 else "-n -m"
        script = f'p=$1; d=$2; shift 2; {join}exec nsenter -t "$p" {namespaces} -- env -C "$d" "$@"'
        procs = str(self.cgroup / "cgroup.procs") if self.cgroup is not None else "-"
        return ["sh", "-c", script, procs, str(self.holder.pid), str(cwd), *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside and wait for it (at most ``timeout`` seconds); raises on failure when ``check``."""
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout,
                              check=check, input=input, env=self.lab.env)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside; the lab stops it (by its process id) on close if it is still running."""
        kwargs.setdefault("env", self.lab.env)
        if self.cgroup is None:
            kwargs["start_new_session"] = True  # its process group is what teardown stops
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, *args: str) -> list[str]:
        """The argv of this test run's Python interpreter with ``args``."""
        return [sys.executable, *args]

    def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        """Rewrite this namespace's ``/etc/hosts`` in place (the bind mount inside keeps seeing the same file)."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for host, addrs in hosts.items():
            lines += [f"{addr} {host}" for addr in addrs]
        with open(Path("/etc/netns") / self.name / "hosts", "r+", encoding="utf-8") as f:
            f.truncate(0)
            f.write("\n".join(lines) + "\n")

    def pids(self) -> list[int]:
        """The processes currently in this namespace's cgroup (all started by this lab); without a cgroup, the
        ones :meth:`popen` started that are still running."""
        if self.cgroup is None:
            return [proc.pid for proc in self.procs if proc.poll() is None]
        try:
            text = (self.cgroup / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def tc_filters(self, dev: str) -> str:
        """``tc filter show`` for both clsact directions of ``dev`` inside this namespace."""
        out = []
        for direction in ("ingress", "egress"):
            res = _run(["ip", "netns", "exec", self.name, "tc", "filter", "show", "dev", dev, direction],
                       check=False)
            out.append(res.stdout)
        return "".join(out)

    def _stop_procs(self) -> None:
        for proc in self.procs:
            if self.cgroup is None:  # no cgroup: the process group it leads (its own session) goes with it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@dataclass
class Link:
    """A veth pair between two namespaces, with one IPv4 and one IPv6 address on each end."""

    a: Namespace
    b: Namespace
    dev_a: str
    dev_b: str
    ip4_a: str
    ip4_b: str
    ip6_a: str
    ip6_b: str


class Lab:
    """Creates namespaces and links; :meth:`close` (or leaving the ``with`` block) removes all of them."""

    def __init__(self, *, cgroup2: bool = True) -> None:
        """``cgroup2`` False: namespaces without any cgroup2 mount inside (pydivert's FLOW/SOCKET layers are
        unavailable there)."""
        reason = lab_unavailable_reason(cgroup2=cgroup2)
        if reason is not None:
            raise RuntimeError(reason)
        self.cgroup2 = cgroup2
        self.cgroup_root = _cgroup2_root()
        self.namespaces: list[Namespace] = []
        self.links: list[Link] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        OWNER_DIR.mkdir(mode=0o700, exist_ok=True)
        self.sweep_stale()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creation -------------------------------------------------------------------------------------------

    def namespace(self, *, hosts: Mapping[str, Sequence[str]] | None = None) -> Namespace:
        """A new namespace with ``lo`` up; ``hosts`` maps host names to addresses for its ``/etc/hosts``."""
        name = f"{PREFIX}{secrets.token_hex(3)}"
        cgroup = self.cgroup_root / name if self.cgroup_root is not None else None
        ns = Namespace(name=name, lab=self, cgroup=cgroup, cgroup2=self.cgroup2)
        self.namespaces.append(ns)  # registered first: close() cleans up whatever part was made
        (OWNER_DIR / name).write_text(str(os.getpid()))
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for host, addrs in (hosts or {}).items():
            lines += [f"{addr} {host}" for addr in addrs]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        _run(["ip", "netns", "add", name])
        if cgroup is not None:
            cgroup.mkdir()
        join = 'echo $$ > "$0" && ' if cgroup is not None else ""
        unshare = "unshare --cgroup -- " if self.cgroup2 else ""
        script = f'{join}exec ip netns exec "$1" {unshare}"$2" -c "$3" "$4"'
        ns.holder = subprocess.Popen(
            ["sh", "-c", script, str(cgroup / "cgroup.procs") if cgroup is not None else "-", name,
             sys.executable, _HOLDER, "cgroup2" if self.cgroup2 else "none"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=cgroup is None)
        try:
            line = read_line(ns.holder, timeout=20)
        except AssertionError:
            err = ns.holder.stderr.read() if ns.holder.poll() is not None and ns.holder.stderr else ""
            raise RuntimeError(f"namespace holder for {name} did not start: {err}") from None
        assert line == "ready", line
        return ns

    def link(self, a: Namespace, b: Namespace) -> Link:
        """A veth pair between ``a`` and ``b``, addressed ``198.18.N.1|2/24`` and ``fd4f:6973:70:N::1|2/64``."""
        index = len(self.links) + 1
        tag = secrets.token_hex(3)
        dev_a, dev_b = f"oisp{tag}a", f"oisp{tag}b"
        # Both ends are created directly inside their namespaces, never in the machine's own.
        _run(["ip", "link", "add", dev_a, "netns", a.name, "type", "veth", "peer", "name", dev_b, "netns", b.name])
        link = Link(a, b, dev_a, dev_b, f"{V4_NET}.{index}.1", f"{V4_NET}.{index}.2",
                    f"{V6_NET}:{index}::1", f"{V6_NET}:{index}::2")
        self.links.append(link)
        for ns, dev, ip4, ip6 in ((a, dev_a, link.ip4_a, link.ip6_a), (b, dev_b, link.ip4_b, link.ip6_b)):
            ex = ["ip", "netns", "exec", ns.name]
            _run([*ex, "ip", "addr", "add", f"{ip4}/24", "dev", dev])
            _run([*ex, "ip", "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad"])
            _run([*ex, "ip", "link", "set", dev, "up"])
        for ns, dev in ((a, dev_a), (b, dev_b)):
            poll_until(lambda ns=ns, dev=dev: "state UP" in _run(  # type: ignore[misc]
                ["ip", "netns", "exec", ns.name, "ip", "link", "show", dev]).stdout,
                timeout=10, what=f"{dev} up")
        return link

    def add_address(self, ns: Namespace, dev: str, address: str) -> None:
        """Assign one more address (IPv4 /24 or IPv6 /64) to the lab's own ``dev`` inside ``ns``."""
        ip = ipaddress.ip_address(address)
        prefix = 24 if ip.version == 4 else 64
        extra = ["nodad"] if ip.version == 6 else []
        _run(["ip", "netns", "exec", ns.name, "ip", "addr", "add", f"{address}/{prefix}", "dev", dev, *extra])

    # -- teardown -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process started here and remove every namespace, veth, cgroup and hosts file."""
        errors: list[str] = []
        for ns in self.namespaces:
            ns._stop_procs()
        for ns in self.namespaces:
            try:
                self._remove_namespace(ns)
            except Exception as exc:  # keep going: every other namespace still has to go
                errors.append(f"{ns.name}: {exc!r}")
        self.namespaces.clear()
        self.links.clear()
        if errors:
            raise RuntimeError("lab teardown left things behind: " + "; ".join(errors))

    def _remove_namespace(self, ns: Namespace) -> None:
        if ns.holder is not None:
            if ns.holder.stdin is not None:
                with contextlib.suppress(OSError):
                    ns.holder.stdin.close()
            try:
                ns.holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ns.holder.kill()
                ns.holder.wait(timeout=10)
            for stream in (ns.holder.stdout, ns.holder.stderr):
                if stream is not None:
                    stream.close()
        if ns.cgroup is not None:
            _remove_cgroup(ns.cgroup)
        if Path(f"/run/netns/{ns.name}").exists():
            _run(["ip", "netns", "del", ns.name], check=False)
        shutil.rmtree(Path("/etc/netns") / ns.name, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (OWNER_DIR / ns.name).unlink()

    def sweep_stale(self) -> None:
        """Remove namespaces a previous lab left behind when its process was killed (owner no longer alive)."""
        for owner in OWNER_DIR.glob(f"{PREFIX}*"):
            try:
                pid = int(owner.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                continue
            cgroup = self.cgroup_root / owner.name if self.cgroup_root is not None else None
            stale = Namespace(name=owner.name, lab=self, cgroup=cgroup)
            with contextlib.suppress(Exception):
                self._remove_namespace(stale)


def _remove_cgroup(cgroup: Path) -> None:
    """Kill (one by one, by id) what is left in the lab's cgroup, then remove it."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + 10
    while True:
        try:
            pids = [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        if not pids:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {cgroup} would not exit")
        for pid in pids:  # only the lab puts processes in its own cgroup
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)  # bounded pacing of the re-check above
    poll_until(lambda: _try_rmdir(cgroup), timeout=10, what=f"removal of {cgroup}")


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def lab(*, cgroup2: bool = True) -> Iterator[Lab]:
    """A :class:`Lab` that is closed on exit."""
    with Lab(cgroup2=cgroup2) as the_lab:
        yield the_lab
