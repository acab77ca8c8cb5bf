"""What the trust-store implementations share: running the OS tools, reading PEM, writing files atomically."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from oisp.errors import CertificateError, ConfigurationError

logger = logging.getLogger(__name__)



class CommandRunner(Protocol):
    """Runs a command without a shell and returns its result; trust stores take one so tests can fake OS tools."""

    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` with ``input`` on its standard input (none when None) and capture its output as text."""

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
#: macOS and Windows may wait for the user to answer a password or confirmation dialog.
COMMAND_TIMEOUT = 300.0


class TrustStorePermissionError(CertificateError):
    """Changing the trust store needs privileges (root, an administrator) this process does not have."""

    def __init__(
        self,
        message: str,
        *,
        elevation: str = "sudo {command}",
        join: Callable[[Sequence[str]], str] = shlex.join,
    ) -> None:
        """``elevation`` turns a command line (made by ``join``) into the instruction that runs it privileged."""
        super().__init__(message)
        self.elevation = elevation
        self.join = join

    def how_to_run(self, command: Sequence[str]) -> str:
        """The instruction that runs ``command`` (an argument list) with the privileges this store needs."""
        return self.elevation.format(command=self.join(command))


def normalize_fingerprint(fingerprint: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits; accepts colons, spaces and either case."""
    digits = re.sub(r"[\s:]", "", fingerprint).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise ConfigurationError(
            f"{fingerprint!r} is not a SHA-256 fingerprint: expected 64 hex digits (colons allowed), as "
            "'oisp ca show' prints it"
        )
    return digits


def pem_certificates(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every PEM certificate block in ``data`` as (the PEM block, its DER); undecodable blocks are skipped."""
    found = []
    for match in _PEM_CERTIFICATE.finditer(data):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append((match.group(0), der))
    return found


def single_certificate(cert_pem: bytes) -> tuple[str, bytes]:
    """The SHA-256 fingerprint (64 hex digits) and the DER of the one certificate in ``cert_pem``."""
    found = pem_certificates(cert_pem)
    if len(found) != 1:
        raise CertificateError(f"expected one PEM certificate, found {len(found)}")
    der = found[0][1]
    return hashlib.sha256(der).hexdigest(), der


def holds_fingerprint(data: bytes, fingerprint: str) -> bool:
    """True when one of the PEM certificates in ``data`` has the SHA-256 ``fingerprint`` (64 hex digits)."""
    return any(hashlib.sha256(der).hexdigest() == fingerprint for _, der in pem_certificates(data))


def file_holds_fingerprint(path: Path, fingerprint: str) -> bool:
    """:func:`holds_fingerprint` for a file; False when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return holds_fingerprint(data, fingerprint)


def run_command(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The default :class:`CommandRunner`."""
    logger.info("running %s", shlex.join(argv))
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as error:
        raise CertificateError(f"{argv[0]} was not found; the trust store needs it") from error
    except PermissionError as error:
        raise TrustStorePermissionError(f"cannot run {argv[0]}: {error.strerror}") from error
    except subprocess.TimeoutExpired as error:
        raise CertificateError(
            f"{shlex.join(argv)} did not finish within {COMMAND_TIMEOUT:.0f} seconds (a dialog waiting for an "
            "answer?); try again"
        ) from error
    logger.debug("%s exited %d: %s%s", argv[0], result.returncode, result.stdout, result.stderr)
    return result


def command_output(result: subprocess.CompletedProcess[str], limit: int = 600) -> str:
    """A command's output on one line, trimmed for an error message."""
    text = " ".join((result.stderr + "\n" + result.stdout).split())
    return text if len(text) <= limit else "..." + text[-limit:]


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode``: a hidden temporary file in the same directory, renamed over it.

    The temporary name starts with a dot and has no certificate suffix, so a store refresh running at the
    same moment never picks up a half-written file.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def temporary_certificate_file(data: bytes, suffix: str) -> Iterator[Path]:
    """A temporary file holding ``data`` for a tool that reads certificates from files; removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="oisp-ca-", suffix=suffix)
    try:
        with open(fd, "wb") as file:
            file.write(data)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
