"""Fixtures for the interception tests: a two-namespace topology with AI-like servers, and the agent."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.netns import Lab, Link, Namespace, lab_unavailable_reason, read_line

HERE = Path(__file__).resolve().parent
PROXY_PORT = 15001


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh namespace lab (skipped with the reason when this machine cannot run one)."""
    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab() as the_lab:
        yield the_lab


@dataclass
class Topology:
    """client namespace ── veth ── upstream namespace, with the servers running."""

    lab: Lab
    client: Namespace
    upstream: Namespace
    link: Link
    other_ip: str  # a second upstream address that is not an AI endpoint
    wildcard_ip: str  # the address the upstream DNS server gives for every name (*.openai.azure.com)
    logs: list[Path] = field(default_factory=list)

    def start_agent(self, targets: list[str], *, relay: str = "thread", **options: Any) -> Agent:
        """Start the interceptor and its test proxy in the client namespace; returns once it diverts.
        ``relay="process"``: the test proxy relays in a child process (see _agent.py)."""
        config = json.dumps({"targets": targets, "options": options, "relay": relay})
        log = tempfile.NamedTemporaryFile("w+", prefix="oisp-agent-", suffix=".log", delete=False)  # noqa: SIM115
        self.logs.append(Path(log.name))
        proc = self.client.popen(self.client.python(str(HERE / "_agent.py"), str(PROXY_PORT), config),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        agent = Agent(proc, Path(log.name))
        ready = agent.next_event(timeout=30)
        if ready.get("event") != "ready":
            raise AssertionError(f"agent did not start: {ready} {agent.stderr()}")
        agent.ready = ready
        return agent

    def client_json(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        """Run the test client inside the client namespace and return what it printed."""
        res = self.client.run(self.client.python(str(HERE / "_client.py"), *args), timeout=timeout, check=False)
        assert res.returncode == 0, f"client {args} failed: {res.stderr[-2000:]}"
        result: dict[str, Any] = json.loads(res.stdout)
        return result


class Agent:
    """The agent process: JSON events on stdout, commands on stdin."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.ready: dict[str, Any] = {}

    def next_event(self, timeout: float = 10) -> dict[str, Any]:
        try:
            line = read_line(self.proc, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.stderr()}") from None
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            raise AssertionError(f"agent wrote {line!r}") from None
        return event

    def wait_for(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        """The next event of ``kind`` (events of other kinds before it are skipped; bounded by ``timeout``)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(timeout=max(0.01, deadline - time.monotonic()))
            if event.get("event") == kind:
                return event

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, Any]:
        self.command("stats")
        return self.wait_for("stats")

    def events_until_stats(self, timeout: float = 10) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every event written before the answer to a ``stats`` command, and that answer."""
        self.command("stats")
        seen = []
        while True:
            event = self.next_event(timeout=timeout)
            if event.get("event") == "stats":
                return seen, event
            seen.append(event)

    def stderr(self) -> str:
        """The end of the agent's log (its stderr goes to a file, so it can never block on a full pipe)."""
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def _start_server(ns: Namespace, *args: str) -> subprocess.Popen[str]:
    proc = ns.popen(ns.python(str(HERE / "_servers.py"), *args), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    line = read_line(proc, timeout=15)
    assert line == "ready", line
    return proc


@pytest.fixture
def topology(lab: Lab) -> Iterator[Topology]:
    """Client and upstream namespaces; api.openai.com (IPv4) and api.anthropic.com (IPv6) are upstream."""
    client = lab.namespace()
    upstream = lab.namespace()
    link = lab.link(client, upstream)
    prefix = link.ip4_b.rsplit(".", 1)[0]
    other_ip, wildcard_ip = f"{prefix}.3", f"{prefix}.4"
    lab.add_address(upstream, link.dev_b, other_ip)
    lab.add_address(upstream, link.dev_b, wildcard_ip)
    client.set_hosts({
        "api.openai.com": [link.ip4_b],
        "api.anthropic.com": [link.ip6_b],
        "example.net": [other_ip],
    })
    _start_server(upstream, "echo", "::", "443")
    _start_server(upstream, "dns", link.ip4_b, wildcard_ip)
    _start_server(client, "http", "127.0.0.1", "11434")
    _start_server(client, "echo", "127.0.0.1", "1234")
    topo = Topology(lab, client, upstream, link, other_ip, wildcard_ip)
    yield topo
    for log in topo.logs:
        log.unlink(missing_ok=True)
