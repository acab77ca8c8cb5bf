"""The whole mission, for real, as root in network namespaces: apps that are not configured at all (they only
trust the oisp CA) call AI endpoints; ``oisp run --mode transparent`` diverts, decrypts, decodes and attributes.

Workstation topology: client namespace (apps + oisp: diverter and proxy) ── veth ── upstream namespace (servers
standing in for api.openai.com on IPv4 and api.anthropic.com on IPv6, and a non-AI host).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from tests.interception.conftest import HERE
from tests.netns import Lab, Namespace, lab_unavailable_reason, poll_until, read_line

from oisp.events import Event

pytestmark = pytest.mark.root
BULK = 50 * 1024 * 1024


@dataclass
class Workstation:
    lab: Lab
    client: Namespace
    upstream: Namespace
    dev: str
    ip4: str
    ip6: str
    other_ip: str
    dir: Path
    test_ca_file: Path
    oisp: subprocess.Popen[str] | None = None

    @property
    def events_file(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def oisp_ca(self) -> Path:
        return self.dir / "conf" / "oisp-ca.pem"

    @property
    def log(self) -> Path:
        return self.dir / "oisp.log"

    def start_oisp(self) -> None:
        log = self.log.open("w")
        self.oisp = self.client.popen(
            self.client.python("-m", "oisp.cli.main", "-v", "run", "--mode", "transparent", "--confdir",
                               str(self.dir / "conf"), "--upstream-ca", str(self.test_ca_file), "--output",
                               str(self.events_file), "--stdout", "none", "--interface", self.dev),
            stdout=subprocess.DEVNULL, stderr=log, text=True)
        log.close()
        oisp = self.oisp
        poll_until(lambda: "diverting connections" in self.log.read_text() or oisp.poll() is not None,
                   timeout=60, what="oisp to start diverting")
        assert oisp.poll() is None, self.log.read_text()[-4000:]

    def events(self) -> list[Event]:
        if not self.events_file.exists():
            return []
        # only whole lines: the sink may be writing the last one right now
        complete = self.events_file.read_text().split("\n")[:-1]
        return [Event.from_json(line) for line in complete if line.strip()]

    def wait_events(self, predicate: Callable[[list[Event]], bool], what: str) -> list[Event]:
        def ready() -> list[Event] | None:
            ev = self.events()
            return ev if predicate(ev) else None
        events: list[Event] = poll_until(ready, timeout=30, what=what)
        return events

    def run(self, *argv: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv_env = ["env", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
        return self.client.run(argv_env, timeout=timeout, check=False)


@contextlib.contextmanager
def _workstation(tmp_path: Path, *, cgroup2: bool) -> Iterator[Workstation]:
    reason = lab_unavailable_reason(cgroup2=cgroup2)
    if reason is not None:
        pytest.skip(reason)
    tmp_path.chmod(0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("api.openai.com", "api.anthropic.com", "example.net")
    cert_file, key_file, ca_file = tmp_path / "up.pem", tmp_path / "up.key", tmp_path / "test-ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with Lab(cgroup2=cgroup2) as lab:
        client, upstream = lab.namespace(), lab.namespace()
        link = lab.link(client, upstream)
        other_ip = link.ip4_b.rsplit(".", 1)[0] + ".3"
        lab.add_address(upstream, link.dev_b, other_ip)
        client.set_hosts({"api.openai.com": [link.ip4_b], "api.anthropic.com": [link.ip6_b],
                          "example.net": [other_ip]})
        server = upstream.popen(upstream.python(str(HERE / "_ai_upstream.py"), str(cert_file), str(key_file)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert read_line(server, timeout=30) == "ready"
        ollama = client.popen(client.python(str(HERE / "_servers.py"), "http", "127.0.0.1", "11434"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert read_line(ollama, timeout=15) == "ready"
        ws = Workstation(lab, client, upstream, link.dev_a, link.ip4_b, link.ip6_b, other_ip, tmp_path, ca_file)
        ws.start_oisp()
        yield ws
        if ws.oisp is not None and ws.oisp.poll() is None:
            ws.oisp.send_signal(signal.SIGTERM)
            ws.oisp.wait(timeout=30)


@pytest.fixture
def workstation(tmp_path: Path) -> Iterator[Workstation]:
    with _workstation(tmp_path, cgroup2=True) as ws:
        yield ws


@pytest.fixture
def workstation_without_cgroup2(tmp_path: Path) -> Iterator[Workstation]:
    """The workstation on a machine without cgroup2 (a cgroup v1 host, a bare ``ip netns exec``): pydivert's
    FLOW/SOCKET layers cannot open there, so no pid comes from the interceptor."""
    with _workstation(tmp_path, cgroup2=False) as ws:
        yield ws


OPENAI_CLIENT = """
import json, os, sys
import openai
client = openai.OpenAI(api_key="sk-proj-" + "e" * 40, max_retries=0)
r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}])
print(json.dumps({"pid": os.getpid(), "exe": os.path.realpath(sys.executable),
                  "answer": r.choices[0].message.content}))
