"""Reverse and transparent modes, half-close, and proxy configuration errors."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs
import httpx
import pytest
import trustme
from tests.proxy.clients import h2_exchange, read_all
from tests.stack import running_stack

from oisp.errors import ConfigurationError
from oisp.proxy import ProxyConfig, ProxyMode, UpstreamOverride


def test_reverse_mode_stands_in_for_the_provider_without_a_client_ca(tmp_path: Path, test_ca: trustme.CA) -> None:
    with running_stack(tmp_path, test_ca, config={"mode": "reverse",
                                                  "reverse_target": "https://api.openai.com"}) as stack:
        with httpx.Client(base_url=f"{stack.proxy_url}/v1") as client:  # plain HTTP, no CA on the client
            r = client.post("/chat/completions", json={"model": "gpt-4o"})
            r2 = client.post("/chat/completions", content=b"x" * 10,
                             headers={"transfer-encoding": "chunked"})
        assert r.status_code == 200 and r.json()["path"] == "/v1/chat/completions"
        assert r2.status_code == 200
        recording = stack.upstream.connections[-1]
        assert recording.alpn == "http/1.1"
        assert [req.header("host") for req in recording.requests] == ["api.openai.com", "api.openai.com"]
        assert recording.requests[0].body == b'{"model":"gpt-4o"}'
        events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
        request = next(e for e in events if e.event_type == "ai.request")
        assert request.data.provider.name == "openai"  # type: ignore[attr-defined]
        assert request.data.provider.endpoint == "https://api.openai.com/v1/chat/completions"  # type: ignore[attr-defined]


def test_reverse_request_rewriter_changes_only_the_host_and_follows_body_framing() -> None:
    from oisp.proxy.reverse import RequestRewriter

    rewriter = RequestRewriter("api.openai.com", "/base")
    stream = (b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 21\r\n\r\nHost: not-a-header!!!"
              b"POST /v1/y HTTP/1.1\r\nhost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    out = b"".join(rewriter.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert out == (b"POST /base/v1/x HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 21\r\n\r\n"
                   b"Host: not-a-header!!!"
                   b"POST /base/v1/y HTTP/1.1\r\nhost: api.openai.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")


@attrs.frozen
class _Original:
    ip: str
    port: int
    pid: int | None


class _FixedDestinations:
    """An original-destination lookup standing in for the interceptor (the real one is tested as root)."""

    def __init__(self) -> None:
        self.asked: list[tuple[tuple[str, int], tuple[str, int]]] = []

    def original_destination(self, client: tuple[str, int], local: tuple[str, int]) -> _Original:
        self.asked.append((client, local))
        return _Original("127.0.0.1", 443, 4242)


def test_transparent_mode_takes_the_original_destination_from_the_lookup(tmp_path: Path, test_ca: trustme.CA) -> None:
    lookup = _FixedDestinations()
    with running_stack(tmp_path, test_ca, config={"mode": "transparent"}, original_destinations=lookup) as stack:
        # A diverted client believes it talks to api.openai.com:443 directly: no CONNECT, just TLS.
        context = stack.client_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(stack.proxy_address, timeout=10)
        with context.wrap_socket(raw, server_hostname="api.openai.com") as sock:
            _, _, bodies = h2_exchange(sock, "api.openai.com", [("/v1/models", b"")])
        assert b'"path": "/v1/models"' in bodies[1]
        assert lookup.asked and lookup.asked[0][1][1] == stack.proxy_address[1]
        events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
        connect = next(e for e in events if e.event_type == "network.connect")
        assert connect.attrs and connect.attrs["oisp.pid_hint"] == 4242
        assert connect.data.dest.domain == "api.openai.com"  # type: ignore[attr-defined]
        assert connect.data.tls.alpn == "h2"  # type: ignore[attr-defined]


def test_half_close_is_propagated_in_passthrough(tmp_path: Path, test_ca: trustme.CA) -> None:
    with running_stack(tmp_path, test_ca) as stack:
        sock = socket.create_connection(stack.proxy_address, timeout=10)
        # absolute-form plain HTTP to Ollama: the request ends with the client's half-close (no length)
        sock.sendall(b"GET http://localhost:11434/api/tags HTTP/1.1\r\nHost: localhost:11434\r\n"
                     b"Connection: close\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 200")
        sock.close()


def test_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigurationError, match="reverse_target"):
        ProxyConfig(mode=ProxyMode.REVERSE)
    with pytest.raises(ConfigurationError, match="listen_port"):
        ProxyConfig(listen_port=70000)
    with pytest.raises(ConfigurationError, match="upstream_ca"):
        ProxyConfig(upstream_ca=Path("/nonexistent/ca.pem"))
    with pytest.raises(ValueError, match="bogus"):
        ProxyConfig(mode="bogus")
    with pytest.raises(ConfigurationError, match="resolve"):
        UpstreamOverride.parse("api.openai.com")
    assert UpstreamOverride.parse("api.openai.com:443:127.0.0.1") == UpstreamOverride(
        "api.openai.com", 443, "127.0.0.1", 443)
    assert UpstreamOverride.parse("api.openai.com:443:[::1]:8443") == UpstreamOverride(
        "api.openai.com", 443, "::1", 8443)


def test_a_host_the_name_constrained_ca_may_not_vouch_for_is_passed_through(
        tmp_path: Path, test_ca: trustme.CA) -> None:
    import ssl

    from tests.proxy.clients import tls_tunnel

    from oisp.tls import CertificateAuthority

    with running_stack(tmp_path, test_ca) as stack:
        # A CA constrained to api.anthropic.com only: api.openai.com is an endpoint it cannot vouch for.
        stack.proxy.ca = CertificateAuthority.load_or_create(tmp_path / "nc", permitted_domains=["api.anthropic.com"])
        context = ssl.create_default_context()
        test_ca.configure_trust(context)
        sock = tls_tunnel(stack.proxy_address, "api.openai.com", context, ["http/1.1"])
        with sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 200")  # the real upstream answered, untouched
        assert stack.proxy.stats.decisions == {"passthrough": 1}


def test_insecure_upstream_is_explicit_and_loud(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    real_ca, unrelated_ca = trustme.CA(), trustme.CA()
    with caplog.at_level(logging.WARNING, logger="oisp.proxy.server"), \
            running_stack(tmp_path, real_ca, config={"upstream_insecure": True}) as stack:
        unrelated_ca.cert_pem.write_to_path(str(stack.upstream_ca_file))  # verification would fail...
        stack.proxy._upstream_contexts.clear()
        with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
            assert client.get("https://api.openai.com/v1/models").status_code == 200  # ...but is off
    assert any("NOT VERIFIED" in r.getMessage() for r in caplog.records)
