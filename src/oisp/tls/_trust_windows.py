"""Windows: the ``Root`` certificate store of the current user (default) or of the machine, through ``certutil``.

``certutil`` names certificates by their SHA-1 thumbprint; oisp names them by SHA-256. The thumbprint of a
certificate known only by its SHA-256 fingerprint is found among the roots Windows reports to Python
(``ssl.enum_certificates``, the union of the user's and the machine's stores); ``certutil -store`` then says
whether it is in the store this instance manages.

Adding to or deleting from the *current user's* ``Root`` store makes Windows show a confirmation dialog;
``certutil`` reports a refusal as ERROR_CANCELLED. The machine store needs an elevated (administrator) prompt.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import subprocess
from collections.abc import Callable

from oisp.errors import CertificateError
from oisp.tls._trust_common import (
    CommandRunner,
    TrustStorePermissionError,
    command_output,
    normalize_fingerprint,
    run_command,
    single_certificate,
    temporary_certificate_file,
)

logger = logging.getLogger(__name__)

_ACCESS_DENIED = ("0x80070005", "e_accessdenied", "error_access_denied")
_CANCELLED = ("0x800704c7", "error_cancelled")


def _enumerated_roots() -> list[bytes]:
    enum_certificates = getattr(ssl, "enum_certificates", None)  # exists only in Windows builds of Python
    if enum_certificates is None:
        return []
    return [der for der, encoding, _trust in enum_certificates("ROOT") if encoding == "x509_asn"]


class WindowsRootStore:
    """The ``Root`` store of the current user or, with ``machine``, of the local machine."""

    def __init__(
        self,
        *,
        machine: bool = False,
        run: CommandRunner = run_command,
        roots: Callable[[], list[bytes]] = _enumerated_roots,
    ) -> None:
        """``run`` and ``roots`` (DER certificates of all Root stores) are replaced by tests."""
        self.machine = machine
        self._scope = [] if machine else ["-user"]
        self._run = run
        self._roots = roots

    def describe(self) -> str:
        """Which Root store this is."""
        if self.machine:
            return r"Windows machine Root store (Cert:\LocalMachine\Root, certutil)"
        return r"Windows current-user Root store (Cert:\CurrentUser\Root, certutil)"

    def contains(self, fingerprint: str) -> bool:
        """True when this store holds the certificate."""
        thumbprint = self._thumbprint(normalize_fingerprint(fingerprint))
        return thumbprint is not None and self._has_thumbprint(thumbprint)

    def install(self, cert_pem: bytes) -> bool:
        """``certutil [-user] -addstore Root``; the user store asks for confirmation in a dialog."""
        _, der = single_certificate(cert_pem)
        thumbprint = hashlib.sha1(der, usedforsecurity=False).hexdigest()
        if self._has_thumbprint(thumbprint):
            return False
        with temporary_certificate_file(der, ".cer") as path:
            result = self._run(["certutil", *self._scope, "-addstore", "Root", str(path)])
        self._check(result, "add the CA to")
        if not self._has_thumbprint(thumbprint):
            raise CertificateError(f"certutil reported success but the CA is not in the {self.describe()}")
        return True

    def uninstall(self, fingerprint: str) -> bool:
        """``certutil [-user] -delstore Root <thumbprint>``; the user store asks for confirmation in a dialog."""
        thumbprint = self._thumbprint(normalize_fingerprint(fingerprint))
        if thumbprint is None or not self._has_thumbprint(thumbprint):
            return False
        result = self._run(["certutil", *self._scope, "-delstore", "Root", thumbprint])
        self._check(result, "remove the CA from")
        if self._has_thumbprint(thumbprint):
            raise CertificateError(f"certutil reported success but the CA is still in the {self.describe()}")
        return True

    def _thumbprint(self, digits: str) -> str | None:
        for der in self._roots():
            if hashlib.sha256(der).hexdigest() == digits:
                return hashlib.sha1(der, usedforsecurity=False).hexdigest()
        return None

    def _has_thumbprint(self, thumbprint: str) -> bool:
        return self._run(["certutil", *self._scope, "-store", "Root", thumbprint]).returncode == 0

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode == 0:
            return
        output = command_output(result)
        lowered = output.lower()
        if any(code in lowered for code in _ACCESS_DENIED):
            raise TrustStorePermissionError(
                f"Windows denied access to {what} the {self.describe()} ({output}); the machine store needs an "
                "administrator",
                elevation="{command}   (in a terminal started with 'Run as administrator')",
                join=subprocess.list2cmdline,
            )
        if any(code in lowered for code in _CANCELLED):
            raise CertificateError(
                f"the Windows security dialog was declined, so oisp did not {what} the {self.describe()}; run the "
                "command again and answer Yes (or use --machine from an administrator prompt: no dialog)"
            )
        raise CertificateError(f"certutil could not {what} the {self.describe()}: {output}")
