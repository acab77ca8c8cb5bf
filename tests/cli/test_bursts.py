"""Bursts through ``oisp run`` with its decoder process: a burst on one connection must not cost events, and a
flood of reset streams must neither cost a bystander's events nor become thousands of events itself."""

from __future__ import annotations

import signal
import socket
import ssl
import threading
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from tests.cli.conftest import OispProcess, RunningUpstream

from oisp.events import Event


def _tls_through_proxy(proxy: tuple[str, int], confdir: Path, alpn: list[str]) -> ssl.SSLSocket:
    raw = socket.create_connection(proxy, timeout=60)
    raw.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, "the proxy closed the tunnel"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(confdir / "oisp-ca.pem"))
    context.set_alpn_protocols(alpn)
    return context.wrap_socket(raw, server_hostname="api.openai.com")


def _oisp(tmp_path: Path, upstream: RunningUpstream, events_file: Path) -> OispProcess:
    return OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--upstream-ca",
                        str(upstream.ca_file), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream.port}",
                        "--stdout", "none", "--output", str(events_file), "--decoder", "process"])


def _events(path: Path) -> list[Event]:
    return [Event.from_json(line) for line in path.read_text().splitlines()]


def _dropped(stderr: str) -> int:
    return int(stderr.split(" events; ", 1)[1].split(" dropped", 1)[0])


@pytest.mark.timeout(400)  # 10,000 exchanges through the proxy, the test's upstream and the decoder process
def test_ten_thousand_pipelined_requests_on_one_connection_are_all_recorded(
        tmp_path: Path, upstream: RunningUpstream) -> None:
    count = 10_000
    events_file = tmp_path / "events.jsonl"
    oisp = _oisp(tmp_path, upstream, events_file)
    try:
        with _tls_through_proxy(oisp.address, tmp_path / "conf", ["http/1.1"]) as tls:
            request = b"GET /v1/models HTTP/1.1\r\nhost: api.openai.com\r\n\r\n"
            tls.sendall(request * count)  # all at once: the upstream answers while we still send
            received = bytearray()
            while received.count(b"HTTP/1.1 200") < count:
                chunk = tls.recv(1 << 20)
                assert chunk, f"the connection ended after {received.count(b'HTTP/1.1 200')} responses"
                received += chunk
    finally:
        code, stderr = oisp.stop(signal.SIGTERM, timeout=120)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    types = [e.event_type for e in _events(events_file)]
    # every response recorded, or the loss counted and reported: here nothing may be lost
    assert _dropped(stderr) == 0, stderr
    assert types.count("ai.request") == count and types.count("ai.response") == count, stderr[-2000:]


def _rapid_reset(tls: ssl.SSLSocket, streams: int) -> None:
    """Open ``streams`` streams and reset each at once (CVE-2023-44487's shape)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    headers = [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
               (":authority", "api.openai.com"), ("content-type", "application/json")]
    for n in range(streams):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        conn.reset_stream(stream_id)
        if n % 500 == 499:
            tls.sendall(conn.data_to_send())
    tls.sendall(conn.data_to_send())
    conn.close_connection()
    tls.sendall(conn.data_to_send())


@pytest.mark.timeout(400)
@pytest.mark.parametrize("streams", [20_000])
def test_a_rapid_reset_flood_costs_a_bystander_nothing_and_is_one_event(
        tmp_path: Path, upstream: RunningUpstream, streams: int) -> None:
    events_file = tmp_path / "events.jsonl"
    oisp = _oisp(tmp_path, upstream, events_file)
    bystander_prompts = [f"bystander question {i}" for i in range(33)]
    failures: list[BaseException] = []

    def bystander() -> None:
        try:
            with httpx.Client(proxy=f"http://{oisp.address[0]}:{oisp.address[1]}",
                              verify=ssl.create_default_context(cafile=str(tmp_path / "conf" / "oisp-ca.pem"))
                              ) as client:
                for prompt in bystander_prompts:
                    r = client.post("https://api.openai.com/v1/chat/completions",
                                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]})
                    assert r.status_code == 200
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    try:
        thread = threading.Thread(target=bystander)
        with _tls_through_proxy(oisp.address, tmp_path / "conf", ["h2"]) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            thread.start()
            _rapid_reset(tls, streams)
        thread.join(120)
        assert not thread.is_alive() and not failures, failures
    finally:
        code, stderr = oisp.stop(signal.SIGTERM, timeout=120)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    events = _events(events_file)
    prompts = [e.data.messages[0].content for e in events  # type: ignore[attr-defined]
               if e.event_type == "ai.request" and e.data.messages]  # type: ignore[attr-defined]
    assert sorted(p for p in prompts if p.startswith("bystander")) == sorted(bystander_prompts)
    assert sum(e.event_type == "ai.response" for e in events) >= len(bystander_prompts)
    assert _dropped(stderr) == 0, stderr
    # the flood: a few streams on their own, then the rest as one partial event saying how many
    flood = [e for e in events if e.event_type == "ai.request" and not e.data.messages]  # type: ignore[attr-defined]
    assert len(flood) < 200, len(flood)
    # one exchange stands for the rest (its request, and its end: the partial event saying how many there were)
    aggregated = [e for e in events if "rapid reset" in e.to_json()]
    assert [e.event_type for e in aggregated] == ["ai.request", "ai.response"], [e.to_dict() for e in aggregated]
    assert f"reset {streams - 100} streams" in aggregated[1].to_json()
