"""Real TLS handshakes against the oisp server contexts, on 127.0.0.1 only, with clients that trust only the oisp CA."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from tests.tls.loopback import RESPONSE, curl_get, handshake_in_memory, https_get, tls_server

from oisp.tls import CertificateAuthority


def client_context(ca: CertificateAuthority, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode("ascii"))
    context.set_alpn_protocols(alpn)
    return context


def test_client_trusting_only_the_ca_verifies_the_host_and_negotiates_h2(ca: CertificateAuthority) -> None:
    with tls_server(ca.server_context("api.openai.com", ["h2"])) as server:
        client = https_get(ca.cert_pem, server.port, "api.openai.com", ["h2", "http/1.1"])
    assert server.error is None
    assert client.alpn == "h2"
    assert server.alpn == "h2"
    assert client.response == RESPONSE
    assert client.peer_cert["subjectAltName"] == (("DNS", "api.openai.com"),)


def test_client_refuses_the_leaf_for_another_host(ca: CertificateAuthority) -> None:
    with (
        tls_server(ca.server_context("api.openai.com", ["h2"])) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        https_get(ca.cert_pem, server.port, "api.anthropic.com")


def test_client_that_does_not_trust_the_ca_refuses_the_leaf(ca: CertificateAuthority, tmp_path: Path) -> None:
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    with (
        tls_server(ca.server_context("api.openai.com", ["h2"])) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in certificate chain"),
    ):
        https_get(stranger.cert_pem, server.port, "api.openai.com")


@pytest.mark.parametrize(
    ("server_alpn", "client_alpn", "negotiated"),
    [
        (["h2"], ["http/1.1", "h2"], "h2"),
        (["http/1.1"], ["h2", "http/1.1"], "http/1.1"),
        (None, ["h2", "http/1.1"], None),
        (["h2"], ["http/1.1"], None),
    ],
)
def test_server_context_offers_exactly_the_alpn_it_was_given(
    ca: CertificateAuthority, server_alpn: list[str] | None, client_alpn: list[str], negotiated: str | None
) -> None:
    done = handshake_in_memory(
        ca.server_context("api.openai.com", server_alpn), client_context(ca, client_alpn), "api.openai.com"
    )
    assert done.client.selected_alpn_protocol() == negotiated
    assert done.server.selected_alpn_protocol() == negotiated


def test_server_context_requires_tls_1_2_or_newer(ca: CertificateAuthority) -> None:
    assert ca.server_context("api.openai.com", None).minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_sends_the_ca_certificate_after_the_leaf(ca: CertificateAuthority) -> None:
    # TLS 1.2 sends the Certificate message in the clear, so the chain can be read off the wire.
    client = client_context(ca, ["h2"])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    done = handshake_in_memory(ca.server_context("api.openai.com", ["h2"]), client, "api.openai.com")
    leaf_der = ca.leaf_for("api.openai.com").certificate.public_bytes(serialization.Encoding.DER)
    assert done.client.version() == "TLSv1.2"
    assert leaf_der in done.server_flight
    assert ca.cert_der in done.server_flight
    assert done.server_flight.index(leaf_der) < done.server_flight.index(ca.cert_der)


def test_server_context_for_an_ip_address_verifies_as_that_address(ca: CertificateAuthority) -> None:
    with tls_server(ca.server_context("127.0.0.1", ["http/1.1"])) as server:
        client = https_get(ca.cert_pem, server.port, "127.0.0.1", ["http/1.1"])
    assert client.peer_cert["subjectAltName"] == (("IP Address", "127.0.0.1"),)


def test_leaf_key_never_stays_on_disk(ca: CertificateAuthority, confdir: Path) -> None:
    ca.server_context("api.openai.com", ["h2"])
    ca.server_context("127.0.0.1", None)
    assert sorted(path.name for path in confdir.iterdir()) == ["oisp-ca-key.pem", "oisp-ca.pem"]
    scratch = Path(ca._scratch or "")
    assert scratch.is_dir()
    assert list(scratch.iterdir()) == []
    assert scratch.stat().st_mode & 0o077 == 0


# -- name constraints, as real clients enforce them ------------------------------------------------------------


def forge_leaf(ca: CertificateAuthority, name: x509.GeneralName) -> ssl.SSLContext:
    """What someone holding the CA key could sign: a leaf for any name, built without oisp's own checks."""
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([name]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = (
        cert.public_bytes(serialization.Encoding.PEM)
        + ca.cert_pem
        + leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path = ca.key_path.with_name("forged.pem")
    path.write_bytes(pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(path)
    path.unlink()
    return context


@pytest.mark.parametrize("host", ["api.openai.com", "api.anthropic.com", "127.0.0.1"])
def test_python_client_accepts_the_constrained_ca_for_permitted_hosts(
    constrained_ca: CertificateAuthority, host: str
) -> None:
    with tls_server(constrained_ca.server_context(host, ["http/1.1"])) as server:
        client = https_get(constrained_ca.cert_pem, server.port, host, ["http/1.1"])
    assert client.response == RESPONSE


@pytest.mark.parametrize(
    ("server_hostname", "name"),
    [
        ("example.com", x509.DNSName("example.com")),
        ("openai.com.example.com", x509.DNSName("openai.com.example.com")),
        ("10.1.2.3", x509.IPAddress(ip_address("10.1.2.3"))),
    ],
)
def test_python_client_rejects_a_forged_leaf_outside_the_constraints(
    constrained_ca: CertificateAuthority, server_hostname: str, name: x509.GeneralName
) -> None:
    # The socket goes to 127.0.0.1 whatever the name: only the name the client verifies changes.
    with (
        tls_server(forge_leaf(constrained_ca, name)) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"),
    ):
        https_get(constrained_ca.cert_pem, server.port, server_hostname, ["http/1.1"])


def test_forged_leaf_is_accepted_by_a_client_trusting_the_unconstrained_ca(ca: CertificateAuthority) -> None:
    # The control for the test above: without name constraints the very same forgery works.
    with tls_server(forge_leaf(ca, x509.DNSName("example.com"))) as server:
        client = https_get(ca.cert_pem, server.port, "example.com", ["http/1.1"])
    assert client.response == RESPONSE


def test_curl_accepts_the_constrained_ca_for_a_permitted_host(constrained_ca: CertificateAuthority) -> None:
    with tls_server(constrained_ca.server_context("api.openai.com", ["http/1.1"])) as server:
        result = curl_get(constrained_ca.cert_path, "api.openai.com", server.port)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ok"
    assert server.request.startswith(b"GET / HTTP/1.1\r\n")


def test_curl_rejects_a_forged_leaf_outside_the_constraints(constrained_ca: CertificateAuthority) -> None:
    with tls_server(forge_leaf(constrained_ca, x509.DNSName("example.com"))) as server:
        result = curl_get(constrained_ca.cert_path, "example.com", server.port)
    assert result.returncode == 60, result.stderr  # CURLE_PEER_FAILED_VERIFICATION
    assert b"permitted subtree violation" in result.stderr
    assert result.stdout == b""
