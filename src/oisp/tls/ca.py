"""The oisp certificate authority: a local CA on disk, and leaf certificates and server contexts it signs.

Files
    The unconstrained CA lives in ``<confdir>/oisp-ca.pem`` (certificate, public) and
    ``<confdir>/oisp-ca-key.pem`` (EC P-256 key, mode 0600). A name-constrained CA is a different CA with its
    own pair, ``oisp-ca-nc-<id>.pem`` and ``oisp-ca-nc-<id>-key.pem``, where ``<id>`` is derived from the
    permitted domains; so changing the domain list creates a new CA instead of silently reusing one whose
    constraints differ, and the unconstrained CA is never overwritten.

Name constraints
    With ``permitted_domains`` the CA carries a critical NameConstraints extension permitting those DNS
    subtrees (each domain and all its subdomains) and the loopback ranges ``127.0.0.0/8`` and ``::1/128``.
    Listing an IP range matters: without one, RFC 5280 leaves IP addresses unconstrained and the CA could
    still vouch for any server reached by address. Loopback is permitted (and nothing else) because a
    certificate for your own machine gives an attacker nothing, while local model servers may be reached by
    address.

Leaves
    All leaves of one :class:`CertificateAuthority` instance share one EC P-256 key, generated in memory when
    the instance is created and never written to the configuration directory. That, plus encoding only the
    per-host fields of each leaf (``_leafcert``), leaves about one ECDSA signature of work per new host.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import ssl
import stat
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Generic, Literal, TypeVar

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oisp.errors import CertificateError, ConfigurationError
from oisp.tls._leafcert import LeafEncoder

__all__ = [
    "CA_VALIDITY",
    "LEAF_BACKDATE",
    "LEAF_VALIDITY",
    "RENEW_BEFORE",
    "CertificateAuthority",
    "Leaf",
    "default_confdir",
]

logger = logging.getLogger(__name__)

#: How long a newly created CA certificate is valid.
CA_VALIDITY = timedelta(days=3650)
#: Longest leaf validity, notBefore to notAfter, backdating included (the CA/Browser Forum 200-day limit).
LEAF_VALIDITY = timedelta(days=199)
#: How far a leaf's notBefore lies in the past, so clients whose clocks run slow still accept it.
LEAF_BACKDATE = timedelta(days=2)
#: A cached leaf (and every SSLContext holding it) is re-issued once it is this close to its notAfter.
RENEW_BEFORE = timedelta(days=7)

_CERT_NAME = "oisp-ca.pem"
_KEY_NAME = "oisp-ca-key.pem"
_CONSTRAINED_STEM = "oisp-ca-nc-"
_LOOPBACK_SUBTREES: tuple[IPv4Network | IPv6Network, ...] = (
    ip_network("127.0.0.0/8"),
    ip_network("::1/128"),
)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# POSIX mode bits are what protect the key there; on Windows they do not reflect ACLs (the per-user
# %LOCALAPPDATA% is what protects it), so the group/other check only means something on POSIX.
_POSIX_FILE_MODES = os.name == "posix"
#: How long to wait for the other half of a CA pair that another process is creating right now.
_PAIR_WAIT_SECONDS = 2.0

_IPAddress = IPv4Address | IPv6Address
_K = TypeVar("_K")
_V = TypeVar("_V")


def default_confdir() -> Path:
    """Return the per-user directory where oisp keeps its CA unless told otherwise.

    ``%LOCALAPPDATA%\\oisp`` on Windows, ``~/Library/Application Support/oisp`` on macOS, and
    ``$XDG_CONFIG_HOME/oisp`` (``~/.config/oisp`` when unset or not absolute) elsewhere.
    """
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else Path.home() / "AppData" / "Local") / "oisp"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "oisp"
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config") / "oisp"


@attrs.frozen
class Leaf:
    """A server certificate for one host, signed by the oisp CA, with its private key."""

    #: The normalized host it was issued for: a lower-case DNS name (A-label) or an IP address.
    host: str
    #: The parsed certificate.
    certificate: x509.Certificate
    #: The certificate alone, PEM.
    cert_pem: bytes
    #: The certificate followed by the CA certificate, PEM: what a server presents.
    chain_pem: bytes
    #: The leaf key; shared by all leaves of one CertificateAuthority instance.
    private_key: ec.EllipticCurvePrivateKey = attrs.field(repr=False, eq=False)
    #: Start of validity (UTC).
    not_before: datetime
    #: End of validity (UTC).
    not_after: datetime


class CertificateAuthority:
    """The local CA oisp signs interception certificates with; create it with :meth:`load_or_create`.

    Issues a :class:`Leaf` per host and a server-side :class:`ssl.SSLContext` per (host, ALPN) pair, both
    cached in bounded LRU caches that drop entries close to expiry (:data:`RENEW_BEFORE`) so they are
    re-issued. All methods are thread-safe.
    """

    def __init__(
        self,
        *,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
        cert_path: Path,
        key_path: Path,
        permitted_domains: tuple[str, ...] | None = None,
        clock: Callable[[], datetime] | None = None,
        cache_size: int = 256,
    ) -> None:
        """Wrap an already loaded CA; normally use :meth:`load_or_create`, which validates the files first.

        ``clock`` returns the current time as an aware UTC datetime (tests inject one); ``cache_size`` bounds
        the leaf cache and the SSLContext cache separately.
        """
        if cache_size < 1:
            raise ConfigurationError(f"cache_size must be at least 1, got {cache_size}")
        self._certificate = certificate
        self._key = private_key
        self._cert_path = cert_path
        self._key_path = key_path
        self._permitted = permitted_domains
        self._clock = clock or _utcnow
        self._cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self._ca_not_before = certificate.not_valid_before_utc
        self._ca_not_after = certificate.not_valid_after_utc
        self._cert_der = certificate.public_bytes(serialization.Encoding.DER)
        self._lock = threading.Lock()
        self._leaves: _ExpiringLru[str, Leaf] = _ExpiringLru(cache_size)
        self._contexts: _ExpiringLru[tuple[str, tuple[str, ...] | None], ssl.SSLContext] = _ExpiringLru(cache_size)
        self._scratch: str | None = None

        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        prototype = (
            _leaf_template(certificate, private_key.public_key(), self._leaf_key.public_key())
            .subject_name(x509.Name([]))
            .serial_number(1)
            .not_valid_before(self._ca_not_before)
            .not_valid_after(self._ca_not_after)
            .sign(private_key, hashes.SHA256())
        )
        self._encoder = LeafEncoder(prototype, private_key)

    # -- creation and loading -------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        confdir: str | os.PathLike[str] | None = None,
        *,
        permitted_domains: Sequence[str] | None = None,
        clock: Callable[[], datetime] | None = None,
        cache_size: int = 256,
    ) -> CertificateAuthority:
        """Load the CA from ``confdir`` (default :func:`default_confdir`), creating it on first use.

        A new CA is an EC P-256 key and a self-signed certificate valid for :data:`CA_VALIDITY`. The directory
        is created with mode 0700 if absent; the key file is written with mode 0600 from its creation on.
        With ``permitted_domains`` (DNS names such as ``"openai.com"``; each also permits its subdomains) the
        CA is name-constrained and kept in its own pair of files (see the module documentation).

        Raises :class:`~oisp.errors.CertificateError` when the files cannot be read or written, the key is
        accessible by other users, the pair is corrupt, incomplete or mismatched, or the CA has expired;
        :class:`~oisp.errors.ConfigurationError` when a permitted domain is not a DNS name.
        """
        directory = Path(confdir) if confdir is not None else default_confdir()
        domains = _normalize_permitted(permitted_domains) if permitted_domains is not None else None
        cert_path, key_path = _pair_paths(directory, domains)
        _ensure_private_dir(directory)
        now = (clock or _utcnow)()
        if not (os.path.lexists(cert_path) or os.path.lexists(key_path)):
            _create_pair(cert_path, key_path, domains, now)
        certificate, key = _load_pair(cert_path, key_path, domains, now)
        return cls(
            certificate=certificate,
            private_key=key,
            cert_path=cert_path,
            key_path=key_path,
            permitted_domains=domains,
            clock=clock,
            cache_size=cache_size,
        )

    # -- the CA certificate -----------------------------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._certificate

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM: what users install as a trusted root."""
        return self._cert_pem

    @property
    def cert_der(self) -> bytes:
        """The CA certificate, DER (``.cer``/``.crt`` for trust stores that want binary)."""
        return self._cert_der

    @property
    def cert_path(self) -> Path:
        """Where the CA certificate is stored."""
        return self._cert_path

    @property
    def key_path(self) -> Path:
        """Where the CA key is stored (mode 0600)."""
        return self._key_path

    @property
    def permitted_domains(self) -> tuple[str, ...] | None:
        """The DNS subtrees this CA is constrained to, normalized and sorted; ``None`` when unconstrained."""
        return self._permitted

    @property
    def fingerprint_sha256(self) -> str:
        """SHA-256 of the DER certificate as upper-case hex pairs joined by colons, as trust-store UIs show."""
        return self._certificate.fingerprint(hashes.SHA256()).hex(":").upper()

    def export(self, fmt: Literal["pem", "der"]) -> bytes:
        """Return the CA certificate (never the key) in ``fmt``, for installing it into a trust store."""
        if fmt == "pem":
            return self._cert_pem
        if fmt == "der":
            return self._cert_der
        raise ConfigurationError(f"export format must be 'pem' or 'der', got {fmt!r}")

    # -- leaves and server contexts ----------------------------------------------------------------------

    def leaf_for(self, host: str) -> Leaf:
        """Return a leaf certificate for ``host``, an SNI name or an IP literal, from the cache or newly signed.

        Names get a DNS subjectAltName, IP literals (``[...]`` brackets and IPv6 zones allowed) an IP one.
        Raises :class:`~oisp.errors.CertificateError` when ``host`` is not a valid name or address, or when
        this CA is name-constrained and ``host`` is outside its permitted domains (clients would refuse it).
        """
        name, address = _normalize_host(host)
        with self._lock:
            return self._leaf_locked(name, address)

    def server_context(self, host: str, alpn: Sequence[str] | None) -> ssl.SSLContext:
        """Return a server-side SSLContext presenting ``host``'s leaf and the CA, for the client-facing side.

        ``alpn`` is set exactly as given (the proxy passes the single protocol the upstream selected);
        ``None`` leaves ALPN unset. The context accepts TLS 1.2 and newer. Contexts are cached per
        (host, ALPN) and must not be modified by callers. Raises :class:`~oisp.errors.CertificateError` as
        :meth:`leaf_for` does, and ``ValueError`` for a protocol name that is not ASCII or over 255 bytes.
        """
        name, address = _normalize_host(host)
        key = (name, tuple(alpn) if alpn is not None else None)
        with self._lock:
            now = self._clock()
            context = self._contexts.get(key, now)
            if context is not None:
                return context
            leaf = self._leaf_locked(name, address)
            context = self._build_context(leaf, key[1])
            self._contexts.put(key, leaf, context)
            return context

    def _leaf_locked(self, name: str, address: _IPAddress | None) -> Leaf:
        now = self._clock()
        leaf = self._leaves.get(name, now)
        if leaf is None:
            if not self._permits(name, address):
                raise CertificateError(
                    f"refusing to issue a certificate for {name!r}: this CA is name-constrained to "
                    f"{', '.join(self._permitted or ())} and loopback addresses, so clients would reject it; "
                    "add the domain to the permitted domains (this creates a new CA to install) or use the "
                    "unconstrained CA"
                )
            leaf = self._issue(name, address, now)
            self._leaves.put(name, leaf, leaf)
        return leaf

    def _permits(self, name: str, address: _IPAddress | None) -> bool:
        if self._permitted is None:
            return True
        if address is not None:
            return any(address in network for network in _LOOPBACK_SUBTREES)
        return any(name == domain or name.endswith("." + domain) for domain in self._permitted)

    def _issue(self, name: str, address: _IPAddress | None, now: datetime) -> Leaf:
        if now >= self._ca_not_after:
            raise CertificateError(
                f"the CA {self._cert_path} expired on {self._ca_not_after:%Y-%m-%d}; remove {self._cert_path} and "
                f"{self._key_path} to create a new CA (then install the new certificate) and restart"
            )
        # Certificates hold whole seconds; round up so the backdating never exceeds LEAF_BACKDATE.
        earliest = now - LEAF_BACKDATE
        if earliest.microsecond:
            earliest = earliest.replace(microsecond=0) + timedelta(seconds=1)
        not_before = max(earliest, self._ca_not_before)
        # X.509 validity includes both ends, so notAfter - notBefore + 1s is the validity period.
        not_after = min(not_before + LEAF_VALIDITY - timedelta(seconds=1), self._ca_not_after)
        # CN is optional and capped at 64 characters. IPs get none: OpenSSL checks a CN that looks like a
        # host name against DNS name constraints when there is no DNS SAN, and "127.0.0.1" looks like one.
        der = self._encoder.encode(
            serial=x509.random_serial_number(),
            not_before=not_before,
            not_after=not_after,
            common_name=name if address is None and len(name) <= 64 else None,
            address=address,
            dns_name=name,
        )
        certificate = x509.load_der_x509_certificate(der)
        cert_pem = _der_to_pem(der)
        logger.debug("issued leaf for %s, valid until %s", name, not_after)
        return Leaf(
            host=name,
            certificate=certificate,
            cert_pem=cert_pem,
            chain_pem=cert_pem + self._cert_pem,
            private_key=self._leaf_key,
            not_before=not_before,
            not_after=not_after,
        )

    def _build_context(self, leaf: Leaf, alpn: tuple[str, ...] | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn is not None:
            context.set_alpn_protocols(list(alpn))
        # load_cert_chain only reads files: write chain and key into our private 0700 directory, load them,
        # and delete the file at once so the leaf key is on disk only for that moment.
        path = os.path.join(self._scratch_dir(), secrets.token_hex(8) + ".pem")
        try:
            _write_exclusive(path, leaf.chain_pem + self._leaf_key_pem, 0o600, durable=False)
            context.load_cert_chain(path)
        except (OSError, ssl.SSLError) as error:
            raise CertificateError(
                f"cannot load the certificate for {leaf.host} into an SSLContext: {error}"
            ) from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return context

    def _scratch_dir(self) -> str:
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="oisp-tls-")  # created 0700
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch


