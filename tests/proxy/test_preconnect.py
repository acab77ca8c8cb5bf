"""Upstream preconnect: after a client connection is served over a new upstream connection, the proxy opens one
spare (handshaken and verified) in the background for the next client connection to the same upstream."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
import tests.stack
import trustme
from anyio.abc import SocketStream
from tests.proxy.clients import h2_exchange, read_all, tls_tunnel
from tests.stack import Stack, running_stack
from tests.upstream import Handler, Recording, Upstream, json_ok

from oisp.proxy import MitmProxy
from oisp.proxy.tls_stream import TlsStream


class _Tracking(Upstream):
    """The test upstream, also recording which connections (by index) have ended, closing the connections
    listed in ``close_at`` right after their TLS handshake (or, when also held, without one), and holding the
    connections in ``hold_at`` before their handshake until their event is set."""

    def __init__(self, context: Any, handler: Handler = json_ok, *, strict: bool = False) -> None:
        super().__init__(context, handler, strict=strict)
        self.closed: set[int] = set()
        self.close_at: set[int] = set()
        self.hold_at: dict[int, anyio.Event] = {}
        self.changed = threading.Condition()

    async def _connection(self, client: SocketStream) -> None:
        index = len(self.connections)
        try:
            if index in self.hold_at:
                placeholder = Recording()
                self.connections.append(placeholder)
                with self.changed:
                    self.changed.notify_all()
                await self.hold_at[index].wait()
                if index in self.close_at:
                    await client.aclose()
                    return
                self.connections.remove(placeholder)  # served below, as any other
            if index in self.close_at and self.context is not None:
                self.connections.append(Recording())
                async with client:
                    tls = await TlsStream.handshake(client, self.context, server_side=True)
                    await tls.aclose()  # close_notify, then FIN: the server is done with this connection
                return
            await super()._connection(client)
        finally:
            with self.changed:
                self.closed.add(index)
                self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout)


@pytest.fixture
def tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tests.stack, "Upstream", _Tracking)


@pytest.fixture
def run(tmp_path: Path, test_ca: trustme.CA, tracking: None) -> Iterator[Callable[..., Any]]:
    with contextlib.ExitStack() as stack:
        yield lambda **config: stack.enter_context(running_stack(tmp_path / str(time.monotonic_ns()), test_ca,
                                                                 config=config))


def _request(stack: Stack, host: str = "api.openai.com") -> bytes:
    with tls_tunnel(stack.proxy_address, host, stack.client_context(), ["http/1.1"]) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_all(sock)


def _ready(proxy: MitmProxy) -> int:
    return sum(1 for s in proxy._spares.values() if s.stream is not None and not s.closing)


def _until(stack: Stack, predicate: Callable[[MitmProxy], bool]) -> None:
    """Wait (on the proxy's event loop, woken by each change of its spares) until ``predicate(proxy)`` holds."""
    async def wait() -> None:
        with anyio.fail_after(10):
            while not predicate(stack.proxy):
                await stack.proxy.wait_spares_changed()

    stack.portal.call(wait)


def _connects(stack: Stack, count: int) -> list[Any]:
    return [e for e in stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "network.connect"]) >= count)
            if e.event_type == "network.connect"]


def _upstream(stack: Stack) -> _Tracking:
    assert isinstance(stack.upstream, _Tracking)
    return stack.upstream


def test_the_next_cold_connection_takes_the_spare_and_a_new_one_is_made(run: Any) -> None:
    stack: Stack = run()
    upstream = _upstream(stack)
    assert _request(stack).startswith(b"HTTP/1.1 200")
    _until(stack, lambda p: _ready(p) == 1)
    assert len(upstream.connections) == 2 and not upstream.connections[1].received  # accepted before client 2
    assert _request(stack).startswith(b"HTTP/1.1 200")
    assert upstream.connections[1].requests[0].target == "/v1/models"  # client 2 went over the spare
    _until(stack, lambda p: _ready(p) == 1)  # and a new spare is waiting for client 3
    with tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["h2", "http/1.1"]) as sock:
        assert sock.selected_alpn_protocol() == "h2"  # another ALPN offer: another upstream target, no spare
        h2_exchange(sock, "api.openai.com", [("/v1/chat/completions", b"{}")])
    _until(stack, lambda p: _ready(p) == 2)
    with tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["h2", "http/1.1"]) as sock:
        sent, received, bodies = h2_exchange(sock, "api.openai.com", [("/v1/chat/completions", b"{}")])
    assert list(bodies.values()) == [b"{\"ok\": true, \"path\": \"/v1/chat/completions\"}"]
    h2_spare = upstream.connections[4]
    assert h2_spare.alpn == "h2" and h2_spare.requests[0].target == "/v1/chat/completions"
    # Byte for byte: the server's SETTINGS, which the spare read before any client came, reached the client.
    assert bytes(h2_spare.sent) == received and bytes(h2_spare.received) == sent
    connects = _connects(stack, 4)
    assert [c.attrs.get("oisp.preconnected") for c in connects] == [None, True, None, True]
    for fresh, spare in ((connects[0], connects[1]), (connects[2], connects[3])):
        assert spare.data.tls.certificate == fresh.data.tls.certificate is not None
        assert (spare.data.tls.version, spare.data.tls.alpn) == (fresh.data.tls.version, fresh.data.tls.alpn)
        assert spare.data.dest.ip == "127.0.0.1" and spare.data.latency_ms is not None
        assert spare.attrs["oisp.interception"] == "intercepted"


