"""The NAT core, as transcripts: packets in, verdicts and rewritten packets out."""

from __future__ import annotations

import ipaddress

import pytest
from tests.interception.packets import ACK, FIN, PSH, RST, SYN, fields, tcp_packet

from oisp.interception._nat import NatTable, Translator, Verdict, fast_key, parse_tcp

PROXY = 15001
CLIENT, SERVER = "198.18.1.1", "198.18.1.2"
CLIENT6, SERVER6 = "fd4f::1", "fd4f::2"


def make(targets: set[tuple[str, int]], *, capacity: int = 16, own: set[tuple[str, int]] | None = None,
         ) -> Translator:
    packed = {(ipaddress.ip_address(ip).packed, port) for ip, port in targets}
    own_packed = {ipaddress.ip_address(ip).packed for ip, _ in (own or set())}

    def is_own(key: tuple[bytes, int, bytes, int]) -> bool:
        return key[0] in own_packed

    translator = Translator(NatTable(capacity=capacity, close_linger=5, idle_timeout=60), PROXY,
                            lambda ip, port: (ip, port) in packed, is_own_flow=is_own if own else None)
    translator.target_ports = frozenset(port for _, port in targets)
    return translator


def test_remote_connection_is_swapped_to_the_proxy_and_back() -> None:
    t = make({(SERVER, 443)})
    syn = tcp_packet(CLIENT, 40000, SERVER, 443, SYN)
    verdict, entry = t.outbound(syn, False, 7, now=0)
    assert verdict is Verdict.INBOUND
    assert fields(syn) == (SERVER, 40000, CLIENT, PROXY)  # looks like an inbound connection from the server
    assert entry is not None and entry.ifindex == 7
    # The proxy answers its peer (SERVER:40000); the client must see SERVER:443.
    synack = tcp_packet(CLIENT, PROXY, SERVER, 40000, SYN | ACK)
    assert t.outbound(synack, False, 7, now=0)[0] is Verdict.INBOUND
    assert fields(synack) == (SERVER, 443, CLIENT, 40000)
    data = tcp_packet(CLIENT, 40000, SERVER, 443, PSH | ACK, b"hello")
    assert t.outbound(data, False, 7, now=1)[0] is Verdict.INBOUND
    assert bytes(data[-5:]) == b"hello"
    assert t.table.by_proxy[(ipaddress.ip_address(SERVER).packed, 40000,
                             ipaddress.ip_address(CLIENT).packed, PROXY)] is entry


def test_ipv6_connection_is_swapped_too() -> None:
    t = make({(SERVER6, 443)})
    syn = tcp_packet(CLIENT6, 40000, SERVER6, 443, SYN)
    assert t.outbound(syn, False, 3, now=0)[0] is Verdict.INBOUND
    assert fields(syn) == (SERVER6, 40000, CLIENT6, PROXY)
    reply = tcp_packet(CLIENT6, PROXY, SERVER6, 40000, SYN | ACK)
    assert t.outbound(reply, False, 3, now=0)[0] is Verdict.INBOUND
    assert fields(reply) == (SERVER6, 443, CLIENT6, 40000)


def test_loopback_connection_only_changes_ports_and_stays_outbound() -> None:
    t = make({("127.0.0.1", 11434)})
    syn = tcp_packet("127.0.0.1", 50000, "127.0.0.1", 11434, SYN)
    assert t.outbound(syn, True, 1, now=0)[0] is Verdict.FORWARD
    assert fields(syn) == ("127.0.0.1", 50000, "127.0.0.1", PROXY)
    reply = tcp_packet("127.0.0.1", PROXY, "127.0.0.1", 50000, SYN | ACK)
    assert t.outbound(reply, True, 1, now=0)[0] is Verdict.FORWARD
    assert fields(reply) == ("127.0.0.1", 11434, "127.0.0.1", 50000)


def test_non_targets_and_mid_stream_packets_of_unknown_flows_pass_unchanged() -> None:
    t = make({(SERVER, 443)})
    for packet in (tcp_packet(CLIENT, 40000, "198.18.1.3", 443, SYN),  # another address
                   tcp_packet(CLIENT, 40001, SERVER, 80, SYN),  # another port
                   tcp_packet(CLIENT, 40002, SERVER, 443, ACK)):  # a flow that began before us
        before = bytes(packet)
        assert t.outbound(packet, False, 1, now=0) == (Verdict.PASS, None)
        assert bytes(packet) == before
    assert len(t.table) == 0


