"""End-to-end diversion inside network namespaces (root only): client ns ── veth ── upstream ns.

The agent (Interceptor + a small transparent test proxy) runs in the client namespace; the servers standing in
for AI endpoints run in the upstream namespace (and an Ollama-like one on the client's own loopback).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
from tests.interception.conftest import HERE, PROXY_PORT, Topology
from tests.netns import poll_until

pytestmark = pytest.mark.root

TARGETS = ["api.openai.com", "api.anthropic.com", "localhost:11434", "*.openai.azure.com"]


def test_ai_connection_arrives_at_proxy_with_original_destination_and_client_pid(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    result = topology.client_json("hello", "api.openai.com", "443")
    conn = agent.wait_for("conn")
    link = topology.link
    # The proxy learned where the client was going, and who the client was.
    assert (conn["ip"], conn["port"]) == (link.ip4_b, 443)
    assert conn["pid"] == result["pid"]
    assert conn["client"] == result["local"]
    assert conn["interface"] == link.dev_a
    assert conn["loopback"] is False
    assert conn["local"][1] == PROXY_PORT
    # The client believes it talks to api.openai.com:443 ...
    assert result["remote"] == [link.ip4_b, 443]
    # ... while the server saw the proxy's own upstream connection, which was not diverted again.
    assert result["server_saw"] == conn["upstream_local"]
    assert result["server_saw"][1] != result["local"][1]
    stats = agent.stats()
    assert stats["diverted_connections"] == 1


def test_non_ai_destination_is_not_diverted(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    result = topology.client_json("hello", "example.net", "443")
    # The server saw the client itself: same address and port, no proxy in between.
    assert result["server_saw"] == result["local"]
    events, stats = agent.events_until_stats()
    assert [e for e in events if e["event"] == "conn"] == []
    assert stats["diverted_connections"] == 0
    assert stats["nat_entries"] == 0
    # Only its SYN crossed user space (the SYN catch for freshly learned addresses); the rest stayed in the
    # kernel, because the filter names the AI endpoints' addresses.
    assert stats["passed_packets"] == 1


def test_without_the_syn_catch_no_packet_of_a_non_ai_connection_reaches_user_space(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS, catch_new_syns=False)
    result = topology.client_json("bulk", "example.net", "443", "2000000")
    assert result["intact"] is True
    stats = agent.stats()
    assert stats["passed_packets"] == 0
    assert stats["diverted_connections"] == 0


def test_ipv6_connection_is_diverted(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    result = topology.client_json("hello", "api.anthropic.com", "443")
    conn = agent.wait_for("conn")
    assert (conn["ip"], conn["port"]) == (topology.link.ip6_b, 443)
    assert conn["pid"] == result["pid"]
    assert conn["client"] == result["local"]
    assert result["server_saw"] == conn["upstream_local"]


def test_loopback_ollama_endpoint_is_diverted(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    curl = topology.client.popen(["curl", "-sS", "--max-time", "20", "http://127.0.0.1:11434/api/tags"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = curl.communicate(timeout=30)
    assert curl.returncode == 0, err
    body = json.loads(out)
    conn = agent.wait_for("conn")
    assert (conn["ip"], conn["port"], conn["loopback"]) == ("127.0.0.1", 11434, True)
    assert conn["pid"] == curl.pid
    assert conn["interface"] == "lo"
    assert body["request"] == "GET /api/tags HTTP/1.1"
    assert body["peer"] == conn["upstream_local"]  # the server answered the proxy, not curl directly


@pytest.mark.parametrize(("host", "port", "target", "size", "relay"), [
    ("api.openai.com", "443", "api.openai.com", 50_000_000, "thread"),
    ("127.0.0.1", "1234", "127.0.0.1:1234", 50_000_000, "thread"),
    ("api.openai.com", "443", "api.openai.com", 20_000_000, "process"),
], ids=["remote-ipv4", "loopback", "remote-ipv4-relay-process"])
def test_bulk_transfer_is_relayed_intact(topology: Topology, host: str, port: str, target: str, size: int,
                                         relay: str) -> None:
    agent = topology.start_agent([*TARGETS, target], relay=relay)
    result = topology.client_json("bulk", host, port, str(size), timeout=120)
    assert result["received"] == size
    assert result["intact"] is True
    conn = agent.wait_for("conn")
    assert conn["port"] == int(port)
    # Established segments took the fast path (one lookup and one slice write each), byte-faithfully: most of
    # the translated packets of a bulk transfer; the handshake, FIN and RST took the full path.
    stats = agent.stats()
    assert stats["translated_packets"] > 100
    assert stats["fast_path_packets"] > stats["translated_packets"] // 2


def test_wildcard_endpoint_is_learned_from_dns_and_diverted(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    assert topology.wildcard_ip not in agent.ready["filter"]
    result = topology.client_json("resolve-hello", topology.link.ip4_b, "myres.openai.azure.com")
    assert result["resolved"] == topology.wildcard_ip
    conn = agent.wait_for("conn")
    assert (conn["ip"], conn["port"]) == (topology.wildcard_ip, 443)
    assert conn["pid"] == result["pid"]
    stats = agent.stats()
    assert stats["dns_answers"] >= 1
    assert stats["filter_swaps"] >= 1
    assert topology.wildcard_ip in stats["filter"]


def _direct(topology: Topology, host: str = "api.openai.com") -> bool:
    """True when a new connection reaches the server directly (False also when it fails, e.g. refused while
    the diversion still points at a proxy that has just gone)."""
    res = topology.client.run(topology.client.python(str(HERE / "_client.py"), "hello", host, "443"),
                              timeout=30, check=False)
    if res.returncode != 0:
        return False
    result = json.loads(res.stdout)
    return bool(result["server_saw"] == result["local"])


def _attached(topology: Topology) -> int:
    """How many programs are attached to the client's veth (each handle has one per direction)."""
    return topology.client.tc_filters(topology.link.dev_a).count(" handle 0x")


