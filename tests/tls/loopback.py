"""TLS helpers for the tests: real handshakes on 127.0.0.1, in-memory handshakes, and captured ClientHellos."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
TIMEOUT = 10.0


@dataclass
class ServerSide:
    """What the one-connection server saw."""

    port: int
    alpn: str | None = None
    request: bytes = b""
    error: BaseException | None = None


@contextlib.contextmanager
def tls_server(context: ssl.SSLContext) -> Iterator[ServerSide]:
    """A server on 127.0.0.1 that accepts one connection, handshakes with ``context`` and answers one request."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    side = ServerSide(port=listener.getsockname()[1])

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            connection.settimeout(TIMEOUT)
            with context.wrap_socket(connection, server_side=True) as tls:
                side.alpn = tls.selected_alpn_protocol()
                side.request = tls.recv(65536)
                tls.sendall(RESPONSE)
        except (OSError, ssl.SSLError) as error:
            side.error = error

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield side
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() if no client ever came
        listener.close()
        thread.join(TIMEOUT)


@dataclass
class ClientSide:
    """What the Python client saw after a successful handshake."""

    alpn: str | None
    version: str | None
    peer_cert: dict[str, object]
    response: bytes


def https_get(
    ca_pem: bytes,
    port: int,
    server_hostname: str,
    alpn: Sequence[str] = ("h2", "http/1.1"),
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> ClientSide:
    """Connect to 127.0.0.1:``port`` trusting only ``ca_pem``, verify ``server_hostname``, send one request."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))  # cadata: no system roots loaded
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        # Read the handshake results before the server's close ends the session.
        peer_cert = tls.getpeercert()
        assert peer_cert is not None
        seen = ClientSide(tls.selected_alpn_protocol(), tls.version(), dict(peer_cert), b"")
        tls.sendall(b"GET / HTTP/1.1\r\nhost: " + server_hostname.encode() + b"\r\n\r\n")
        while chunk := tls.recv(65536):
            seen.response += chunk
        return seen


def curl_get(ca_file: Path, host: str, port: int) -> subprocess.CompletedProcess[bytes]:
    """Run curl against 127.0.0.1:``port`` as https://``host``, trusting only ``ca_file``; skips without curl."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(ca_file.parent)}  # no proxies, no ~/.curlrc
    return subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            str(TIMEOUT),
            "--cacert",
            str(ca_file),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            f"https://{host}:{port}/",
        ],
        capture_output=True,
        env=env,
        timeout=TIMEOUT * 2,
        check=False,
    )


def client_hello(
    server_hostname: str | None = "api.openai.com",
    alpn: Sequence[str] | None = ("h2", "http/1.1"),
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The bytes Python's ssl sends first as a client: a real ClientHello, captured through a MemoryBIO."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


@dataclass
class MemoryHandshake:
    """Both ends of a finished in-memory handshake and the bytes the server sent."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    server_flight: bytes


def handshake_in_memory(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str
) -> MemoryHandshake:
    """Run a TLS handshake between two SSLObjects through MemoryBIOs; raises what either side raises."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, client_out, server_hostname=server_hostname)
    server = server_context.wrap_bio(to_server, server_out, server_side=True)
    flight = b""
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (
            ("client", client, client_out, to_server),
            ("server", server, server_out, to_client),
        ):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if name == "server":
                flight += data
            peer_in.write(data)
        if all(done.values()):
            return MemoryHandshake(client, server, flight)
    raise AssertionError("in-memory handshake did not finish in 10 rounds")