def test_when_disabled_new_connections_pass_but_existing_ones_keep_translating() -> None:
    t = make({(SERVER, 443)})
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)
    t.enabled = False
    assert t.outbound(tcp_packet(CLIENT, 40001, SERVER, 443, SYN), False, 1, now=0)[0] is Verdict.PASS
    assert t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK), False, 1, now=0)[0] is Verdict.INBOUND


def test_fin_both_ways_closes_and_the_entry_expires_after_the_linger() -> None:
    t = make({(SERVER, 443)})
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, FIN | ACK), False, 1, now=1)
    entry = t.table.by_client[next(iter(t.table.by_client))]
    assert entry.closed_at is None
    t.outbound(tcp_packet(CLIENT, PROXY, SERVER, 40000, FIN | ACK), False, 1, now=2)
    assert entry.closed_at == 2
    # the last ACK is still translated during the linger
    assert t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK), False, 1, now=3)[0] is Verdict.INBOUND
    assert t.table.expire(now=6) == 0
    assert t.table.expire(now=7) == 1
    assert len(t.table) == 0 and not t.table.by_proxy


def test_rst_closes_and_idle_entries_expire() -> None:
    t = make({(SERVER, 443)})
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)
    t.outbound(tcp_packet(CLIENT, 40001, SERVER, 443, SYN), False, 1, now=0)
    t.outbound(tcp_packet(CLIENT, PROXY, SERVER, 40000, RST), False, 1, now=1)
    assert t.table.expire(now=6) == 1
    assert t.table.expire(now=59) == 0
    assert t.table.expire(now=60) == 1


def test_a_reused_four_tuple_after_close_starts_a_fresh_entry() -> None:
    t = make({(SERVER, 443)})
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, RST), False, 1, now=1)
    verdict, entry = t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=2)
    assert verdict is Verdict.INBOUND and entry is not None and entry.closed_at is None
    assert t.stats.diverted_connections == 2


def test_a_full_table_lets_new_connections_go_direct() -> None:
    t = make({(SERVER, 443)}, capacity=2)
    for port in (40000, 40001):
        assert t.outbound(tcp_packet(CLIENT, port, SERVER, 443, SYN), False, 1, now=0)[0] is Verdict.INBOUND
    assert t.outbound(tcp_packet(CLIENT, 40002, SERVER, 443, SYN), False, 1, now=0)[0] is Verdict.PASS
    assert t.stats.refused_full == 1


def test_proxy_side_collisions_are_refused() -> None:
    # Same client port to the same address on two target ports: both would look the same to the proxy.
    t = make({(SERVER, 443), (SERVER, 8443)})
    assert t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)[0] is Verdict.INBOUND
    assert t.outbound(tcp_packet(CLIENT, 40000, SERVER, 8443, SYN), False, 1, now=0)[0] is Verdict.PASS
    assert t.stats.refused_collision == 1


def test_orphan_replies_of_the_proxy_towards_an_ai_endpoint_are_dropped() -> None:
    t = make({(SERVER, 443)})
    assert t.outbound(tcp_packet(CLIENT, PROXY, SERVER, 40000, ACK), False, 1, now=0) == (Verdict.DROP, None)
    # ... but not towards anything else, nor on loopback
    assert t.outbound(tcp_packet(CLIENT, PROXY, "198.18.1.9", 40000, ACK), False, 1, now=0)[0] is Verdict.PASS
    assert t.outbound(tcp_packet("127.0.0.1", PROXY, "127.0.0.1", 40000, ACK), True, 1, now=0)[0] is Verdict.PASS


def test_the_proxys_own_flows_are_excluded_where_there_is_no_socket_mark() -> None:
    t = make({(SERVER, 443)}, own={(CLIENT, 0)})
    assert t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, SYN), False, 1, now=0)[0] is Verdict.PASS
    assert t.stats.own_flows == 1


@pytest.mark.parametrize("raw", [
    bytearray(b"\x45" + bytes(10)),  # too short
    tcp_packet(CLIENT, 1, SERVER, 2)[:30],  # truncated TCP header
    bytearray(b"\x60" + bytes(59)),  # IPv6, next header not TCP
])
def test_what_is_not_a_whole_tcp_packet_passes(raw: bytearray) -> None:
    assert parse_tcp(raw) is None
    assert make({(SERVER, 443)}).outbound(raw, False, 1, now=0) == (Verdict.PASS, None)


