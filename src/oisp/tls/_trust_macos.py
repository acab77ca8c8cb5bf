"""macOS: the login keychain with user trust settings (default), or the System keychain with admin trust settings.

Installing is ``security add-trusted-cert -r trustRoot`` (plus ``-d`` for the admin domain), which adds the
certificate to the keychain *and* marks it trusted; uninstalling undoes both: ``security remove-trusted-cert``
(the trust setting) and ``security delete-certificate -Z <sha1>`` (the certificate). Changing user trust
settings makes macOS ask for the login password in a dialog, so it needs a logged-in desktop session; the
System keychain needs root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from oisp.errors import CertificateError
from oisp.tls._trust_common import (
    CommandRunner,
    TrustStorePermissionError,
    command_output,
    normalize_fingerprint,
    pem_certificates,
    run_command,
    single_certificate,
    temporary_certificate_file,
)

logger = logging.getLogger(__name__)

_SYSTEM_KEYCHAIN = Path("/Library/Keychains/System.keychain")
_NO_INTERACTION = ("no user interaction was possible", "authorization was denied", "user canceled")


def _login_keychain() -> Path:
    keychains = Path.home() / "Library" / "Keychains"
    modern = keychains / "login.keychain-db"
    return modern if modern.exists() or not (keychains / "login.keychain").exists() else keychains / "login.keychain"


def _is_root() -> bool:
    return sys.platform != "win32" and os.geteuid() == 0  # this store is macOS-only; Windows has no euid


class MacKeychainStore:
    """The login keychain (user trust) or, with ``machine``, the System keychain (admin trust)."""

    def __init__(
        self,
        *,
        machine: bool = False,
        run: CommandRunner = run_command,
        keychain: Path | None = None,
        is_root: Callable[[], bool] = _is_root,
    ) -> None:
        """``run``, ``keychain`` and ``is_root`` are replaced by tests."""
        self.machine = machine
        self.keychain = keychain or (_SYSTEM_KEYCHAIN if machine else _login_keychain())
        self._domain = ["-d"] if machine else []
        self._run = run
        self._is_root = is_root

    def describe(self) -> str:
        """Which keychain and trust domain this is."""
        domain = "admin" if self.machine else "user"
        return f"macOS keychain {self.keychain} ({domain} trust settings, security)"

    def contains(self, fingerprint: str) -> bool:
        """True when the keychain holds the certificate."""
        return self._find(normalize_fingerprint(fingerprint)) is not None

    def install(self, cert_pem: bytes) -> bool:
        """``security add-trusted-cert [-d] -r trustRoot -k <keychain>``."""
        digits, _ = single_certificate(cert_pem)
        if self._find(digits) is not None:
            return False
        self._require_root("add the CA to")
        with temporary_certificate_file(cert_pem, ".pem") as path:
            result = self._run(
                ["security", "add-trusted-cert", *self._domain, "-r", "trustRoot", "-k", str(self.keychain), str(path)]
            )
        self._check(result, "add the CA to")
        if self._find(digits) is None:
            raise CertificateError(f"security reported success but the CA is not in {self.keychain}")
        return True

    def uninstall(self, fingerprint: str) -> bool:
        """Remove the trust setting, then the certificate (found by its SHA-1 hash) from the keychain."""
        digits = normalize_fingerprint(fingerprint)
        found = self._find(digits)
        if found is None:
            return False
        self._require_root("remove the CA from")
        pem, der = found
        with temporary_certificate_file(pem, ".pem") as path:
            untrust = self._run(["security", "remove-trusted-cert", *self._domain, str(path)])
        if untrust.returncode != 0:
            # No trust setting (someone removed it already) is fine; a refused dialog is not.
            self._check(untrust, "remove the trust setting of the CA in", tolerate_missing=True)
        thumbprint = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
        self._check(self._run(["security", "delete-certificate", "-Z", thumbprint, str(self.keychain)]),
                    "remove the CA from")
        if self._find(digits) is not None:
            raise CertificateError(f"security reported success but the CA is still in {self.keychain}")
        return True

    def _find(self, digits: str) -> tuple[bytes, bytes] | None:
        result = self._run(["security", "find-certificate", "-a", "-p", str(self.keychain)])
        if result.returncode != 0:
            logger.debug("cannot list %s: %s", self.keychain, command_output(result))
            return None
        for pem, der in pem_certificates(result.stdout.encode("ascii", "replace")):
            if hashlib.sha256(der).hexdigest() == digits:
                return pem, der
        return None

    def _require_root(self, what: str) -> None:
        if self.machine and not self._is_root():
            raise TrustStorePermissionError(f"oisp needs root to {what} the System keychain")

    def _check(self, result: subprocess.CompletedProcess[str], what: str, *, tolerate_missing: bool = False) -> None:
        if result.returncode == 0:
            return
        output = command_output(result)
        lowered = output.lower()
        if tolerate_missing and ("could not be found" in lowered or "not found" in lowered):
            return
        if any(phrase in lowered for phrase in _NO_INTERACTION):
            raise CertificateError(
                f"macOS did not allow oisp to {what} {self.keychain} ({output}): changing trust settings asks for "
                "your password in a dialog, so run this in a Terminal of your logged-in desktop session (not over "
                "SSH), and confirm the dialog"
            )
        if "permission" in lowered or "not permitted" in lowered:
            raise TrustStorePermissionError(f"macOS denied permission to {what} {self.keychain} ({output})")
        raise CertificateError(f"security could not {what} {self.keychain}: {output}")
