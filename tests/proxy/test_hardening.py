"""Hostile and fault cases (issue 15): requests addressed to oisp itself, descriptor exhaustion, idle connections."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trustme
from tests.proxy.clients import read_all
from tests.stack import Stack, running_stack

from oisp.proxy.loop import SelfAddresses


def _ask(proxy: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(request)
        return read_all(sock)


@pytest.mark.parametrize("request_line", [
    "GET http://127.0.0.1:{port}/ HTTP/1.1",
    "GET http://localhost:{port}/v1/models HTTP/1.1",
    "CONNECT 127.0.0.1:{port} HTTP/1.1",
    "CONNECT localhost:{port} HTTP/1.1",
    "CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1",
])
def test_a_request_addressed_to_oisp_itself_is_refused(stack: Stack, request_line: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    port = stack.proxy_address[1]
    line = request_line.format(port=port)
    with caplog.at_level(logging.WARNING, logger="oisp.proxy.server"):
        answer = _ask(stack.proxy_address, f"{line}\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answer += _ask(stack.proxy_address, f"{line}\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 508 Loop Detected\r\n") and b"oisp's own listening address" in answer
    assert stack.proxy.stats.connections == 2  # nothing was forwarded back to oisp
    warnings = [r for r in caplog.records if "own listening address" in r.getMessage()]
    assert len(warnings) == 1  # once per interval, however often
    # the proxy still serves, also the same host on another port
    assert _ask(stack.proxy_address, b"GET http://127.0.0.1:1234/x HTTP/1.1\r\nHost: 127.0.0.1:1234\r\n"
                b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_a_wildcard_listener_refuses_every_local_address(tmp_path: Path, test_ca: trustme.CA) -> None:
    with running_stack(tmp_path, test_ca, config={"listen_host": "0.0.0.0"}) as stack:
        port = stack.proxy_address[1]
        proxy = ("127.0.0.1", port)
        for target in ("127.0.0.1", "127.0.0.2", "0.0.0.0", socket.gethostname()):
            answer = _ask(proxy, f"CONNECT {target}:{port} HTTP/1.1\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 508"), (target, answer)
        assert stack.proxy.stats.connections == 4


def test_self_addresses_of_bound_and_wildcard_listeners() -> None:
    bound = SelfAddresses(("127.0.0.1", 8080))
    assert bound.is_self("127.0.0.1", 8080) and bound.is_self("::ffff:127.0.0.1", 8080)
    assert bound.is_self("0.0.0.0", 8080)
    assert not bound.is_self("127.0.0.1", 8081) and not bound.is_self("127.0.0.2", 8080)
    wildcard = SelfAddresses(("::", 8080))
    assert wildcard.is_self("::1", 8080) and wildcard.is_self("127.9.9.9", 8080)
    assert not wildcard.is_self("192.0.2.1", 8080)  # TEST-NET: on no interface
    assert not SelfAddresses(("0.0.0.0", 8080)).is_self("::1", 8080)


def test_throttled_logs_once_per_interval_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    from oisp.ratelog import Throttled

    now = [0.0]
    throttled = Throttled(logging.getLogger("t"), 60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        assert throttled.log(logging.WARNING, "boom %s", 1)
        assert not throttled.log(logging.WARNING, "boom %s", 2) and not throttled.log(logging.WARNING, "boom %s", 3)
        now[0] = 61.0
        assert throttled.log(logging.WARNING, "boom %s", 4)
    assert [r.getMessage() for r in caplog.records] == ["boom 1", "boom 4 (2 more like it in the last 60 s)"]
    assert throttled.total == 4
