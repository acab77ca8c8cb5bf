"""The CA on disk: where it lives, file modes from the first instant, reloading, and refusing unsafe or broken files."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.tls.conftest import PERMITTED, FakeClock

from oisp.errors import CertificateError, ConfigurationError
from oisp.tls import CertificateAuthority, default_confdir
from oisp.tls import ca as ca_module

posix_only = pytest.mark.skipif(os.name != "posix", reason="file mode bits only protect the key on POSIX")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so only the mode oisp asks for protects its files."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# -- default location ---------------------------------------------------------------------------------------


def test_default_confdir_on_windows_is_under_localappdata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", "/users/ann/AppData/Local")
    assert default_confdir() == Path("/users/ann/AppData/Local/oisp")


def test_default_confdir_on_macos_is_application_support(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_confdir() == tmp_path / "Library" / "Application Support" / "oisp"


def test_default_confdir_on_linux_follows_xdg_config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_confdir() == tmp_path / "xdg" / "oisp"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_default_confdir_on_linux_falls_back_to_dot_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert default_confdir() == tmp_path / ".config" / "oisp"


# -- creation -----------------------------------------------------------------------------------------------


def test_first_use_creates_cert_and_key_files(ca: CertificateAuthority, confdir: Path) -> None:
    assert ca.cert_path == confdir / "oisp-ca.pem"
    assert ca.key_path == confdir / "oisp-ca-key.pem"
    assert sorted(path.name for path in confdir.iterdir()) == ["oisp-ca-key.pem", "oisp-ca.pem"]
    assert ca.cert_path.read_bytes() == ca.cert_pem
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


@posix_only
@pytest.mark.usefixtures("umask_zero")
def test_key_is_0600_and_directory_0700_even_with_umask_zero(tmp_path: Path) -> None:
    confdir = tmp_path / "nested" / "conf"
    ca = CertificateAuthority.load_or_create(confdir)
    assert mode(ca.key_path) == 0o600
    assert mode(confdir) == 0o700
    assert mode(ca.cert_path) == 0o644


@posix_only
def test_key_file_is_created_0600_exclusively_before_any_byte_is_written(
    monkeypatch: pytest.MonkeyPatch, confdir: Path
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kwargs: object) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    ca = CertificateAuthority.load_or_create(confdir)
    monkeypatch.undo()

    created = [(path, flags, mode) for path, flags, mode in opened if flags & os.O_CREAT]
    key_writes = [entry for entry in created if "key" in Path(entry[0]).name]
    assert len(key_writes) == 1
    path, flags, file_mode = key_writes[0]
    assert flags & os.O_EXCL
    assert file_mode == 0o600
    assert Path(path).parent == confdir
    assert Path(path) != ca.key_path  # written under a temporary name, then linked into place
    assert not Path(path).exists()


def test_second_load_returns_the_same_ca(ca: CertificateAuthority, confdir: Path) -> None:
    key_before = ca.key_path.read_bytes()
    again = CertificateAuthority.load_or_create(confdir)
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    assert again.key_path.read_bytes() == key_before


def test_creating_over_an_existing_pair_never_replaces_it(ca: CertificateAuthority, clock: FakeClock) -> None:
    # What a process that lost the creation race does: its key must not replace the winner's.
    key_before, cert_before = ca.key_path.read_bytes(), ca.cert_path.read_bytes()
    ca_module._create_pair(ca.cert_path, ca.key_path, None, clock())
    assert ca.key_path.read_bytes() == key_before
    assert ca.cert_path.read_bytes() == cert_before
    assert sorted(path.name for path in ca.cert_path.parent.iterdir()) == ["oisp-ca-key.pem", "oisp-ca.pem"]


def test_export_gives_pem_and_der_of_the_certificate_only(ca: CertificateAuthority) -> None:
    assert ca.export("pem") == ca.cert_pem
    assert ca.export("der") == ca.cert_der
    assert x509.load_der_x509_certificate(ca.export("der")) == x509.load_pem_x509_certificate(ca.export("pem"))
    assert b"PRIVATE" not in ca.export("pem")
    with pytest.raises(ConfigurationError, match="'pem' or 'der'"):
        ca.export("p12")  # type: ignore[arg-type]


def test_fingerprint_is_sha256_of_der_in_colon_hex(ca: CertificateAuthority) -> None:
    import hashlib

    expected = hashlib.sha256(ca.cert_der).hexdigest().upper()
    assert ca.fingerprint_sha256.replace(":", "") == expected
    assert len(ca.fingerprint_sha256.split(":")) == 32


# -- name-constrained CA storage ------------------------------------------------------------------------------


def test_constrained_ca_lives_beside_the_unconstrained_one(ca: CertificateAuthority, confdir: Path) -> None:
    constrained = CertificateAuthority.load_or_create(confdir, permitted_domains=PERMITTED)
    assert constrained.cert_path != ca.cert_path
    assert constrained.key_path != ca.key_path
    assert constrained.cert_path.name.startswith("oisp-ca-nc-")
    assert constrained.fingerprint_sha256 != ca.fingerprint_sha256
    assert CertificateAuthority.load_or_create(confdir).fingerprint_sha256 == ca.fingerprint_sha256
    same = CertificateAuthority.load_or_create(confdir, permitted_domains=["Anthropic.com.", "openai.com"])
    assert same.fingerprint_sha256 == constrained.fingerprint_sha256
    other = CertificateAuthority.load_or_create(confdir, permitted_domains=["openai.com"])
    assert other.cert_path not in {ca.cert_path, constrained.cert_path}


def test_permitted_domains_are_normalized_and_sorted(constrained_ca: CertificateAuthority) -> None:
    assert constrained_ca.permitted_domains == ("anthropic.com", "openai.com")


@pytest.mark.parametrize(
    "domains", [[], ["*.openai.com"], [".openai.com"], ["open ai.com"], ["openai..com"], "openai.com"]
)
def test_invalid_permitted_domains_are_refused(confdir: Path, domains: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        CertificateAuthority.load_or_create(confdir, permitted_domains=domains)
    assert not confdir.exists() or not any(confdir.iterdir())


# -- refusing unsafe or broken files ---------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("exposed", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_readable_or_writable_by_others_is_refused_with_the_fix(
    ca: CertificateAuthority, confdir: Path, exposed: int
) -> None:
    ca.key_path.chmod(exposed)
    with pytest.raises(CertificateError) as caught:
        CertificateAuthority.load_or_create(confdir)
    assert f"chmod 600 {ca.key_path}" in str(caught.value)
    assert f"{exposed:04o}" in str(caught.value)
    ca.key_path.chmod(0o600)
    assert CertificateAuthority.load_or_create(confdir).fingerprint_sha256 == ca.fingerprint_sha256


def test_corrupt_certificate_is_refused(ca: CertificateAuthority, confdir: Path) -> None:
    ca.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="not a PEM certificate.*remove"):
        CertificateAuthority.load_or_create(confdir)


def test_corrupt_key_is_refused(ca: CertificateAuthority, confdir: Path) -> None:
    ca.key_path.write_bytes(b"garbage")
    with pytest.raises(CertificateError, match="not a readable PEM private key.*remove"):
        CertificateAuthority.load_or_create(confdir)


def test_encrypted_key_is_refused(ca: CertificateAuthority, confdir: Path) -> None:
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    ca.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CertificateError, match="encrypted"):
        CertificateAuthority.load_or_create(confdir)


def test_certificate_and_key_of_different_cas_are_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    shutil.copyfile(other.cert_path, ca.cert_path)
    with pytest.raises(CertificateError, match="do not belong together"):
        CertificateAuthority.load_or_create(ca.cert_path.parent)


def test_incomplete_pair_is_refused(ca: CertificateAuthority, confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_module, "_PAIR_WAIT_SECONDS", 0.0)
    ca.cert_path.unlink()
    with pytest.raises(CertificateError, match=f"found {ca.key_path} but not {ca.cert_path}.*incomplete"):
        CertificateAuthority.load_or_create(confdir)


def test_unconstrained_pair_under_a_constrained_name_is_refused(ca: CertificateAuthority, confdir: Path) -> None:
    cert_path, key_path = ca_module._pair_paths(confdir, ca_module._normalize_permitted(PERMITTED))
    shutil.copy(ca.cert_path, cert_path)
    shutil.copy(ca.key_path, key_path)  # copy() keeps the 0600 mode
    with pytest.raises(CertificateError, match="name constraints"):
        CertificateAuthority.load_or_create(confdir, permitted_domains=PERMITTED)


def test_expired_ca_is_refused(confdir: Path, clock: FakeClock) -> None:
    CertificateAuthority.load_or_create(confdir, clock=clock)
    clock.now += timedelta(days=3651)
    with pytest.raises(CertificateError, match="expired on"):
        CertificateAuthority.load_or_create(confdir, clock=clock)


def test_confdir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    occupied = tmp_path / "conf"
    occupied.write_text("not a directory")
    with pytest.raises(CertificateError, match="not a directory"):
        CertificateAuthority.load_or_create(occupied)


def test_cache_size_below_one_is_refused(confdir: Path) -> None:
    with pytest.raises(ConfigurationError, match="cache_size"):
        CertificateAuthority.load_or_create(confdir, cache_size=0)
