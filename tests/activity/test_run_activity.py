"""``oisp run --activity`` as a user runs it: an agent calls a stand-in provider through the proxy, then runs a
shell command and writes a file; the events reach the configured sink (as root; both decoder modes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.activity.helpers import needs_root_linux
from tests.cli.conftest import OispProcess, RunningUpstream
from tests.oisp_schema import SchemaValidator
from tests.sinks.helpers import wait_until

from oisp.events import Event

pytestmark = [pytest.mark.root, needs_root_linux]

AGENT = """
import ssl, subprocess, sys
import httpx
proxy, ca, folder = sys.argv[1], sys.argv[2], sys.argv[3]
with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=ca)) as client:
    r = client.post("https://api.openai.com/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "write the files"}]},
                    headers={"authorization": "Bearer sk-proj-" + "s" * 40})
    assert r.status_code == 200
subprocess.run(["sh", "-c", f"echo from-tool > {folder}/tool.txt"], check=True)
open(f"{folder}/direct.txt", "w").write("direct")
"""


def _events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    return [Event.from_json(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("decoder", ["process", "inline"])
def test_run_with_activity_reports_what_an_agent_did(tmp_path: Path, upstream: RunningUpstream, decoder: str,
                                                     oisp_schema: SchemaValidator) -> None:
    events_file = tmp_path / "events.jsonl"
    work = tmp_path / "work"
    work.mkdir()
    bystander = tmp_path / "bystander.txt"
    config = tmp_path / "oisp.toml"
    config.write_text(f'''
[proxy]
listen = "127.0.0.1:0"
confdir = "{tmp_path / 'conf'}"
upstream_ca = "{upstream.ca_file}"
resolve = ["api.openai.com:443:127.0.0.1:{upstream.port}"]

[capture]
decoder = "{decoder}"

[[sinks]]
kind = "jsonl"
path = "{events_file}"
''')
    oisp = OispProcess(["run", "--config", str(config), "--stdout", "none", "--activity"])
    try:
        host, port = oisp.address
        agent = subprocess.run([sys.executable, "-c", AGENT, f"http://{host}:{port}", str(tmp_path / "conf" /
                                "oisp-ca.pem"), str(work)], capture_output=True, text=True, timeout=60)
        assert agent.returncode == 0, agent.stderr
        bystander.write_text("not an agent")  # this test's process made no AI call
        wait_until(lambda: any(e.event_type == "file.write" and getattr(e.data, "path", "").endswith(
            "direct.txt") for e in _events(events_file)), timeout=30)
    finally:
        code, stderr = oisp.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    events = _events(events_file)
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.process is not None
    agent_pid = request.process.pid
    assert agent_pid not in (None, os.getpid())
    shell = [e for e in events if e.event_type == "process.exec" and e.process and e.process.ppid == agent_pid]
    assert len(shell) == 1 and shell[0].data.exe == os.path.realpath("/bin/sh")  # type: ignore[attr-defined]
    writes = {getattr(e.data, "path", ""): e for e in events if e.event_type == "file.write"}
    assert set(writes) >= {f"{work}/tool.txt", f"{work}/direct.txt"}
    assert writes[f"{work}/direct.txt"].process.pid == agent_pid  # type: ignore[union-attr]
    assert writes[f"{work}/tool.txt"].process.ppid == agent_pid  # type: ignore[union-attr]
    assert str(bystander) not in writes
    assert all((e.attrs or {}).get("oisp.agent_pid") == agent_pid for e in events
               if e.event_type.startswith(("process.", "file.")))
    # The agent's only connection is to the proxy, which reports it itself (intercepted): not reported again.
    assert [(e.attrs or {}).get("oisp.interception") for e in events if e.event_type == "network.connect"
            and e.process is not None and e.process.pid == agent_pid] == ["intercepted"]
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
