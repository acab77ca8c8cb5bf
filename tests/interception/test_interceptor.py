"""The Interceptor's logic over a fake diversion backend (no privileges, no kernel)."""

from __future__ import annotations

import collections
import ipaddress
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from tests.interception.packets import ACK, SYN, a, dns_response, fields, tcp_packet
from tests.netns import poll_until

from oisp.errors import ConfigurationError
from oisp.interception import Interceptor, InterceptorConfig, OriginalDestinationSource, TargetSet
from oisp.interception.dns import TYPE_A
from oisp.netns import current_identity

pydivert = pytest.importorskip("pydivert")
from pydivert import Packet  # noqa: E402
from pydivert.windivert_dll.structs import WinDivertAddress  # noqa: E402

PROXY = 15001
CLIENT, SERVER, LEARNED = "198.18.1.1", "198.18.1.2", "198.18.1.4"
NETWORK, FLOW, SOCKET = 0, 2, 3


class FakeHandle:
    def __init__(self, backend: FakeBackend, filter: str, layer: int, flags: int) -> None:
        self.backend, self.filter, self.layer, self.flags = backend, filter, layer, flags
        self.queue: collections.deque[Any] = collections.deque()
        self.sent: list[Any] = []
        self.closed = False
        self.shut = False

    def send(self, packet: Any, recalculate_checksum: bool = True) -> int:
        assert not self.closed
        self.sent.append(packet)
        self.backend.sent.append((self, packet))
        return len(packet.raw)

    def close(self) -> None:
        self.closed = True


class FakePoller:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.handles: list[FakeHandle] = []

    def add(self, handle: FakeHandle) -> None:
        self.handles.append(handle)

    def remove(self, handle: FakeHandle) -> None:
        self.handles = [h for h in self.handles if h is not handle]

    def wait(self, timeout: float) -> list[Any]:
        with self.backend.cond:
            if not any(h.queue for h in self.handles):
                self.backend.cond.wait(timeout)
            return [h for h in self.handles if h.queue]

    def recv_nowait(self, handle: FakeHandle) -> Any | None:
        with self.backend.cond:
            return handle.queue.popleft() if handle.queue else None

    def close(self) -> None:
        self.handles = []


class FakeBackend:
    uses_socket_marks = True

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.handles: list[FakeHandle] = []
        self.sent: list[tuple[FakeHandle, Any]] = []
        self.alive = True
        self.prepared = False

    def prepare(self, *, mount_bpffs: bool) -> None:
        self.prepared = True

    def open(self, filter: str, layer: Any, flags: Any, *, interfaces: Sequence[str] | None = None,
             priority: int = 0) -> FakeHandle:
        handle = FakeHandle(self, filter, int(layer), int(flags))
        self.handles.append(handle)
        return handle

    def shutdown_recv(self, handle: FakeHandle) -> None:
        handle.shut = True

    def poller(self) -> FakePoller:
        return FakePoller(self)

    def listener_alive(self, port: int) -> bool:
        return self.alive

    def interface_name(self, ifindex: int) -> str | None:
        return f"if{ifindex}"

    def loopback_interfaces(self) -> list[str]:
        return ["lo"]

    def mark_upstream_socket(self, sock: socket.socket) -> None:
        pass

    # -- helpers for the tests ------------------------------------------------------------------------------

    def open_handles(self, layer: int, *, sniff: bool | None = None) -> list[FakeHandle]:
        return [h for h in self.handles if h.layer == layer and not h.closed
                and (sniff is None or bool(h.flags & 1) == sniff)]

    @property
    def network(self) -> FakeHandle:
        (handle,) = self.open_handles(NETWORK, sniff=False)
        return handle

    def push(self, handle: FakeHandle, packet: Any) -> None:
        with self.cond:
            handle.queue.append(packet)
            self.cond.notify_all()


def network_packet(raw: bytearray, *, ifindex: int = 7, loopback: bool = False) -> Any:
    addr = WinDivertAddress()
    addr.Outbound = 1
    addr.Loopback = int(loopback)
    addr.u.Network.IfIdx = ifindex
    return Packet(raw, wd_addr=addr)


def event(layer: int, kind: int, *, pid: int, endpoint: int, local: tuple[str, int],
          remote: tuple[str, int]) -> Any:
    addr = WinDivertAddress()
    addr.Layer = layer
    addr.Event = kind
    data = addr.u.Socket
    data.EndpointId, data.ProcessId = endpoint, pid
    for words, ip in ((data.LocalAddr, local[0]), (data.RemoteAddr, remote[0])):
        value = int(ipaddress.IPv4Address(ip))
        words[0], words[1] = value, 0xFFFF
    data.LocalPort, data.RemotePort, data.Protocol = local[1], remote[1], 6
    return Packet(b"", wd_addr=addr)


