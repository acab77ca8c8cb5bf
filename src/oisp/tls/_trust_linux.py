"""Linux trust stores: an anchor file in the distribution's directory, then the distribution's refresh command.

Debian/Ubuntu read ``*.crt`` files (PEM) below ``/usr/local/share/ca-certificates`` and ``update-ca-certificates``
writes ``/etc/ssl/certs/ca-certificates.crt``; Fedora/RHEL read ``/etc/pki/ca-trust/source/anchors`` and
``update-ca-trust extract`` writes ``/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem``. oisp owns exactly one
anchor file, so uninstalling removes that file and runs the refresh again.

Uninstalling on Debian runs ``update-ca-certificates --fresh`` (as Debian documents for removing a local CA):
without it the symlink and hash link the install created in ``/etc/ssl/certs`` would stay behind, dangling.
Neither run reports a removed local certificate to the hooks in ``/etc/ca-certificates/update.d`` (the script
only reports ``!``-lines of its configuration), so Java's keystore (the ``jks-keystore`` hook) would keep
trusting the CA; oisp therefore tells the hooks itself, exactly as the script does for an addition: the line
``-/etc/ssl/certs/oisp-ca.pem`` on their standard input. The script also leaves the old bundle in place when no
certificate at all is left, so the bundle is checked afterwards and, when it still holds the CA although no
source does, rewritten without it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from oisp.errors import CertificateError
from oisp.tls._trust_common import (
    CommandRunner,
    TrustStorePermissionError,
    command_output,
    file_holds_fingerprint,
    normalize_fingerprint,
    pem_certificates,
    replace_file,
    run_command,
    single_certificate,
)

logger = logging.getLogger(__name__)

_DEBIAN_CONF = Path("/etc/ca-certificates.conf")
_DEBIAN_LOCAL = Path("/usr/local/share/ca-certificates")
_DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_DEBIAN_HOOKS = Path("/etc/ca-certificates/update.d")
_FEDORA_ANCHORS = Path("/etc/pki/ca-trust/source/anchors")
_FEDORA_BUNDLE = Path("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
# Non-login shells of ordinary users often lack the sbin directories the refresh tools live in.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PERMISSION_WORDS = ("permission denied", "operation not permitted", "must be root", "superuser")
_RUN_PARTS_NAME = re.compile(r"[A-Za-z0-9_-]+")  # the names run-parts runs (Debian's default, no --lsbsysinit)


def detect_linux_store(run: CommandRunner = run_command) -> AnchorFileStore | None:
    """The store of this distribution family, recognised by its files; None when neither is present."""
    if _DEBIAN_CONF.exists() or _DEBIAN_LOCAL.is_dir():
        return debian_store(run=run)
    if _FEDORA_ANCHORS.is_dir():
        return fedora_store(run=run)
    return None


def debian_store(run: CommandRunner = run_command) -> AnchorFileStore:
    """Debian/Ubuntu's system store."""
    return AnchorFileStore(
        title="Debian/Ubuntu system trust store",
        anchor=_DEBIAN_LOCAL / "oisp-ca.crt",
        bundle=_DEBIAN_BUNDLE,
        install_command=("update-ca-certificates",),
        uninstall_command=("update-ca-certificates", "--fresh"),
        package_hint="install the ca-certificates package (apt-get install ca-certificates)",
        hooks=_DEBIAN_HOOKS,
        link=Path("/etc/ssl/certs/oisp-ca.pem"),
        run=run,
    )