"""


def test_unconfigured_openai_sdk_and_curl_are_intercepted_decoded_and_attributed(workstation: Workstation) -> None:
    ws = workstation
    out = ws.run(sys.executable, "-c", OPENAI_CLIENT, env={"SSL_CERT_FILE": str(ws.oisp_ca)})
    assert out.returncode == 0, out.stderr[-3000:] + ws.log.read_text()[-3000:]
    client = json.loads(out.stdout)
    assert client["answer"] == "Hello from upstream"
    curl = ws.run("curl", "-sS", "--cacert", str(ws.oisp_ca), "https://api.openai.com/v1/chat/completions",
                  "-H", "content-type: application/json", "-d", '{"model": "gpt-4o", "messages": []}')
    assert curl.returncode == 0 and "Hello from upstream" in curl.stdout, curl.stderr
    events = ws.wait_events(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2,
                            "two ai.response events")
    requests = [e for e in events if e.event_type == "ai.request"]
    sdk = next(e for e in requests if e.process and e.process.pid == client["pid"])
    assert sdk.process is not None and sdk.process.exe == client["exe"]
    assert sdk.data.messages[0].content == "Say hello"  # type: ignore[attr-defined]
    assert sdk.data.auth.key_prefix == "sk-proj-"  # type: ignore[attr-defined]
    assert "e" * 40 not in ws.events_file.read_text()
    by_curl = [e for e in requests if e.process and e.process.name == "curl"]
    assert len(by_curl) == 1 and by_curl[0].process.exe == "/usr/bin/curl"  # type: ignore[union-attr]
    connects = [e for e in events if e.event_type == "network.connect"]
    assert connects and all(e.attrs and e.attrs["oisp.interception"] == "intercepted" for e in connects)
    assert {e.data.dest.ip for e in connects} == {ws.ip4}  # type: ignore[attr-defined]
    assert all(e.attrs and e.attrs.get("oisp.pid_hint") for e in connects)  # pids from the FLOW/SOCKET layers
    assert all(e.attrs and e.attrs["oisp.pid_source"] == "flow_layer" for e in connects)
    assert all(e.confidence.process_attribution == "direct" for e in connects)


def test_ipv6_endpoint_is_intercepted(workstation: Workstation) -> None:
    ws = workstation
    curl = ws.run("curl", "-sS", "-6", "--cacert", str(ws.oisp_ca), "https://api.anthropic.com/v1/messages",
                  "-d", '{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}')
    assert curl.returncode == 0 and "Hello over IPv6" in curl.stdout, curl.stderr + ws.log.read_text()[-3000:]
    events = ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "ai.response")
    connect = next(e for e in events if e.event_type == "network.connect")
    assert connect.data.dest.ip == ws.ip6  # type: ignore[attr-defined]
    assert connect.data.tls.sni == "api.anthropic.com"  # type: ignore[attr-defined]


def test_loopback_ollama_plain_http_is_intercepted(workstation: Workstation) -> None:
    ws = workstation
    curl = ws.run("curl", "-sS", "http://127.0.0.1:11434/api/chat", "-d", '{"model": "llama3", "messages": []}')
    assert curl.returncode == 0 and "POST /api/chat" in curl.stdout, curl.stderr
    events = ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "ai.response")
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.provider.name == "ollama"  # type: ignore[attr-defined]
    assert request.process is not None and request.process.name == "curl"


def test_non_ai_host_passes_untouched(workstation: Workstation) -> None:
    ws = workstation
    curl = ws.run("curl", "-sS", "--cacert", str(ws.test_ca_file), "https://example.net/")
    assert curl.returncode == 0 and '"ok": true' in curl.stdout, curl.stderr  # the real certificate, no oisp
    ai = ws.run("curl", "-sS", "--cacert", str(ws.oisp_ca), "https://api.openai.com/v1/models")
    assert ai.returncode == 0, ai.stderr + ws.log.read_text()[-3000:]
    events = ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "ai.response")
    assert all((e.data.dest.domain or "") != "example.net" for e in events  # type: ignore[attr-defined]
               if e.event_type == "network.connect")


def test_ai_connections_after_direct_non_ai_ones(workstation: Workstation) -> None:
    # Regression: curl closes its direct (not diverted) HTTP/2 connection to the non-AI host with a RST, and the
    # upstream test server used to die of it (an ExceptionGroup escaping its per-connection handler), so the
    # next AI connection's upstream leg was refused. Several direct connections make the race near-certain.
    ws = workstation
    for _ in range(10):
        curl = ws.run("curl", "-sS", "--cacert", str(ws.test_ca_file), "https://example.net/")
        assert curl.returncode == 0 and '"ok": true' in curl.stdout, curl.stderr
    for i in range(3):
        ai = ws.run("curl", "-sS", "--cacert", str(ws.oisp_ca), "https://api.openai.com/v1/models")
        assert ai.returncode == 0, (i, ai.stderr + ws.log.read_text()[-3000:])


def test_bulk_transfer_is_relayed_intact(workstation: Workstation) -> None:
    ws = workstation
    target = ws.dir / "bulk.bin"
    curl = ws.run("curl", "-sS", "--cacert", str(ws.oisp_ca), "-o", str(target), f"https://api.openai.com/bulk/{BULK}",
                  timeout=120)
    assert curl.returncode == 0, curl.stderr
    pattern = bytes(range(256)) * 4096
    expected = hashlib.sha256((pattern * (BULK // len(pattern) + 1))[:BULK]).hexdigest()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    events = ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "ai.response")
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.attrs and response.attrs["http.status"] == 200


def test_fails_open_when_the_proxy_is_killed(workstation: Workstation) -> None:
    ws = workstation
    assert ws.oisp is not None
    ws.oisp.kill()
    ws.oisp.wait(timeout=10)
    # Direct again within seconds: the client now sees the real certificate (it trusts only the test CA here).
    def direct() -> bool:
        out = ws.run("curl", "-sS", "--max-time", "2", "--cacert", str(ws.test_ca_file),
                     "https://api.openai.com/v1/models", timeout=10)
        return out.returncode == 0
    poll_until(direct, timeout=15, interval=0.5, what="connections to go direct after the proxy died")


IDENTIFIED_OPENAI_CLIENT = """
import json, os, pwd, sys
import openai
client = openai.OpenAI(api_key="sk-proj-" + "e" * 40, max_retries=0)
r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}])
assert r.choices[0].message.content == "Hello from upstream", r
print(json.dumps({"pid": os.getpid(), "exe": os.path.realpath(sys.executable),
                  "user": pwd.getpwuid(os.getuid()).pw_name}))
