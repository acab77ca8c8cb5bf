"""The proxy with real clients and real TLS on loopback: fidelity, streaming, passthrough, pinning, failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import trustme
from tests.proxy.clients import connect_tunnel, h2_exchange, read_all, served, tls_tunnel
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

REQUEST = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi \xc3\xa9"}]}'


def decisions(stack: Stack) -> list[str]:
    return [e.attrs["oisp.interception"] for e in stack.of_type("network.connect") if e.attrs]


# --- fidelity -------------------------------------------------------------------------------------------------

def test_http1_bytes_reach_upstream_and_client_unchanged(stack: Stack) -> None:
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nX-Odd-Case: KeepMe\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               b"5\r\n" + REQUEST[:5] + b"\r\n" + f"{len(REQUEST) - 5:x}".encode() + b"\r\n" + REQUEST[5:]
               + b"\r\n0\r\n\r\n")
    with sock:
        sock.sendall(request)
        received = read_all(sock)
    recording = served(stack.upstream)[-1]
    assert recording.alpn == "http/1.1"
    assert bytes(recording.received) == request
    assert received == bytes(recording.sent)
    assert recording.requests[0].body == REQUEST


def test_http2_bytes_reach_upstream_and_client_unchanged(stack: Stack) -> None:
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["h2", "http/1.1"])
    with sock:
        assert sock.selected_alpn_protocol() == "h2"
        sent, received, bodies = h2_exchange(sock, "api.openai.com", [("/v1/chat/completions", REQUEST)])
    recording = served(stack.upstream)[-1]
    assert recording.alpn == "h2"
    assert bytes(recording.received) == sent
    assert received == bytes(recording.sent)
    assert json.loads(bodies[1])["path"] == "/v1/chat/completions"


def test_client_alpn_is_mirrored_upstream(stack: Stack, tmp_path: Path, test_ca: trustme.CA) -> None:
    # The client offers only HTTP/1.1: upstream must not be asked for h2.
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
    with sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
        read_all(sock)
    assert served(stack.upstream)[-1].alpn == "http/1.1"
    # An upstream that only speaks HTTP/1.1 makes the client's h2 offer resolve to HTTP/1.1.
    with running_stack(tmp_path / "h1only", test_ca, upstream_alpn=("http/1.1",)) as h1only:
        sock = tls_tunnel(h1only.proxy_address, "api.openai.com", h1only.client_context(), ["h2", "http/1.1"])
        with sock:
            assert sock.selected_alpn_protocol() == "http/1.1"


# --- real clients ---------------------------------------------------------------------------------------------

def test_openai_sdk_through_https_proxy(stack: Stack) -> None:
    code = (
        "import openai\n"
        "client = openai.OpenAI(api_key='sk-proj-" + "t" * 40 + "', max_retries=0)\n"
        "r = client.with_raw_response.chat.completions.create(\n"
        "    model='gpt-4o', messages=[{'role': 'user', 'content': 'hi'}])\n"
        "print(r.http_request.url, r.status_code)\n"
    )
    code += "import os; print('pid', os.getpid())\n"
    out = subprocess.run([_python(), "-c", code], env=stack.client_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "https://api.openai.com/v1/chat/completions 200" in out.stdout
    pid = int(out.stdout.split("pid ")[1])
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.provider.name == "openai"  # type: ignore[attr-defined]
    # every event of the connection carries the client process, found from the loopback socket table
    for event in events:
        assert event.process is not None and event.process.pid == pid, event.event_type
        assert event.process.exe and event.process.cmdline and event.process.cmdline.startswith(_python())
        assert event.actor is not None and event.actor.uid is not None
    assert served(stack.upstream)[-1].requests[0].header("authorization") == "Bearer sk-proj-" + "t" * 40
    assert "t" * 40 not in "".join(e.to_json() for e in events)


def test_anthropic_sdk_through_https_proxy(stack: Stack) -> None:
    code = (
        "import anthropic\n"
        "client = anthropic.Anthropic(api_key='sk-ant-api03-" + "k" * 40 + "', max_retries=0)\n"
        "r = client.with_raw_response.messages.create(model='claude-sonnet-4-5', max_tokens=10, "
        "messages=[{'role':'user','content':'hi'}])\n"
        "print(r.http_request.url, r.status_code)\n"
    )
    out = subprocess.run([_python(), "-c", code], env=stack.client_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "https://api.anthropic.com/v1/messages 200" in out.stdout
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    assert next(e for e in events if e.event_type == "ai.request").data.provider.name == "anthropic"  # type: ignore[attr-defined]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (CI installs it)")
@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_curl_through_explicit_proxy(stack: Stack, version: str) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-x", stack.proxy_url, "--cacert", stack.ca_file, version, "-w", "\n%{http_version}",
         "-H", "content-type: application/json", "-d", REQUEST.decode(), "https://api.openai.com/v1/embeddings"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, http_version = out.stdout.rsplit("\n", 1)
    assert json.loads(body)["path"] == "/v1/embeddings"
    assert http_version == ("2" if version == "--http2" else "1.1")
    assert served(stack.upstream)[-1].alpn == ("h2" if version == "--http2" else "http/1.1")
    assert served(stack.upstream)[-1].requests[0].body == REQUEST


def test_twenty_concurrent_http2_streams_on_one_connection_are_decoded_to_the_right_exchanges(
        stack: Stack) -> None:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(proxy=stack.proxy_url, verify=stack.client_context(), http2=True) as client:
            async def one(i: int) -> httpx.Response:
                return await client.post(f"https://api.openai.com/v1/stream/{i}", content=f"body-{i}".encode())
            await client.get("https://api.openai.com/v1/models")  # the connection all streams share
            results: list[httpx.Response] = []
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(lambda i=i: _append(results, one(i)))
            return results

    responses = anyio.run(main)
    assert len(responses) == 20 and all(r.http_version == "HTTP/2" for r in responses)
    assert len(served(stack.upstream)) == 1
    assert sorted(r.body for r in served(stack.upstream)[0].requests[1:]) == sorted(
        f"body-{i}".encode() for i in range(20))
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 21)
    requests = [e for e in events if e.event_type == "ai.request" and e.attrs and e.attrs["http.method"] == "POST"]
    paths = sorted(e.attrs["http.path"] for e in requests if e.attrs)
    assert paths == sorted(f"/v1/stream/{i}" for i in range(20))
    streams = {e.attrs["http.stream_id"] for e in requests if e.attrs}
    assert len(streams) == 20
    assert len({e.attrs["oisp.connection_id"] for e in requests if e.attrs}) == 1


async def _append(results: list[httpx.Response], coro: object) -> None:
    results.append(await coro)  # type: ignore[misc]


def test_one_hundred_concurrent_connections(stack: Stack) -> None:
    async def main() -> list[int]:
        statuses: list[int] = []

        async def one(i: int) -> None:
            async with httpx.AsyncClient(proxy=stack.proxy_url, verify=stack.client_context()) as client:
                r = await client.get(f"https://api.openai.com/v1/models/{i}")
                statuses.append(r.status_code)

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        return statuses

    assert anyio.run(main) == [200] * 100
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 100, timeout=30)
    assert len([e for e in events if e.event_type == "ai.response"]) == 100
    assert stack.proxy.stats.decisions["intercepted"] == 100


def test_sse_reaches_the_client_chunk_by_chunk_while_it_is_decoded(stack: Stack) -> None:
    gate = stack.portal.call(anyio.Event)
    seen: list[bytes] = []
    original = stack.proxy.observer
    assert original is not None

    class Watching:
        def connection(self, report: object) -> None:
            original.connection(report)  # type: ignore[arg-type]

        def exchange_listener(self, info: object) -> object:
            inner = original.exchange_listener(info)  # type: ignore[arg-type]

            class Listener:
                def request(self, exchange: object) -> None:
                    inner.request(exchange)  # type: ignore[union-attr]

                def response_start(self, exchange: object) -> None:
                    inner.response_start(exchange)  # type: ignore[union-attr]

                def response_data(self, exchange: object, data: bytes) -> None:
                    seen.append(data)
                    inner.response_data(exchange, data)  # type: ignore[union-attr]

                def end(self, exchange: object) -> None:
                    inner.end(exchange)  # type: ignore[union-attr]

            return Listener()

    stack.proxy.observer = Watching()  # type: ignore[assignment]

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            await gate.wait()
            yield b'data: {"n": 2}\n\ndata: [DONE]\n\n'
        return Response(headers=[("content-type", "text/event-stream")], body=body)

    stack.upstream.handler = handler
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), http2=True) as client, \
            client.stream("POST", "https://api.openai.com/v1/chat/completions", content=REQUEST) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        assert first == b'data: {"n": 1}\n\n'  # arrived while the upstream still holds chunk 2
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            stack.sink.wait_for(10**6, 0.01)
        assert seen == [b'data: {"n": 1}\n\n']  # and the decoder got its copy before chunk 2 exists
        assert not gate.is_set()
        stack.portal.call(gate.set)
        rest = b"".join(chunks)
    assert rest == b'data: {"n": 2}\n\ndata: [DONE]\n\n'
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    response_event = next(e for e in events if e.event_type == "ai.response")
    assert response_event.data.success is True  # type: ignore[attr-defined]


# --- what is not intercepted ----------------------------------------------------------------------------------

def test_non_ai_host_is_passed_through_with_the_real_certificate(stack: Stack, test_ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    test_ca.configure_trust(context)  # trusts the real upstream, not oisp
    sock = tls_tunnel(stack.proxy_address, "example.com", context, ["http/1.1"])
    with sock:
        issuer = dict(x[0] for x in sock.getpeercert()["issuer"])  # type: ignore[index]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")
    assert "oisp" not in json.dumps(issuer).lower()
    assert stack.proxy.stats.decisions == {"passthrough": 1}
    assert stack.of_type("ai.request") == []


def test_pinned_client_is_passed_through_after_repeated_alerts(stack: Stack, test_ca: trustme.CA) -> None:
    pinned = ssl.create_default_context()
    test_ca.configure_trust(pinned)  # trusts only the real CA: it rejects oisp's leaf with an unknown_ca alert
    for _ in range(2):  # one alert is not enough evidence; the second pins this process
        with pytest.raises(ssl.SSLError):
            tls_tunnel(stack.proxy_address, "api.openai.com", pinned, ["http/1.1"])
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", pinned, ["http/1.1"])
    with sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "network.connect"]) >= 3)
    assert decisions(stack) == ["client_rejected_certificate"] * 2 + ["pinned_passthrough"]
    rejected = stack.of_type("network.connect")[0]
    assert rejected.data.success is False and "handshake" in rejected.data.error  # type: ignore[attr-defined]
    assert not [e for e in events if e.event_type == "ai.request"]
    assert stack.proxy.stats.pinned == [f"api.openai.com by {Path(sys.executable).resolve().name}[{os.getpid()}]"]


_ABORT_AFTER_HANDSHAKE = """
import socket, ssl, sys
host, port, ca, trust_oisp = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
for _ in range(5):
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\\r\\nHost: api.openai.com:443\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += sock.recv(4096)
    context = ssl.create_default_context(cafile=ca)
    try:
        context.wrap_socket(sock, server_hostname="api.openai.com").close()  # handshake, then close at once
    except ssl.SSLError:
        sock.close()