def debian_trust_dir_store(directory: Path, run: CommandRunner = run_command) -> AnchorFileStore:
    """A Debian-layout store in ``directory``: the system's root list plus what is installed there.

    Layout: ``ca-certificates.conf`` (a copy of the system's list, made on first install), ``local/`` (the
    anchor), ``certs/`` (symlinks, hash links and the bundle ``certs/ca-certificates.crt``). No hooks run.
    """
    root = directory.absolute()
    conf, local, certs = root / "ca-certificates.conf", root / "local", root / "certs"
    options = ("--certsconf", str(conf), "--localcertsdir", str(local), "--etccertsdir", str(certs),
               "--hooksdir", str(root / "hooks"))

    def prepare() -> None:
        local.mkdir(parents=True, exist_ok=True)
        certs.mkdir(exist_ok=True)
        if not conf.exists():
            try:
                system_list = _DEBIAN_CONF.read_bytes()
            except OSError:
                system_list = b""
            conf.write_bytes(system_list)

    return AnchorFileStore(
        title=f"trust directory {root}",
        anchor=local / "oisp-ca.crt",
        bundle=certs / "ca-certificates.crt",
        install_command=("update-ca-certificates", *options),
        uninstall_command=("update-ca-certificates", "--fresh", *options),
        package_hint="a trust directory needs Debian's update-ca-certificates (apt-get install ca-certificates)",
        hooks=root / "hooks",
        link=certs / "oisp-ca.pem",
        prepare=prepare,
        run=run,
    )


def fedora_store(run: CommandRunner = run_command) -> AnchorFileStore:
    """Fedora/RHEL's system store."""
    return AnchorFileStore(
        title="Fedora/RHEL system trust store",
        anchor=_FEDORA_ANCHORS / "oisp-ca.pem",
        bundle=_FEDORA_BUNDLE,
        install_command=("update-ca-trust", "extract"),
        uninstall_command=("update-ca-trust", "extract"),
        package_hint="install the ca-certificates package (dnf install ca-certificates)",
        run=run,
    )


