"""The Linux sources: process events from the kernel's connector, file events from fanotify.

Each source is a thread that waits on its kernel descriptor, drains what is queued, turns the records of processes
in scope into events, and hands the batch to the monitor with the monotonic time taken *before* the drain: every
kernel event that happened before that time was queued before it (the kernel queues them synchronously in the
fork/exec/exit and close/unlink/rename paths), so once the batch is emitted that time is the source's watermark.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from oisp.activity import build, cn_proc, fanotify
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.procfs import read_process
from oisp.activity.scope import AgentScope
from oisp.activity.settings import ActivitySettings, ActivityStats, SensitivePaths
from oisp.events import Event

assert sys.platform == "linux"

__all__ = ["FileSource", "ProcessSource", "ProcessTable"]

log = logging.getLogger(__name__)

#: (source, events, watermark in monotonic ns) -> None; called from the source's thread
Deliver = Callable[[Any, list[Event], int], bool]

#: longest a source's thread waits for its descriptor before it moves its watermark on (idle sources)
IDLE_WAKE = 0.02


class ProcessTable:
    """What is known about the observed processes, by pid (bounded; shared by the sources)."""

    def __init__(self, limit: int) -> None:
        self._facts: OrderedDict[int, ProcessFacts] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, pid: int, agent: int | None) -> ProcessFacts:
        """The facts of ``pid``, read from /proc when not known yet."""
        with self._lock:
            facts = self._facts.get(pid)
        if facts is not None:
            facts.agent = agent
            return facts
        snap = read_process(pid)
        facts = ProcessFacts(pid, ppid=snap.ppid, exe=snap.exe, args=snap.args, cwd=snap.cwd, uid=snap.uid,
                             gid=snap.gid, name=snap.name, agent=agent, missing=snap.missing)
        self.put(facts)
        return facts

    def put(self, facts: ProcessFacts) -> None:
        """Remember ``facts`` (the oldest entry goes when the table is full)."""
        with self._lock:
            self._facts[facts.pid] = facts
            if len(self._facts) > self._limit:
                self._facts.popitem(last=False)

    def pop(self, pid: int) -> ProcessFacts | None:
        """Forget ``pid`` and return what was known."""
        with self._lock:
            return self._facts.pop(pid, None)

    def __len__(self) -> int:
        return len(self._facts)


class _Source:
    """A thread draining one kernel descriptor."""

    name = ""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    def fileno(self) -> int:
        raise NotImplementedError

    def drain(self, out: list[Event]) -> bool:
        """Read what is queued, append the events to emit; True when more may be queued."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"oisp-activity-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll(IDLE_WAKE * 1000)
            if self._stop.is_set():
                break
            mark = time.monotonic_ns()
            events: list[Event] = []
            try:
                while self.drain(events) and len(events) < 2048:
                    pass
            except Exception:
                log.exception("activity: the %s source failed", self.name)
            if not self._deliver(self, events, mark):
                break

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class ProcessSource(_Source):
    """``process.exec``/``exit``/``fork`` of processes in scope, from netlink ``CN_PROC``."""

    name = "processes"

    def __init__(self, scope: AgentScope, table: ProcessTable, settings: ActivitySettings, stats: ActivityStats,
                 clock: Clock, deliver: Deliver, admit: Callable[[int | None], bool]) -> None:
        super().__init__(deliver)
        self._connector = cn_proc.ProcConnector()
        self._scope = scope
        self._table = table
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._admit = admit
        self._records: list[cn_proc.ProcEvent] = []
        self._self = os.getpid()

    def fileno(self) -> int:
        return self._connector.fileno()

    def drain(self, out: list[Event]) -> bool:
        records = self._records
        records.clear()
        more = self._connector.read(records, limit=256)
        self._stats.process_overruns = self._connector.overruns
        self._stats.malformed = self._connector.malformed
        self._stats.process_records += len(records)
        for record in records:
            try:
                self._handle(record, out)
            except Exception:  # one odd record never stops the source
                log.exception("activity: process record %r", record)
        return more

    def _handle(self, record: cn_proc.ProcEvent, out: list[Event]) -> None:
        scope = self._scope
        clock = self._clock
        if isinstance(record, cn_proc.ForkEvent):
            scope.on_fork(record.parent, record.child)
            if record.child == self._self or not scope.in_scope(record.child):
                return
            agent = scope.agent_of(record.child)
            if agent == record.child or not self._admit(agent):
                return  # an agent's own fork (read after its AI call was reported): not one of its effects
            parent = self._table.get(record.parent, scope.agent_of(record.parent))
            self._table.put(ProcessFacts(record.child, ppid=record.parent, exe=parent.exe, args=parent.args,
                                         cwd=parent.cwd, uid=parent.uid, gid=parent.gid, name=parent.name,
                                         start_ns=record.timestamp_ns, agent=agent))
            if self._settings.fork_events:
                out.append(build.process_fork_event(parent, record.child, record.timestamp_ns, clock))
        elif isinstance(record, cn_proc.ExecEvent):
            pid = record.pid
            tracked = scope.in_scope(pid)
            if not tracked and not self._settings.include_exe:
                return
            snap = read_process(pid)
            if snap.exe:
                scope.on_exec(pid, snap.exe)
            if pid == self._self or not scope.in_scope(pid):
                self._table.pop(pid)
                return
            agent = scope.agent_of(pid)
            if not self._admit(agent):
                return
            before = self._table.pop(pid)
            facts = ProcessFacts(pid, ppid=snap.ppid if snap.ppid is not None else (before.ppid if before else None),
                                 exe=snap.exe, args=snap.args, cwd=snap.cwd if snap.cwd else
                                 (before.cwd if before else None), uid=snap.uid if snap.uid is not None else
                                 (before.uid if before else None), gid=snap.gid, name=snap.name,
                                 start_ns=before.start_ns if before else record.timestamp_ns, agent=agent,
                                 missing=tuple(m for m in snap.missing
                                               if not (before and m in ("ppid", "cwd", "uid")
                                                       and getattr(before, m) is not None)))
            self._table.put(facts)
            if facts.missing:
                self._stats.partial += 1
            out.append(build.process_exec_event(facts, record.timestamp_ns, clock))
        else:
            pid = record.pid
            in_scope = scope.in_scope(pid)
            agent = scope.agent_of(pid)
            scope.on_exit(pid)
            known = self._table.pop(pid)
            if pid == self._self or not in_scope:
                return
            if known is None:
                if not self._admit(agent):
                    return
                known = ProcessFacts(pid, ppid=record.parent, agent=agent, missing=("exe", "args"))
            facts = known
            facts.agent = agent
            if record.parent and not facts.ppid:
                facts.ppid = record.parent
            out.append(build.process_exit_event(facts, record.timestamp_ns, clock, status=record.status))

    def close(self) -> None:
        self._connector.close()