def _tcp_checksum(packet: bytearray) -> int:
    """The TCP checksum of ``packet`` computed from scratch (pseudo-header, header and payload)."""
    if packet[0] >> 4 == 4:
        offset = (packet[0] & 0x0F) * 4
        pseudo = bytes(packet[12:20]) + bytes([0, 6]) + (len(packet) - offset).to_bytes(2, "big")
    else:
        offset = 40
        pseudo = bytes(packet[8:40]) + (len(packet) - offset).to_bytes(4, "big") + bytes([0, 0, 0, 6])
    segment = bytearray(packet[offset:])
    segment[16:18] = b"\0\0"
    data = pseudo + bytes(segment) + (b"\0" if len(segment) % 2 else b"")
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _with_checksum(packet: bytearray) -> bytearray:
    offset = 40 if packet[0] >> 4 == 6 else 20
    packet[offset + 16:offset + 18] = _tcp_checksum(packet).to_bytes(2, "big")
    return packet


@pytest.mark.parametrize(("client", "server"), [(CLIENT, SERVER), (CLIENT6, SERVER6), ("127.0.0.1", "127.0.0.2")])
def test_a_complete_checksum_stays_valid_through_both_rewrites(client: str, server: str) -> None:
    # RFC 1624 incremental update for the rewritten port; the addresses only swap (or stay), which the sum ignores
    loopback = client.startswith("127.")
    t = make({(server, 443)})
    for packet in (_with_checksum(tcp_packet(client, 40000, server, 443, SYN)),
                   _with_checksum(tcp_packet(client, 40000, server, 443, PSH | ACK, b"odd-length payload!"))):
        t.outbound(packet, loopback, 1, now=0, checksum_valid=True)
        offset = 40 if packet[0] >> 4 == 6 else 20
        assert int.from_bytes(packet[offset + 16:offset + 18], "big") == _tcp_checksum(packet)
    # the proxy's reply to its peer: remote, from the client's address to the server's with the client's port;
    # loopback, from the listener's address to the client
    source, destination = (server, client) if loopback else (client, server)
    reply = _with_checksum(tcp_packet(source, PROXY, destination, 40000, PSH | ACK, b"hi"))
    assert t.outbound(reply, loopback, 1, now=0, checksum_valid=True)[0] is not Verdict.PASS
    offset = 40 if reply[0] >> 4 == 6 else 20
    assert int.from_bytes(reply[offset + 16:offset + 18], "big") == _tcp_checksum(reply)
    assert t.stats.checksums_updated == 3


def test_without_a_complete_checksum_the_field_is_left_for_the_injector() -> None:
    t = make({(SERVER, 443)})
    packet = tcp_packet(CLIENT, 40000, SERVER, 443, SYN)
    packet[36:38] = b"\x12\x34"  # a partial (offload) sum: not ours to touch
    t.outbound(packet, False, 1, now=0)
    assert bytes(packet[36:38]) == b"\x12\x34" and t.stats.checksums_updated == 0


def _fast_translate(t: Translator, packet: bytearray) -> Verdict | None:
    """Translate ``packet`` as the interceptor's batch loop does through the fast path (None: it cannot)."""
    found = fast_key(packet)
    rewrite = t.table.fast.get(found[0]) if found is not None else None
    if rewrite is None or found is None:
        return None
    packet[found[1]:found[2]] = rewrite[0]
    return rewrite[2]


def _established(t: Translator, client: str, server: str, port: int = 443) -> None:
    syn = tcp_packet(client, 40000, server, port, SYN)
    verdict, entry = t.outbound(syn, client.startswith("127."), 7, now=0)
    assert entry is not None and verdict is not Verdict.PASS
    t.outbound(tcp_packet(client, PROXY, server if not client.startswith("127.") else client, 40000, SYN | ACK),
               client.startswith("127."), 7, now=0)
    t.outbound(tcp_packet(client, 40000, server, port, ACK), client.startswith("127."), 7, now=0)
    entry.attributed = True  # the interceptor's handshake step, after the client's ACK


@pytest.mark.parametrize(("client", "server", "port"), [(CLIENT, SERVER, 443), (CLIENT6, SERVER6, 443),
                                                         ("127.0.0.1", "127.0.0.1", 11434)])
