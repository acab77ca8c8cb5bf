"""End to end, as root on Linux: a real agent process calls a stand-in provider through the proxy, runs the tool
calls it gets (a shell command that writes a file; a file written directly), and oisp reports what it did,
attributed and linked to the right tool call, with side effects on the tool results; a process that never
called an AI endpoint writes a file meanwhile and is not reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.upstream import Request, Response, Upstream, server_context

from oisp.activity.link_stage import LinkingStage, link_activity
from oisp.attribution import Attributor
from oisp.endpoints import EndpointTable
from oisp.event_decoder import EventDecoder
from oisp.events import Event, ProcessInfo
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.proxy import MitmProxy, ProxyConfig, UpstreamOverride
from oisp.sinks.memory import MemorySink
from oisp.tls import CertificateAuthority

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="observing other processes' exec and file events (netlink CN_PROC, fanotify) needs root on Linux",
)

SHELL_COMMAND = "echo from-shell > from_shell.txt"
TOOL_CALLS = [
    {"id": "call_shell", "type": "function",
     "function": {"name": "run_shell", "arguments": json.dumps({"command": SHELL_COMMAND})}},
    {"id": "call_write", "type": "function",
     "function": {"name": "write_file", "arguments": json.dumps({"path": "direct.txt", "content": "written"})}},
]

AGENT = textwrap.dedent('''
    import json, subprocess, sys
    from openai import OpenAI

    client = OpenAI(api_key="sk-test-not-a-real-key", max_retries=0)
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("run_shell", "write_file")]
    messages = [{"role": "user", "content": "make the two files"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    message = reply.choices[0].message
    print("CALLS", flush=True)
    sys.stdin.readline()  # the test runs another process meanwhile
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "run_shell":
            output = subprocess.run(args["command"], shell=True, check=True).returncode
        else:
            with open(args["path"], "w") as f:
                f.write(args["content"])
            output = "ok"
        messages.append({"role": "tool", "tool_call_id": call.id, "content": str(output)})
    final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    print("DONE", final.choices[0].message.content, flush=True)
''')


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def stand_in_provider(request: Request) -> Response:
    body = json.loads(request.body or b"{}")
    answered = any(m.get("role") == "tool" for m in body.get("messages", []))
    message: dict[str, Any] = ({"role": "assistant", "content": "both files are written"} if answered
                               else {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS})
    return Response(body=json.dumps({
        "id": "chatcmpl-e2e", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop" if answered else "tool_calls"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
    }).encode())


def caused_by(event: Event) -> list[str]:
    return [r.event_id for r in event.related_events or () if r.relationship == "caused_by"]


def path_of(event: Event) -> str | None:
    path = getattr(event.data, "path", None)
    return path if isinstance(path, str) else None


def test_an_agents_tool_effects_are_linked_to_the_right_call(tmp_path: Path, test_ca: trustme.CA,
                                                            oisp_schema: SchemaValidator) -> None:
    from oisp.activity import Activity

    workdir = tmp_path / "work"
    workdir.mkdir()
    upstream_ca_file = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(upstream_ca_file))
    ca = CertificateAuthority.load_or_create(tmp_path / "oisp-conf")
    sink = MemorySink()
    plugins = create_plugin_manager()
    pipeline = Pipeline({"memory": sink})
    stages: list[LinkingStage] = []

    async def run(stop: anyio.Event, *, task_status: Any) -> None:
        async with pipeline, Activity(emit=pipeline.emit) as activity:
            activity.watch_pipeline(pipeline)
            # A generous bound: on a loaded machine a pass of the kernel reader may come late; the result still
            # waits only until the watermark passes its request.
            stage = link_activity(pipeline, activity, hold_ms=3000)
            assert stage is not None
            stages.append(stage)
            task_status.started()
            await stop.wait()

    with anyio.from_thread.start_blocking_portal() as portal:
        upstream = Upstream(server_context(test_ca.issue_cert("api.openai.com")), stand_in_provider)
        upstream_future, port = portal.start_task(upstream.serve)
        stop = portal.call(anyio.Event)
        run_future, _ = portal.start_task(run, stop)
        proxy = MitmProxy(ProxyConfig(listen_port=0, upstream_ca=upstream_ca_file,
                                      overrides=(UpstreamOverride("api.openai.com", 443, "127.0.0.1", port),)),
                          ca=ca, observer=EventDecoder(plugins, pipeline.emit),
                          endpoints=EndpointTable(plugins.endpoints()), attributor=Attributor())
        proxy_future, address = portal.start_task(proxy.serve)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"HTTPS_PROXY": f"http://{address[0]}:{address[1]}", "SSL_CERT_FILE": str(ca.cert_path),
                    "NO_PROXY": "", "PYTHONUNBUFFERED": "1"})
        try:
            agent = subprocess.Popen([sys.executable, "-c", AGENT], cwd=workdir, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert agent.stdout is not None and agent.stdin is not None
            line = agent.stdout.readline()
            assert line.strip() == "CALLS", (line, agent.stderr.read() if agent.stderr else "")
            # Meanwhile, a process that never called an AI endpoint writes a file in the same folder.
            subprocess.run(["sh", "-c", "echo bystander > bystander.txt"], cwd=workdir, check=True)
            agent.stdin.write("go\n")
            agent.stdin.flush()
            out, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            assert out.startswith("DONE both files are written"), out
            _wait_for_end(sink)
        finally:
            for future in (proxy_future, upstream_future):
                future.cancel()
            portal.call(stop.set)
            run_future.result(timeout=15)

    events = list(sink.events)
    seen = describe(events) + f"\n{stages[0].linker.stats}"
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    assert (workdir / "from_shell.txt").exists() and (workdir / "direct.txt").exists()
    calls = {e.data.call_id: e for e in events if e.event_type == "agent.tool_call"}  # type: ignore[attr-defined]
    assert set(calls) == {"call_shell", "call_write"}
    shell_call, write_call = calls["call_shell"], calls["call_write"]

    # The direct write: by the agent itself, linked to write_file.
    (direct,) = [e for e in events if e.event_type == "file.write" and path_of(e) == str(workdir / "direct.txt")]
    assert direct.process is not None and direct.process.pid == agent.pid
    assert caused_by(direct) == [write_call.event_id], seen
    # The shell: the sh the agent started, and the file it wrote, linked to run_shell.
    children = [e for e in events if e.event_type == "process.exec" and e.process is not None
                and e.process.ppid == agent.pid]
    shells = [e for e in children if os.path.basename(str(e.data.exe)) in ("sh", "dash", "bash")]  # type: ignore[attr-defined]
    assert len(shells) == 1, seen
    sh = shells[0]
    # Whatever else the agent ran on its own before the model asked for anything (the SDK runs uname) is not
    # linked to a call.
    assert all(not caused_by(e) for e in children if e is not sh and e.ts_mono is not None
               and e.ts_mono < min(c.ts_mono or 0 for c in calls.values())), seen
    if sh.data.args:  # type: ignore[attr-defined]  # (a shell gone before /proc was read has none)
        assert SHELL_COMMAND in sh.data.args  # type: ignore[attr-defined]
    assert caused_by(sh) == [shell_call.event_id], seen
    shell_writes = [e for e in events if e.event_type == "file.write" and path_of(e) == str(workdir / "from_shell.txt")]
    assert shell_writes, seen
    assert all(caused_by(e) == [shell_call.event_id] for e in shell_writes), seen
    # The bystander is not reported at all.
    assert not [e for e in events if str(workdir / "bystander.txt") in e.to_json()]

    results = {e.data.call_id: e for e in events if e.event_type == "agent.tool_result"}  # type: ignore[attr-defined]
    shell_effects = results["call_shell"].data.side_effects or []  # type: ignore[attr-defined]
    write_effects = results["call_write"].data.side_effects or []  # type: ignore[attr-defined]
    assert [e["event_id"] for e in shell_effects if e["type"] == "process_spawned"] == [sh.event_id], seen
    assert any(e["target"] == str(workdir / "from_shell.txt") and e["type"] in ("file_created", "file_modified")
               for e in shell_effects), seen
    assert [e["target"] for e in write_effects] == [str(workdir / "direct.txt")], seen
    # Each result comes after the effects it lists.
    order = [e.event_id for e in events]
    assert order.index(results["call_shell"].event_id) > max(order.index(e.event_id) for e in [sh, *shell_writes])

    sessions = [e for e in events if e.event_type == "agent.session"]
    assert [s.data.extra["action"] for s in sessions] == ["start", "end"]  # type: ignore[attr-defined]
    assert all(s.process is not None and s.process.pid == agent.pid for s in sessions)
    stats = sessions[1].data.extra["stats"]  # type: ignore[attr-defined]
    assert stats["llm_calls"] == 2 and stats["tool_calls"] == 2 and stats["tokens_used"] == 60
    assert stats["files_written"] >= 2
    assert stages[0].linker.stats.ambiguous == 0


def describe(events: list[Event]) -> str:
    """One line per event (type, pid, ppid, kernel time, data, links): the transcript a failure shows."""
    lines = []
    for e in events:
        process = e.process or ProcessInfo()
        links = [(r.relationship, r.event_id[-6:]) for r in e.related_events or ()]
        effects = f" {getattr(e.data, 'side_effects', None)}" if e.event_type == "agent.tool_result" else ""
        lines.append(f"{e.event_id[-6:]} {e.event_type} pid={process.pid} ppid={process.ppid} t={e.ts_mono} "
                     f"{json.dumps(e.to_dict().get('data'))[:160]} {links} {(e.attrs or {}).get('oisp.link')}{effects}")
    return "\n".join(lines)


def _wait_for_end(sink: MemorySink, timeout: float = 15.0) -> list[Event]:
    """The sink's events once the agent's session has ended (waits on the sink's condition, no sleeping)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        events = list(sink.events)
        if any(e.event_type == "agent.session" and e.data.extra.get("action") == "end"  # type: ignore[attr-defined]
               for e in events) or time.monotonic() > deadline:
            return events
        sink.wait_for(len(events) + 1, max(0.0, min(0.5, deadline - time.monotonic())))
