"""The diversion filter builder."""

from __future__ import annotations

import ipaddress

import pytest

from oisp.interception._filter import build_filter


def pairs(*items: tuple[str, int]) -> set[tuple[bytes, int]]:
    return {(ipaddress.ip_address(ip).packed, port) for ip, port in items}


def test_addresses_ports_syns_and_proxy_replies_are_in_the_filter() -> None:
    f = build_filter(pairs(("203.0.113.5", 443), ("203.0.113.6", 443), ("2001:db8::5", 443),
                           ("127.0.0.1", 11434)), [443, 11434], 15001)
    assert f.text.startswith("outbound and tcp and (")
    assert "(ip.DstAddr >= 203.0.113.5 and ip.DstAddr <= 203.0.113.6)" in f.text  # merged into a range
    assert "ipv6.DstAddr == 2001:db8::5" in f.text
    assert "(tcp.DstPort == 11434 and (ip.DstAddr == 127.0.0.1))" in f.text
    assert "(tcp.Syn and not tcp.Ack and (tcp.DstPort == 443 or tcp.DstPort == 11434))" in f.text
    assert f.text.endswith("tcp.SrcPort == 15001)")
    assert f.covers(ipaddress.ip_address("203.0.113.6").packed, 443)
    assert not f.covers(ipaddress.ip_address("203.0.113.7").packed, 443)
    assert f.port_only_families == frozenset()


def test_without_addresses_only_syns_and_replies_are_diverted() -> None:
    f = build_filter(set(), [443], 15001)
    assert f.text == "outbound and tcp and ((tcp.Syn and not tcp.Ack and (tcp.DstPort == 443)) or tcp.SrcPort == 15001)"
    assert build_filter(set(), [443], 15001, catch_syns=False).text == "outbound and tcp and (tcp.SrcPort == 15001)"


def test_too_many_ranges_fall_back_to_ports_for_that_family() -> None:
    many = pairs(*((f"203.0.113.{i}", 443) for i in range(0, 200, 2)), ("2001:db8::1", 443))
    f = build_filter(many, [443], 15001, max_ranges=48)
    assert f.port_only_families == {4}
    assert "(ip and tcp.DstPort == 443)" in f.text
    assert "ipv6.DstAddr == 2001:db8::1" in f.text
    assert f.covers(ipaddress.ip_address("198.51.100.1").packed, 443)  # any IPv4 address now


def test_built_filters_compile_in_the_windivert_language() -> None:
    pydivert = pytest.importorskip("pydivert")
    try:
        check = pydivert.Divert.check_filter
        check("true")
    except (ImportError, OSError, NotImplementedError) as exc:  # pragma: no cover - no native library
        pytest.skip(f"pydivert cannot compile filters here: {exc}")
    many = pairs(*((f"203.0.113.{i}", 443) for i in range(0, 100, 2)), *((f"2001:db8::{i:x}", 443)
                                                                        for i in range(0, 100, 2)))
    for addresses in (set(), pairs(("203.0.113.5", 443), ("::1", 11434)), many):
        for udp_ports in ((), (443,)):
            text = build_filter(addresses, [443, 11434, 1234], 15001, udp_ports=udp_ports).text
            assert check(text)[0], (text, check(text))