print("done")
"""


@pytest.mark.parametrize("attack", ["closes_after_handshake", "sends_alerts"])
def test_one_process_cannot_turn_inspection_off_for_another(stack: Stack, test_ca: trustme.CA, tmp_path: Path,
                                                            attack: str) -> None:
    # Another process with the same executable (every Python app is python3.x) aborts its handshakes: closing
    # right after a completed one (which any process can do), or refusing the certificate with an alert.
    real_ca = tmp_path / "real-ca.pem"
    test_ca.cert_pem.write_to_path(str(real_ca))
    ca = stack.ca_file if attack == "closes_after_handshake" else str(real_ca)
    out = subprocess.run([sys.executable, "-c", _ABORT_AFTER_HANDSHAKE, *map(str, stack.proxy_address), ca,
                          "1" if attack == "closes_after_handshake" else "0"], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "done", out.stderr
    stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "network.connect"]) >= 5)
    # What is recorded for this process is unchanged: its request is intercepted and decoded.
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
        assert client.post("https://api.openai.com/v1/chat/completions", content=REQUEST).status_code == 200
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.request" for e in ev))
    assert any(e.event_type == "ai.request" for e in events)
    assert decisions(stack)[-1] == "intercepted"
    if attack == "sends_alerts":  # the attacker pinned only itself
        assert decisions(stack)[:5] == ["client_rejected_certificate"] * 2 + ["pinned_passthrough"] * 3
        assert len(stack.proxy.stats.pinned) == 1 and f"[{os.getpid()}]" not in stack.proxy.stats.pinned[0]
    else:
        assert "pinned_passthrough" not in decisions(stack) and stack.proxy.stats.pinned == []


def test_upstream_with_an_untrusted_certificate_never_gets_client_data(tmp_path: Path) -> None:
    real_ca, unrelated_ca = trustme.CA(), trustme.CA()
    with running_stack(tmp_path, real_ca) as stack:
        # The proxy is told to trust a different CA than the one that signed the upstream.
        unrelated_ca.cert_pem.write_to_path(str(stack.upstream_ca_file))
        stack.proxy._upstream_contexts.clear()
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure"):
            tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
        events = stack.wait_for(lambda ev: any(e.event_type == "network.connect" for e in ev))
        connect = next(e for e in events if e.event_type == "network.connect")
        assert connect.data.success is False  # type: ignore[attr-defined]
        assert "verification failed" in connect.data.error  # type: ignore[attr-defined]
        assert connect.attrs and connect.attrs["oisp.interception"] == "upstream_verification_failed"
        assert all(not c.received for c in stack.upstream.connections)


def test_plain_http_ollama_through_explicit_proxy_is_decoded(stack: Stack) -> None:
    with httpx.Client(proxy=stack.proxy_url) as client:
        r = client.post("http://localhost:11434/api/chat", content=b'{"model": "llama3"}')
    assert r.status_code == 200 and r.json()["path"] == "/api/chat"  # origin form for the origin server
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.provider.name == "ollama"  # type: ignore[attr-defined]
    assert request.confidence.content_source == "plaintext_capture"


# --- bad input ------------------------------------------------------------------------------------------------

def _still_serves(stack: Stack) -> None:
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
        assert client.get("https://api.openai.com/v1/models").status_code == 200


def test_garbage_instead_of_a_client_hello(stack: Stack) -> None:
    sock = connect_tunnel(stack.proxy_address, "api.openai.com")
    with sock:
        sock.sendall(b"\x16\x03\x01\xff\xff" + b"\x00garbage" * 100)
        sock.shutdown(socket.SHUT_WR)
        read_all(sock)
    sock = socket.create_connection(stack.proxy_address, timeout=10)
    with sock:
        sock.sendall(b"\x00\x01\x02 not http at all\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400")
    _still_serves(stack)


def test_malformed_http_inside_tls_is_relayed_and_marked_partial(stack: Stack) -> None:
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
    with sock:
        sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost api.openai.com no colon\r\n\r\n")
        read_all(sock)
    assert bytes(served(stack.upstream)[-1].received).startswith(b"POST /v1/chat")
    _still_serves(stack)


def test_truncated_request_body_is_marked_partial(stack: Stack) -> None:
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 100\r\n\r\n"
                     b"only ten b")
        sock.shutdown(socket.SHUT_WR)
        read_all(sock)
    _still_serves(stack)


@pytest.mark.parametrize("http2", [False, True])
def test_upstream_reset_mid_stream_marks_the_exchange_partial(stack: Stack, http2: bool) -> None:
    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            yield b'data: {"n": 2}\n\n'
        return Response(headers=[("content-type", "text/event-stream")], body=body, abort_after_chunks=1)

    stack.upstream.handler = handler
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), http2=http2) as client, \
            pytest.raises(httpx.HTTPError):
        client.post("https://api.openai.com/v1/chat/completions", content=REQUEST).read()
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.confidence.completeness == "partial"
    assert response.confidence.limitations
    assert response.data.success is False  # type: ignore[attr-defined]
    stack.upstream.handler = _ok
    _still_serves(stack)


async def _ok(request: Request) -> Response:
    return Response(body=b"{}")


def test_client_abort_mid_response_marks_the_exchange_partial(stack: Stack) -> None:
    gate = stack.portal.call(anyio.Event)

    async def handler(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            await gate.wait()
            yield b'data: {"n": 2}\n\n'
        return Response(headers=[("content-type", "text/event-stream")], body=body)

    stack.upstream.handler = handler
    sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}")
    assert b"data:" in sock.recv(65536) or b"data:" in sock.recv(65536)
    sock.close()
    stack.portal.call(gate.set)
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.confidence.completeness == "partial"
    stack.upstream.handler = _ok
    _still_serves(stack)


def _python() -> str:
    import sys

    return sys.executable


