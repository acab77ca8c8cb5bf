"""QUIC in the namespace lab (root only): a UDP sender in the client namespace, a UDP echo server upstream.

With the interceptor on, datagrams to an AI endpoint's port 443 never reach the server and the (process, host)
is reported once; UDP to other addresses goes through; ``block_quic=False`` leaves UDP alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tests.interception.conftest import HERE, Agent, Topology, _start_server
from tests.netns import poll_until

pytestmark = pytest.mark.root

TARGETS = ["api.openai.com", "api.anthropic.com"]


@pytest.fixture
def udp_topology(topology: Topology) -> Topology:
    _start_server(topology.upstream, "udp-echo", "::", "443")
    return topology


def held_quic_client(topo: Topology, agent: Agent, host: str, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the QUIC-like client, keep its sockets open (as a QUIC client waiting for an answer does) until the
    agent reported the attempt; returns the client's result and the report."""
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "hold"
        os.mkfifo(fifo)
        proc = topo.client.popen(topo.client.python(str(HERE / "_client.py"), "quic", host, topo.other_ip,
                                                    str(count), str(fifo)),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            report = agent.wait_for("quic", timeout=20)
        except AssertionError:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            raise AssertionError(f"no report; client: {proc.communicate(timeout=30)}") from None
        finally:
            with contextlib.suppress(OSError):  # no reader: the client is gone already
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result, report


def test_quic_to_an_ai_endpoint_is_dropped_and_reported_once(udp_topology: Topology) -> None:
    topo = udp_topology
    agent = topo.start_agent(TARGETS)
    assert "udp.DstPort == 443" in agent.ready["filter"]
    first, report = held_quic_client(topo, agent, topo.link.ip4_b, 5)
    # The probe (to a non-AI address, after the five) was the first datagram the server saw: none got through.
    assert first["probe_answer"] == "seen=1" and first["host_answer"] is None
    assert report["host"] == "api.openai.com" and report["port"] == 443
    assert report["pid"] == first["pid"] and report["client"] == first["local"]
    assert report["decision"] == "quic_blocked" and report["protocol"] == "udp"
    assert report["process"] is not None and report["process"].startswith("python")
    # IPv6 too; a second process to the same host is its own report.
    second, report = held_quic_client(topo, agent, topo.link.ip6_b, 3)
    assert second["probe_answer"] == "seen=2"
    assert report["host"] == "api.anthropic.com" and report["pid"] == second["pid"]
    events, stats = agent.events_until_stats()
    assert [e for e in events if e["event"] == "quic"] == []  # nothing more was reported
    assert stats["quic_dropped_packets"] == 8 and stats["quic_flows"] == 2
    assert stats["diverted_connections"] == 0


def test_the_same_process_and_host_is_reported_once(udp_topology: Topology) -> None:
    topo = udp_topology
    agent = topo.start_agent(TARGETS)
    result, report = held_quic_client(topo, agent, topo.link.ip4_b, 2)
    assert report["pid"] == result["pid"]
    # Retransmissions on the same socket are the same flow: dropped, not reported again.
    poll_until(lambda: agent.stats()["quic_dropped_packets"] == 2, timeout=10, what="both datagrams dropped")
    assert agent.stats()["quic_flows"] == 1


def test_block_quic_off_leaves_udp_alone(udp_topology: Topology) -> None:
    topo = udp_topology
    agent = topo.start_agent(TARGETS, block_quic=False)
    assert "udp" not in agent.ready["filter"]
    result = topo.client_json("quic", "api.openai.com", topo.other_ip, "3")
    assert result["probe_answer"] == "seen=4"  # the three datagrams reached the server before the probe
    events, stats = agent.events_until_stats()
    assert [e for e in events if e["event"] == "quic"] == [] and stats["quic_dropped_packets"] == 0


def test_tcp_to_the_same_endpoint_is_still_diverted(udp_topology: Topology) -> None:
    topo = udp_topology
    agent = topo.start_agent(TARGETS)
    topo.client_json("quic", "api.openai.com", topo.other_ip, "1")
    result = topo.client_json("hello", "api.openai.com", "443")  # the fallback a QUIC client makes
    conn = agent.wait_for("conn")
    assert conn["pid"] == result["pid"] and conn["port"] == 443