class AnchorFileStore:
    """A store fed by certificate files in a directory and compiled into a bundle by a refresh command."""

    def __init__(
        self,
        *,
        title: str,
        anchor: Path,
        bundle: Path,
        install_command: Sequence[str],
        uninstall_command: Sequence[str],
        package_hint: str,
        hooks: Path | None = None,
        link: Path | None = None,
        prepare: Callable[[], None] | None = None,
        run: CommandRunner = run_command,
    ) -> None:
        """``anchor`` is the one file oisp owns; the commands refresh ``bundle`` after adding or removing it.

        ``hooks`` is a directory of programs told about a removal by the line ``-<link>`` on their standard input,
        where ``link`` is the name the refresh gave the anchor (Debian's update-ca-certificates hooks).
        """
        self.title = title
        self.anchor = anchor
        self.bundle = bundle
        self._install_command = tuple(install_command)
        self._uninstall_command = tuple(uninstall_command)
        self._package_hint = package_hint
        self._hooks = hooks
        self._link = link
        self._prepare = prepare
        self._run = run

    def describe(self) -> str:
        """The store, its anchor file, its bundle and the refresh command."""
        return f"{self.title} ({self.anchor}, refreshed by {self._install_command[0]} into {self.bundle})"

    def contains(self, fingerprint: str) -> bool:
        """True when the anchor or the generated bundle holds the certificate."""
        digits = normalize_fingerprint(fingerprint)
        return file_holds_fingerprint(self.anchor, digits) or file_holds_fingerprint(self.bundle, digits)

    def install(self, cert_pem: bytes) -> bool:
        """Write the anchor and refresh the bundle; puts the previous anchor back if the refresh fails."""
        digits, _ = single_certificate(cert_pem)
        anchored = file_holds_fingerprint(self.anchor, digits)
        if anchored and file_holds_fingerprint(self.bundle, digits):
            return False
        previous: bytes | None = None
        if not anchored:
            previous = _read_or_none(self.anchor)
            if previous is not None:
                logger.warning("%s holds another oisp CA; replacing it (that CA is no longer trusted)", self.anchor)
            if self._prepare is not None:
                self._change(self._prepare, "set up", self.title)
            self._change(lambda: replace_file(self.anchor, cert_pem, 0o644), "write", self.anchor)
        try:
            self._refresh(self._install_command)
        except CertificateError:
            if not anchored:
                self._restore(previous)
            raise
        if previous is not None:
            # The refresh saw the same file name and so reported no change to its hooks: tell them.
            self._tell_hooks(f"-{self._link}\n+{self._link}\n")
        if not file_holds_fingerprint(self.bundle, digits):
            raise CertificateError(
                f"{self._install_command[0]} ran but {self.bundle} does not contain the CA; check that "
                f"{self.anchor} is picked up by your distribution's configuration"
            )
        return True

    def uninstall(self, fingerprint: str) -> bool:
        """Remove the anchor if it holds this certificate and refresh; also heals a bundle left stale."""
        digits = normalize_fingerprint(fingerprint)
        anchored = file_holds_fingerprint(self.anchor, digits)
        if not anchored and not file_holds_fingerprint(self.bundle, digits):
            return False
        others = self._other_sources(digits)
        if not anchored and others:
            raise CertificateError(
                f"the CA is in the {self.title} but oisp did not add it: {', '.join(map(str, others))} hold it; "
                f"remove them and run {' '.join(self._uninstall_command)}"
            )
        if anchored:
            previous = _read_or_none(self.anchor)
            self._change(self.anchor.unlink, "remove", self.anchor)
            try:
                self._refresh(self._uninstall_command)
            except CertificateError:
                self._restore(previous)
                raise
            self._tell_hooks(f"-{self._link}\n")
        else:
            self._refresh(self._uninstall_command)  # only the generated bundle still holds it
        if file_holds_fingerprint(self.bundle, digits):
            if others:
                raise CertificateError(
                    f"the CA is still trusted: {', '.join(map(str, others))} also hold it (oisp did not add "
                    f"them); remove them and run {' '.join(self._uninstall_command)}"
                )
            logger.warning("%s still holds the CA after the refresh (no certificate left?); rewriting it without",
                           self.bundle)
            self._change(lambda: self._scrub_bundle(digits), "rewrite", self.bundle)
        return True

    # -- internals ---------------------------------------------------------------------------------------------

    def _restore(self, previous: bytes | None) -> None:
        try:
            if previous is None:
                self.anchor.unlink(missing_ok=True)
            else:
                replace_file(self.anchor, previous, 0o644)
        except OSError as error:
            logger.error("could not put %s back as it was: %s", self.anchor, error)

    def _change(self, action: Callable[[], None], verb: str, path: Path | str) -> None:
        try:
            action()
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM):
                raise TrustStorePermissionError(
                    f"cannot {verb} {path}: {error.strerror}; changing the {self.title} needs root (or write "
                    "access to it)"
                ) from error
            raise CertificateError(f"cannot {verb} {path}: {error.strerror or error}") from error

    def _refresh(self, command: tuple[str, ...]) -> None:
        tool = shutil.which(command[0], path=os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN]))
        if tool is None:
            raise CertificateError(f"{command[0]} was not found; {self._package_hint}")
        result = self._run([tool, *command[1:]])
        if result.returncode == 0:
            return
        output = command_output(result)
        if any(word in output.lower() for word in _PERMISSION_WORDS):
            raise TrustStorePermissionError(
                f"{command[0]} failed for lack of permissions ({output}); changing the {self.title} needs root"
            )
        raise CertificateError(f"{' '.join(command)} failed with exit code {result.returncode}: {output}")

    def _tell_hooks(self, changes: str) -> None:
        """Run each hook as the refresh does, with ``changes`` (``+``/``-`` lines) on its standard input."""
        if self._hooks is None or self._link is None or not self._hooks.is_dir():
            return
        for hook in sorted(self._hooks.iterdir()):
            if not (_RUN_PARTS_NAME.fullmatch(hook.name) and hook.is_file() and os.access(hook, os.X_OK)):
                continue
            result = self._run([str(hook)], input=changes)
            if result.returncode != 0:
                logger.warning("the hook %s failed (exit code %d): %s; what it maintains (such as Java's keystore) "
                               "may not match the trust store", hook, result.returncode, command_output(result))

    def _other_sources(self, digits: str) -> list[Path]:
        """Files beside the anchor (put there by someone else) that hold the certificate too."""
        directory = self.anchor.parent
        if not directory.is_dir():
            return []
        return [
            path
            for path in sorted(directory.rglob("*"))
            if path != self.anchor and path.is_file() and file_holds_fingerprint(path, digits)
        ]

    def _scrub_bundle(self, digits: str) -> None:
        data = self.bundle.read_bytes()
        for block, der in pem_certificates(data):
            if hashlib.sha256(der).hexdigest() == digits:
                data = data.replace(block, b"")
        replace_file(self.bundle, data, 0o644)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
