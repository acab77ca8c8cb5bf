"""OISP events from observed process and file facts (sans-io: every function takes what was observed).

Timestamps: the kernel's monotonic nanoseconds go into ``ts_mono`` (the clock :class:`~oisp.events.Event` uses
for it by default, so activity and AI events order together) and the wall clock ``ts`` is derived from it with
one offset measured when the source started (:class:`Clock`).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from oisp._version import __version__
from oisp.events import (
    Actor,
    Confidence,
    Event,
    FileDelete,
    FileInfo,
    FileOpen,
    FileRead,
    FileRename,
    FileWrite,
    ParentProcess,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    ProcessInfo,
    Source,
)

__all__ = [
    "Clock",
    "ProcessFacts",
    "decode_exit_status",
    "file_delete_event",
    "file_open_event",
    "file_read_event",
    "file_rename_event",
    "file_write_event",
    "process_exec_event",
    "process_exit_event",
    "process_fork_event",
    "signal_name",
    "user_name",
]

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh", "mksh", "csh", "tcsh", "ash", "busybox",
                    "pwsh", "powershell", "powershell.exe", "pwsh.exe", "cmd.exe", "nu"})
INTERPRETERS = ("python", "node", "ruby", "perl", "php", "bun", "deno", "lua", "Rscript", "java")


class Clock:
    """Monotonic nanoseconds (kernel ``ktime``, Python's ``time.monotonic_ns``) -> wall clock, one offset."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> datetime:
        """The wall-clock time of a monotonic timestamp."""
        return datetime.fromtimestamp((mono_ns + self.offset_ns) / 1e9, UTC)


class ProcessFacts:
    """What is known about one observed process (kept while it lives, for its exit and its files' events)."""

    __slots__ = ("_actor", "_info", "agent", "args", "cwd", "exe", "gid", "missing", "name", "pid", "ppid",
                 "start_ns", "uid")

    def __init__(self, pid: int, *, ppid: int | None = None, exe: str | None = None, args: list[str] | None = None,
                 cwd: str | None = None, uid: int | None = None, gid: int | None = None, name: str | None = None,
                 start_ns: int | None = None, agent: int | None = None, missing: tuple[str, ...] = ()) -> None:
        self.pid = pid
        self.ppid = ppid
        self.exe = exe
        self.args = args
        self.cwd = cwd
        self.uid = uid
        self.gid = gid
        self.name = name or (os.path.basename(exe) if exe else None)
        self.start_ns = start_ns
        self.agent = agent
        self.missing = missing
        self._info: ProcessInfo | None = None
        self._actor: Actor | None = None

    def changed(self) -> None:
        """Say that a field changed (the envelope blocks are made again)."""
        self._info = None
        self._actor = None

    def process_info(self) -> ProcessInfo:
        """The envelope's ``process`` block (one immutable record, shared by the process's events)."""
        if self._info is None:
            self._info = self._make_info()
        return self._info

    def _make_info(self) -> ProcessInfo:
        args = self.args
        cmdline = " ".join(args) if args else None
        parent = ParentProcess(pid=self.ppid) if self.ppid else None
        return ProcessInfo(pid=self.pid, ppid=self.ppid, exe=self.exe, name=self.name, cmdline=cmdline,
                           cmdline_args=list(args) if args else None, cwd=self.cwd, parent=parent)

    def actor(self) -> Actor | None:
        """The envelope's ``actor`` block (the process's real user)."""
        if self.uid is None:
            return None
        if self._actor is None:
            self._actor = Actor(uid=self.uid, gid=self.gid, user=user_name(self.uid))
        return self._actor

    def attrs(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``attrs``: which agent tree the process is in (``oisp.agent_pid``) and what could not be read."""
        out: dict[str, Any] = {}
        if self.agent is not None:
            out["oisp.agent_pid"] = self.agent
        if self.missing:
            out["oisp.unreadable"] = list(self.missing)
        if extra:
            out.update(extra)
        return out


_SOURCES: dict[tuple[str, str], Source] = {}


def _source(point: str, method: str = "other") -> Source:
    """The ``source`` block (immutable: one per capture point, shared by its events)."""
    source = _SOURCES.get((point, method))
    if source is None:
        source = _SOURCES[point, method] = Source(collector="oisp", collector_version=__version__,
                                                  capture_method=method, capture_point=point)
    return source


class _MtimeText:
    """``2026-12-08T02:00:00.123456Z`` of a file's mtime; the text of the whole second is kept from the last
    call (files written together share it), which spares most of the date formatting."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, mtime_ns: int) -> str:
        second, ns = divmod(mtime_ns, 1_000_000_000)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{ns // 1000:06d}Z"


_mtime_text = _MtimeText()


_CONFIDENCES: dict[tuple[Any, ...], Confidence] = {}


def _confidence(missing: tuple[str, ...] | list[str], *, reasons: list[str], completeness: str = "full",
                limitations: list[str] | None = None) -> Confidence:
    """The ``confidence`` block: a few combinations are all there is, so each is made once and shared by the
    events that have it (like ``source``: never changed after it is made)."""
    if missing and completeness != "sampled":
        completeness = "partial"
    key = (tuple(missing), tuple(reasons), completeness, tuple(limitations) if limitations is not None else None)
    confidence = _CONFIDENCES.get(key)
    if confidence is None:
        if len(_CONFIDENCES) > 256:
            _CONFIDENCES.clear()
        confidence = _CONFIDENCES[key] = Confidence(
            level="medium" if completeness == "sampled" else "high", completeness=completeness,
            reasons=list(reasons), missing=list(missing) or None,
            limitations=list(limitations) if limitations is not None else None,
            process_attribution="direct", content_source="none")
    return confidence


def _shell_and_script(exe: str, args: list[str] | None) -> tuple[bool, str | None, str | None]:
    """(is a shell, interpreter, script path) of an exec."""
    base = os.path.basename(exe)
    is_shell = base in SHELLS
    script = None
    interpreter = None
    if args and len(args) > 1 and (is_shell or base.startswith(INTERPRETERS)):
        first = args[1]
        if not first.startswith("-") and (is_shell or "/" in first or "." in first):
            interpreter, script = exe, first
    return is_shell, interpreter, script


@lru_cache(maxsize=256)
def user_name(uid: int) -> str | None:
    """The login name of ``uid`` (None when unknown, and on Windows)."""
    if sys.platform == "win32":
        return None
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return None


def signal_name(number: int) -> str | None:
    """``SIGKILL`` for 9, ... (None when unknown)."""
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def process_exec_event(facts: ProcessFacts, ts_ns: int, clock: Clock, *, point: str = "cn_proc",
                       limitations: list[str] | None = None, sampled: bool = False, script: str | None = None,
                       exe_from: str | None = None) -> Event:
    """``process.exec`` of an observed process (``script``: the ``#!`` script it ran, when known otherwise than
    from its arguments; ``exe_from``: where the executable came from when not from /proc)."""
    exe = facts.exe or "[unknown]"
    is_shell, interpreter, found = _shell_and_script(exe, facts.args) if facts.exe else (None, None, None)
    if script is not None:
        interpreter, found = exe, script
    data = ProcessExec(exe=exe, args=facts.args, cwd=facts.cwd, interpreter=interpreter, script_path=found,
                       is_shell=is_shell, is_script=found is not None if facts.exe else None)
    extra = {"oisp.exe_source": exe_from} if exe_from else None
    return Event.create(data, ts=clock.wall(ts_ns), ts_mono=ts_ns, process=facts.process_info(),
                        actor=facts.actor(), source=_source(point), attrs=facts.attrs(extra) or None,
                        confidence=_confidence(facts.missing, reasons=[_reason(sampled)],
                                               completeness="sampled" if sampled else "full",
                                               limitations=limitations))


def _reason(sampled: bool) -> str:
    return "process_list_polled" if sampled else "kernel_process_event"


def decode_exit_status(status: int) -> tuple[int, int | None, bool]:
    """(exit code, killing signal or None, core dumped) of a wait status (exit code << 8 | signal)."""
    signal = status & 0x7F
    if signal:
        return 128 + signal, signal, bool(status & 0x80)
    return (status >> 8) & 0xFF, None, False


def process_exit_event(facts: ProcessFacts, ts_ns: int, clock: Clock, *, status: int | None,
                       point: str = "cn_proc", limitations: list[str] | None = None,
                       sampled: bool = False) -> Event:
    """``process.exit``: ``status`` is the wait status (exit code << 8, or the killing signal); None when not
    known (``exit_code`` -1, named in ``confidence.missing``)."""
    runtime = (ts_ns - facts.start_ns) // 1_000_000 if facts.start_ns is not None else None
    missing = tuple(m for m in facts.missing if m != "cwd") + (("runtime_ms",) if runtime is None else ())
    if status is None:
        data = ProcessExit(exit_code=-1, runtime_ms=max(0, runtime) if runtime is not None else None,
                           termination_type="unknown")
        missing += ("exit_code",)
    else:
        code, signal, core = decode_exit_status(status)
        data = ProcessExit(exit_code=code, signal=signal, signal_name=signal_name(signal) if signal else None,
                           runtime_ms=max(0, runtime) if runtime is not None else None,
                           termination_type="coredump" if core else "signaled" if signal else "normal")
    return Event.create(data, ts=clock.wall(ts_ns), ts_mono=ts_ns, process=facts.process_info(),
                        actor=facts.actor(), source=_source(point), attrs=facts.attrs() or None,
                        confidence=_confidence(missing, reasons=[_reason(sampled)],
                                               completeness="sampled" if sampled else "full",
                                               limitations=limitations))


def process_fork_event(parent: ProcessFacts, child_pid: int, ts_ns: int, clock: Clock, *,
                       point: str = "cn_proc") -> Event:
    """``process.fork``: ``parent`` (the envelope's process) created ``child_pid``."""
    return Event.create(ProcessFork(child_pid=child_pid, is_thread=False), ts=clock.wall(ts_ns), ts_mono=ts_ns,
                        process=parent.process_info(), actor=parent.actor(), source=_source(point),
                        attrs=parent.attrs() or None,
                        confidence=_confidence(parent.missing, reasons=["kernel_process_event"]))


def _file_info(path: str, stat: os.stat_result | None) -> FileInfo:
    name = os.path.basename(path)
    ext = os.path.splitext(name)[1].lstrip(".") or None
    if stat is None:
        return FileInfo(path=path, name=name or None, extension=ext)
    return FileInfo(path=path, name=name or None, extension=ext, size=stat.st_size, inode=stat.st_ino,
                    mode=f"{stat.st_mode & 0o7777:04o}", uid=stat.st_uid, gid=stat.st_gid,
                    mtime=_mtime_text(stat.st_mtime_ns))


def _file_event(data: Any, facts: ProcessFacts, ts_ns: int, clock: Clock, missing: list[str], point: str,
                limitations: list[str] | None, extra: dict[str, Any] | None) -> Event:
    return Event.create(data, ts=clock.wall(ts_ns), ts_mono=ts_ns, process=facts.process_info(),
                        actor=facts.actor(), source=_source(point), attrs=facts.attrs(extra) or None,
                        confidence=_confidence(missing, reasons=["kernel_file_event"], completeness="metadata_only",
                                               limitations=limitations))


def file_write_event(facts: ProcessFacts, path: str, ts_ns: int, clock: Clock, *, created: bool | None,
                     stat: os.stat_result | None, content_hash: str | None = None, point: str = "fanotify",
                     limitations: list[str] | None = None, extra: dict[str, Any] | None = None) -> Event:
    """``file.write``: ``path`` was written and closed (``stat`` after the close, None if it was gone)."""
    missing = ["file.size"] if stat is None else []
    data = FileWrite(path=path, created=created, file=_file_info(path, stat), content_hash=content_hash)
    return _file_event(data, facts, ts_ns, clock, missing, point, limitations, extra)


def file_open_event(facts: ProcessFacts, path: str, ts_ns: int, clock: Clock, *, stat: os.stat_result | None,
                    point: str = "fanotify", extra: dict[str, Any] | None = None) -> Event:
    """``file.open`` of a sensitive path (the open flags are not reported by the kernel: ``flags`` is empty)."""
    data = FileOpen(path=path, flags=[], file=_file_info(path, stat))
    return _file_event(data, facts, ts_ns, clock, ["flags"], point, None, extra)


def file_read_event(facts: ProcessFacts, path: str, ts_ns: int, clock: Clock, *, stat: os.stat_result | None,
                    point: str = "fanotify", extra: dict[str, Any] | None = None) -> Event:
    """``file.read`` of a sensitive path (it was read; how many bytes is not reported)."""
    data = FileRead(path=path, file=_file_info(path, stat))
    return _file_event(data, facts, ts_ns, clock, [], point, None, extra)


def file_delete_event(facts: ProcessFacts, path: str, ts_ns: int, clock: Clock, *, is_directory: bool = False,
                      point: str = "fanotify", extra: dict[str, Any] | None = None) -> Event:
    """``file.delete``."""
    name = os.path.basename(path)
    data = FileDelete(path=path, file=FileInfo(path=path, name=name or None, is_directory=is_directory or None))
    return _file_event(data, facts, ts_ns, clock, [], point, None, extra)


def file_rename_event(facts: ProcessFacts, old_path: str, new_path: str, ts_ns: int, clock: Clock, *,
                      point: str = "fanotify", extra: dict[str, Any] | None = None) -> Event:
    """``file.rename``."""
    data = FileRename(old_path=old_path, new_path=new_path)
    return _file_event(data, facts, ts_ns, clock, [], point, None, extra)
