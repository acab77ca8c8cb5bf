"""``jsonl`` sink: appends one event per line to a private file, with rotation by size and time.

Event files hold prompts and responses, so every file this sink creates (the live file, rotated files, their
compressed copies) is created with mode 0600 and missing parent directories with 0700.

Rotation renames the live file to ``<name>.<UTC time>Z`` (``events.jsonl.20261124T081507Z``; ``.1``, ``.2``
... when that name is taken), reopens ``<name>`` and, with ``compress``, gzips the rotated file. Compression
writes ``.gz.tmp``, fsyncs it, renames it to ``.gz`` and only then deletes the original, so an interruption
never loses a line: leftovers are finished the next time the sink opens or rotates.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from oisp.errors import ConfigurationError, OispError
from oisp.events import Event
from oisp.sinks._files import PRIVATE_DIR_MODE, fsync_directory, remove_quietly

__all__ = ["JsonlSink"]

logger = logging.getLogger(__name__)

_OPTIONS = ("path", "fsync", "rotate_bytes", "rotate_seconds", "keep", "compress")
_FILE_MODE = 0o600
_DIR_MODE = PRIVATE_DIR_MODE
# Only POSIX file modes can be checked and tightened; elsewhere st_mode carries no group/other bits to fix.
_POSIX_MODES = os.name == "posix"
_COPY_CHUNK = 1 << 20
# str.splitlines() also breaks lines at these; JSON may escape them, so a line never contains one raw.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class JsonlSink:
    """Appends each event as one line of JSON (``Event.to_json()``, UTF-8) to ``path``.

    Every batch is written with unbuffered writes (so it is flushed when :meth:`write` returns) and, with
    ``fsync``, synced to disk. A batch that fails to write is removed from the file again where possible and
    the ``OSError`` is raised for the pipeline to count; a batch split by a size rotation keeps the lines that
    went to the rotated file.

    ``rotate_bytes`` starts a new file before a line would take the live file past that size (a single larger
    line gets a file of its own; lines are never split). ``rotate_seconds`` starts a new file at the first
    batch written once the live file is that old. ``keep`` rotated files are kept, the oldest deleted first
    (0 keeps none). ``clock`` (seconds since the epoch) exists for tests.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        rotate_bytes: int | None = None,
        rotate_seconds: float | None = None,
        keep: int = 5,
        compress: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = _check_path(path)
        self.fsync = _check_bool("fsync", fsync)
        self.rotate_bytes = _check_positive_int("rotate_bytes", rotate_bytes)
        self.rotate_seconds = _check_seconds("rotate_seconds", rotate_seconds)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigurationError(f"sinks.jsonl.keep: {keep!r} must be an integer >= 0")
        self.keep = keep
        self.compress = _check_bool("compress", compress)
        self._clock = clock
        self._rotated_pattern = re.compile(
            re.escape(self.path.name) + r"\.(?P<ts>\d{8}T\d{6}Z)(?:\.(?P<n>\d+))?(?P<gz>\.gz(?P<tmp>\.tmp)?)?"
        )
        self._fd: int | None = None
        self._closed = False
        self._size = 0
        self._opened_at = 0.0
        _make_private_dirs(self.path.parent)
        self._open()
        self._finish_rotated()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> JsonlSink:
        """Build from configuration: ``path`` (required), ``fsync``, ``rotate_bytes``, ``rotate_seconds``,
        ``keep`` and ``compress``."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"sinks.jsonl: unknown option(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS)}"
            )
        if options.get("path") is None:
            raise ConfigurationError("sinks.jsonl.path: required (the file events are appended to)")
        given = {key: options[key] for key in _OPTIONS if key in options and options[key] is not None}
        return cls(**given)

    def owned_paths(self) -> list[Path]:
        """What this sink writes into after it has started: the live file (rotation also needs its directory,
        which is not handed over: it may be shared). See :mod:`oisp.decoder_process.privileges`."""
        return [self.path]

    # Sink ---------------------------------------------------------------------------------------
    def write(self, events: Sequence[Event]) -> None:
        """Append ``events``, one line each, rotating first where a limit says so; raises ``OSError``."""
        if self._closed:
            raise OispError(f"sinks.jsonl: {self.path} is closed; write() was called after close()")
        if self._fd is None:  # an earlier reopen failed; the cause may have passed
            self._open()
        lines = [_encode(event) for event in events]  # all or nothing: serialize before touching the file
        if not lines:
            return
        now = self._clock()
        may_rotate = True
        if self.rotate_seconds is not None and self._size > 0 and now - self._opened_at >= self.rotate_seconds:
            may_rotate = self._rotate(now)
        pending: list[bytes] = []
        pending_size = 0
        for line in lines:
            if (may_rotate and self.rotate_bytes is not None and self._size + pending_size > 0
                    and self._size + pending_size + len(line) > self.rotate_bytes):
                self._append(b"".join(pending))
                pending, pending_size = [], 0
                may_rotate = self._rotate(now)
            pending.append(line)
            pending_size += len(line)
        self._append(b"".join(pending))

    def close(self) -> None:
        """Sync (with ``fsync``) and close the live file; later writes raise. Closing twice does nothing."""
        self._closed = True
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # inspection ---------------------------------------------------------------------------------
    def rotated_files(self) -> list[Path]:
        """The rotated files of this sink (compressed or not), oldest first."""
        return [path for _, path in self._rotated()]

    # files --------------------------------------------------------------------------------------
    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, _FILE_MODE)
        try:
            _tighten(fd, self.path)
            size = os.fstat(fd).st_size
            if size > 0:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    logger.warning("%s does not end with a newline (an earlier write was interrupted); "
                                   "appending from a new line", self.path)
                    _write_all(fd, b"\n")
                    size += 1
            # A file that already has lines is as old as its last write, at most (TimedRotatingFileHandler
            # makes the same choice): a restarted collector does not postpone the rotation forever.
            now = self._clock()
            self._opened_at = min(now, os.fstat(fd).st_mtime) if size > 0 else now
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

    def _append(self, data: bytes) -> None:
        if not data:
            return
        assert self._fd is not None
        start = self._size
        try:
            _write_all(self._fd, data)
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            # Take a partial batch out again: a line cut short would swallow the next one when read back.
            try:
                os.ftruncate(self._fd, start)
            except OSError as exc:
                logger.warning("%s: could not remove a partly written batch: %s", self.path, exc)
            raise
        self._size = start + len(data)

    def _rotate(self, now: float) -> bool:
        """Rotate the live file; False (and the live file kept) when the rename failed."""
        assert self._fd is not None
        fd, self._fd = self._fd, None
        os.close(fd)  # closed before the rename: an open file cannot be renamed everywhere
        target = self._rotated_name(now)
        try:
            os.rename(self.path, target)
        except OSError as exc:
            logger.error("could not rotate %s to %s (writing on to %s): %s", self.path, target.name,
                         self.path.name, exc)
            self._open()
            return False
        logger.info("rotated %s to %s", self.path, target.name)
        self._open()
        self._finish_rotated()
        return True

    def _rotated_name(self, now: float) -> Path:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        # After every file of this second so far, even deleted ones' names are not reused: order is by name.
        numbers = [int(match["n"] or 0) for p in self.path.parent.iterdir()
                   if (match := self._rotated_pattern.fullmatch(p.name)) is not None and match["ts"] == stamp]
        name = f"{self.path.name}.{stamp}"
        return self.path.with_name(f"{name}.{max(numbers) + 1}" if numbers else name)

    def _rotated(self) -> list[tuple[tuple[str, int], Path]]:
        """(order key, path) of every rotated file, oldest first; the ``.gz`` one when both exist."""
        found: dict[tuple[str, int], Path] = {}
        for path in self.path.parent.iterdir():
            match = self._rotated_pattern.fullmatch(path.name)
            if match is None or match["tmp"]:
                continue
            key = (match["ts"], int(match["n"] or 0))
            if key not in found or match["gz"]:
                found[key] = path
        return sorted(found.items())

    def _finish_rotated(self) -> None:
        """Clean up interrupted compressions, delete rotated files beyond ``keep``, compress the rest."""
        for path in list(self.path.parent.iterdir()):
            match = self._rotated_pattern.fullmatch(path.name)
            if match is None:
                continue
            plain = path.with_name(path.name.removesuffix(".gz.tmp").removesuffix(".gz"))
            if match["tmp"]:
                if plain.exists():  # the original is intact: the half-written copy is worthless
                    remove_quietly(path, "sinks.jsonl")
                else:
                    logger.warning("%s has no original beside it; left alone", path)
            elif match["gz"] is None and plain.with_name(plain.name + ".gz").exists():
                remove_quietly(path, "sinks.jsonl")  # compressed and renamed (so synced) before an interruption
        rotated = [path for _, path in self._rotated()]
        excess = max(len(rotated) - self.keep, 0)
        for path in rotated[:excess]:
            logger.info("deleting %s (keep=%d)", path, self.keep)
            remove_quietly(path, "sinks.jsonl")
        if self.compress:
            for path in rotated[excess:]:
                if not path.name.endswith(".gz"):
                    self._compress(path)

    def _compress(self, plain: Path) -> None:
        target = plain.with_name(plain.name + ".gz")
        partial = plain.with_name(plain.name + ".gz.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
            fd = os.open(partial, flags, _FILE_MODE)
            with open(fd, "wb") as raw:
                _tighten(fd, partial)
                with gzip.GzipFile(filename=plain.name, mode="wb", fileobj=raw, compresslevel=6) as packed, \
                        open(plain, "rb") as source:
                    shutil.copyfileobj(source, packed, _COPY_CHUNK)
                raw.flush()
                os.fsync(raw.fileno())
            os.rename(partial, target)
            fsync_directory(plain.parent)
            os.unlink(plain)
        except OSError as exc:
            # The rotated file is intact; the next rotation (or start) tries again.
            logger.error("could not compress %s (kept uncompressed): %s", plain, exc)
            if partial.exists():
                remove_quietly(partial, "sinks.jsonl")


def _encode(event: Event) -> bytes:
    text = event.to_json().translate(_LINE_BREAKERS) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (undecodable bytes kept by a decoder) are not UTF-8; escaped they still read back.
        return (json.dumps(event.to_dict(), separators=(",", ":")) + "\n").encode("ascii")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _tighten(fd: int, path: Path) -> None:
    if sys.platform == "win32" or not _POSIX_MODES:  # no os.fchmod on Windows (before 3.13)
        return
    mode = os.fstat(fd).st_mode & 0o777
    if mode & 0o077:
        os.fchmod(fd, _FILE_MODE)
        logger.warning("%s was open to other users (mode %04o); changed to 0600 because it holds prompts",
                       path, mode)


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by someone else
            path.mkdir(mode=_DIR_MODE)






def _check_path(value: object) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"sinks.jsonl.path: {value!r} must be a non-empty string (a file path)")
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigurationError(f"sinks.jsonl.path: {value!r} is a directory; name a file inside it")
    return path


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"sinks.jsonl.{key}: {value!r} must be true or false")
    return value


def _check_positive_int(key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"sinks.jsonl.{key}: {value!r} must be a positive integer")
    return value


def _check_seconds(key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"sinks.jsonl.{key}: {value!r} must be a positive number of seconds")
    return float(value)
