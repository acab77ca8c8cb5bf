"""Explicit mode with plain HTTP (``HTTP_PROXY``): real clients through oisp to a strict origin server that refuses
absolute-form targets, a Host that is not the target's, and proxy-hop headers (as Express and most frameworks do)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from tests.netns import poll_until
from tests.proxy.clients import read_all
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response, json_ok


def _curl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "--silent", "--show-error", "--fail-with-body", "--proxy", stack.proxy_url,
                           "--noproxy", "", *args], capture_output=True, text=True, timeout=30, check=False)


def _requests(stack: Stack) -> list[tuple[int, str, str, str | None]]:
    """(upstream connection index, method, target, Host) of every request the origin server received."""
    return [(i, r.method, r.target, r.header("host"))
            for i, c in enumerate(stack.plain_upstream.connections) for r in c.requests]


pytestmark = pytest.mark.skipif(subprocess.run(["which", "curl"], capture_output=True).returncode != 0,
                                reason="needs curl")


def test_curl_chat_to_a_local_model_server_reaches_it_in_origin_form(stack: Stack) -> None:
    body = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    out = _curl(stack, "http://localhost:11434/api/chat", "-H", "content-type: application/json", "-d", body)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["path"] == "/api/chat"
    assert stack.plain_upstream.refused == []
    assert _requests(stack) == [(0, "POST", "/api/chat", "localhost:11434")]
    assert bytes(stack.plain_upstream.connections[0].requests[0].body) == body.encode()
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.provider.name == "ollama"  # type: ignore[attr-defined]
    assert request.data.model.id == "llama3"  # type: ignore[attr-defined]


def test_curl_keeps_one_connection_across_requests_and_origins(stack: Stack) -> None:
    out = _curl(stack, "http://localhost:11434/api/tags", "http://localhost:11434/api/ps",
                "http://example.com/index.html", "http://localhost:11434/api/version")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [json.loads(x)["path"] for x in out.stdout.replace("}{", "}\n{").splitlines()] == [
        "/api/tags", "/api/ps", "/index.html", "/api/version"]
    assert stack.plain_upstream.refused == []
    # one client connection to oisp; a new upstream connection each time the origin changes
    assert stack.proxy.stats.connections == 1
    assert _requests(stack) == [(0, "GET", "/api/tags", "localhost:11434"), (0, "GET", "/api/ps", "localhost:11434"),
                                (1, "GET", "/index.html", "example.com"), (2, "GET", "/api/version", "localhost:11434")]
    connects = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "network.connect"]) >= 2)
    decisions = [(e.data.dest.domain, e.attrs["oisp.interception"])  # type: ignore[attr-defined,index]
                 for e in connects if e.event_type == "network.connect"]
    assert decisions == [("localhost", "plain_http"), ("localhost", "plain_http")]  # non-AI hosts: no events
    assert stack.proxy.stats.decisions == {"plain_http": 2, "passthrough": 1}


def test_httpx_keep_alive_with_bodies_chunked_and_not(stack: Stack) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "llama3", '
        yield b'"prompt": "why"}'

    with httpx.Client(proxy=stack.proxy_url, trust_env=False) as client:
        first = client.post("http://localhost:11434/api/generate", content=b'{"model": "llama3", "prompt": "a"}')
        second = client.post("http://localhost:11434/api/generate", content=chunks())
        third = client.get("http://localhost:11434/api/tags", headers={"X-Custom-Case": "Kept"})
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200], stack.plain_upstream.refused
    assert [r.json()["path"] for r in (first, second, third)] == ["/api/generate", "/api/generate", "/api/tags"]
    assert len(stack.plain_upstream.connections) == 1
    received = stack.plain_upstream.connections[0].requests
    assert received[1].body == b'{"model": "llama3", "prompt": "why"}'
    assert received[1].header("transfer-encoding") == "chunked"  # chunking passed on, not re-encoded
    raw = bytes(stack.plain_upstream.connections[0].received)
    assert b"\r\n5\r\n" not in raw and b'\r\n14\r\n{"model": "llama3", \r\n' in raw
    assert b"X-Custom-Case: Kept" in raw
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.request"]) >= 3)
    assert [(e.data.model.id if e.data.model else None)  # type: ignore[attr-defined]
            for e in events if e.event_type == "ai.request"] == ["llama3", "llama3", None]


def test_everything_but_the_target_host_and_hop_headers_is_byte_for_byte(stack: Stack) -> None:
    head = (b"POST http://localhost:11434/api/embed HTTP/1.1\r\nhOsT: localhost:11434\r\nX-b: 2\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dTpw\r\nx-A:  spaced \r\n"
            b"Connection: close, X-b\r\nContent-Length: 7\r\n\r\n")
    sock = socket.create_connection(stack.proxy_address, timeout=10)
    with sock:
        sock.sendall(head + b'{"a":1}')
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert bytes(stack.plain_upstream.connections[0].received) == (
        b"POST /api/embed HTTP/1.1\r\nhOsT: localhost:11434\r\nx-A:  spaced \r\nConnection: close\r\n"
        b"Content-Length: 7\r\n\r\n" + b'{"a":1}')


def test_a_pipelined_request_for_another_origin_waits_for_the_responses(stack: Stack) -> None:
    sock = socket.create_connection(stack.proxy_address, timeout=10)
    with sock:
        sock.sendall(b"GET http://localhost:11434/api/tags HTTP/1.1\r\nHost: localhost:11434\r\n\r\n"
                     b"GET http://example.com/next HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200") == 2
    assert answer.index(b'"/api/tags"') < answer.index(b'"/next"')
    assert _requests(stack) == [(0, "GET", "/api/tags", "localhost:11434"), (1, "GET", "/next", "example.com")]


def test_a_request_oisp_cannot_forward_gets_a_clear_answer(stack: Stack) -> None:
    sock = socket.create_connection(stack.proxy_address, timeout=10)
    with sock:
        sock.sendall(b"GET http://localhost:11434/ HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")
    with httpx.Client(proxy=stack.proxy_url, trust_env=False) as client:
        assert client.get("http://localhost:11434/api/tags").status_code == 200


async def _big_at_big(request: Request) -> Response:
    """A 4 MiB answer for /big (more than the sockets between proxy and client hold), JSON otherwise."""
    if request.target == "/big":
        return Response(headers=[("content-type", "application/octet-stream")], body=b"x" * (4 << 20))
    return await json_ok(request)


def test_a_change_of_origin_never_cuts_the_answer_the_client_is_still_reading(tmp_path: Path,
                                                                             test_ca: trustme.CA) -> None:
    with running_stack(tmp_path, test_ca, handler=_big_at_big) as stack:
        sock = socket.create_connection(stack.proxy_address, timeout=10)
        with sock:
            sock.sendall(b"GET http://localhost:11434/big HTTP/1.1\r\nHost: localhost:11434\r\n\r\n")
            # the whole answer has left the origin server, and most of it waits in socket buffers, unread
            poll_until(lambda: sum(len(c.sent) for c in stack.plain_upstream.connections) > 4 << 20, timeout=10,
                       what="the origin sent the big answer")
            sock.sendall(b"GET http://example.com/after HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
            answer = read_all(sock)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert b"content-length: 4194304" in head.lower()
        assert rest[:4 << 20] == b"x" * (4 << 20)
        assert rest[4 << 20:].startswith(b"HTTP/1.1 200") and rest.endswith(b'"/after"}')