# -- caches ------------------------------------------------------------------------------------------------


class _ExpiringLru(Generic[_K, _V]):
    """A bounded LRU map whose entries depend on a leaf; entries whose leaf is due for renewal are dropped.

    Not locked: the CertificateAuthority holds its lock around every use.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._entries: OrderedDict[_K, tuple[Leaf, _V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _K, now: datetime) -> _V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        leaf, value = entry
        if not (leaf.not_before <= now < leaf.not_after - RENEW_BEFORE):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: _K, leaf: Leaf, value: _V) -> None:
        self._entries[key] = (leaf, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)


# -- names -------------------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _to_a_label(name: str) -> str:
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna").decode("ascii")
    return name


def _dns_name(raw: str) -> str | None:
    """Return ``raw`` as a normalized DNS name (lower case, A-labels, no trailing dot), or None if invalid."""
    name = raw.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    try:
        name = _to_a_label(name)
    except UnicodeError:
        return None
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        return None
    return name


def _normalize_host(host: str) -> tuple[str, _IPAddress | None]:
    """Split a host into its normalized name and, for IP literals, the address."""
    candidate = host.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    if ":" in candidate or candidate[-1:].isdigit():  # cheap pre-check: names rarely end in a digit
        try:
            address = ip_address(candidate.split("%", 1)[0])  # an IPv6 zone cannot go into a certificate
        except ValueError:
            pass
        else:
            return str(address), address
    name = _dns_name(candidate)
    if name is None:
        raise CertificateError(f"cannot issue a certificate for {host!r}: not a DNS name or an IP address")
    return name, None


def _normalize_permitted(domains: Sequence[str]) -> tuple[str, ...]:
    if isinstance(domains, str):
        raise ConfigurationError(f"permitted_domains must be a list of domains, not the string {domains!r}")
    normalized = []
    for raw in domains:
        name = _dns_name(raw)
        if name is None:
            raise ConfigurationError(
                f"permitted domain {raw!r} is not a DNS name; give plain domains such as 'openai.com' "
                "(each also permits all its subdomains; no '*' or leading '.')"
            )
        normalized.append(name)
    if not normalized:
        raise ConfigurationError("permitted_domains is empty; give at least one domain, or None for no constraints")
    return tuple(sorted(set(normalized)))


def _pair_paths(directory: Path, domains: tuple[str, ...] | None) -> tuple[Path, Path]:
    if domains is None:
        return directory / _CERT_NAME, directory / _KEY_NAME
    digest = hashlib.sha256("\n".join(domains).encode("ascii")).hexdigest()[:12]
    return directory / f"{_CONSTRAINED_STEM}{digest}.pem", directory / f"{_CONSTRAINED_STEM}{digest}-key.pem"


# -- building certificates ---------------------------------------------------------------------------------


def _build_ca(key: ec.EllipticCurvePrivateKey, domains: tuple[str, ...] | None, now: datetime) -> x509.Certificate:
    label = "oisp name-constrained CA" if domains else "oisp CA"
    # A random suffix keeps CAs from different machines apart in trust-store UIs.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oisp"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {secrets.token_hex(4)}"),
        ]
    )
    now = now.replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if domains is not None:
        builder = builder.add_extension(_name_constraints(domains), critical=True)
    return builder.sign(key, hashes.SHA256())


def _name_constraints(domains: tuple[str, ...]) -> x509.NameConstraints:
    subtrees: list[x509.GeneralName] = [x509.DNSName(domain) for domain in domains]
    subtrees += [x509.IPAddress(network) for network in _LOOPBACK_SUBTREES]
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None)


def _leaf_template(
    ca: x509.Certificate, ca_public_key: ec.EllipticCurvePublicKey, leaf_public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """A builder holding what every leaf of this CA shares; the prototype for :class:`LeafEncoder`."""
    try:
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_public_key)
    return (
        x509.CertificateBuilder()
        .issuer_name(ca.subject)
        .public_key(leaf_public_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_public_key), critical=False)
    )


def _der_to_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)  # 76-character lines; PEM readers accept any line length up to 76
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


# -- files -------------------------------------------------------------------------------------------------


def _ensure_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise CertificateError(f"{directory} exists and is not a directory; oisp keeps its CA there") from None
    except OSError as error:
        raise CertificateError(f"cannot create the CA directory {directory}: {error.strerror}") from error
    else:
        logger.info("created CA directory %s", directory)


def _write_exclusive(path: str | Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from the first instant and write ``data``.

    ``durable`` fsyncs the file: wanted for the CA, pointless for a scratch file deleted right away.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _publish(data: bytes, final: Path, mode: int) -> None:
    """Write ``data`` to ``final`` atomically: into a temporary name in the same directory, then linked.

    A hard link never replaces an existing file, so two processes creating the CA at once cannot end up with
    one's key beside the other's certificate; the loser gets FileExistsError.
    """
    temporary = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    _write_exclusive(temporary, data, mode)
    try:
        try:
            os.link(temporary, final)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: fall back to rename
            os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on every OS; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_pair(cert_path: Path, key_path: Path, domains: tuple[str, ...] | None, now: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build_ca(key, domains, now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # The key goes first: a certificate is only ever published by the process whose key is on disk.
        _publish(key_pem, key_path, 0o600)
    except FileExistsError:
        logger.info("another process created %s first; using its CA", key_path)
        return
    except OSError as error:
        raise CertificateError(f"cannot write the CA key {key_path}: {error.strerror}") from error
    try:
        _publish(certificate.public_bytes(serialization.Encoding.PEM), cert_path, 0o644)
    except OSError as error:
        raise CertificateError(f"cannot write the CA certificate {cert_path}: {error.strerror}") from error
    logger.info("created CA %s (key %s)", cert_path, key_path)


def _wait_for_pair(cert_path: Path, key_path: Path) -> None:
    """Give a process that is creating the pair right now a moment to publish its second file."""
    deadline = time.monotonic() + _PAIR_WAIT_SECONDS
    while not (cert_path.exists() and key_path.exists()):
        if time.monotonic() >= deadline:
            present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            raise CertificateError(
                f"found {present} but not {missing}: the CA is incomplete; remove {present} to create a new "
                "CA (and install the new certificate where the old one was trusted)"
            )
        time.sleep(0.01)


def _load_pair(
    cert_path: Path, key_path: Path, domains: tuple[str, ...] | None, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    _wait_for_pair(cert_path, key_path)
    recreate = f"remove {cert_path} and {key_path} to create a new CA (then install the new certificate)"
    key = _read_private_key(key_path, recreate)
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as error:
        raise CertificateError(f"cannot read the CA certificate {cert_path}: {error.strerror}") from error
    except ValueError as error:
        raise CertificateError(f"{cert_path} is not a PEM certificate ({error}); {recreate}") from error
    public_der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public_der) != key.public_key().public_bytes(*public_der):
        raise CertificateError(f"{cert_path} and {key_path} do not belong together (different keys); {recreate}")
    try:
        certificate.verify_directly_issued_by(certificate)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{cert_path} is not a self-signed CA certificate; {recreate}")
    try:
        found = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        found = None
    expected = _name_constraints(domains) if domains is not None else None
    if found != expected:
        raise CertificateError(f"{cert_path} has name constraints {found}, expected {expected}; {recreate}")
    if now >= certificate.not_valid_after_utc:
        raise CertificateError(f"the CA {cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; {recreate}")
    return certificate, key


def _read_private_key(path: Path, recreate: str) -> ec.EllipticCurvePrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise CertificateError(f"cannot read the CA key {path}: {error.strerror}") from error
    with open(fd, "rb") as file:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if _POSIX_FILE_MODES and mode & 0o077:
            raise CertificateError(
                f"the CA key {path} is accessible by other users (mode {mode:04o}); whoever can read it can "
                f"intercept this machine's TLS traffic. Fix it with: chmod 600 {path}"
            )
        data = file.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as error:  # encrypted
        raise CertificateError(f"the CA key {path} is encrypted; oisp needs an unencrypted key ({error})") from error
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{path} is not a readable PEM private key ({error}); {recreate}") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"the CA key {path} is a {type(key).__name__}, oisp needs an EC key; {recreate}")
    return key