def udp_dns_packet(payload: bytes) -> Any:
    udp = struct.pack("!HHHH", 53, 40000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, a(SERVER), a(CLIENT))
    return network_packet(bytearray(ip + udp))


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def interceptor(backend: FakeBackend) -> Iterator[Interceptor]:
    targets = TargetSet([f"{SERVER}:443", "*.openai.azure.com"])
    config = InterceptorConfig(proxy_port=PROXY, liveness_interval=0.05)
    with Interceptor(config, targets, backend=backend) as it:
        assert it.wait_diverting(5)
        yield it


def sent_after(backend: FakeBackend, count: int) -> list[tuple[FakeHandle, Any]]:
    return poll_until(lambda: backend.sent if len(backend.sent) >= count else None, timeout=5,
                      what=f"{count} packets re-injected")


def test_the_interceptor_is_an_original_destination_source(interceptor: Interceptor) -> None:
    assert isinstance(interceptor, OriginalDestinationSource)


def test_start_prepares_and_opens_diversion_events_and_dns_sniffer(backend: FakeBackend,
                                                                   interceptor: Interceptor) -> None:
    assert backend.prepared
    assert f"ip.DstAddr == {SERVER}" in backend.network.filter
    assert interceptor.filter == backend.network.filter
    assert len(backend.open_handles(FLOW)) == len(backend.open_handles(SOCKET)) == 1
    (dns,) = backend.open_handles(NETWORK, sniff=True)
    assert "udp.SrcPort == 53" in dns.filter


def test_a_diverted_connection_is_looked_up_with_the_pid_from_socket_and_flow_events(
        backend: FakeBackend, interceptor: Interceptor) -> None:
    flow, sock = backend.open_handles(FLOW)[0], backend.open_handles(SOCKET)[0]
    backend.push(sock, event(SOCKET, 4, pid=4242, endpoint=9, local=("0.0.0.0", 0), remote=(SERVER, 443)))
    backend.push(backend.network, network_packet(tcp_packet(CLIENT, 40000, SERVER, 443, SYN)))
    handle, syn = sent_after(backend, 1)[0]
    assert handle is backend.network
    assert fields(syn.raw) == (SERVER, 40000, CLIENT, PROXY)
    assert syn.wd_addr.Outbound == 0  # re-injected inbound
    # The established event (pid 0: the socket predates nothing, but only the CONNECT event had the pid) is
    # queued before the client's handshake ACK, which makes the interceptor take it in first.
    flow.queue.append(event(FLOW, 1, pid=0, endpoint=9, local=(CLIENT, 40000), remote=(SERVER, 443)))
    backend.push(backend.network, network_packet(tcp_packet(CLIENT, 40000, SERVER, 443, ACK)))
    sent_after(backend, 2)
    dest = interceptor.original_destination((SERVER, 40000), ("::ffff:" + CLIENT, PROXY))
    assert dest is not None
    assert (dest.ip, dest.port, dest.pid, dest.interface, dest.client, dest.loopback) == (
        SERVER, 443, 4242, "if7", (CLIENT, 40000), False)
    if sys.platform == "linux":  # the client's socket is in the namespace diverted in, named for lookups there
        assert dest.netns is not None and dest.netns.identity == current_identity()
        stat = os.stat(dest.netns.path)
        assert (stat.st_dev, stat.st_ino) == dest.netns.identity
    assert interceptor.original_destination((SERVER, 40001), (CLIENT, PROXY)) is None
    # FLOW DELETED closes the entry (it lingers for the connection's last packets)
    backend.push(flow, event(FLOW, 2, pid=0, endpoint=9, local=(CLIENT, 40000), remote=(SERVER, 443)))
    poll_until(lambda: all(e.closed_at is not None for e in interceptor.table.by_client.values()), timeout=5,
               what="entry closed")


def test_a_diverted_connection_of_the_proxy_itself_is_refused(backend: FakeBackend,
                                                              interceptor: Interceptor) -> None:
    flow = backend.open_handles(FLOW)[0]
    backend.push(backend.network, network_packet(tcp_packet(CLIENT, 40000, SERVER, 443, SYN)))
    sent_after(backend, 1)
    flow.queue.append(event(FLOW, 1, pid=os.getpid(), endpoint=1, local=(CLIENT, 40000), remote=(SERVER, 443)))
    backend.push(backend.network, network_packet(tcp_packet(CLIENT, 40000, SERVER, 443, ACK)))
    sent_after(backend, 2)
    assert interceptor.original_destination((SERVER, 40000), (CLIENT, PROXY)) is None


