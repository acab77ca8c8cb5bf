"""Linux fanotify: a sans-io parser of the event buffer and a thin ctypes binding (``fanotify_init``/``_mark``).

The group is a *notification* group (``FAN_CLASS_NOTIF``): the kernel queues events and never waits for this
reader, so a writer is never blocked. It reports file identifiers, not open descriptors
(``FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID``, kernel 5.17+): each event names the directory
(a file handle) and the entry, which is what makes create, delete and rename visible, and costs no descriptor in
this process for the many events that are filtered out by pid. The directory handle is turned into a path only
for events that are kept (:meth:`Fanotify.directory_path`). Older kernels fall back to plain ``FAN_REPORT_DFID_NAME``
(no ``FAN_RENAME``: moves are not reported) — :attr:`Fanotify.mode` says which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
from typing import NamedTuple

assert sys.platform == "linux"

__all__ = [
    "FAN_CLOSE_WRITE",
    "FAN_CREATE",
    "FAN_DELETE",
    "FAN_ONDIR",
    "FAN_OPEN",
    "FAN_OPEN_EXEC",
    "FAN_Q_OVERFLOW",
    "FAN_RENAME",
    "FanEvent",
    "Fanotify",
    "FileId",
    "decoded",
    "fsid_key",
    "local_mounts",
    "parse_events",
]

FAN_CLASS_NOTIF = 0x0
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_ACCESS = 0x1
FAN_MODIFY = 0x2
FAN_CLOSE_WRITE = 0x8
FAN_CLOSE_NOWRITE = 0x10
FAN_OPEN = 0x20
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_OPEN_EXEC = 0x1000
FAN_DELETE = 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FILESYSTEM = 0x100
AT_FDCWD = -100

INFO_FID = 1
INFO_DFID_NAME = 2
INFO_DFID = 3
INFO_OLD_DFID_NAME = 10
INFO_NEW_DFID_NAME = 12

_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO_HEADER = struct.Struct("=BBH")  # info_type, pad, len
_FSID = struct.Struct("=ii")
_HANDLE_HEAD = struct.Struct("=Ii")  # handle_bytes, handle_type
METADATA_VERSION = 3
O_PATH = 0o10000000


def fsid_key(val0: int, val1: int) -> int:
    """The filesystem id as ``os.statvfs().f_fsid`` has it (glibc: ``val[0] | val[1] << 32``)."""
    return (val0 & 0xFFFFFFFF) | ((val1 & 0xFFFFFFFF) << 32)


class FileId(NamedTuple):
    """A directory (or file) handle on a filesystem, and the entry name when the record has one."""

    fsid: int
    handle: bytes  # a ``struct file_handle`` as open_by_handle_at takes it
    name: str | None


class FanEvent(NamedTuple):
    """One event: what happened (``mask``), who did it (``pid``), and the identifiers reported with it.

    ``raw``: an event kept undecoded (its bytes; the identifiers are None until :func:`decoded` reads them)."""

    mask: int
    pid: int
    fd: int
    dfid_name: FileId | None
    old: FileId | None
    new: FileId | None
    raw: bytes | None = None


def decoded(event: FanEvent) -> FanEvent:
    """``event`` with its identifiers read (an event kept undecoded by :func:`parse_events`), else as it is."""
    if event.raw is None:
        return event
    out: list[FanEvent] = []
    parse_events(event.raw, out)
    return out[0] if out else event._replace(raw=None)


def _file_id(buf: bytes, start: int, end: int, with_name: bool) -> FileId | None:
    at = start + _INFO_HEADER.size
    if at + _FSID.size + _HANDLE_HEAD.size > end:
        return None
    val0, val1 = _FSID.unpack_from(buf, at)
    at += _FSID.size
    handle_bytes, _handle_type = _HANDLE_HEAD.unpack_from(buf, at)
    handle_end = at + _HANDLE_HEAD.size + handle_bytes
    if handle_end > end:
        return None
    name = None
    if with_name:
        nul = buf.find(b"\0", handle_end, end)
        raw = buf[handle_end: nul if nul >= 0 else end]
        name = raw.decode("utf-8", "surrogateescape")
    return FileId(fsid_key(val0, val1), bytes(buf[at:handle_end]), name)


def parse_events(buf: bytes, out: list[FanEvent], *, want_pid: object = None, also: int = 0) -> int:
    """Append the events of one ``read`` of the fanotify descriptor to ``out``; returns how many were malformed.

    ``want_pid``, when given, is a callable ``pid -> bool``: events of other pids are skipped before their
    identifiers are decoded, unless their mask has a bit of ``also``: those are appended undecoded (their bytes
    in ``raw``, for :func:`decoded` when they turn out to matter). Never raises on bad input.
    """
    offset = 0
    size = len(buf)
    bad = 0
    keep = want_pid if callable(want_pid) else None
    while offset + _METADATA.size <= size:
        event_len, vers, _res, metadata_len, mask, fd, pid = _METADATA.unpack_from(buf, offset)
        if event_len < _METADATA.size or offset + event_len > size or vers != METADATA_VERSION:
            return bad + 1
        end = offset + event_len
        if keep is not None and not mask & FAN_Q_OVERFLOW and not keep(pid):
            if mask & also:
                out.append(FanEvent(mask, pid, fd, None, None, None, bytes(buf[offset:end])))
            offset = end
            continue
        dfid = old = new = None
        at = offset + metadata_len
        while at + _INFO_HEADER.size <= end:
            info_type, _pad, length = _INFO_HEADER.unpack_from(buf, at)
            if length < _INFO_HEADER.size or at + length > end:
                bad += 1
                break
            if info_type == INFO_DFID_NAME:
                dfid = _file_id(buf, at, at + length, True)
            elif info_type == INFO_OLD_DFID_NAME:
                old = _file_id(buf, at, at + length, True)
            elif info_type == INFO_NEW_DFID_NAME:
                new = _file_id(buf, at, at + length, True)
            elif info_type == INFO_DFID and dfid is None:
                dfid = _file_id(buf, at, at + length, False)
            at += length
        out.append(FanEvent(mask, pid, fd, dfid, old, new))
        offset = end
    return bad


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fanotify_init.restype = ctypes.c_int
        lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        lib.fanotify_mark.restype = ctypes.c_int
        lib.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.open_by_handle_at.restype = ctypes.c_int
        _libc = lib
    return _libc


def _error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


class Fanotify:
    """A fanotify notification group reporting directory handles and names (needs ``CAP_SYS_ADMIN``).

    ``queue`` is not set: the kernel's default queue (16384 events) bounds memory; when it overflows the kernel
    reports ``FAN_Q_OVERFLOW`` once, counted in :attr:`overflows`.
    """

    MODES = (
        ("dfid_name_target", FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID),
        ("dfid_name", FAN_REPORT_DFID_NAME),
    )

    def __init__(self) -> None:
        lib = _lib()
        self.fd = -1
        self.mode = ""
        last: OSError | None = None
        for mode, flags in self.MODES:
            fd = lib.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | flags,
                                   os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
            if fd >= 0:
                self.fd, self.mode = fd, mode
                break
            last = _error("fanotify_init")
            if last.errno == errno.EPERM:
                raise last
        if self.fd < 0:
            raise last or OSError(errno.EINVAL, "fanotify_init failed")
        #: fsid -> a descriptor of the marked filesystem's root (for open_by_handle_at)
        self._mounts: dict[int, int] = {}
        self.overflows = 0
        self.malformed = 0

    @property
    def reports_rename(self) -> bool:
        """Whether ``FAN_RENAME`` (old and new names in one event) is available."""
        return self.mode == "dfid_name_target"

    def mark_filesystem(self, path: str, mask: int) -> None:
        """Watch ``mask`` on the whole filesystem that ``path`` is on."""
        if self.mode != "dfid_name_target":
            mask &= ~FAN_RENAME
        lib = _lib()
        if lib.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, os.fsencode(path)) < 0:
            raise _error(f"fanotify_mark({path})")
        key = os.statvfs(path).f_fsid
        if key not in self._mounts:
            self._mounts[key] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def unmark_filesystem(self, path: str, mask: int) -> None:
        """Stop watching ``mask`` on the filesystem that ``path`` is on (events already queued stay queued; the
        filesystem's handles still resolve: :meth:`directory_path`)."""
        if self.mode != "dfid_name_target":
            mask &= ~FAN_RENAME
        if _lib().fanotify_mark(self.fd, FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM, mask, AT_FDCWD,
                                os.fsencode(path)) < 0:
            raise _error(f"fanotify_mark({path}, remove)")

    def fileno(self) -> int:
        """The group's descriptor (to wait on it)."""
        return self.fd

    def read(self, out: list[FanEvent], want_pid: object = None, *, size: int = 65536) -> bool:
        """Append what is queued (one read of up to ``size`` bytes); False when nothing was queued."""
        raw = self.read_raw(1, size=size)
        for buf in raw:
            self.parse(buf, out, want_pid)
        return bool(raw)

    def read_raw(self, limit: int, *, size: int = 65536) -> list[bytes]:
        """Up to ``limit`` reads of what is queued, undecoded (stops when the queue is empty)."""
        found = []
        for _ in range(limit):
            try:
                buf = os.read(self.fd, size)
            except BlockingIOError:
                break
            if not buf:
                break
            found.append(buf)
        return found

    def parse(self, buf: bytes, out: list[FanEvent], want_pid: object = None, also: int = 0) -> None:
        """Decode one read's bytes into ``out`` (counting overflows and malformed events)."""
        start = len(out)
        self.malformed += parse_events(buf, out, want_pid=want_pid, also=also)
        for event in out[start:]:
            if event.mask & FAN_Q_OVERFLOW:
                self.overflows += 1

    def directory_path(self, file_id: FileId) -> str | None:
        """The current path of a directory handle (None when it is gone or on a filesystem not marked here)."""
        mount = self._mounts.get(file_id.fsid)
        if mount is None:
            if len(self._mounts) != 1:
                return None
            mount = next(iter(self._mounts.values()))
        fd = _lib().open_by_handle_at(mount, file_id.handle, O_PATH | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        return path

    def path_of(self, file_id: FileId, cache: dict[tuple[int, bytes], str | None] | None = None) -> str | None:
        """The path of the entry a record names (directory path + name). ``cache`` (the caller's, kept for as
        long as directory paths may be taken as unchanged: one pass of reads) saves resolving a directory again."""
        if cache is None:
            directory = self.directory_path(file_id)
        else:
            key = (file_id.fsid, file_id.handle)
            if key in cache:
                directory = cache[key]
            else:
                directory = cache[key] = self.directory_path(file_id)
                if len(cache) > 1024:
                    cache.pop(next(iter(cache)))
        if directory is None:
            return None
        if directory.endswith(" (deleted)"):
            directory = directory.removesuffix(" (deleted)")
        if not file_id.name or file_id.name == ".":
            return directory
        return directory.rstrip("/") + "/" + file_id.name

    def close(self) -> None:
        """Close the group and the filesystem descriptors."""
        for fd in self._mounts.values():
            os.close(fd)
        self._mounts.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "bcachefs", "jfs",
                               "reiserfs", "vfat", "exfat", "ntfs3", "overlay"})


def local_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each local filesystem, one mount point per filesystem."""
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or not rest:
            continue
        device, point, fstype = fields[2], fields[4].replace("\\040", " "), rest[0]
        if fstype not in LOCAL_FILESYSTEMS or device in seen:
            continue
        seen.add(device)
        found.append((point, fstype))
    return found
