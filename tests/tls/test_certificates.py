"""What the CA and leaf certificates contain, parsed back with cryptography and checked property by property."""

from __future__ import annotations

from datetime import timedelta
from ipaddress import ip_address, ip_network

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.tls.conftest import FakeClock, MakeCa

from oisp.errors import CertificateError
from oisp.tls import CertificateAuthority, Leaf
from oisp.tls.ca import LEAF_BACKDATE, LEAF_VALIDITY


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the CA certificate -----------------------------------------------------------------------------------------


def test_ca_is_self_signed_ec_p256_valid_ten_years(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    cert.verify_directly_issued_by(cert)
    assert cert.subject == cert.issuer
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=3650)
    assert cert.version is x509.Version.v3


def test_ca_basic_constraints_are_critical_ca_with_path_length_zero(ca: CertificateAuthority) -> None:
    constraints = ext(ca.certificate, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)


def test_ca_key_usage_is_critical_cert_and_crl_signing_only(ca: CertificateAuthority) -> None:
    usage = ext(ca.certificate, x509.KeyUsage)
    assert usage.critical
    value = usage.value
    assert isinstance(value, x509.KeyUsage)
    assert value.key_cert_sign
    assert value.crl_sign
    assert not value.digital_signature
    assert not value.key_encipherment


def test_ca_subject_key_identifier_matches_its_key(ca: CertificateAuthority) -> None:
    ski = ext(ca.certificate, x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(ca.certificate.public_key())


def test_unconstrained_ca_has_no_name_constraints(ca: CertificateAuthority) -> None:
    with pytest.raises(x509.ExtensionNotFound):
        ext(ca.certificate, x509.NameConstraints)
    assert ca.permitted_domains is None


def test_constrained_ca_permits_its_domains_and_loopback_only(constrained_ca: CertificateAuthority) -> None:
    constraints = ext(constrained_ca.certificate, x509.NameConstraints)
    assert constraints.critical
    value = constraints.value
    assert isinstance(value, x509.NameConstraints)
    assert value.excluded_subtrees is None
    assert value.permitted_subtrees is not None
    assert set(value.permitted_subtrees) == {
        x509.DNSName("anthropic.com"),
        x509.DNSName("openai.com"),
        x509.IPAddress(ip_network("127.0.0.0/8")),
        x509.IPAddress(ip_network("::1/128")),
    }


# -- leaves ---------------------------------------------------------------------------------------------------


def test_leaf_validity_is_at_most_199_days_with_at_most_two_days_backdating(make_ca: MakeCa, clock: FakeClock) -> None:
    ca = make_ca()
    clock.now += timedelta(days=30)  # away from the CA's own notBefore, so backdating is not clamped
    leaf = ca.leaf_for("api.openai.com")
    cert = leaf.certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= LEAF_VALIDITY
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= LEAF_VALIDITY - timedelta(seconds=1)
    backdating = clock.now - cert.not_valid_before_utc
    assert timedelta(0) <= backdating <= LEAF_BACKDATE
    assert backdating >= LEAF_BACKDATE - timedelta(seconds=1)
    assert (leaf.not_before, leaf.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)


def test_leaf_never_outlives_the_ca(make_ca: MakeCa, clock: FakeClock) -> None:
    ca = make_ca()
    clock.now = ca.certificate.not_valid_after_utc - timedelta(days=30)
    leaf = ca.leaf_for("api.openai.com")
    assert leaf.not_after == ca.certificate.not_valid_after_utc


def test_leaf_from_a_ca_that_expired_while_running_is_refused(make_ca: MakeCa, clock: FakeClock) -> None:
    ca = make_ca()
    clock.now = ca.certificate.not_valid_after_utc
    with pytest.raises(CertificateError, match="expired"):
        ca.leaf_for("api.openai.com")


def test_leaf_is_a_server_certificate_signed_by_the_ca(ca: CertificateAuthority) -> None:
    cert = ca.leaf_for("api.openai.com").certificate
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.issuer == ca.certificate.subject
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]  # type: ignore[call-overload]
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)
    usage = ext(cert, x509.KeyUsage).value
    assert isinstance(usage, x509.KeyUsage)
    assert usage.digital_signature
    assert not usage.key_cert_sign