"""
#: Prints the shell's pid, then becomes the command (the same pid): how a curl call says which process it is.
_SAY_PID = 'echo "$$"; exec "$@"'


def test_without_cgroup2_every_ai_call_is_attributed_by_the_original_tuple(
        workstation_without_cgroup2: Workstation, request: pytest.FixtureRequest) -> None:
    ws = workstation_without_cgroup2
    log = ws.log.read_text()
    assert "FLOW/SOCKET layers are unavailable" in log, log[-3000:]  # really no pids from the interceptor here
    calls: dict[int, tuple[str, str]] = {}  # pid -> (exe, user) of each client that made an AI call

    sdk = ws.run(sys.executable, "-c", IDENTIFIED_OPENAI_CLIENT, env={"SSL_CERT_FILE": str(ws.oisp_ca)})
    assert sdk.returncode == 0, sdk.stderr[-3000:] + ws.log.read_text()[-3000:]
    made = json.loads(sdk.stdout)
    calls[made["pid"]] = (made["exe"], made["user"])

    def curl(*args: str, user: str | None = None) -> None:
        become = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if user == "nobody" else []
        out = ws.run(*become, "sh", "-c", _SAY_PID, "sh", "curl", "-sS", "--fail", *args)
        assert out.returncode == 0, out.stderr + ws.log.read_text()[-3000:]
        pid = int(out.stdout.split("\n", 1)[0])
        calls[pid] = ("/usr/bin/curl", user or "root")

    # pytest's temporary directories are root's own: the CA is copied where any user can read it.
    shared = Path(tempfile.mkdtemp(prefix="oisp-ca-"))
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    shared.chmod(0o755)
    ca = shared / "oisp-ca.pem"
    ca.write_bytes(ws.oisp_ca.read_bytes())
    ca.chmod(0o644)
    # Another user over IPv4, IPv6, and the loopback NAT (ports rewritten only) to a local Ollama.
    curl("--cacert", str(ca), "https://api.openai.com/v1/chat/completions", "-H", "content-type: application/json",
         "-d", '{"model": "gpt-4o", "messages": []}', user="nobody")
    curl("-6", "--cacert", str(ca), "https://api.anthropic.com/v1/messages",
         "-d", '{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}')
    curl("http://127.0.0.1:11434/api/chat", "-d", '{"model": "llama3", "messages": []}')
    assert len(calls) == 4

    events = ws.wait_events(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= len(calls),
                            f"{len(calls)} ai.response events")
    connects = [e for e in events if e.event_type == "network.connect"]
    assert len(connects) == len(calls)
    for connect in connects:
        assert connect.attrs is not None and "oisp.pid_hint" not in connect.attrs
        assert connect.attrs["oisp.pid_source"] == "sock_diag_original", connect.attrs
        assert connect.confidence.process_attribution == "socket_inode"
    ai = [e for e in events if e.event_type.startswith("ai.")]
    assert {e.event_type for e in ai} >= {"ai.request", "ai.response"}
    for event in [*connects, *ai]:
        assert event.process is not None and event.actor is not None, event.event_type
        assert event.process.pid in calls, (event.event_type, event.process.pid, calls)
        exe, user = calls[event.process.pid]
        assert (event.process.exe, event.actor.user) == (exe, user), event.event_type
    assert {e.process.pid for e in ai if e.process is not None and e.event_type == "ai.request"} == set(calls)


def test_quic_to_an_ai_endpoint_is_dropped_and_reported_then_tcp_is_intercepted(workstation: Workstation) -> None:
    """A QUIC-like client (UDP 443) gets no answer from api.openai.com and oisp reports it once as a
    ``network.connect`` over UDP with its process; the TCP the client falls back to is intercepted as always."""
    import os

    ws = workstation
    echo = ws.upstream.popen(ws.upstream.python(str(HERE / "_servers.py"), "udp-echo", "::", "443"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert read_line(echo, timeout=15) == "ready"
    fifo = ws.dir / "hold-quic"
    os.mkfifo(fifo)
    # The sender keeps its socket open until released (a QUIC client waits for its handshake's answer).
    sender = ws.client.popen(ws.client.python(str(HERE / "_client.py"), "quic", ws.ip4, ws.other_ip, "4",
                                              str(fifo)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def quic_reported(events: list[Event]) -> bool:
        return any(e.event_type == "network.connect" and e.data.protocol == "udp"  # type: ignore[attr-defined]
                   for e in events)

    try:
        events = ws.wait_events(quic_reported, "a network.connect over UDP")
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    out, err = sender.communicate(timeout=30)
    assert sender.returncode == 0, err
    result = json.loads(out)
    assert result["host_answer"] is None and result["probe_answer"] == "seen=1"  # none of the four got through
    (quic,) = [e for e in events if e.event_type == "network.connect" and e.data.protocol == "udp"]  # type: ignore[attr-defined]
    assert quic.data.dest.domain == "api.openai.com" and quic.data.dest.port == 443  # type: ignore[attr-defined]
    assert quic.data.success is False  # type: ignore[attr-defined]
    assert quic.attrs is not None and quic.attrs["oisp.interception"] == "quic_blocked"
    assert quic.attrs["oisp.provider"] == "openai"
    assert quic.process is not None and quic.process.pid == result["pid"]
    curl = ws.run("curl", "-sS", "--cacert", str(ws.oisp_ca), "https://api.openai.com/v1/models")
    assert curl.returncode == 0, curl.stderr
    ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "the TCP call's ai.response")


#: An agent: an AI call (intercepted), then a plain connection of its own to a host that is not an AI endpoint,
#: held open until its ``network.connect`` is in the events file (the polled source sees open connections only).
AGENT_WITH_OTHER_CONNECTION = """
import json, os, socket, sys, time
import openai
events, host = sys.argv[1], sys.argv[2]
client = openai.OpenAI(api_key="sk-proj-" + "e" * 40, max_retries=0)
client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}])
with socket.create_connection((host, 443)) as conn:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(events) as f:
            if any('"not_intercepted"' in line and f'"process":{{"pid":{os.getpid()},' in line for line in f):
                break
        time.sleep(0.05)  # polls the events file (a condition with a deadline)
    print(json.dumps({"pid": os.getpid(), "port": conn.getsockname()[1]}))
