"""The QUIC guard (sans-io), its reporter, and the filter's UDP terms."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest
from tests.interception.packets import tcp_packet
from tests.oisp_schema import SchemaValidator

from oisp.event_decoder import network_connect_event
from oisp.interception._filter import build_filter
from oisp.interception.quic import QuicAttempt, QuicGuard, QuicReporter, pid_owning, udp_flow, udp_socket_inode

AI_V4, AI_V6, OTHER = "203.0.113.5", "2001:db8::5", "198.51.100.9"


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes = b"\xc0quic-initial") -> bytearray:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, s.packed, d.packed)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s.packed, d.packed)
    return bytearray(ip + udp)


def _target(packed: bytes, port: int) -> bool:
    return port == 443 and packed in {ipaddress.ip_address(AI_V4).packed, ipaddress.ip_address(AI_V6).packed}


def test_udp_flow_reads_v4_and_v6_and_ignores_tcp() -> None:
    flow = udp_flow(udp_packet("10.0.0.2", 50000, AI_V4, 443))
    assert flow == (ipaddress.ip_address("10.0.0.2").packed, 50000, ipaddress.ip_address(AI_V4).packed, 443)
    assert udp_flow(udp_packet("2001:db8::2", 50001, AI_V6, 443))[1:] == (  # type: ignore[index]
        50001, ipaddress.ip_address(AI_V6).packed, 443)
    assert udp_flow(tcp_packet("10.0.0.2", 50000, AI_V4, 443)) is None
    assert udp_flow(b"\x45\x00") is None


def test_quic_to_targets_is_dropped_and_each_flow_reported_once() -> None:
    seen: list[QuicAttempt] = []
    guard = QuicGuard(_target, lambda packed: "api.openai.com", seen.append)
    initial = udp_packet("10.0.0.2", 50000, AI_V4, 443)
    assert QuicGuard.is_udp(initial) and not QuicGuard.is_udp(tcp_packet("10.0.0.2", 1, AI_V4, 443))
    assert [guard.should_drop(initial) for _ in range(5)] == [True] * 5  # retransmitted Initials
    assert guard.should_drop(udp_packet("2001:db8::2", 50001, AI_V6, 443))
    assert not guard.should_drop(udp_packet("10.0.0.2", 50002, OTHER, 443))  # not an AI endpoint
    assert not guard.should_drop(udp_packet("10.0.0.2", 50003, AI_V4, 53))  # not the QUIC port
    assert seen == [QuicAttempt(("10.0.0.2", 50000), (AI_V4, 443), "api.openai.com"),
                    QuicAttempt(("2001:db8::2", 50001), (AI_V6, 443), "api.openai.com")]
    assert (guard.dropped, guard.passed, guard.flows) == (6, 2, 2)


def test_a_failing_report_callback_does_not_stop_the_drop() -> None:
    def boom(attempt: QuicAttempt) -> None:
        raise RuntimeError("sink gone")

    guard = QuicGuard(_target, lambda packed: None, boom)
    assert guard.should_drop(udp_packet("10.0.0.2", 50000, AI_V4, 443))


def test_the_reporter_keeps_one_report_per_process_and_host(oisp_schema: SchemaValidator) -> None:
    pids = {50000: 4242, 50001: 4242, 50002: 5151}
    reporter = QuicReporter(provider_for=lambda host: "openai", pid_for=lambda client: pids[client[1]])
    for port in (50000, 50001, 50002):
        reporter.submit(QuicAttempt(("10.0.0.2", port), (AI_V4, 443), "api.openai.com"))
    reporter.close()
    reports = []
    while (report := reporter.next_report()) is not None:
        reports.append(report)
    assert [r.pid_hint for r in reports] == [4242, 5151]
    event = network_connect_event(reports[0])
    oisp_schema.validate(event.to_dict())
    assert event.data.protocol == "udp" and event.data.success is False
    assert event.data.dest.domain == "api.openai.com" and event.data.dest.port == 443
    assert event.attrs["oisp.interception"] == "quic_blocked" and event.attrs["oisp.provider"] == "openai"


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_udp_socket_of_a_flow_is_found_with_its_process(family: socket.AddressFamily) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:  # pragma: no cover - no IPv6 here
            pytest.skip(f"cannot bind {host}: {exc}")
        port = sock.getsockname()[1]
        inode = udp_socket_inode((host, port))
        if inode is None and not os.path.exists("/proc/net/udp"):
            pytest.skip("no /proc/net/udp on this platform")
        assert inode == os.fstat(sock.fileno()).st_ino
        assert pid_owning(inode) == os.getpid()


def test_the_filter_diverts_udp_443_to_target_addresses_only() -> None:
    addresses = {(ipaddress.ip_address(AI_V4).packed, 443), (ipaddress.ip_address(AI_V6).packed, 443),
                 (ipaddress.ip_address("127.0.0.1").packed, 11434)}
    text = build_filter(addresses, [443, 11434], 15001, udp_ports=[443]).text
    assert text.startswith("outbound and ((tcp and (")
    assert f"(udp.DstPort == 443 and (ip.DstAddr == {AI_V4}))" in text
    assert f"(udp.DstPort == 443 and (ipv6.DstAddr == {AI_V6}))" in text
    assert "udp.DstPort == 11434" not in text
    assert build_filter(addresses, [443], 15001).text.startswith("outbound and tcp and (")  # QUIC guard off


def test_past_the_range_budget_udp_falls_back_to_the_port() -> None:
    many = {(ipaddress.ip_address(f"203.0.113.{i}").packed, 443) for i in range(0, 60, 2)}
    text = build_filter(many, [443], 15001, udp_ports=[443], max_ranges=48).text
    assert "(ip and udp.DstPort == 443)" in text and "(ip and tcp.DstPort == 443)" not in text
