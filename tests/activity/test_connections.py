"""Other connections of agent processes, end to end as root on Linux: a real agent calls a stand-in provider
through the proxy, gets a tool call, and opens a plain TCP connection to a server on loopback; oisp reports it as a
``network.connect`` (pid, destination, port; not intercepted) linked to that tool call, with a
``network_request`` side effect on the tool result. Its connection to the proxy (an AI call the proxy reports
itself) is not reported again, and a process that never called an AI endpoint connecting meanwhile is not
reported. Both sources run: pydivert's FLOW layer and, with it made unavailable, the polled socket tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
import trustme
from tests.activity.test_link_e2e import _wait_for_end, caused_by, describe
from tests.oisp_schema import SchemaValidator
from tests.upstream import Request, Response, Upstream, server_context

from oisp.activity import flow
from oisp.activity.connections import NOT_INTERCEPTED
from oisp.activity.link_stage import LinkingStage, link_activity
from oisp.attribution import Attributor
from oisp.endpoints import EndpointTable
from oisp.event_decoder import EventDecoder
from oisp.events import Event
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.proxy import MitmProxy, ProxyConfig, UpstreamOverride
from oisp.sinks.memory import MemorySink
from oisp.tls import CertificateAuthority

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="observing other processes' connections (pydivert's FLOW layer, their sockets) needs root on Linux",
)

AGENT = textwrap.dedent('''
    import json, socket, sys
    from openai import OpenAI

    client = OpenAI(api_key="sk-test-not-a-real-key", max_retries=0)
    tools = [{"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "fetch it"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    message = reply.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    (call,) = message.tool_calls
    host, port = json.loads(call.function.arguments)["address"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        print("CONNECTED", conn.getsockname()[1], flush=True)
        data = conn.recv(100)  # the server closes it once the test saw the event
    messages.append({"role": "tool", "tool_call_id": call.id, "content": data.decode()})
    final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    print("DONE", final.choices[0].message.content, flush=True)
''')


SERVER = textwrap.dedent('''
    import socket, sys, threading
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    held = []

    def accept():
        while True:
            conn, _ = server.accept()
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.readline()  # the test releases the connections once it saw the agent's reported
    for conn in list(held):
        conn.sendall(b"fetched")
        conn.close()
    sys.stdin.readline()
''')


class Server:
    """A plain TCP server on loopback, in a process of its own (not the monitor's: connections to a port the
    monitor's process listens on are taken as the proxy's): connections are held until :meth:`release`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self._released = False

    def release(self) -> None:
        if not self._released and self.proc.stdin is not None:
            self._released = True
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        self.release()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(params=["flow", "polled"])
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "flow":
        why = flow.available()
        if why is not None:
            pytest.skip(why)
    else:  # as where the FLOW layer is absent (no cgroup2, macOS): the fallback source runs
        monkeypatch.setattr(flow, "available", lambda: "forced off by the test")
    return str(request.param)


