"""``oisp run``, ``replay``, ``plugins`` and configuration errors, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
from tests.cli.conftest import OISP, OispProcess, RunningUpstream
from tests.events.samples import ALL
from tests.sinks.helpers import wait_until
from tests.sinks.webhook_receiver import Receiver

from oisp.events import Event


def _client(proxy: tuple[str, int], confdir: Path) -> httpx.Client:
    return httpx.Client(proxy=f"http://{proxy[0]}:{proxy[1]}",
                        verify=ssl.create_default_context(cafile=str(confdir / "oisp-ca.pem")))


def test_run_with_a_config_file_writes_events_and_stops_gracefully_on_sigterm(
        tmp_path: Path, upstream: RunningUpstream) -> None:
    events_file = tmp_path / "out" / "events.jsonl"
    config = tmp_path / "oisp.toml"
    config.write_text(f'''
[proxy]
listen = "127.0.0.1:0"
confdir = "{tmp_path / 'conf'}"
upstream_ca = "{upstream.ca_file}"
resolve = ["api.openai.com:443:127.0.0.1:{upstream.port}"]

[[sinks]]
kind = "jsonl"
path = "{events_file}"
''')
    oisp = OispProcess(["run", "--config", str(config), "--stdout", "none"])
    with _client(oisp.address, tmp_path / "conf") as client:
        r = client.post("https://api.openai.com/v1/chat/completions",
                        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"authorization": "Bearer sk-proj-" + "s" * 40})
    assert r.status_code == 200
    code, stderr = oisp.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "1 connections" in stderr and "intercepted 1" in stderr
    lines = events_file.read_text().splitlines()
    events = [Event.from_json(line) for line in lines]
    types = [e.event_type for e in events]
    assert types.count("ai.request") == 1 and types.count("ai.response") == 1 and "network.connect" in types
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.messages[0].content == "hi"  # type: ignore[attr-defined]
    assert request.process is not None and request.process.pid == os.getpid()
    assert "s" * 40 not in events_file.read_text()
    assert stat.S_IMODE(events_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("decoder", ["process", "inline"])
def test_run_exports_to_a_webhook_and_reports_what_arrived(tmp_path: Path, upstream: RunningUpstream,
                                                           decoder: str) -> None:
    """The webhook sink as a user configures it: built in the decoder process (or inline), events signed and
    delivered to an HTTPS receiver, its counters in the summary printed at exit."""
    # as root, the decoder process runs as nobody: its spool must be somewhere nobody can reach (not under
    # pytest's private directory)
    reachable = Path(tempfile.mkdtemp(prefix="oisp-webhook-"))
    reachable.chmod(0o755)
    spool = reachable / "spool"
    with Receiver(tmp_path, secret="run-secret") as receiver:
        receiver.start()
        config = tmp_path / "oisp.toml"
        config.write_text(f'''
[proxy]
listen = "127.0.0.1:0"
confdir = "{tmp_path / 'conf'}"
upstream_ca = "{upstream.ca_file}"
resolve = ["api.openai.com:443:127.0.0.1:{upstream.port}"]

[[sinks]]
kind = "webhook"
url = "{receiver.url}"
secret = "run-secret"
ca_file = "{receiver.ca_file}"
spool_dir = "{spool}"
''')
        oisp = OispProcess(["run", "--config", str(config), "--stdout", "none", "--decoder", decoder])
        with _client(oisp.address, tmp_path / "conf") as client:
            r = client.post("https://api.openai.com/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        wait_until(lambda: {"ai.request", "ai.response"} <= {e["event_type"] for e in receiver.events},
                   what="the exchange's events at the receiver")
        code, stderr = oisp.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr and receiver.bad_signatures == 0
    count = len(receiver.events)
    assert f"oisp: sink webhook: spooled {count}, delivered {count}, dropped 0, rejected 0" in stderr
    shutil.rmtree(reachable)


def test_run_exports_to_kafka(tmp_path: Path, upstream: RunningUpstream) -> None:
    """The kafka sink as a user configures it, to librdkafka's mock cluster (running in this test's process):
    the exchange's events are consumed back, and the exit summary reports them delivered."""
    confluent_kafka = pytest.importorskip("confluent_kafka", reason="the kafka extra: pip install 'oisp[kafka]'")
    from tests.sinks.kafka_mock import MockCluster

    with MockCluster() as cluster:
        cluster.create_topic("ai-traffic")
        config = tmp_path / "oisp.toml"
        config.write_text(f'''
[proxy]
listen = "127.0.0.1:0"
confdir = "{tmp_path / 'conf'}"
upstream_ca = "{upstream.ca_file}"
resolve = ["api.openai.com:443:127.0.0.1:{upstream.port}"]

[[sinks]]
kind = "kafka"
bootstrap_servers = "{cluster.bootstrap_servers}"
topic = "ai-traffic"
''')
        oisp = OispProcess(["run", "--config", str(config), "--stdout", "none"])
        with _client(oisp.address, tmp_path / "conf") as client:
            r = client.post("https://api.openai.com/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        code, stderr = oisp.stop(signal.SIGTERM)
        assert code == 0, stderr
        consumer = confluent_kafka.Consumer({"bootstrap.servers": cluster.bootstrap_servers, "group.id": "t",
                                             "auto.offset.reset": "earliest"})
        consumer.subscribe(["ai-traffic"])
        events: list[Event] = []

        def consumed_both() -> bool:
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                events.append(Event.from_json(message.value()))
            return {"ai.request", "ai.response"} <= {e.event_type for e in events}

        wait_until(consumed_both, timeout=20, what="the events consumed back")
        consumer.close()
    assert "Traceback" not in stderr
    delivered = int(stderr.split("oisp: sink kafka: queued ", 1)[1].split(",", 1)[0])
    assert f"oisp: sink kafka: queued {delivered}, delivered {delivered}, failed 0, dropped 0" in stderr
    assert delivered >= 3  # network.connect, ai.request, ai.response
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.process is not None and request.process.pid == os.getpid()


@pytest.mark.parametrize("decoder", ["process", "inline"])
def test_ctrl_c_on_the_terminal_stops_proxy_and_decoder_process_without_losing_events(
        tmp_path: Path, upstream: RunningUpstream, decoder: str) -> None:
    """Ctrl+C signals the whole foreground process group: the decoder process must not die of it before the
    proxy has handed it everything."""
    events_file = tmp_path / "events.jsonl"
    oisp = OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--upstream-ca",
                        str(upstream.ca_file), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream.port}",
                        "--stdout", "none", "--output", str(events_file), "--decoder", decoder],
                       start_new_session=True)
    import psutil

    children = psutil.Process(oisp.proc.pid).children()
    assert [c.cmdline()[-3:-1] for c in children] == ([["oisp.decoder_process", "--fd"]] if decoder == "process"
                                                      else [])
    with _client(oisp.address, tmp_path / "conf") as client:
        for _ in range(20):
            assert client.get("https://api.openai.com/v1/models").status_code == 200
    os.killpg(oisp.proc.pid, signal.SIGINT)
    code, stderr = oisp.stop(0)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    types = [Event.from_json(line).event_type for line in events_file.read_text().splitlines()]
    assert types.count("ai.request") == 20 and types.count("ai.response") == 20
    assert "; 41 events; 0 dropped" in stderr  # and one network.connect
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_a_stalled_decoder_process_never_stalls_the_apps(tmp_path: Path, upstream: RunningUpstream) -> None:
    """The relay never waits for decoding: with the decoder process frozen, requests still go through, and once
    it runs again every event is written."""
    import psutil

    events_file = tmp_path / "events.jsonl"
    oisp = OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--upstream-ca",
                        str(upstream.ca_file), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream.port}",
                        "--stdout", "none", "--output", str(events_file)])
    (decoder,) = psutil.Process(oisp.proc.pid).children()
    decoder.suspend()  # SIGSTOP: it cannot read a single copy
    try:
        with _client(oisp.address, tmp_path / "conf") as client:
            for i in range(30):
                r = client.post("https://api.openai.com/v1/chat/completions", json={
                    "model": "gpt-4o", "messages": [{"role": "user", "content": f"question {i}"}]})
                assert r.status_code == 200
        assert not events_file.exists() or events_file.read_text() == ""
    finally:
        decoder.resume()
    code, stderr = oisp.stop(signal.SIGTERM)
    assert code == 0, stderr
    events = [Event.from_json(line) for line in events_file.read_text().splitlines()]
    prompts = [e.data.messages[0].content for e in events if e.event_type == "ai.request"]  # type: ignore[attr-defined]
    assert prompts == [f"question {i}" for i in range(30)]
    assert sum(e.event_type == "ai.response" for e in events) == 30


