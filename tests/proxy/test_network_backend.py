"""The proxy's network backend is replaceable (``MitmProxy(network=...)``, ``proxy.services.network``): every
upstream connect and TLS handshake, on either side, goes through it."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from anyio.abc import ByteStream, SocketStream
from tests.stack import Stack

from oisp.proxy.net import SocketHook
from oisp.proxy.service import AnyioNetwork
from oisp.proxy.tls_stream import TlsStream


class Recording(AnyioNetwork):
    """The real network, noting what the proxy asks of it; ``refuse`` makes every connect fail."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = refuse

    async def connect_tcp(self, host: str, port: int, *, before_connect: SocketHook | None,
                          timeout: float) -> SocketStream:
        self.calls.append(("connect", host, port))
        if self.refuse:
            raise ConnectionRefusedError(111, "refused by the test's network backend")
        return await super().connect_tcp(host, port, before_connect=before_connect, timeout=timeout)

    async def tls_client(self, stream: SocketStream, context: ssl.SSLContext, *, server_hostname: str,
                         session: ssl.SSLSession | None = None) -> TlsStream:
        self.calls.append(("tls_client", server_hostname))
        return await super().tls_client(stream, context, server_hostname=server_hostname, session=session)

    async def tls_server(self, stream: ByteStream, context: ssl.SSLContext, *, initial_data: bytes) -> TlsStream:
        self.calls.append(("tls_server", initial_data[:1]))
        return await super().tls_server(stream, context, initial_data=initial_data)


def test_every_connect_and_handshake_goes_through_the_network_backend(stack: Stack) -> None:
    network = Recording()
    stack.proxy.services.network = network
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
        r = client.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
    assert r.status_code == 200
    assert network.calls[:3] == [("connect", "127.0.0.1", stack.upstream.port), ("tls_client", "api.openai.com"),
                                 ("tls_server", b"\x16")]


def test_a_backend_that_cannot_connect_fails_the_connection_cleanly(stack: Stack) -> None:
    stack.proxy.services.network = Recording(refuse=True)
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client, \
            pytest.raises(httpx.HTTPError):
        client.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
    events = stack.wait_for(lambda ev: any(e.event_type == "network.connect" for e in ev))
    connect = next(e for e in events if e.event_type == "network.connect")
    assert connect.data.success is False
    assert "refused by the test's network backend" in (connect.data.error or "")
    assert stack.proxy.stats.decisions.get("upstream_failed") == 1
