"""Making clients trust the oisp CA: the operating system's trust store, and a bundle for per-process trust.

Trust stores
    :class:`TrustStore` is the one interface over the platforms' stores; :func:`system_trust_store` is the
    one place that picks an implementation, and the only code in oisp that looks at ``sys.platform`` for
    trust. The implementations live in their own modules:

    - ``_trust_linux``: Debian/Ubuntu (``/usr/local/share/ca-certificates/oisp-ca.crt`` and
      ``update-ca-certificates``) and Fedora/RHEL (``/etc/pki/ca-trust/source/anchors/oisp-ca.pem`` and
      ``update-ca-trust extract``); both system-wide and root-only. A *trust directory* runs Debian's
      ``update-ca-certificates`` on a directory of your choosing instead of ``/etc`` (throwaway stores, tests).
    - ``_trust_windows``: the current user's or the machine's ``Root`` store, through ``certutil``.
    - ``_trust_macos``: the login keychain (user trust settings) or the System keychain (admin trust settings),
      through ``security``.

    Installing removes nothing but a previous oisp CA in oisp's own slot; uninstalling removes exactly what
    installing added and refreshes the store, and is a no-op when the certificate is not there.

Client bundle
    Programs that read a CA file from the environment (``SSL_CERT_FILE`` and friends) replace their roots with
    that file, so it must hold the system's roots as well as the oisp CA: :func:`write_client_bundle` builds it
    and :func:`client_environment` names the variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
import sys
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12

from oisp.errors import CertificateError
from oisp.tls._trust_common import CommandRunner, TrustStorePermissionError, pem_certificates, replace_file

__all__ = [
    "CommandRunner",
    "TrustStore",
    "TrustStorePermissionError",
    "client_environment",
    "pkcs12_truststore",
    "system_trust_store",
    "write_client_bundle",
]

logger = logging.getLogger(__name__)

# Where distributions keep their generated PEM bundle, for Pythons whose OpenSSL default path does not exist
# (python.org and standalone builds): Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine and macOS.
_WELL_KNOWN_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


class TrustStore(Protocol):
    """A place the operating system (or a set of programs) takes trusted root certificates from.

    Fingerprints are SHA-256 of the DER certificate, as hex with or without colons, in either case.
    """

    def install(self, cert_pem: bytes) -> bool:
        """Add the certificate as a trusted root; False when it already was one (nothing changed).

        Raises :class:`TrustStorePermissionError` when the store needs privileges this process lacks,
        :class:`~oisp.errors.CertificateError` for every other failure (leaving the store as it was).
        """

    def uninstall(self, fingerprint: str) -> bool:
        """Remove the certificate with this fingerprint and what installing it added; False when absent."""

    def contains(self, fingerprint: str) -> bool:
        """True when the store holds the certificate with this fingerprint (needs no privileges)."""

    def describe(self) -> str:
        """What and where the store is, for people: e.g. the files and the command it uses."""


def system_trust_store(*, machine: bool = False, trust_dir: Path | None = None) -> TrustStore:
    """The trust store of this system: the one function that decides which implementation applies.

    ``machine`` selects the machine-wide store where a platform has both (Windows: the local machine's
    ``Root`` store instead of the current user's; macOS: the System keychain instead of the login keychain);
    Linux stores are always system-wide. ``trust_dir`` selects a Debian-layout store in that directory
    instead of the system one (it needs Debian's ``update-ca-certificates``). Raises
    :class:`~oisp.errors.CertificateError` when this system has no supported store.
    """
    if trust_dir is not None:
        from oisp.tls._trust_linux import debian_trust_dir_store

        return debian_trust_dir_store(trust_dir)
    if sys.platform == "win32":
        from oisp.tls._trust_windows import WindowsRootStore

        return WindowsRootStore(machine=machine)
    if sys.platform == "darwin":
        from oisp.tls._trust_macos import MacKeychainStore

        return MacKeychainStore(machine=machine)
    from oisp.tls._trust_linux import detect_linux_store

    store = detect_linux_store()
    if store is None:
        raise CertificateError(
            "this system has no trust store oisp can install into (supported: Windows, macOS, Debian/Ubuntu "
            "with update-ca-certificates, Fedora/RHEL with update-ca-trust); add the CA certificate (oisp ca "
            "path) to your system's store by hand, or trust it per program with: eval \"$(oisp ca env)\""
        )
    return store


# -- the client bundle and environment ------------------------------------------------------------------------


def client_environment(bundle: Path, ca_cert: Path) -> dict[str, str]:
    """The environment variables that make common HTTP clients trust the oisp CA, in a stable order.

    ``bundle`` is a file written by :func:`write_client_bundle` (system roots plus the CA), for the variables
    that *replace* a program's roots: OpenSSL-based programs and Python's ``ssl`` (also Go, Ruby, httpx),
    requests, curl, the AWS SDKs and CLI, and gRPC core. Node (and Bun) *add* the file named by
    ``NODE_EXTRA_CA_CERTS`` to their built-in roots, so that one names ``ca_cert`` alone.
    ``GIT_SSL_CAINFO`` is left out on purpose: git is not an AI client, and pinning its roots to a bundle
    that can go stale would only widen what this environment changes.
    """
    shared = str(bundle)
    return {
        "SSL_CERT_FILE": shared,
        "REQUESTS_CA_BUNDLE": shared,
        "CURL_CA_BUNDLE": shared,
        "AWS_CA_BUNDLE": shared,
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": shared,
        "NODE_EXTRA_CA_CERTS": str(ca_cert),
    }


def write_client_bundle(cert_pem: bytes, path: Path) -> bool:
    """Write ``path``: this system's root certificates followed by ``cert_pem``; True when it was (re)written.

    The roots come from the first of: the CA file Python's ``ssl`` uses by default (``SSL_CERT_FILE`` when it
    names another file, so a corporate bundle is kept), OpenSSL's compiled-in file, the distributions' usual
    bundle files, and ``certifi`` when it is installed. The file is replaced atomically and only when its
    content would change, so calling this on every start is cheap. Raises
    :class:`~oisp.errors.CertificateError` when ``path`` cannot be written.
    """
    own = pem_certificates(cert_pem)
    if len(own) != 1:
        raise CertificateError("the CA certificate to add to the client bundle is not a single PEM certificate")
    own_digest = hashlib.sha256(own[0][1]).digest()
    source, roots = _system_roots(path)
    if source is None:
        logger.warning(
            "found no system root certificates (no CA bundle file and no certifi); %s will trust only the oisp "
            "CA, so clients using it cannot reach servers outside oisp",
            path,
        )
    seen = {own_digest}
    blocks: list[bytes] = []
    for pem, der in roots:
        digest = hashlib.sha256(der).digest()
        if digest not in seen:
            seen.add(digest)
            blocks.append(pem)
    header = (
        f"# Written by oisp (oisp ca env): the root certificates of {source or 'nowhere'} followed by the oisp CA.\n"
        "# Rewritten when either changes; do not edit.\n"
    )
    content = header.encode() + b"".join(block + b"\n" for block in blocks)
    content += f"# oisp CA, SHA-256 {own_digest.hex(':').upper()}\n".encode() + own[0][0] + b"\n"
    try:
        if path.read_bytes() == content:
            return False
    except OSError:
        pass
    try:
        replace_file(path, content, 0o644)
    except OSError as error:
        raise CertificateError(f"cannot write the client bundle {path}: {error.strerror or error}") from error
    logger.info("wrote client bundle %s (%d roots from %s and the oisp CA)", path, len(blocks), source)
    return True


def _system_roots(exclude: Path) -> tuple[str | None, list[tuple[bytes, bytes]]]:
    paths = ssl.get_default_verify_paths()
    candidates: list[str] = [p for p in (paths.cafile, paths.openssl_cafile) if p]
    candidates.extend(_WELL_KNOWN_BUNDLES)
    with contextlib.suppress(ImportError):
        import certifi

        candidates.append(certifi.where())
    excluded = _same_file_key(exclude)
    for candidate in candidates:
        if excluded is not None and _same_file_key(Path(candidate)) == excluded:
            continue  # SSL_CERT_FILE may already point at the bundle being rebuilt
        try:
            data = Path(candidate).read_bytes()
        except OSError:
            continue
        roots = pem_certificates(data)
        if roots:
            return candidate, roots
    return None, []


def _same_file_key(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


# -- PKCS#12 ---------------------------------------------------------------------------------------------------


def pkcs12_truststore(certificate: x509.Certificate, friendly_name: str) -> bytes:
    """The certificate alone (no key) as an unencrypted PKCS#12 file that Java also reads as a trust store.

    A certificate-only PKCS#12 without Java's trusted-certificate attribute loads as an empty key store in
    Java, so this writes the attribute (``serialize_java_truststore``); Windows and macOS import the same file.
    """
    serialize = getattr(pkcs12, "serialize_java_truststore", None)
    if serialize is None:
        raise CertificateError(
            "exporting PKCS#12 needs cryptography 45 or newer; upgrade it (pip install -U 'cryptography>=45') or "
            "export pem/der"
        )
    data: bytes = serialize([pkcs12.PKCS12Certificate(certificate, friendly_name.encode("utf-8"))], NoEncryption())
    return data
