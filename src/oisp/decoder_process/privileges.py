"""The decoder process gives up its privileges: it parses bytes from the network and runs third-party plugins, so
when oisp runs as root (transparent mode, activity), it must not.

A decoder process started as root (POSIX) becomes an unprivileged user: ``decoder_user`` when configured, else
the user who ran ``sudo`` (``SUDO_UID`` and ``SUDO_GID``), else ``nobody``. First, while it has a single thread
(these settings are per thread, inherited by threads started later), it sets ``no_new_privs`` (Linux: no
set-user-id program can give privileges back) and empties its capability bounding and ambient sets. Once its
sinks are open (and before it reads a single copy), it drops supplementary groups and sets its real, effective
and saved group and user ids in every thread (the kernel clears the permitted and effective capabilities),
checks all of it in ``/proc/self/status`` for every thread, and checks that it can no longer read the files it
is told to protect (the CA key). Anything that does not hold stops the start with a clear error: a decoder
process never runs privileged by accident.

Windows: no restricted token is made yet (the decoder process runs with oisp's token); see docs/security.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs

from oisp.errors import OispError

__all__ = ["Account", "PrivilegeError", "drop_privileges", "hand_over", "preload", "process_status",
           "restrict_new_privileges", "target_account"]

logger = logging.getLogger(__name__)

#: ``decoder_user`` value that keeps the decoder process's privileges (not recommended; said in the log).
KEEP = "root"
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class PrivilegeError(OispError):
    """The decoder process could not give up its privileges (it does not start)."""


@attrs.frozen
class Account:
    """Whom the decoder process becomes."""

    name: str
    uid: int
    gid: int


def target_account(configured: str | None, environ: Mapping[str, str] | None = None) -> Account | None:
    """Whom a decoder process started with these settings becomes, or None when it keeps what it has (it is not
    privileged, or ``configured`` is ``"root"``). ``configured``: a user name or numeric uid; None: the user
    behind ``sudo``, else ``nobody``. Raises :class:`PrivilegeError` for a user that does not exist."""
    if sys.platform == "win32":
        return None
    if os.geteuid() != 0 or configured == KEEP:
        return None
    import pwd

    environ = os.environ if environ is None else environ
    if configured is None:
        sudo_uid, sudo_gid = environ.get("SUDO_UID", ""), environ.get("SUDO_GID", "")
        if sudo_uid.isdigit() and sudo_gid.isdigit() and int(sudo_uid) != 0:
            name = environ.get("SUDO_USER") or sudo_uid
            return Account(name=name, uid=int(sudo_uid), gid=int(sudo_gid))
        configured = "nobody"
    try:
        entry = pwd.getpwuid(int(configured)) if configured.isdigit() else pwd.getpwnam(configured)
    except KeyError:
        raise PrivilegeError(f"decoder_user {configured!r}: no such user on this system") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"decoder_user {configured!r} is root; use \"root\" to keep privileges on purpose")
    return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


#: Packages whose modules the decoder process may import on demand (a provider's decoder, a content coding):
#: imported before the drop, since the unprivileged user may not be able to read them (a checkout under /root).
_PRELOAD_PACKAGES = ("oisp.http", "oisp.framing", "oisp.providers", "oisp.provider_kit", "oisp.activity", "oisp.events",
                     "oisp.sinks")
_PRELOAD_MODULES = ("oisp.conversation", "oisp.event_decoder", "oisp.redaction", "gzip", "zlib", "bz2", "lzma", "json",
                    "base64", "uuid", "encodings.idna", "encodings.latin_1", "encodings.ascii", "unicodedata",
                    "brotli", "brotlicffi", "zstandard", "compression.zstd", "backports.zstd", "h11._abnf")


def preload() -> None:
    """Import what decoding may import later, while the files are still readable (optional modules that are not
    installed are skipped)."""
    import importlib
    import pkgutil

    for name in _PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for package_name in _PRELOAD_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, package_name + "."):
            try:
                importlib.import_module(module.name)
            except ImportError as exc:  # an optional extra's module (otlp, kafka) without its dependency
                logger.debug("preloading %s: %s", module.name, exc)


def hand_over(sinks: Mapping[str, object], account: Account) -> list[tuple[str, Path]]:
    """Before the drop: give ``account`` what the sinks write into after starting (a sink's optional
    ``owned_paths()``: the webhook's spool, the jsonl file), so that they keep working as that user. Returns the
    directories among them, by sink (for :func:`check_sinks_after_drop`)."""
    directories: list[tuple[str, Path]] = []
    if sys.platform == "win32":  # pragma: no cover - never called there (target_account returns None)
        return directories
    for name, sink in sinks.items():
        owned = getattr(sink, "owned_paths", None)
        if not callable(owned):
            continue
        for path in owned():
            try:
                os.chown(path, account.uid, account.gid)
            except OSError as exc:
                raise PrivilegeError(f"sink {name}: could not hand {path} to user {account.name}: {exc}") from exc
            if os.path.isdir(path):
                directories.append((name, Path(path)))
    return directories


def check_sinks_after_drop(sinks: Mapping[str, object], account: Account,
                           directories: Iterable[tuple[str, Path]] = ()) -> None:
    """After the drop: each ``(sink, directory)`` that :func:`hand_over` handed over must be reachable and writable
    by the user (else the start fails, saying so); a jsonl sink that will rotate in a directory the user cannot
    write is warned about."""
    for name, directory in directories:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PrivilegeError(f"sink {name}: {directory} is out of reach of the decoder process's user "
                                 f"{account.name} (a directory above it private to root?); choose a place that user "
                                 "can reach, or set decoder_user")
    for name, sink in sinks.items():
        path = getattr(sink, "path", None)
        rotates = getattr(sink, "rotate_bytes", None) is not None or getattr(sink, "rotate_seconds", None) is not None
        if isinstance(path, Path) and rotates and not os.access(path.parent, os.W_OK | os.X_OK):
            logger.warning("sink %s rotates %s, but the decoder process's user %s cannot write in %s: rotation will "
                           "fail (give that directory to the user, or set decoder_user)", name, path, account.name,
                           path.parent)


def restrict_new_privileges() -> None:
    """The first step, while the decoder process has a single thread (``prctl`` applies to the calling thread
    and is inherited by the threads it starts later, such as the sinks'): set ``no_new_privs``, empty the
    capability bounding and ambient sets (Linux). Root keeps its current capabilities until
    :func:`drop_privileges` (these only limit what an ``execve`` could give), so sinks can still open their files."""
    if not sys.platform.startswith("linux"):
        return
    if threading.active_count() != 1:
        raise PrivilegeError("restricting privileges must happen before the decoder process starts any thread")
    prctl = _prctl()
    _check(prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    _check(prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear the ambient capabilities")
    for cap in range(64):  # needs CAP_SETPCAP: before the user id changes; EINVAL past the last one
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL and cap > 0:
                break
            _check(-1, f"drop capability {cap} from the bounding set")


def drop_privileges(account: Account, protected: Iterable[Path] = ()) -> None:
    """Become ``account`` for good, in every thread, without capabilities (see the module's documentation; call
    :func:`restrict_new_privileges` first), then check that every path in ``protected`` is out of reach. Raises
    :class:`PrivilegeError` when any step does not hold."""
    if sys.platform == "win32":  # pragma: no cover - never called there (target_account returns None)
        raise PrivilegeError("dropping privileges is not implemented on Windows")
    linux = sys.platform.startswith("linux")
    try:
        os.setgroups([])
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)  # every thread (glibc applies it to all)
    except OSError as exc:
        raise PrivilegeError(f"could not become user {account.name} (uid {account.uid}): {exc}") from exc
    try:
        os.setresuid(0, 0, 0)
    except OSError:
        pass
    else:
        raise PrivilegeError("the decoder process could become root again after dropping its privileges")
    if linux:
        for task in Path("/proc/self/task").iterdir():
            _verify(process_status(task / "status"), account, task.name)
    for path in protected:
        try:
            with open(path, "rb"):
                pass
        except OSError:
            continue
        raise PrivilegeError(f"the decoder process's user {account.name} can read {path}, which it must not "
                             "(choose another decoder_user, or protect the file)")
    logger.info("decoder process now runs as %s (uid %d, gid %d) without capabilities", account.name,
                account.uid, account.gid)


def process_status(path: Path | str = "/proc/self/status") -> dict[str, str]:
    """The fields of a Linux ``/proc/<pid>/status`` file."""
    fields: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _verify(status: Mapping[str, str], account: Account, task: str) -> None:
    uids = {int(v) for v in status["Uid"].split()}
    gids = {int(v) for v in status["Gid"].split()}
    problems = []
    if uids != {account.uid} or gids != {account.gid}:
        problems.append(f"uids {status['Uid']!r}, gids {status['Gid']!r}")
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if key in status and int(status[key], 16) != 0:
            problems.append(f"{key} {status[key]}")
    if status.get("NoNewPrivs", "1") != "1":
        problems.append("no_new_privs is not set")
    if problems:
        raise PrivilegeError(f"the decoder process (thread {task}) still holds privileges: {'; '.join(problems)}")


def _prctl() -> Callable[..., int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise PrivilegeError(f"the decoder process could not {what}: {os.strerror(error)}")
