"""How the proxy sets a connection up: upstream TLS sessions resumed without weakening verification, and the
process learnt while the handshakes run."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import attrs
import pytest
import trustme
from tests.proxy.clients import read_all, tls_tunnel
from tests.stack import Stack, running_stack

from oisp.attribution import Attributor
from oisp.proxy.pinning import PinnedClients, ProcessKey


def _request(stack: Stack, host: str = "api.openai.com") -> bytes:
    with tls_tunnel(stack.proxy_address, host, stack.client_context(), ["http/1.1"]) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_all(sock)


def _connects(stack: Stack, count: int) -> list[object]:
    return [e for e in stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "network.connect"]) >= count)
            if e.event_type == "network.connect"]


# --- upstream TLS sessions ------------------------------------------------------------------------------------

def test_upstream_sessions_are_resumed_and_the_certificate_is_still_reported(
        tmp_path: Path, test_ca: trustme.CA) -> None:
    # no spare connections: each request makes exactly one upstream handshake, whose resumption is counted
    with running_stack(tmp_path, test_ca, config={"preconnect_idle": 0}) as stack:
        assert stack.upstream.context is not None
        before = stack.upstream.context.session_stats()["hits"]
        for _ in range(3):
            assert _request(stack).startswith(b"HTTP/1.1 200")
        assert stack.upstream.context.session_stats()["hits"] - before == 2  # the second and third resumed
        certificates = [e.data.tls.certificate for e in _connects(stack, 3)]  # type: ignore[attr-defined]
        assert certificates[0] is not None and certificates[0].fingerprint_sha256
        assert certificates[1] == certificates[0] and certificates[2] == certificates[0]


def test_a_session_is_only_resumed_for_the_name_it_was_verified_for(stack: Stack) -> None:
    # no spare connections: a spare for the first name would (rightly) resume that name's session
    stack.proxy.config = attrs.evolve(stack.proxy.config, preconnect_idle=0)
    assert stack.upstream.context is not None
    before = stack.upstream.context.session_stats()["hits"]
    assert _request(stack, "api.openai.com").startswith(b"HTTP/1.1 200")
    assert _request(stack, "api.anthropic.com").startswith(b"HTTP/1.1 200")  # same upstream, other name
    assert stack.upstream.context.session_stats()["hits"] == before


def test_no_session_is_resumed_once_trust_changed(tmp_path: Path) -> None:
    real_ca, unrelated_ca = trustme.CA(), trustme.CA()
    with running_stack(tmp_path, real_ca) as stack:
        assert _request(stack).startswith(b"HTTP/1.1 200")  # a verified session to resume
        unrelated_ca.cert_pem.write_to_path(str(stack.upstream_ca_file))
        stack.proxy._upstream_contexts.clear()  # the proxy now trusts another CA only
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure"):
            _request(stack)
        connects = _connects(stack, 2)
        assert connects[1].attrs["oisp.interception"] == "upstream_verification_failed"  # type: ignore[attr-defined]
        # Nothing reached the upstream after the first request: neither over the failed connection nor over the
        # spare made (preconnect) under the old trust, which a connection under the new one must not take.
        assert len(stack.upstream.connections) >= 2
        assert not any(c.received for c in stack.upstream.connections[1:])


def test_sessions_are_not_resumed_past_their_age(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from oisp.proxy.upstream import UpstreamSessions

    monkeypatch.setattr(UpstreamSessions, "MAX_AGE", -1.0)
    assert stack.upstream.context is not None
    before = stack.upstream.context.session_stats()["hits"]
    assert _request(stack).startswith(b"HTTP/1.1 200")
    assert _request(stack).startswith(b"HTTP/1.1 200")
    assert stack.upstream.context.session_stats()["hits"] == before  # verified again, fully


# --- the process ----------------------------------------------------------------------------------------------

def test_the_process_is_in_the_report_and_events_though_nobody_waited_for_it(stack: Stack) -> None:
    for _ in range(2):  # the first connection searches /proc, the second is recalled on the event loop
        assert _request(stack).startswith(b"HTTP/1.1 200")
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    for event in events:
        if event.event_type in ("network.connect", "ai.request", "ai.response"):
            assert event.process is not None and event.process.pid == os.getpid(), event.event_type


def test_recall_names_a_process_seen_before_without_a_search() -> None:
    attributor = Attributor()
    with socket.create_server(("127.0.0.1", 0)) as server:
        local = server.getsockname()
        first = socket.create_connection(local)
        first_fd = first.fileno()
        conn, first_addr = server.accept()
        with first, conn:
            assert attributor.recall(first_addr, local, None) is None  # never seen: needs the full lookup
            found = attributor(first_addr, local, None)
            assert found is not None and found.process.pid == os.getpid()
        second = socket.create_connection(local)  # most likely the same descriptor number as the first
        conn, second_addr = server.accept()
        with second, conn:
            # The lowest free descriptor: the first connection's, where recall looks first.
            assert second.fileno() == first_fd
            assert attributor.recall(second_addr, local, None) is found
        assert attributor.recall(("127.0.0.1", 1), local, None) is None


def test_pinned_clients_need_repeated_evidence_from_one_process() -> None:
    now = [0.0]
    pinned = PinnedClients(ttl=10, strikes=2, max_entries=2, clock=lambda: now[0])
    node = ProcessKey("/usr/bin/node", "node app.js", 100, "t0")
    other = ProcessKey("/usr/bin/node", "node other.js", 101, "t1")
    assert not pinned.evidence("api.openai.com", None)  # an unknown process is never pinned
    assert not pinned.evidence("API.openai.com", node)  # one alert is not enough
    assert not pinned.knows("api.openai.com")
    now[0] = 11.0
    assert not pinned.evidence("api.openai.com", node)  # the first one is too old by now
    assert pinned.evidence("api.openai.com", node)
    assert not pinned.evidence("api.openai.com", node)  # pinned already: not new
    assert pinned.knows("api.openai.com") and pinned.is_pinned("api.openai.com", node)
    assert not pinned.is_pinned("api.openai.com", other) and not pinned.is_pinned("api.openai.com", None)
    # the same executable and command line with another pid (or start time) is another process
    assert not pinned.is_pinned("api.openai.com", ProcessKey("/usr/bin/node", "node app.js", 100, "t9"))
    assert pinned.pinned() == [("api.openai.com", node)]
    now[0] = 22.0
    assert not pinned.is_pinned("api.openai.com", node)  # expired entries are dropped...
    assert not pinned.knows("api.openai.com")  # ...and the host with them
