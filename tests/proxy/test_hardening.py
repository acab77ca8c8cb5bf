"""Hostile and fault cases (issue 15): requests addressed to oisp itself, descriptor exhaustion, idle connections."""

from __future__ import annotations

import logging
import socket
import ssl
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


_PROXY_WITH_FEW_DESCRIPTORS = """
import logging, resource, sys, tempfile
from pathlib import Path
import anyio
from oisp.attribution import Attributor
from oisp.proxy import MitmProxy, ProxyConfig
from oisp.tls import CertificateAuthority

limit = int(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")

async def main():
    ca = CertificateAuthority.load_or_create(Path(tempfile.mkdtemp()))
    proxy = MitmProxy(ProxyConfig(listen_port=0, handshake_timeout=60), ca=ca, attributor=Attributor())
    async with anyio.create_task_group() as tg:
        address = await tg.start(proxy.serve)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        print(address[1], flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin
        tg.cancel_scope.cancel()

anyio.run(main)
"""


def test_running_out_of_descriptors_backs_off_logs_once_and_recovers(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _PROXY_WITH_FEW_DESCRIPTORS, "64"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr", "wb"))  # noqa: SIM115
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # Tunnels that send nothing after their CONNECT hold a descriptor each in the proxy (and have their process
        # looked up); 150 are far more than it has.
        for _ in range(150):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            held[-1].sendall(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        log = tmp_path / "stderr"
        deadline = time.monotonic() + 10
        while "descriptors" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the log file for the condition, with a deadline
        # While the proxy is out of descriptors the backlog keeps being retried; give it 2 s of that.
        retry_until = time.monotonic() + 2
        while time.monotonic() < retry_until:
            time.sleep(0.1)
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        accept_lines = [line for line in text.splitlines() if "accept" in line]
        assert 1 <= len(accept_lines) <= 3, text[-3000:]
        for sock in held:
            sock.close()
        held.clear()
        # Descriptors free up: the proxy serves again.
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
                    answer = read_all(sock)
                if answer.startswith(b"HTTP/1.1 502"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the proxy did not serve again"
        assert "Traceback" not in log.read_text()
    finally:
        for sock in held:
            sock.close()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=20)


@pytest.mark.parametrize("host", ["example.com", "api.openai.com", "localhost:11434"])
def test_a_silent_connection_is_closed(tmp_path: Path, test_ca: trustme.CA, host: str) -> None:
    import time

    # The client never sends a ClientHello: after handshake_timeout it is passed through raw (fail-open), and the
    # test upstream tolerates silence forever; the whole silent lifetime is still bounded.
    config = {"handshake_timeout": 0.5, "silent_lifetime": 1.5}
    with running_stack(tmp_path, test_ca, config=config) as stack:
        target = host if ":" in host else f"{host}:443"
        with socket.create_connection(stack.proxy_address, timeout=10) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            started = time.monotonic()
            assert read_all(sock).startswith(b"HTTP/1.1 200")  # read_all returns at EOF (or fails at 10 s)
            assert time.monotonic() - started < 5
        if host != "example.com":
            return
        # A client that speaks late (after handshake_timeout, so its bytes are passed through raw) is not silent:
        # its connection outlives silent_lifetime.
        context = ssl.create_default_context()
        test_ca.configure_trust(context)
        sock = socket.create_connection(stack.proxy_address, timeout=10)
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        deadline = started + 5
        while not stack.proxy.stats.decisions.get("passthrough"):  # the proxy gave up waiting for a ClientHello
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with context.wrap_socket(sock, server_hostname="example.com") as tls:
            while time.monotonic() < started + 2.0:  # past silent_lifetime (time itself is the condition)
                time.sleep(0.05)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
            assert read_all(tls).startswith(b"HTTP/1.1 200")


async def _relay_into_a_broken_upstream() -> str | None:
    import anyio
    from anyio.streams.stapled import StapledByteStream

    from oisp.proxy.relay import relay

    class Broken(anyio.abc.ByteStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            await anyio.sleep_forever()
            raise AssertionError

        async def send(self, item: bytes) -> None:
            raise anyio.BrokenResourceError  # what anyio raises for a peer that reset the connection: no message

        async def send_eof(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

    send, receive = anyio.create_memory_object_stream[bytes](1)
    await send.send(b"GET / HTTP/1.1\r\n\r\n")
    client = StapledByteStream(Broken(), _BytesFromObjects(receive))
    result = await relay(client, Broken())
    return result.error


class _BytesFromObjects:
    def __init__(self, stream: object) -> None:
        self.stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.receive()  # type: ignore[attr-defined, no-any-return]


def test_a_reset_reason_names_the_error_when_it_has_no_message() -> None:
    import anyio

    assert anyio.run(_relay_into_a_broken_upstream) == "server side: BrokenResourceError"
