"""What ``/proc`` says about a process right now, read quickly and without raising.

Kernel process events carry only pids; the rest (executable, arguments, working directory, user, parent) is read
from ``/proc/<pid>`` when the event is read. A short-lived process may be gone by then: what could not be read is
named in :attr:`ProcSnapshot.missing`, never guessed and never a reason to drop the event.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["ProcSnapshot", "read_exe", "read_process"]

#: longest command line kept (the rest is cut; arguments can be whole scripts)
ARGS_LIMIT = 4096


class ProcSnapshot(NamedTuple):
    """A process as ``/proc`` showed it; None where it could not be read (listed in ``missing``)."""

    pid: int
    exe: str | None
    args: list[str] | None
    cwd: str | None
    ppid: int | None
    uid: int | None
    gid: int | None
    name: str | None
    missing: tuple[str, ...]


def _readlink(path: str) -> str | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target.removesuffix(" (deleted)") or None


def read_exe(pid: int, *, proc: str = "/proc") -> str | None:
    """Only ``pid``'s executable (one readlink: what deciding whether a process is in scope needs)."""
    return _readlink(f"{proc}/{pid}/exe")


def read_process(pid: int, *, proc: str = "/proc") -> ProcSnapshot:
    """Read ``pid``'s executable, arguments, cwd, parent, uid/gid and name; never raises."""
    base = f"{proc}/{pid}"
    exe = _readlink(base + "/exe")
    cwd = _readlink(base + "/cwd")
    args: list[str] | None = None
    try:
        with open(base + "/cmdline", "rb") as f:
            raw = f.read(ARGS_LIMIT + 1)
    except OSError:
        raw = b""
    if raw:
        if len(raw) > ARGS_LIMIT:
            raw = raw[:ARGS_LIMIT]
        args = [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0")]
    ppid = uid = gid = None
    name = None
    try:
        with open(base + "/status", "rb") as f:
            status = f.read(4096)
    except OSError:
        status = b""
    for line in status.split(b"\n"):
        key, _, value = line.partition(b":")
        if key == b"Name":
            name = value.strip().decode("utf-8", "replace") or None
        elif key == b"PPid":
            ppid = _int(value)
        elif key == b"Uid":
            uid = _int(value.split()[0]) if value.split() else None
        elif key == b"Gid":
            gid = _int(value.split()[0]) if value.split() else None
            break  # the fields wanted come before Gid
    missing = tuple(field for field, value in (("exe", exe), ("args", args), ("cwd", cwd), ("ppid", ppid),
                                                ("uid", uid)) if value is None)
    return ProcSnapshot(pid, exe, args, cwd, ppid, uid, gid, name, missing)


def _int(value: bytes) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None

