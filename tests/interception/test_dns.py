"""The sans-io DNS response parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.interception.packets import a, aaaa, dns_name, dns_response

from oisp.errors import ProtocolError
from oisp.interception.dns import TYPE_A, TYPE_AAAA, TYPE_CNAME, addresses_for, parse_dns_response


def test_a_and_aaaa_answers_are_parsed_with_ttls() -> None:
    msg = dns_response("api.openai.com", [("api.openai.com", TYPE_A, 300, a("203.0.113.5")),
                                          ("api.openai.com", TYPE_AAAA, 60, aaaa("2001:db8::5"))])
    response = parse_dns_response(msg)
    assert response is not None
    assert response.questions == ("api.openai.com",)
    assert [(r.name, r.rtype, r.ttl, r.value) for r in response.records] == [
        ("api.openai.com", TYPE_A, 300, "203.0.113.5"),
        ("api.openai.com", TYPE_AAAA, 60, "2001:db8::5"),
    ]


def test_cname_chain_is_followed_with_the_smallest_ttl() -> None:
    msg = dns_response("myres.openai.azure.com", [
        ("myres.openai.azure.com", TYPE_CNAME, 3600, dns_name("edge.azure.example")),
        ("edge.azure.example", TYPE_CNAME, 120, dns_name("node.azure.example")),
        ("node.azure.example", TYPE_A, 30, a("198.51.100.20")),
        ("unrelated.example", TYPE_A, 30, a("198.51.100.99")),
    ])
    response = parse_dns_response(msg)
    assert response is not None
    assert addresses_for(response, "myres.openai.azure.com") == {"198.51.100.20": 30}


def test_compressed_cname_target_is_expanded() -> None:
    # The CNAME target points back into the question name: "x." + <pointer to offset 12>.
    target = b"\x01x\xc0\x0c"
    msg = dns_response("api.example", [("api.example", TYPE_CNAME, 10, target),
                                       ("x.api.example", TYPE_A, 10, a("192.0.2.1"))])
    response = parse_dns_response(msg)
    assert response is not None
    assert response.records[0].value == "x.api.example"
    assert addresses_for(response, "API.example.") == {"192.0.2.1": 10}


def test_queries_are_not_responses() -> None:
    query = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + dns_name("api.openai.com") + b"\x00\x01\x00\x01"
    assert parse_dns_response(query) is None


def test_error_responses_keep_their_rcode() -> None:
    response = parse_dns_response(dns_response("nope.example", [], rcode=3))
    assert response is not None
    assert response.rcode == 3


@pytest.mark.parametrize("message", [
    b"\x00" * 5,  # shorter than a header
    struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\x05abc",  # label past the end
    struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c",  # pointer loop onto itself
    struct.pack("!6H", 1, 0x8180, 1, 1, 0, 0) + dns_name("a.b") + b"\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01",
])
def test_malformed_messages_raise_protocol_error(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_dns_response(message)


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    try:
        parse_dns_response(data)
    except ProtocolError:
        pass


@given(st.binary(min_size=12, max_size=300))
def test_arbitrary_response_bodies_never_raise_anything_but_protocol_error(body: bytes) -> None:
    try:
        parse_dns_response(struct.pack("!6H", 1, 0x8180, 2, 3, 1, 1) + body)
    except ProtocolError:
        pass