def test_fails_open_when_the_proxy_stops(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    assert not _direct(topology)
    before = _attached(topology)  # the diversion, and the DNS sniffer (which only copies)
    agent.command("stop-proxy")
    agent.wait_for("proxy-stopped")
    stopped = time.monotonic()
    poll_until(lambda: _direct(topology), timeout=5, interval=0.05, what="connections going direct")
    assert time.monotonic() - stopped < 5
    stats = agent.stats()
    assert stats["diverting"] is False
    assert stats["filter"] is None
    assert _attached(topology) == before - 2


def test_all_filters_are_removed_on_exit(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS)
    dev = topology.link.dev_a
    assert "tc_divert" in topology.client.tc_filters(dev)
    agent.command("quit")
    agent.wait_for("bye")
    assert agent.proc.wait(timeout=10) == 0
    assert "bpf" not in topology.client.tc_filters(dev)
    assert "bpf" not in topology.client.tc_filters("lo")
    assert _direct(topology)


def test_all_filters_are_removed_on_sigterm(topology: Topology) -> None:
    agent = topology.start_agent(TARGETS, handle_signals=True)
    dev = topology.link.dev_a
    assert "tc_divert" in topology.client.tc_filters(dev)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=10) == -signal.SIGTERM
    assert "bpf" not in topology.client.tc_filters(dev)
    assert "bpf" not in topology.client.tc_filters("lo")


def _prog_ids(tc_output: str) -> set[str]:
    return set(re.findall(r" id (\d+) ", tc_output))


def test_crashed_run_fails_open_and_is_cleaned_up_at_next_start(topology: Topology) -> None:
    dev = topology.link.dev_a
    agent = topology.start_agent(TARGETS)
    crashed = _prog_ids(topology.client.tc_filters(dev))
    assert crashed
    agent.proc.kill()
    agent.proc.wait(timeout=10)
    # The killed process's filters are still attached, but pass traffic once its heartbeat is stale.
    assert _prog_ids(topology.client.tc_filters(dev)) == crashed
    killed = time.monotonic()
    poll_until(lambda: _direct(topology), timeout=8, interval=0.1, what="fail-open after the crash")
    assert time.monotonic() - killed < 8
    # The next start reaps them (bpffs registry), and diverts again.
    again = topology.start_agent(TARGETS)
    now = _prog_ids(topology.client.tc_filters(dev))
    assert now
    assert not now & crashed
    assert not _direct(topology)
    again.command("quit")
    again.wait_for("bye")
    assert "bpf" not in topology.client.tc_filters(dev)