def test_flags_override_the_config_file_and_line_output_goes_to_stdout(
        tmp_path: Path, upstream: RunningUpstream) -> None:
    config = tmp_path / "oisp.toml"
    config.write_text('[proxy]\nlisten = "127.0.0.1:1"\nmode = "explicit"\n')
    oisp = OispProcess(["run", "--config", str(config), "--listen", "127.0.0.1:0", "--confdir",
                        str(tmp_path / "conf"), "--upstream-ca", str(upstream.ca_file), "--resolve",
                        f"api.openai.com:443:127.0.0.1:{upstream.port}", "--stdout", "line"],
                       stdout=subprocess.PIPE)
    with _client(oisp.address, tmp_path / "conf") as client:
        assert client.get("https://api.openai.com/v1/models").status_code == 200
    code, _ = oisp.stop(signal.SIGINT)
    assert code == 0
    out = oisp.stdout
    assert "ai.request openai" in out and "ai.response openai 200" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[proxy]\nmdoe = 'explicit'\n", "proxy: unknown key(s) mdoe"),
        ("[proxy]\nmode = 'sideways'\n", "proxy.mode: 'sideways' is not allowed; allowed: explicit, reverse"),
        ("[capture]\nbody_cap = -5\n", "capture.body_cap: -5 must be a positive integer"),
        ("[capture]\ndecoder = 'thread'\n", "capture.decoder: 'thread' is not allowed; allowed: process, inline"),
        ("[proxy]\npreconnect_idle = -1\n", "proxy.preconnect_idle: -1 must be a number >= 0"),
        ("[capture]\ndecoder_buffer = 0\n", "capture.decoder_buffer: 0 must be a positive integer"),
        ("[[sinks]]\nkind = 'jsonl'\nrotate_bytes = 10\n", "path"),
        ("[[sinks]]\nkind = 'carrier-pigeon'\n", "unknown sink kind 'carrier-pigeon'"),
        ("[[sinks]]\nkind = 'kafka'\n", "sinks.kafka.bootstrap_servers: required"),
        ("[[sinks]]\nkind = 'kafka'\nbootstrap_servers = 'k:9092'\ntopik = 'x'\n", "unknown option(s) ['topik']"),
        ("[[sinks]]\nkind = 'kafka'\nbootstrap_servers = 'k:9092'\nconfig = { 'acks' = 'maybe' }\n",
         "sinks.kafka.config: librdkafka refused the configuration"),
        ("[[sinks]]\nkind = 'webhook'\nurl = 'https://x.test/'\nspool_dir = 's'\nbatch_size = 'big'\n",
         "sinks.webhook.batch_size: 'big' must be an integer >= 1"),
        ("[[sinks]]\nkind = 'webhook'\nspool_dir = 's'\n", "sinks.webhook.url: required"),
        ("[endpoints]\nremove = ['nope.example']\n", "endpoints.remove: 'nope.example' is not in the endpoint table"),
        ("not toml = = =", "is not valid TOML"),
    ],
)
def test_invalid_configuration_is_a_clear_error_naming_the_key(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "oisp.toml"
    config.write_text(content)
    out = subprocess.run([*OISP, "run", "--config", str(config), "--confdir", str(tmp_path / "c"),
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_replay_re_emits_recorded_events_and_reports_invalid_lines(tmp_path: Path) -> None:
    recorded = tmp_path / "recorded.jsonl"
    events = [factory() for factory in ALL.values()]
    recorded.write_text("\n".join([*(e.to_json() for e in events[:6]), "{not json", "",
                                   *(e.to_json() for e in events[6:])]) + "\n")
    out_file = tmp_path / "replayed.jsonl"
    out = subprocess.run([*OISP, "replay", str(recorded), "--output", str(out_file), "--stdout", "none"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"replayed {len(events)} events" in out.stderr and "line 7: not valid JSON" in out.stderr
    replayed = [Event.from_json(line) for line in out_file.read_text().splitlines()]
    assert [e.event_id for e in replayed] == [e.event_id for e in events]


def test_plugins_lists_builtin_and_installed_plugins() -> None:
    out = subprocess.run([*OISP, "plugins", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    names = {p["name"]: p for p in listing["plugins"]}
    assert names["oisp.sinks.builtin"]["builtin"] is True
    assert names["oisp.providers.openai"]["builtin"] is True
    text = subprocess.run([*OISP, "plugins"], capture_output=True, text=True, timeout=30).stdout
    assert "sink kinds:" in text and "jsonl" in text
    assert "kafka" in text and "webhook" in text


def test_transparent_mode_without_root_says_clearly_what_it_needs(tmp_path: Path) -> None:
    # Never start diverting on this machine's own network: as root, the command runs with every capability
    # dropped (setpriv), which is what an unprivileged user has.
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's capabilities for this test")
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--"]
    out = subprocess.run([*prefix, *OISP, "run", "--mode", "transparent", "--confdir", str(tmp_path / "conf")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "transparent mode diverts packets and needs root: run it with sudo" in out.stderr
    assert "Traceback" not in out.stderr


def test_version() -> None:
    out = subprocess.run([*OISP, "--version"], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("oisp ")




def test_name_constrained_ca_is_used_for_ai_hosts_and_cannot_vouch_for_others(
        tmp_path: Path, upstream: RunningUpstream) -> None:
    from cryptography import x509

    oisp = OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--stdout", "none",
                        "--upstream-ca", str(upstream.ca_file), "--name-constrained-ca", "--resolve",
                        f"api.openai.com:443:127.0.0.1:{upstream.port}"])
    ca_files = sorted((tmp_path / "conf").glob("oisp-ca-nc-*[0-9a-f].pem"))
    assert len(ca_files) == 1, list((tmp_path / "conf").iterdir())
    ca = x509.load_pem_x509_certificate(ca_files[0].read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    permitted = {str(n.value) for n in constraints.value.permitted_subtrees or []}
    assert {"api.openai.com", "api.anthropic.com", "openai.azure.com"} <= permitted
    assert "example.com" not in permitted
    verify = ssl.create_default_context(cafile=str(ca_files[0]))
    with httpx.Client(proxy=f"http://{oisp.address[0]}:{oisp.address[1]}", verify=verify) as client:
        assert client.get("https://api.openai.com/v1/models").status_code == 200
    code, stderr = oisp.stop()
    assert code == 0, stderr


def test_a_busy_port_and_a_bad_body_cap_are_clear_errors(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = subprocess.run([*OISP, "run", "--confdir", str(tmp_path), "--listen", f"127.0.0.1:{port}",
                              "--stdout", "none"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert f"oisp: error: listen: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([*OISP, "run", "--confdir", str(tmp_path), "--body-cap", "0"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "--body-cap: 0 must be a positive number of bytes" in out.stderr