def test_a_name_learned_from_dns_is_diverted_from_its_first_syn(backend: FakeBackend,
                                                                interceptor: Interceptor) -> None:
    first = backend.network
    assert LEARNED not in first.filter
    (dns,) = backend.open_handles(NETWORK, sniff=True)
    # The answer was captured before the client could use it; the SYN comes right after.
    dns.queue.append(udp_dns_packet(dns_response("myres.openai.azure.com",
                                                 [("myres.openai.azure.com", TYPE_A, 300, a(LEARNED))])))
    backend.push(first, network_packet(tcp_packet(CLIENT, 40000, LEARNED, 443, SYN)))
    handle, syn = sent_after(backend, 1)[0]
    assert fields(syn.raw) == (LEARNED, 40000, CLIENT, PROXY)
    # The filter was rebuilt to hold the new address, and the old handle handed over and closed.
    assert first.closed and first.shut
    assert handle is backend.network and LEARNED in backend.network.filter
    assert interceptor.stats()["filter_swaps"] == 1


def test_fails_open_when_the_proxy_stops_listening_and_resumes_when_it_is_back(
        backend: FakeBackend, interceptor: Interceptor) -> None:
    first = backend.network
    backend.alive = False
    poll_until(lambda: not interceptor.diverting, timeout=5, what="fail-open")
    assert first.closed
    assert backend.open_handles(NETWORK, sniff=False) == []
    assert interceptor.filter is None
    backend.alive = True
    assert interceptor.wait_diverting(5)
    assert backend.network is not first


def test_fails_open_when_heartbeats_stop(backend: FakeBackend) -> None:
    now = [100.0]
    config = InterceptorConfig(proxy_port=PROXY, liveness_interval=0.05, heartbeat_timeout=3)
    with Interceptor(config, [f"{SERVER}:443"], backend=backend, clock=lambda: now[0]) as it:
        assert it.wait_diverting(5)
        it.heartbeat()
        now[0] += 2
        assert it.diverting
        now[0] += 2  # 4 s without a heartbeat
        poll_until(lambda: not it.diverting, timeout=5, what="fail-open on stale heartbeat")
        it.heartbeat()
        now[0] += 1  # the next liveness check is due
        assert it.wait_diverting(5)


def test_stop_closes_every_handle_and_is_idempotent(backend: FakeBackend) -> None:
    it = Interceptor(InterceptorConfig(proxy_port=PROXY), [f"{SERVER}:443"], backend=backend)
    it.start()
    assert it.wait_diverting(5)
    held = it._namespace
    it.stop()
    it.stop()
    assert backend.handles and all(h.closed for h in backend.handles)
    assert not it.diverting
    if sys.platform == "linux":  # the namespace it held open for lookups is let go too
        assert held is not None and it._namespace is None
        try:
            stat = os.stat(held.namespace.path)
        except OSError:
            pass  # the descriptor is closed
        else:  # or its number was reused, for some other file
            assert (stat.st_dev, stat.st_ino) != held.namespace.identity


def test_own_flows_are_excluded_by_pid_where_sockets_cannot_be_marked(backend: FakeBackend) -> None:
    backend.uses_socket_marks = False
    with Interceptor(InterceptorConfig(proxy_port=PROXY), [f"{SERVER}:443"], backend=backend) as it:
        assert it.wait_diverting(5)
        sock = backend.open_handles(SOCKET)[0]
        # The proxy's CONNECT event (with its local port, as on Windows) precedes its SYN.
        sock.queue.append(event(SOCKET, 4, pid=os.getpid(), endpoint=3, local=(CLIENT, 50000),
                                remote=(SERVER, 443)))
        raw = tcp_packet(CLIENT, 50000, SERVER, 443, SYN)
        backend.push(backend.network, network_packet(raw))
        _, packet = sent_after(backend, 1)[0]
        assert fields(packet.raw) == (CLIENT, 50000, SERVER, 443)  # untouched
        assert it.stats()["own_flows_passed"] == 1


def test_a_proxy_not_yet_listening_delays_diversion(backend: FakeBackend) -> None:
    backend.alive = False
    with Interceptor(InterceptorConfig(proxy_port=PROXY, liveness_interval=0.05), [f"{SERVER}:443"],
                     backend=backend) as it:
        assert not it.diverting
        assert backend.open_handles(NETWORK, sniff=False) == []
        backend.alive = True
        assert it.wait_diverting(5)


def test_loopback_targets_add_loopback_interfaces_to_an_explicit_list(backend: FakeBackend) -> None:
    config = InterceptorConfig(proxy_port=PROXY, interfaces=["eth9"])
    it = Interceptor(config, ["localhost:11434", "api.example"], backend=backend)
    assert it._choose_interfaces(backend) == ["eth9", "lo"]
    assert Interceptor(config, ["api.example"], backend=backend)._choose_interfaces(backend) == ["eth9"]


@pytest.mark.parametrize("options", [{"proxy_port": 0}, {"proxy_port": 70000},
                                     {"proxy_port": 1, "liveness_interval": 0}])
def test_bad_configuration_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        InterceptorConfig(**options)