"""


@pytest.mark.parametrize("cgroup2", [True, False], ids=["flow_layer", "polled"])
def test_an_agents_other_connection_is_reported_once_and_its_ai_calls_are_not_reported_again(
        tmp_path: Path, cgroup2: bool) -> None:
    with _workstation(tmp_path, cgroup2=cgroup2) as ws:
        out = ws.run(sys.executable, "-c", AGENT_WITH_OTHER_CONNECTION, str(ws.events_file), ws.other_ip,
                     env={"SSL_CERT_FILE": str(ws.oisp_ca)})
        assert out.returncode == 0, out.stderr[-3000:] + ws.log.read_text()[-3000:]
        agent = json.loads(out.stdout)
        events = ws.wait_events(lambda ev: any(e.event_type == "ai.response" for e in ev), "ai.response")
    log = ws.log.read_text()
    assert ("connections of agent processes are polled" in log) == (not cgroup2), log[-3000:]
    mine = [e for e in events if e.event_type == "network.connect" and e.process is not None
            and e.process.pid == agent["pid"]]
    by_kind = sorted((e.attrs or {}).get("oisp.interception", "") for e in mine)
    assert by_kind == ["intercepted", "not_intercepted"], [e.to_dict() for e in mine]
    (other,) = [e for e in mine if (e.attrs or {})["oisp.interception"] == "not_intercepted"]
    assert (other.data.dest.ip, other.data.dest.port, other.data.src.port) == (  # type: ignore[attr-defined]
        ws.other_ip, 443, agent["port"])
    assert (other.attrs or {})["oisp.agent_pid"] == agent["pid"]