def test_leaf_authority_key_identifier_is_the_ca_subject_key_identifier(ca: CertificateAuthority) -> None:
    ca_ski = ext(ca.certificate, x509.SubjectKeyIdentifier).value
    aki = ext(ca.leaf_for("api.openai.com").certificate, x509.AuthorityKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest


def test_leaf_key_is_not_the_ca_key_and_is_shared_by_the_instance(ca: CertificateAuthority) -> None:
    one, two = ca.leaf_for("api.openai.com"), ca.leaf_for("api.anthropic.com")
    assert spki(one.certificate.public_key()) != spki(ca.certificate.public_key())
    assert spki(one.certificate.public_key()) == spki(one.private_key.public_key())
    assert spki(one.certificate.public_key()) == spki(two.certificate.public_key())
    assert isinstance(one.private_key.curve, ec.SECP256R1)


def test_leaf_serials_are_random_and_positive(ca: CertificateAuthority) -> None:
    serials = {ca.leaf_for(f"h{i}.example.com").certificate.serial_number for i in range(20)}
    assert len(serials) == 20
    assert all(0 < serial < 2**159 for serial in serials)
    assert max(serials).bit_length() > 64


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.openai.com", x509.DNSName("api.openai.com")),
        ("API.OpenAI.com.", x509.DNSName("api.openai.com")),
        ("bücher.example", x509.DNSName("xn--bcher-kva.example")),
        ("127.0.0.1", x509.IPAddress(ip_address("127.0.0.1"))),
        ("::1", x509.IPAddress(ip_address("::1"))),
        ("[2001:db8::1]", x509.IPAddress(ip_address("2001:db8::1"))),
        ("fe80::1%eth0", x509.IPAddress(ip_address("fe80::1"))),
    ],
)
def test_leaf_subject_alt_name_is_dns_for_names_and_ip_for_addresses(
    ca: CertificateAuthority, host: str, expected: x509.GeneralName
) -> None:
    leaf = ca.leaf_for(host)
    san = ext(leaf.certificate, x509.SubjectAlternativeName)
    assert list(san.value) == [expected]  # type: ignore[call-overload]
    common_names = leaf.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if isinstance(expected, x509.DNSName):
        assert [attribute.value for attribute in common_names] == [expected.value]
        assert not san.critical
    else:
        assert common_names == []  # OpenSSL would check an IP-looking CN against DNS name constraints
        assert san.critical  # required when the subject is empty


def test_leaf_for_a_name_longer_than_64_has_no_common_name(ca: CertificateAuthority) -> None:
    host = "a" * 60 + ".example.com"
    cert = ca.leaf_for(host).certificate
    assert cert.subject == x509.Name([])
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.DNSName(host)]  # type: ignore[call-overload]


@pytest.mark.parametrize("host", ["", ".", "a..b", "*.openai.com", "exa mple.com", "-bad.com", "a" * 64 + ".com"])
def test_leaf_for_something_that_is_not_a_host_is_refused(ca: CertificateAuthority, host: str) -> None:
    with pytest.raises(CertificateError, match="not a DNS name or an IP address"):
        ca.leaf_for(host)


@pytest.mark.parametrize(
    "host", ["example.com", "openai.com.evil.net", "notopenai.com", "10.0.0.1", "::ffff:127.0.0.1"]
)
def test_constrained_ca_refuses_hosts_clients_would_reject(constrained_ca: CertificateAuthority, host: str) -> None:
    with pytest.raises(CertificateError, match="name-constrained"):
        constrained_ca.leaf_for(host)


@pytest.mark.parametrize("host", ["openai.com", "api.openai.com", "a.b.anthropic.com", "127.0.0.1", "127.1.2.3", "::1"])
def test_constrained_ca_issues_within_its_subtrees(constrained_ca: CertificateAuthority, host: str) -> None:
    constrained_ca.leaf_for(host).certificate.verify_directly_issued_by(constrained_ca.certificate)


def test_leaf_pem_and_chain(ca: CertificateAuthority) -> None:
    leaf = ca.leaf_for("api.openai.com")
    assert x509.load_pem_x509_certificate(leaf.cert_pem) == leaf.certificate
    chain = x509.load_pem_x509_certificates(leaf.chain_pem)
    assert chain == [leaf.certificate, ca.certificate]
    assert "private_key" not in repr(leaf)


@pytest.mark.parametrize("host", ["api.openai.com", "127.0.0.1", "2001:db8::1", "b" * 61 + ".example.com"])
def test_leaf_encoding_is_byte_for_byte_what_the_cryptography_builder_makes(
    ca: CertificateAuthority, host: str
) -> None:
    # The fast encoder only joins bytes; the builder is the reference for what they must be.
    leaf: Leaf = ca.leaf_for(host)
    cert = leaf.certificate
    names = list(ext(cert, x509.SubjectAlternativeName).value)  # type: ignore[call-overload]
    ca_ski = ext(ca.certificate, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    leaf_public = leaf.private_key.public_key()
    reference = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(leaf_public)
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_public), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=cert.subject == x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    assert cert.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == reference.signature_algorithm_oid


def test_leaf_times_after_2049_use_generalized_time(make_ca: MakeCa, clock: FakeClock) -> None:
    clock.now = clock.now.replace(year=2049, month=12, day=1)
    ca = make_ca()
    cert = ca.leaf_for("api.openai.com").certificate
    assert cert.not_valid_after_utc.year == 2050
    assert cert.not_valid_before_utc.year == 2049
    cert.verify_directly_issued_by(ca.certificate)