def test_a_spare_the_server_closed_is_not_used(run: Any) -> None:
    stack: Stack = run()
    upstream = _upstream(stack)
    upstream.close_at = {1}
    assert _request(stack).startswith(b"HTTP/1.1 200")
    upstream.wait(lambda: 1 in upstream.closed)
    _until(stack, lambda p: not p._spares)  # the proxy saw it close and dropped it
    assert _request(stack).startswith(b"HTTP/1.1 200")
    assert not upstream.connections[1].received and upstream.connections[2].requests
    assert [c.attrs.get("oisp.preconnected") for c in _connects(stack, 2)] == [None, None]


def test_a_spare_expires_and_is_closed(run: Any) -> None:
    stack: Stack = run(preconnect_idle=0.2)
    upstream = _upstream(stack)
    assert _request(stack).startswith(b"HTTP/1.1 200")
    _until(stack, lambda p: _ready(p) == 1)
    _until(stack, lambda p: not p._spares)
    upstream.wait(lambda: 1 in upstream.closed)  # the upstream saw the unused spare closed
    assert not upstream.connections[1].received


def test_shutdown_closes_spares_promptly(run: Any) -> None:
    stack: Stack = run()
    upstream = _upstream(stack)
    assert _request(stack).startswith(b"HTTP/1.1 200")
    _until(stack, lambda p: _ready(p) == 1)
    started = time.monotonic()
    stack.portal.call(stack.proxy.shutdown, 5.0)
    upstream.wait(lambda: 1 in upstream.closed, timeout=3.0)
    assert time.monotonic() - started < 3.0 and not stack.proxy._spares


def test_preconnect_idle_zero_makes_no_spares(run: Any) -> None:
    stack: Stack = run(preconnect_idle=0)
    upstream = _upstream(stack)
    for _ in range(2):
        assert _request(stack).startswith(b"HTTP/1.1 200")
    assert [c.attrs.get("oisp.preconnected") for c in _connects(stack, 2)] == [None, None]
    assert len(upstream.connections) == 2 and all(c.received for c in upstream.connections)
    assert not stack.proxy._spares


def test_preconnect_idle_is_validated() -> None:
    from oisp.errors import ConfigurationError
    from oisp.proxy import ProxyConfig

    with pytest.raises(ConfigurationError, match="preconnect_idle"):
        ProxyConfig(preconnect_idle=-1)


def test_a_connection_arriving_while_the_spare_is_being_made_waits_for_it(run: Any) -> None:
    """A client connection that comes while the spare's handshake is under way takes that spare when it is ready,
    instead of making a second upstream connection in parallel."""
    stack: Stack = run()
    upstream = _upstream(stack)
    hold = stack.portal.call(anyio.Event)
    upstream.hold_at = {1: hold}  # the spare's TLS handshake waits until the test lets it go
    assert _request(stack).startswith(b"HTTP/1.1 200")
    upstream.wait(lambda: len(upstream.connections) == 2)  # the spare is connecting, its handshake held
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(_request, stack)
        _until(stack, lambda p: any(s.waiting for s in p._spares.values()))  # the client waits for the spare
        stack.portal.call(hold.set)
        assert second.result(timeout=10).startswith(b"HTTP/1.1 200")
    assert upstream.connections[1].requests[0].target == "/v1/models"  # client 2 went over the spare
    assert all(c is upstream.connections[1] or c is upstream.connections[0] or not c.received
               for c in upstream.connections)  # no other upstream connection carried anything
    connects = _connects(stack, 2)
    assert [c.attrs.get("oisp.preconnected") for c in connects] == [None, True]
    assert connects[1].data.tls.certificate == connects[0].data.tls.certificate is not None


def test_a_spare_that_fails_while_a_connection_waits_for_it_lets_that_connection_open_its_own(run: Any) -> None:
    stack: Stack = run()
    upstream = _upstream(stack)
    hold = stack.portal.call(anyio.Event)
    upstream.hold_at = {1: hold}
    upstream.close_at = {1}  # once let go, the spare's connection is closed without a handshake
    assert _request(stack).startswith(b"HTTP/1.1 200")
    upstream.wait(lambda: len(upstream.connections) == 2)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(_request, stack)
        _until(stack, lambda p: any(s.waiting for s in p._spares.values()))
        stack.portal.call(hold.set)
        assert second.result(timeout=10).startswith(b"HTTP/1.1 200")
    assert not upstream.connections[1].received and upstream.connections[2].requests[0].target == "/v1/models"
    assert [c.attrs.get("oisp.preconnected") for c in _connects(stack, 2)] == [None, None]


def test_only_one_connection_waits_for_a_spare_being_made(run: Any) -> None:
    """In a burst, one connection waits for the spare under way; another one opens its own at once and is served
    while the spare's handshake is still held."""
    stack: Stack = run()
    upstream = _upstream(stack)
    hold = stack.portal.call(anyio.Event)
    upstream.hold_at = {1: hold}
    assert _request(stack).startswith(b"HTTP/1.1 200")
    upstream.wait(lambda: len(upstream.connections) == 2)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(_request, stack)
        _until(stack, lambda p: any(s.waiting for s in p._spares.values()))
        other = pool.submit(_request, stack)
        assert other.result(timeout=10).startswith(b"HTTP/1.1 200")  # served with the spare's handshake held
        assert not hold.is_set() and not waiting.done()
        stack.portal.call(hold.set)
        assert waiting.result(timeout=10).startswith(b"HTTP/1.1 200")
    assert upstream.connections[1].requests[0].target == "/v1/models"  # the waiting client got the spare
    assert sorted(c.attrs.get("oisp.preconnected") is True for c in _connects(stack, 3)) == [False, False, True]