def test_the_fast_path_rewrites_established_segments_exactly_as_the_full_path(client: str, server: str,
                                                                               port: int) -> None:
    t = make({(server, port)})
    _established(t, client, server, port)
    peer = server if not client.startswith("127.") else client
    for make_packet in (lambda: tcp_packet(client, 40000, server, port, PSH | ACK, b"upload"),
                        lambda: tcp_packet(client, PROXY, peer, 40000, ACK, b"download")):
        full, fast = make_packet(), make_packet()
        assert _fast_translate(t, fast) is None  # not learned yet: the first one takes the full path
        verdict, _ = t.outbound(full, client.startswith("127."), 7, now=1)
        again = make_packet()
        assert _fast_translate(t, again) is verdict  # learned from it
        assert again == full
    assert len(t.table.fast) == 2


def test_the_fast_path_is_not_learned_before_the_handshake_nor_for_syn_fin_rst_or_complete_checksums() -> None:
    t = make({(SERVER, 443)})
    syn = tcp_packet(CLIENT, 40000, SERVER, 443, SYN)
    t.outbound(syn, False, 7, now=0)
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK), False, 7, now=0)  # not attributed yet
    assert not t.table.fast
    entry = next(iter(t.table.by_client.values()))
    entry.attributed = True
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK), False, 7, now=0, checksum_valid=True)
    assert not t.table.fast  # a complete checksum needs the incremental update of the full path
    for flags in (SYN | ACK, FIN | ACK, RST):
        assert fast_key(tcp_packet(CLIENT, 40000, SERVER, 443, flags)) is None
    assert fast_key(tcp_packet(CLIENT, 40000, SERVER, 443, ACK)) is not None


def test_closing_or_removing_a_connection_forgets_its_fast_path() -> None:
    t = make({(SERVER, 443)})
    _established(t, CLIENT, SERVER)
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK, b"x"), False, 7, now=1)
    assert len(t.table.fast) == 1
    entry = next(iter(t.table.by_client.values()))
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, RST), False, 7, now=2)
    assert entry.closed_at is not None and not t.table.fast and not entry.fast_keys
    # a closed entry learns nothing more; a table emptied forgets everything
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK, b"y"), False, 7, now=2)
    assert not t.table.fast
    _established(t, CLIENT, SERVER)  # the 4-tuple reused: a fresh entry
    t.outbound(tcp_packet(CLIENT, 40000, SERVER, 443, ACK, b"z"), False, 7, now=3)
    assert len(t.table.fast) == 1
    t.table.clear()
    assert not t.table.fast and not t.table.by_client


@pytest.mark.parametrize("raw", [bytearray(), bytearray(b"\x45" + bytes(30)), bytearray(b"\x46" + bytes(60)),
                                 bytearray(b"\x60" + bytes(50)),
                                 tcp_packet(CLIENT, 1, SERVER, 2)[:39]])
def test_fast_key_refuses_what_it_cannot_rewrite_blindly(raw: bytearray) -> None:
    assert fast_key(raw) is None
    udp = tcp_packet(CLIENT, 1, SERVER, 2)
    udp[9] = 17
    assert fast_key(udp) is None
    fragment = tcp_packet(CLIENT, 1, SERVER, 2)
    fragment[7] = 1
    assert fast_key(fragment) is None


def test_packet_offsets_walks_back_to_back_packets_by_their_ip_headers() -> None:
    from oisp.interception._backend import packet_offsets

    packets = [tcp_packet(CLIENT, 1, SERVER, 2, ACK, b"a" * 100), tcp_packet(CLIENT6, 1, SERVER6, 2, ACK, b"bb"),
               tcp_packet(CLIENT, 3, SERVER, 4)]
    buffer = bytearray(b"".join(packets)) + bytearray(64)  # the rest of the receive buffer
    received = sum(map(len, packets))
    assert packet_offsets(buffer, 3, received) == [0, 140, 140 + 62, received]
    assert packet_offsets(buffer, 0, 0) == [0]
    with pytest.raises(OSError, match="3 packets"):
        packet_offsets(buffer, 3, received + 1)  # the lengths do not add up to what was received
    with pytest.raises(OSError):
        packet_offsets(buffer, 4, received)  # fewer packets than reported
