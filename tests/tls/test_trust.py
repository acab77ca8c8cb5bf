"""Trust stores and the client bundle: the Debian store for real (in a trust directory), the Windows and macOS stores
against fakes of their tools, choosing a store, PKCS#12 for Java, and fingerprints."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import pkcs12

from oisp.errors import CertificateError, ConfigurationError
from oisp.tls import CertificateAuthority
from oisp.tls._trust_common import normalize_fingerprint, pem_certificates
from oisp.tls._trust_linux import AnchorFileStore, debian_trust_dir_store
from oisp.tls._trust_macos import MacKeychainStore
from oisp.tls._trust_windows import WindowsRootStore
from oisp.tls.trust import (
    TrustStorePermissionError,
    client_environment,
    pkcs12_truststore,
    system_trust_store,
    write_client_bundle,
)

needs_update_ca_certificates = pytest.mark.skipif(
    shutil.which("update-ca-certificates", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="needs Debian's update-ca-certificates (apt-get install ca-certificates)",
)


def digits(ca: CertificateAuthority) -> str:
    return ca.certificate.fingerprint(hashes.SHA256()).hex()


def sha1(ca: CertificateAuthority) -> str:
    return ca.certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - certutil and security name certificates so


class FakeTool:
    """Stands in for an OS tool: records each command line and answers with ``handler``."""

    def __init__(self, handler: Callable[[list[str]], tuple[int, str]]) -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[str | None] = []
        self.handler = handler

    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        self.calls.append(command)
        self.inputs.append(input)
        code, output = self.handler(command)
        return subprocess.CompletedProcess(command, code, stdout=output, stderr="")


# -- fingerprints ----------------------------------------------------------------------------------------------


def test_fingerprints_are_accepted_with_colons_in_either_case_and_junk_is_refused(ca: CertificateAuthority) -> None:
    assert normalize_fingerprint(ca.fingerprint_sha256) == digits(ca)
    assert normalize_fingerprint(digits(ca).upper()) == digits(ca)
    with pytest.raises(ConfigurationError, match="64 hex digits"):
        normalize_fingerprint("ab:cd")


# -- the Debian store in a trust directory (real update-ca-certificates) ----------------------------------------


@needs_update_ca_certificates
def test_trust_dir_install_contains_uninstall_round_trip(tmp_path: Path, ca: CertificateAuthority) -> None:
    store = debian_trust_dir_store(tmp_path / "trust")
    assert not store.contains(ca.fingerprint_sha256)
    assert store.install(ca.cert_pem) is True
    assert store.contains(ca.fingerprint_sha256)
    assert store.install(ca.cert_pem) is False
    bundle = tmp_path / "trust" / "certs" / "ca-certificates.crt"
    assert ca.cert_pem.strip() in bundle.read_bytes()
    assert store.uninstall(ca.fingerprint_sha256) is True
    assert not store.contains(ca.fingerprint_sha256)
    assert store.uninstall(ca.fingerprint_sha256) is False
    assert list((tmp_path / "trust" / "local").iterdir()) == []


def recording_hook(trust: Path) -> Path:
    """Put a hook into the trust directory that appends what it is told to a log; returns the log."""
    log = trust.parent / "hook.log"
    (trust / "hooks").mkdir(parents=True)
    hook = trust / "hooks" / "record"
    hook.write_text(f"#!/bin/sh\ncat >> '{log}'\n")
    hook.chmod(0o755)
    return log


@needs_update_ca_certificates
def test_hooks_hear_of_the_addition_from_the_refresh_and_of_the_removal_from_oisp(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    # Debian's update-ca-certificates never reports a removed local certificate to its hooks (Java's keystore
    # is one), so oisp does, with the line the script would have written.
    trust = tmp_path / "trust"
    log = recording_hook(trust)
    store = debian_trust_dir_store(trust)
    link = f"{trust}/certs/oisp-ca.pem"
    store.install(ca.cert_pem)
    assert f"+{link}" in log.read_text().splitlines()
    log.write_text("")
    store.uninstall(ca.fingerprint_sha256)
    lines = log.read_text().splitlines()
    assert lines[-1] == f"-{link}"
    assert f"+{link}" not in lines


@needs_update_ca_certificates
def test_uninstall_heals_the_bundle_the_refresh_leaves_behind_when_no_certificate_is_left(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    # With an empty root list, update-ca-certificates has nothing to write and keeps the old bundle.
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "ca-certificates.conf").write_bytes(b"")
    store = debian_trust_dir_store(tmp_path / "trust")
    store.install(ca.cert_pem)
    bundle = tmp_path / "trust" / "certs" / "ca-certificates.crt"
    assert len(pem_certificates(bundle.read_bytes())) == 1
    assert store.uninstall(ca.fingerprint_sha256) is True
    assert pem_certificates(bundle.read_bytes()) == []
    assert not store.contains(ca.fingerprint_sha256)


@needs_update_ca_certificates
def test_installing_a_new_oisp_ca_replaces_the_previous_one_in_the_oisp_slot(
        tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    log = recording_hook(tmp_path / "trust")
    store = debian_trust_dir_store(tmp_path / "trust")
    store.install(other.cert_pem)
    log.write_text("")
    with caplog.at_level(logging.WARNING):
        assert store.install(ca.cert_pem) is True
    assert "replacing it" in caplog.text
    assert store.contains(ca.fingerprint_sha256)
    assert not store.contains(other.fingerprint_sha256)
    # Same file name, so the refresh reports nothing; the hooks (Java) must still swap the certificate.
    link = f"{tmp_path / 'trust'}/certs/oisp-ca.pem"
    assert log.read_text().splitlines()[-2:] == [f"-{link}", f"+{link}"]


@needs_update_ca_certificates
def test_uninstall_refuses_to_claim_success_while_another_file_keeps_the_ca_trusted(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    store = debian_trust_dir_store(tmp_path / "trust")
    store.install(ca.cert_pem)
    (tmp_path / "trust" / "local" / "someone-elses.crt").write_bytes(ca.cert_pem)
    with pytest.raises(CertificateError, match=r"still trusted: .*someone-elses\.crt"):
        store.uninstall(ca.fingerprint_sha256)
    # Now only the other file holds it: not oisp's to remove.
    with pytest.raises(CertificateError, match=r"oisp did not add it: .*someone-elses\.crt"):
        store.uninstall(ca.fingerprint_sha256)
    assert (tmp_path / "trust" / "local" / "someone-elses.crt").exists()


# -- the anchor store's failure handling (fake refresh) ------------------------------------------------------


def anchor_store(tmp_path: Path, tool: FakeTool) -> AnchorFileStore:
    (tmp_path / "anchors").mkdir()
    return AnchorFileStore(
        title="test store",
        anchor=tmp_path / "anchors" / "oisp-ca.pem",
        bundle=tmp_path / "bundle.pem",
        install_command=("sh",),  # found on PATH; the fake runs instead
        uninstall_command=("sh",),
        package_hint="",
        run=tool,
    )


def test_a_failed_refresh_takes_the_new_anchor_back_out(tmp_path: Path, ca: CertificateAuthority) -> None:
    store = anchor_store(tmp_path, FakeTool(lambda argv: (1, "boom")))
    with pytest.raises(CertificateError, match="failed with exit code 1: boom"):
        store.install(ca.cert_pem)
    assert list((tmp_path / "anchors").iterdir()) == []


def test_a_refresh_denied_for_lack_of_root_is_a_permission_error_and_changes_nothing(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    store = anchor_store(tmp_path, FakeTool(lambda argv: (1, "ln: failed: Permission denied")))
    with pytest.raises(TrustStorePermissionError) as raised:
        store.install(ca.cert_pem)
    assert raised.value.how_to_run(["oisp", "ca", "install"]) == "sudo oisp ca install"
    assert list((tmp_path / "anchors").iterdir()) == []


def test_a_failed_refresh_during_uninstall_puts_the_anchor_back(tmp_path: Path, ca: CertificateAuthority) -> None:
    results = iter([(0, ""), (1, "boom")])

    def refresh(argv: list[str]) -> tuple[int, str]:
        code, output = next(results)
        if code == 0:  # the install's refresh: compile the bundle from the anchor
            (tmp_path / "bundle.pem").write_bytes((tmp_path / "anchors" / "oisp-ca.pem").read_bytes())
        return code, output

    store = anchor_store(tmp_path, FakeTool(refresh))
    store.install(ca.cert_pem)
    with pytest.raises(CertificateError, match="boom"):
        store.uninstall(ca.fingerprint_sha256)
    assert (tmp_path / "anchors" / "oisp-ca.pem").read_bytes() == ca.cert_pem


def test_an_unwritable_anchor_directory_is_a_permission_error(tmp_path: Path, ca: CertificateAuthority,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = anchor_store(tmp_path, FakeTool(lambda argv: (0, "")))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("oisp.tls._trust_linux.replace_file", denied)
    with pytest.raises(TrustStorePermissionError, match=r"cannot write .*oisp-ca\.pem: Permission denied; .*needs "
                                                         r"root"):
        store.install(ca.cert_pem)


# -- Windows, against a fake certutil ---------------------------------------------------------------------------


class FakeCertutil:
    """certutil over an in-memory Root store holding DER certificates."""

    def __init__(self, *, answer: tuple[int, str] | None = None) -> None:
        self.store: list[bytes] = []
        self.answer = answer

    def __call__(self, argv: list[str]) -> tuple[int, str]:
        assert argv[0] == "certutil"
        verb = next(a for a in argv if a.startswith("-") and a != "-user")
        if verb == "-store":
            found = any(hashlib.sha1(der).hexdigest() == argv[-1] for der in self.store)  # noqa: S324
            return (0, "") if found else (-2146885628, "CRYPT_E_NOT_FOUND")
        if self.answer is not None:
            return self.answer
        if verb == "-addstore":
            self.store.append(Path(argv[-1]).read_bytes())
        elif verb == "-delstore":
            self.store = [der for der in self.store if hashlib.sha1(der).hexdigest() != argv[-1]]  # noqa: S324
        return 0, "CertUtil: -addstore command completed successfully."


def test_windows_user_store_adds_deletes_and_finds_by_thumbprint(ca: CertificateAuthority) -> None:
    certutil = FakeCertutil()
    tool = FakeTool(certutil)
    store = WindowsRootStore(run=tool, roots=lambda: certutil.store)
    assert store.install(ca.cert_pem) is True
    assert tool.calls[1][:4] == ["certutil", "-user", "-addstore", "Root"]
    assert certutil.store == [ca.cert_der]
    assert not Path(tool.calls[1][4]).exists()  # the temporary .cer is gone
    assert store.contains(ca.fingerprint_sha256)
    assert store.install(ca.cert_pem) is False
    assert store.uninstall(ca.fingerprint_sha256) is True
    assert ["certutil", "-user", "-delstore", "Root", sha1(ca)] in tool.calls
    assert certutil.store == []
    assert store.uninstall(ca.fingerprint_sha256) is False
    assert "CurrentUser" in store.describe()


def test_windows_machine_store_without_administrator_says_how_to_run_it(ca: CertificateAuthority) -> None:
    certutil = FakeCertutil(answer=(5, "CertUtil: -addstore command FAILED: 0x80070005 (WIN32: 5 ERROR_ACCESS_DENIED)"))
    tool = FakeTool(certutil)
    store = WindowsRootStore(machine=True, run=tool, roots=lambda: certutil.store)
    with pytest.raises(TrustStorePermissionError) as raised:
        store.install(ca.cert_pem)
    assert tool.calls[-1][:3] == ["certutil", "-addstore", "Root"]  # no -user: the machine store
    hint = raised.value.how_to_run([r"C:\Program Files\oisp\oisp.exe", "ca", "install", "--machine"])
    assert hint.startswith('"C:\\Program Files\\oisp\\oisp.exe" ca install --machine')
    assert "Run as administrator" in hint


def test_windows_declined_dialog_is_reported_as_such(ca: CertificateAuthority) -> None:
    certutil = FakeCertutil(answer=(1223, "0x800704c7 (WIN32: 1223 ERROR_CANCELLED)"))
    store = WindowsRootStore(run=FakeTool(certutil), roots=lambda: certutil.store)
    with pytest.raises(CertificateError, match="security dialog was declined"):
        store.install(ca.cert_pem)


# -- macOS, against a fake security -----------------------------------------------------------------------------


class FakeSecurity:
    """security over an in-memory keychain of PEM certificates with a set of trusted SHA-256 fingerprints."""

    def __init__(self, *, add_answer: tuple[int, str] | None = None) -> None:
        self.keychain: list[bytes] = []
        self.trusted: set[str] = set()
        self.add_answer = add_answer

    def __call__(self, argv: list[str]) -> tuple[int, str]:
        assert argv[0] == "security"
        verb = argv[1]
        if verb == "find-certificate":
            return 0, "".join(pem.decode() + "\n" for pem in self.keychain)
        if verb == "add-trusted-cert":
            if self.add_answer is not None:
                return self.add_answer
            pem = Path(argv[-1]).read_bytes()
            self.keychain.append(pem)
            self.trusted.add(hashlib.sha256(pem_certificates(pem)[0][1]).hexdigest())
            return 0, ""
        if verb == "remove-trusted-cert":
            der = pem_certificates(Path(argv[-1]).read_bytes())[0][1]
            self.trusted.discard(hashlib.sha256(der).hexdigest())
            return 0, ""
        if verb == "delete-certificate":
            thumbprint = argv[argv.index("-Z") + 1]
            self.keychain = [
                pem for pem in self.keychain
                if hashlib.sha1(pem_certificates(pem)[0][1]).hexdigest().upper() != thumbprint  # noqa: S324
            ]
            return 0, ""
        raise AssertionError(argv)


def test_macos_login_keychain_install_trusts_and_uninstall_removes_trust_and_certificate(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    security = FakeSecurity()
    tool = FakeTool(security)
    keychain = tmp_path / "login.keychain-db"
    store = MacKeychainStore(run=tool, keychain=keychain, is_root=lambda: False)
    assert store.install(ca.cert_pem) is True
    add = next(call for call in tool.calls if call[1] == "add-trusted-cert")
    assert add[2:6] == ["-r", "trustRoot", "-k", str(keychain)]
    assert digits(ca) in security.trusted
    assert store.install(ca.cert_pem) is False
    assert store.uninstall(ca.fingerprint_sha256) is True
    assert ["security", "delete-certificate", "-Z", sha1(ca).upper(), str(keychain)] in tool.calls
    assert security.keychain == [] and security.trusted == set()
    assert store.uninstall(ca.fingerprint_sha256) is False


def test_macos_system_keychain_needs_root_and_uses_the_admin_domain(tmp_path: Path, ca: CertificateAuthority) -> None:
    security = FakeSecurity()
    tool = FakeTool(security)
    with pytest.raises(TrustStorePermissionError, match="needs root"):
        MacKeychainStore(machine=True, run=tool, is_root=lambda: False).install(ca.cert_pem)
    as_root = MacKeychainStore(machine=True, run=tool, is_root=lambda: True)
    assert as_root.install(ca.cert_pem) is True
    assert tool.calls[-2][:4] == ["security", "add-trusted-cert", "-d", "-r"]
    assert "/Library/Keychains/System.keychain" in tool.calls[-2]


def test_macos_without_a_desktop_session_explains_the_password_dialog(tmp_path: Path,
                                                                      ca: CertificateAuthority) -> None:
    answer = (1, "SecTrustSettingsSetTrustSettings: The authorization was denied since no user interaction was "
                 "possible.")
    store = MacKeychainStore(run=FakeTool(FakeSecurity(add_answer=answer)), keychain=tmp_path / "k",
                             is_root=lambda: False)
    with pytest.raises(CertificateError, match="logged-in desktop session"):
        store.install(ca.cert_pem)


# -- choosing the store -----------------------------------------------------------------------------------------


def test_one_function_chooses_the_store_by_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert isinstance(system_trust_store(), WindowsRootStore)
    assert system_trust_store(machine=True).machine is True  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "platform", "darwin")
    assert isinstance(system_trust_store(), MacKeychainStore)
    monkeypatch.setattr(sys, "platform", "linux")
    assert "trust directory" in system_trust_store(trust_dir=tmp_path).describe()
    monkeypatch.setattr("oisp.tls._trust_linux.detect_linux_store", lambda: None)
    with pytest.raises(CertificateError, match="oisp ca env"):
        system_trust_store()


# -- the client bundle ------------------------------------------------------------------------------------------


def test_client_bundle_holds_the_system_roots_and_the_ca_and_is_rewritten_only_when_stale(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    bundle = tmp_path / "bundle.pem"
    assert write_client_bundle(ca.cert_pem, bundle) is True
    certificates = pem_certificates(bundle.read_bytes())
    assert len(certificates) > 10, "the system roots are missing"
    assert certificates[-1][1] == ca.cert_der
    assert write_client_bundle(ca.cert_pem, bundle) is False
    bundle.write_bytes(bundle.read_bytes()[:-200])
    assert write_client_bundle(ca.cert_pem, bundle) is True
    assert pem_certificates(bundle.read_bytes()) == certificates
    ssl.create_default_context(cafile=str(bundle))  # OpenSSL loads it


def test_client_bundle_ignores_ssl_cert_file_pointing_at_itself_and_keeps_the_ca_once(
        tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle.pem"
    write_client_bundle(ca.cert_pem, bundle)
    before = pem_certificates(bundle.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    bundle.write_bytes(bundle.read_bytes() + b"\n")  # stale, so it is rebuilt from the environment's file
    write_client_bundle(ca.cert_pem, bundle)
    assert pem_certificates(bundle.read_bytes()) == before


def test_client_bundle_keeps_a_custom_ssl_cert_file(tmp_path: Path, ca: CertificateAuthority,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    corporate = CertificateAuthority.load_or_create(tmp_path / "corp")
    monkeypatch.setenv("SSL_CERT_FILE", str(corporate.cert_path))
    bundle = tmp_path / "bundle.pem"
    write_client_bundle(ca.cert_pem, bundle)
    assert [der for _, der in pem_certificates(bundle.read_bytes())] == [corporate.cert_der, ca.cert_der]


def test_client_environment_names_the_bundle_and_gives_node_the_ca_alone(tmp_path: Path) -> None:
    env = client_environment(tmp_path / "bundle.pem", tmp_path / "ca.pem")
    assert env["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "ca.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE",
                 "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        assert env[name] == str(tmp_path / "bundle.pem")
    assert "GIT_SSL_CAINFO" not in env


# -- PKCS#12 ----------------------------------------------------------------------------------------------------


def test_pkcs12_holds_only_the_certificate_and_java_reads_it_as_a_trusted_entry(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    data = pkcs12_truststore(ca.certificate, "oisp CA")
    loaded = pkcs12.load_pkcs12(data, None)
    assert loaded.key is None and loaded.cert is None
    assert [c.certificate for c in loaded.additional_certs] == [ca.certificate]
    assert loaded.additional_certs[0].friendly_name == b"oisp CA"
    keytool = shutil.which("keytool")
    if keytool is None:
        pytest.skip("keytool (Java) is not installed")
    path = tmp_path / "ca.p12"
    path.write_bytes(data)
    listing = subprocess.run([keytool, "-list", "-storetype", "PKCS12", "-keystore", str(path), "-storepass", ""],
                             capture_output=True, text=True, check=False, timeout=60)
    assert "trustedCertEntry" in listing.stdout, listing.stdout + listing.stderr
    assert ca.fingerprint_sha256 in listing.stdout
