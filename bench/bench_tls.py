"""Benchmark oisp's TLS certificate work: leaf issuance, SSLContext creation, cached lookups, ClientHello parsing.

Run ``.venv/bin/python bench/bench_tls.py`` (``--help`` for options). The CA lives in a temporary directory, so
your real oisp configuration is never touched. Baselines, measured in the same run:

* builder, fresh key: cryptography's CertificateBuilder with every leaf extension, signing a fresh EC P-256
  key per leaf (what a straightforward implementation does);
* builder, shared key: the same with one leaf key reused, i.e. oisp's design without the prototype encoder;
* bare SSLContext(): the floor any server context pays before a certificate is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oisp.tls import CertificateAuthority, parse_client_hello

Row = tuple[str, float, float, int]


def measure(name: str, operation: Callable[[int], object], runs: int, warmup: int = 50) -> Row:
    """Time ``operation(i)`` for ``runs`` distinct values of i; return (name, median µs, p99 µs, runs)."""
    for i in range(warmup):
        operation(-1 - i)
    gc.collect()
    samples = []
    for i in range(runs):
        start = time.perf_counter_ns()
        operation(i)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return name, statistics.median(samples) / 1000, samples[min(runs - 1, int(runs * 0.99))] / 1000, runs


def builder_leaf(
    ca: CertificateAuthority, ca_key: ec.EllipticCurvePrivateKey, shared_key: ec.EllipticCurvePrivateKey | None
) -> Callable[[int], x509.Certificate]:
    """A leaf issuer built on CertificateBuilder alone, with the same extensions as oisp's leaves."""
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)

    def issue(i: int) -> x509.Certificate:
        host = f"b{i}.example.com"
        key = shared_key if shared_key is not None else ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(now + timedelta(days=197))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    return issue


def captured_client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="api.openai.com")
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server: the hello is out
        client.do_handshake()
    return outgoing.read()


def run(runs: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="oisp-bench-") as tmp:
        # A cache larger than the run, so "new host" really is new every time and nothing is evicted.
        ca = CertificateAuthority.load_or_create(Path(tmp) / "conf", cache_size=runs * 4 + 1000)
        ca_key = ca._key  # the benchmark compares against builder-based issuing with the very same CA key
        shared = ec.generate_private_key(ec.SECP256R1())
        ca.leaf_for("cached.example.com")
        ca.server_context("cached.example.com", ["h2"])
        hello = captured_client_hello()
        return [
            measure("leaf, new host: oisp leaf_for()", lambda i: ca.leaf_for(f"l{i}.example.com"), runs),
            measure("leaf, new host: builder, shared key", builder_leaf(ca, ca_key, shared), runs),
            measure("leaf, new host: builder, fresh key (baseline)", builder_leaf(ca, ca_key, None), runs),
            measure(
                "SSLContext, new host (leaf + context)",
                lambda i: ca.server_context(f"c{i}.example.com", ["h2"]),
                runs // 4,
            ),
            measure(
                "SSLContext, cached leaf, new ALPN",
                lambda i: ca.server_context(f"l{i}.example.com", ["http/1.1"]),
                runs // 4,
            ),
            measure("bare ssl.SSLContext() (floor)", lambda i: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), runs // 4),
            measure("cached server_context()", lambda i: ca.server_context("cached.example.com", ["h2"]), runs),
            measure("cached leaf_for()", lambda i: ca.leaf_for("cached.example.com"), runs),
            measure("parse_client_hello(real, 1 record)", lambda i: parse_client_hello(hello), runs),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000, help="iterations per leaf row (contexts: a quarter)")
    args = parser.parse_args()
    rows = run(args.runs)
    print(
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, cryptography {cryptography.__version__}, "
        f"{platform.machine()} x{os.cpu_count()}"
    )
    width = max(len(row[0]) for row in rows)
    print(f"{'case':<{width}}  {'median µs':>10}  {'p99 µs':>10}  {'runs':>6}")
    for name, median, p99, count in rows:
        print(f"{name:<{width}}  {median:>10.1f}  {p99:>10.1f}  {count:>6}")


if __name__ == "__main__":
    main()
