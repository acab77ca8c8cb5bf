"""The target set: parsing, resolution, learning from DNS answers, expiry."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from tests.interception.packets import a, dns_name, dns_response

from oisp.endpoints import EndpointTable
from oisp.errors import ConfigurationError
from oisp.interception.dns import TYPE_A, TYPE_CNAME, parse_dns_response
from oisp.interception.targets import Target, TargetSet, parse_target


@pytest.mark.parametrize(("text", "target"), [
    ("api.openai.com", Target("api.openai.com", 443)),
    ("API.OpenAI.com.", Target("api.openai.com", 443)),
    ("localhost:11434", Target("localhost", 11434)),
    ("*.openai.azure.com", Target("*.openai.azure.com", 443)),
    ("[::1]:11434", Target("::1", 11434)),
    ("2001:db8::7", Target("2001:db8::7", 443)),
    ("127.0.0.1:1234", Target("127.0.0.1", 1234)),
])
def test_targets_are_parsed(text: str, target: Target) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["", "host:notaport", "host:70000", "[::1", "[::1]x"])
def test_bad_targets_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_target(text)


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, family: int, kind: int) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "not found")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, kind, 6, "", (ip, port))
                for ip in self.answers[host]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def test_exact_names_are_resolved_and_ip_literals_are_taken_as_they_are() -> None:
    resolver = FakeResolver({"api.openai.com": ["203.0.113.5", "2001:db8::5"], "localhost": ["127.0.0.1", "::1"]})
    targets = TargetSet(["api.openai.com", "localhost:11434", "198.51.100.1:8443"], resolver=resolver)
    assert targets.matches("198.51.100.1", 8443)
    assert not targets.matches("203.0.113.5", 443)
    assert targets.refresh() is True
    assert targets.matches("203.0.113.5", 443)
    assert targets.matches("2001:db8::5", 443)
    assert targets.matches("::ffff:203.0.113.5", 443)  # dual-stack sockets report mapped addresses
    assert targets.matches("127.0.0.1", 11434)
    assert not targets.matches("127.0.0.1", 443)
    assert targets.contains(packed("::1"), 11434)
    assert targets.ports == {443, 11434, 8443}


def test_refresh_is_due_after_the_interval_and_keeps_addresses_when_resolution_fails() -> None:
    clock = Clock()
    resolver = FakeResolver({"api.openai.com": ["203.0.113.5"]})
    targets = TargetSet(["api.openai.com"], resolver=resolver, refresh_interval=60, clock=clock)
    assert targets.refresh_due()
    targets.refresh()
    version = targets.version
    assert not targets.refresh_due()
    clock.now += 61
    assert targets.refresh_due()
    resolver.answers.clear()
    assert targets.refresh() is False  # a failed resolution keeps what we had
    assert targets.matches("203.0.113.5", 443)
    resolver.answers["api.openai.com"] = ["203.0.113.9"]
    assert targets.refresh() is True
    assert targets.version > version
    assert targets.matches("203.0.113.9", 443)
    assert not targets.matches("203.0.113.5", 443)


def test_wildcard_addresses_are_learned_from_dns_through_cnames_and_expire() -> None:
    clock = Clock()
    targets = TargetSet(["*.openai.azure.com", "api.openai.com"], resolver=FakeResolver({}), clock=clock,
                        min_ttl=30, max_ttl=3600)
    answer = parse_dns_response(dns_response("myres.openai.azure.com", [
        ("myres.openai.azure.com", TYPE_CNAME, 600, dns_name("edge.example.net")),
        ("edge.example.net", TYPE_A, 5, a("198.51.100.20")),
    ]))
    assert answer is not None
    assert targets.learn(answer) is True
    assert targets.matches("198.51.100.20", 443)
    assert targets.learn(answer) is False  # nothing new
    clock.now += 29
    assert targets.expire() is False  # a 5 s TTL is clamped up to min_ttl
    clock.now += 2
    assert targets.expire() is True
    assert not targets.matches("198.51.100.20", 443)


def test_unrelated_names_teach_nothing() -> None:
    targets = TargetSet(["*.openai.azure.com"], resolver=FakeResolver({}))
    answer = parse_dns_response(dns_response("openai.azure.com.evil.example", [
        ("openai.azure.com.evil.example", TYPE_A, 60, a("198.51.100.66"))]))
    assert answer is not None
    assert targets.learn(answer) is False
    assert targets.addresses() == frozenset()


def test_built_in_endpoint_table_is_accepted() -> None:
    targets = TargetSet.from_endpoints(EndpointTable.from_plugins(), resolver=FakeResolver({}))
    assert {443, 11434, 1234} <= targets.ports
    assert targets.matches_name("us-east-1-aiplatform.googleapis.com", 443)
    assert targets.matches_name("bedrock-runtime.eu-west-1.amazonaws.com", 443)


def test_an_empty_target_list_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        TargetSet([])