_WRITE_MASK = fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE | fanotify.FAN_DELETE | fanotify.FAN_RENAME


class FileSource(_Source):
    """``file.write``/``delete``/``rename``, and ``file.open`` of sensitive paths, from fanotify."""

    name = "files"

    def __init__(self, scope: AgentScope, table: ProcessTable, settings: ActivitySettings, stats: ActivityStats,
                 clock: Clock, deliver: Deliver, admit: Callable[[int | None], bool]) -> None:
        super().__init__(deliver)
        self._group = fanotify.Fanotify()
        self._scope = scope
        self._table = table
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._admit = admit
        self._sensitive = SensitivePaths(settings.sensitive_paths)
        mask = _WRITE_MASK | (fanotify.FAN_OPEN if settings.sensitive_paths else 0)
        marked = []
        for point, fstype in fanotify.local_mounts():
            if point.startswith(("/proc", "/sys")) or not os.access(point, os.W_OK):
                continue
            try:
                self._group.mark_filesystem(point, mask)
                marked.append(point)
            except OSError as exc:
                stats.limitations.append(f"files on {point} ({fstype}) are not observed: {exc.strerror or exc}")
        if not marked:
            self._group.close()
            raise OSError("fanotify could not watch any local filesystem")
        self.marked = marked
        if not self._group.reports_rename:
            stats.limitations.append("renames are not reported (FAN_RENAME needs Linux 5.17)")
        #: paths created (FAN_CREATE) by a process in scope and not closed yet: "created" on their file.write
        self._created: OrderedDict[str, None] = OrderedDict()
        self._self = os.getpid()
        self._records: list[fanotify.FanEvent] = []

    @property
    def mode(self) -> str:
        return self._group.mode

    def fileno(self) -> int:
        return self._group.fileno()

    def _wanted(self, pid: int) -> bool:
        return pid != self._self and self._scope.in_scope(pid)

    def drain(self, out: list[Event]) -> bool:
        records = self._records
        records.clear()
        before = self._group.overflows
        more = self._group.read(records, self._wanted)
        self._stats.file_overflows = self._group.overflows
        self._stats.file_records += len(records)
        if self._group.overflows != before:
            log.warning("activity: the kernel's fanotify queue overflowed: file events were lost")
        now = time.monotonic_ns()
        for record in records:
            if record.mask & fanotify.FAN_Q_OVERFLOW:
                continue
            try:
                self._handle(record, now, out)
            except Exception:
                log.exception("activity: file record %r", record)
        return more

    def _handle(self, record: fanotify.FanEvent, now: int, out: list[Event]) -> None:
        mask = record.mask
        agent = self._scope.agent_of(record.pid)
        if not self._admit(agent):
            return
        group = self._group
        clock = self._clock
        if mask & fanotify.FAN_RENAME:
            if record.old is None or record.new is None:
                return
            old = group.path_of(record.old) or f"[unresolved]/{record.old.name}"
            new = group.path_of(record.new) or f"[unresolved]/{record.new.name}"
            facts = self._table.get(record.pid, agent)
            out.append(build.file_rename_event(facts, old, new, now, clock))
            self._created.pop(old, None)
            return
        if record.dfid_name is None or mask & fanotify.FAN_ONDIR:
            return
        path = group.path_of(record.dfid_name)
        unresolved = path is None
        if path is None:
            path = f"[unresolved]/{record.dfid_name.name}"
        facts = self._table.get(record.pid, agent)
        extra = {"oisp.path_unresolved": True} if unresolved else None
        if mask & fanotify.FAN_OPEN and not mask & (fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE) \
                and self._sensitive(path):
            out.append(build.file_open_event(facts, path, now, clock, stat=_stat(path),
                                             extra={"oisp.sensitive": True}))
        if mask & fanotify.FAN_CREATE:
            self._created[path] = None
            while len(self._created) > 4096:
                self._created.popitem(last=False)
        if mask & fanotify.FAN_CLOSE_WRITE:
            created = path in self._created
            self._created.pop(path, None)
            stat = _stat(path)
            digest = _hash(path, self._settings.hash_limit) if self._settings.hash_files and stat else None
            out.append(build.file_write_event(facts, path, now, clock, created=created, stat=stat,
                                              content_hash=digest, extra=extra))
        if mask & fanotify.FAN_DELETE:
            self._created.pop(path, None)
            out.append(build.file_delete_event(facts, path, now, clock, extra=extra))

    def close(self) -> None:
        self._group.close()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=False)
    except OSError:
        return None


def _hash(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                return None
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