def _provider(address: str) -> Any:
    async def answer(request: Request) -> Response:
        body = json.loads(request.body or b"{}")
        answered = any(m.get("role") == "tool" for m in body.get("messages", []))
        call = {"id": "call_fetch", "type": "function",
                "function": {"name": "fetch", "arguments": json.dumps({"address": address})}}
        message: dict[str, Any] = ({"role": "assistant", "content": "fetched it"} if answered
                                   else {"role": "assistant", "content": None, "tool_calls": [call]})
        return Response(body=json.dumps({
            "id": "chatcmpl-net", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop" if answered else "tool_calls"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }).encode())
    return answer


def connects(events: list[Event], **where: Any) -> list[Event]:
    found = []
    for e in events:
        if e.event_type != "network.connect" or (e.attrs or {}).get("oisp.interception") != NOT_INTERCEPTED:
            continue
        if "pid" in where and (e.process is None or e.process.pid != where["pid"]):
            continue
        if "port" in where and e.data.dest.port != where["port"]:  # type: ignore[attr-defined]
            continue
        found.append(e)
    return found


def test_an_agents_plain_connection_is_reported_and_linked(tmp_path: Path, test_ca: trustme.CA, server: Server,
                                                          source: str, oisp_schema: SchemaValidator) -> None:
    from oisp.activity import Activity

    address = f"127.0.0.1:{server.port}"
    upstream_ca_file = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(upstream_ca_file))
    ca = CertificateAuthority.load_or_create(tmp_path / "oisp-conf")
    sink = MemorySink()
    plugins = create_plugin_manager()
    pipeline = Pipeline({"memory": sink})
    stages: list[LinkingStage] = []
    running: list[dict[str, str]] = []

    async def run(stop: anyio.Event, *, task_status: Any) -> None:
        async with pipeline, Activity(emit=pipeline.emit) as activity:
            activity.watch_pipeline(pipeline)
            stage = link_activity(pipeline, activity, hold_ms=3000)
            assert stage is not None
            stages.append(stage)
            running.append(activity.running)
            task_status.started()
            await stop.wait()

    with anyio.from_thread.start_blocking_portal() as portal:
        upstream = Upstream(server_context(test_ca.issue_cert("api.openai.com")), _provider(address))
        upstream_future, port = portal.start_task(upstream.serve)
        stop = portal.call(anyio.Event)
        run_future, _ = portal.start_task(run, stop)
        proxy = MitmProxy(ProxyConfig(listen_port=0, upstream_ca=upstream_ca_file,
                                      overrides=(UpstreamOverride("api.openai.com", 443, "127.0.0.1", port),)),
                          ca=ca, observer=EventDecoder(plugins, pipeline.emit),
                          endpoints=EndpointTable(plugins.endpoints()), attributor=Attributor())
        proxy_future, proxy_address = portal.start_task(proxy.serve)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"HTTPS_PROXY": f"http://{proxy_address[0]}:{proxy_address[1]}",
                    "SSL_CERT_FILE": str(ca.cert_path), "NO_PROXY": "", "PYTHONUNBUFFERED": "1"})
        bystander = None
        try:
            agent = subprocess.Popen([sys.executable, "-c", AGENT], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert agent.stdout is not None
            line = agent.stdout.readline()
            assert line.startswith("CONNECTED"), (line, agent.stderr.read() if agent.stderr else "")
            # Meanwhile a process that never called an AI endpoint connects to the same server.
            bystander = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
                import socket, sys
                with socket.create_connection(("127.0.0.1", {server.port})) as c:
                    print("CONNECTED", flush=True)
                    c.recv(100)
                """)], stdout=subprocess.PIPE, text=True)
            assert bystander.stdout is not None and bystander.stdout.readline().startswith("CONNECTED")
            # The connections stay open until the agent's is reported (the polled source sees open ones only).
            deadline_events = _wait_for(sink, lambda evs: bool(connects(evs, pid=agent.pid, port=server.port)))
            assert connects(deadline_events, pid=agent.pid, port=server.port), describe(deadline_events)
            server.release()
            out, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            assert out.strip().endswith("DONE fetched it"), out
            bystander.wait(timeout=10)
            _wait_for_end(sink)
        finally:
            server.release()
            if bystander is not None and bystander.poll() is None:
                bystander.kill()
            for future in (proxy_future, upstream_future):
                future.cancel()
            portal.call(stop.set)
            run_future.result(timeout=15)

    events = list(sink.events)
    seen = describe(events) + f"\n{stages[0].linker.stats}\n{running}"
    assert running[0]["connections"].startswith("pydivert" if source == "flow" else "socket tables"), running
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    (call,) = [e for e in events if e.event_type == "agent.tool_call"]
    (connect,) = connects(events, pid=agent.pid, port=server.port)
    assert connect.data.dest.ip == "127.0.0.1" and connect.data.protocol == "tcp", seen  # type: ignore[attr-defined]
    assert connect.data.src.port == int(line.split()[1]), seen  # type: ignore[attr-defined]
    assert (connect.attrs or {})["oisp.agent_pid"] == agent.pid
    assert connect.confidence.completeness == ("sampled" if source == "polled" else "metadata_only"), seen
    assert caused_by(connect) == [call.event_id], seen
    (result,) = [e for e in events if e.event_type == "agent.tool_result"]
    effects = result.data.side_effects or []  # type: ignore[attr-defined]
    assert [(e["type"], e["target"], e["event_id"]) for e in effects] == [
        ("network_request", address, connect.event_id)], seen
    # Only that one: the agent's connections to the proxy are the proxy's to report (they are, intercepted) ...
    assert connects(events, pid=agent.pid) == [connect], seen
    assert [e for e in events if e.event_type == "network.connect" and e.process is not None
            and e.process.pid == agent.pid and (e.attrs or {}).get("oisp.interception") == "intercepted"], seen
    # ... and the bystander is not reported at all.
    assert bystander is not None and not [e for e in events if e.process is not None
                                          and e.process.pid == bystander.pid], seen


def _wait_for(sink: MemorySink, condition: Any, timeout: float = 20.0) -> list[Event]:
    """The sink's events once ``condition`` holds for them, or at the deadline (waits on the sink, no sleeping)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        events = list(sink.events)
        if condition(events) or time.monotonic() > deadline:
            return events
        sink.wait_for(len(events) + 1, max(0.0, min(0.5, deadline - time.monotonic())))
