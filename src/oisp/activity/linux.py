"""The Linux sources: process events from the kernel's connector, file events from fanotify, one reader thread.

One thread reads both kernel queues, in an order that makes the scope right for every file event: at time ``t``
it drains the process events, reads what fanotify has queued (bytes, not decoded), drains the process events
again, and only then decodes the file events and filters them by the scope. A file event read by then was made
by a process whose fork happened before it, so the second drain has told the scope about that process; exits
read in the pass are applied after the file events (a child that forks, writes and exits within one pass is
still in scope for its write). The batch is handed over with ``t``: every kernel event that happened before ``t``
was queued before it (the kernel queues them synchronously in the fork/exec/exit and close/unlink/rename paths),
so once the batch is emitted ``t`` is the watermark.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from oisp.activity import build, cn_proc, fanotify
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.procfs import read_exe, read_process
from oisp.activity.scope import AgentScope
from oisp.activity.settings import ActivitySettings, ActivityStats, SensitivePaths
from oisp.events import Event

assert sys.platform == "linux"

__all__ = ["FileReader", "LinuxSource", "ProcessReader", "ProcessTable"]

log = logging.getLogger(__name__)

#: (source, events, watermark in monotonic ns) -> keep going; called from the source's thread
Deliver = Callable[[Any, list[Event], int], bool]

#: longest a source's thread waits for its descriptor before it moves its watermark on (idle sources)
IDLE_WAKE = 0.02
#: shortest time between two passes of the reader (seconds): what events may wait to be read together
MIN_PASS = 0.005
#: most records held for execs waiting for their executable (past it the oldest goes out without it)
MAX_HELD = 32768
#: records of processes out of scope kept for an agent learned late (its AI call reported after its first effects)
RECENT = 8192
#: how far back an agent learned late is replayed when the AI event does not say when the call was made (ns)
REPLAY_NS = 2_000_000_000
#: seconds without any agent process after which the file marks are removed (they come back with an agent)
DISARM_AFTER = 1.0


class ProcessTable:
    """What is known about the observed processes, by pid (bounded; shared by the sources)."""

    def __init__(self, limit: int) -> None:
        self._facts: OrderedDict[int, ProcessFacts] = OrderedDict()
        self._exec_paths: OrderedDict[int, list[str]] = OrderedDict()
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

    def note_exec_open(self, pid: int, path: str) -> None:
        """``pid`` opened ``path`` to execute it (its program, a script's interpreter, the dynamic loader)."""
        with self._lock:
            paths = self._exec_paths.get(pid)
            if paths is None:
                self._exec_paths[pid] = paths = []
                if len(self._exec_paths) > self._limit:
                    self._exec_paths.popitem(last=False)
            if len(paths) < 4:
                paths.append(path)

    def has_exec_paths(self, pid: int) -> bool:
        """Whether the files ``pid`` opened for exec are known."""
        return pid in self._exec_paths

    def take_exec_paths(self, pid: int) -> list[str]:
        """The paths ``pid`` opened for exec since the last call (forgotten here)."""
        with self._lock:
            return self._exec_paths.pop(pid, None) or []

    def pop(self, pid: int) -> ProcessFacts | None:
        """Forget ``pid`` and return what was known."""
        with self._lock:
            return self._facts.pop(pid, None)

    def __len__(self) -> int:
        return len(self._facts)


class LinuxSource:
    """The reader thread of the process and file readers (either may be absent)."""

    name = "linux"

    def __init__(self, processes: ProcessReader | None, files: FileReader | None, deliver: Deliver) -> None:
        self.processes = processes
        self.files = files
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        #: the watermark so far (monotonic ns)
        self._mark = time.monotonic_ns()
        #: (agent pid, since) of agents learned since the last pass (appended from the event loop)
        self._replays: deque[tuple[int, int]] = deque()

    def replay(self, agent: int, since: int) -> None:
        """``agent`` was just learned: at the next pass, emit what it and the processes it started did since
        ``since`` (monotonic ns) before this was known (thread-safe). The file marks are armed at once."""
        if self.files is not None:
            self.files.arm()
        self._replays.append((agent, since))

    def _replay(self, out: list[Event]) -> None:
        processes, files = self.processes, self.files
        while self._replays:
            agent, since = self._replays.popleft()
            tree = processes.tree_since(agent, since) if processes is not None else {agent}
            if files is not None:
                files.replay(agent, tree, since, out, exec_opens=True)
            if processes is not None:
                processes.replay(agent, tree, since, out, exits=False)
            if files is not None:
                files.replay(agent, tree, since, out, exec_opens=False)
            if processes is not None:
                processes.replay(agent, tree, since, out, exits=True)

    def start(self) -> None:
        """Start the reader thread."""
        self._thread = threading.Thread(target=self._run, name="oisp-activity", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _batch_priority()
        poller = select.poll()
        for reader in (self.processes, self.files):
            if reader is not None:
                poller.register(reader.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        processes, files = self.processes, self.files
        last = 0.0
        while not self._stop.is_set():
            poller.poll(IDLE_WAKE * 1000)
            # pace the passes: events arriving meanwhile wait in the kernel's queues and are read together
            # (fanotify sees every open on the machine; a pass per event would cost more than the events)
            pause = last + MIN_PASS - time.monotonic()
            if pause > 0 and self._stop.wait(pause):
                break
            if self._stop.is_set():
                break
            last = time.monotonic()
            mark = time.monotonic_ns()
            events: list[Event] = []
            try:
                if processes is not None:
                    processes.drain(events)
                raw = files.read_raw() if files is not None else []
                if processes is not None:
                    processes.drain(events)
                if files is not None:
                    files.decode(raw, events)
                if self._replays:
                    self._replay(events)
                files_drained = files is not None and files.drained
                if processes is not None:
                    processes.finish(events, files_drained=files_drained, files_read=files is not None)
                    floor = processes.floor()
                    if floor is not None:
                        mark = min(mark, floor)
                if (processes is not None and not processes.drained) or (files is not None and not files_drained):
                    mark = self._mark  # a queue still holds events from before the pass: no further than before
                if files is not None:
                    files.sync_marks(last)
            except Exception:
                log.exception("activity: reading kernel events failed")
                mark = self._mark
            self._mark = max(self._mark, mark)
            if not self._deliver(self, events, mark):
                break

    def stop(self) -> None:
        """Stop the thread, close the kernel descriptors."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for reader in (self.processes, self.files):
            if reader is not None:
                reader.close()


def _batch_priority() -> None:
    """Make the calling thread ``SCHED_BATCH``: it gets its fair share of the CPU, but its wake-ups do not preempt
    the thread running on that core (the kernel wakes the reader on the core of the process whose event woke it:
    the agent's); events wait in the kernel's queues meanwhile, a little longer."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread, on Linux
    except (OSError, AttributeError) as exc:
        log.debug("activity: the reader thread keeps its scheduling policy: %s", exc)


class ProcessReader:
    """``process.exec``/``exit``/``fork`` of processes in scope, from netlink ``CN_PROC``.

    A process that is gone before its exec is read leaves no ``/proc/<pid>/exe``; the file reader reports the
    files it opened for exec (``FAN_OPEN_EXEC``, queued before the exec record), so such an exec is held until
    the file reader's next pass and takes its executable from there. Its later
    records wait with it (one pass: 5 to 25 ms).
    """

    def __init__(self, scope: AgentScope, table: ProcessTable, settings: ActivitySettings, stats: ActivityStats,
                 clock: Clock, admit: Callable[[int | None], bool]) -> None:
        self._connector = cn_proc.ProcConnector()
        self._scope = scope
        self._table = table
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._admit = admit
        #: passes of the reader; a held exec waits for a whole pass of the file reader after the one it came in
        self._pass = 0
        self._exits: list[cn_proc.ExitEvent] = []
        self._records: list[cn_proc.ProcEvent] = []
        self._self = os.getpid()
        #: records waiting for a held exec, in order: (record, what was read when it was read)
        self._held: deque[tuple[cn_proc.ProcEvent, Any, int]] = deque()
        self._held_pids: dict[int, int] = {}
        self._files_read = False
        self._files_drained_pass = -1
        #: whether the last drain emptied the connector's queue
        self.drained = True
        #: recent records of processes out of scope, for an agent learned late (:meth:`replay`)
        self._recent: deque[cn_proc.ProcEvent] = deque(maxlen=RECENT)

    def fileno(self) -> int:
        return self._connector.fileno()

    def floor(self) -> int | None:
        """Below the watermark: just before the oldest record still held back (None: nothing held)."""
        if not self._held:
            return None
        return self._held[0][0].timestamp_ns - 1

    def drain(self, out: list[Event], *, limit: int = 64) -> None:
        """Read what is queued (at most ``limit`` rounds of 256 datagrams); exits wait for :meth:`finish`."""
        records = self._records
        more = False
        for _ in range(limit):
            records.clear()
            more = self._connector.read(records, limit=256)
            self._stats.process_records += len(records)
            for record in records:
                try:
                    self._read(record, out)
                except Exception:  # one odd record never stops the source
                    log.exception("activity: process record %r", record)
            if not more:
                break
        self.drained = not more
        self._stats.process_overruns = self._connector.overruns
        self._stats.malformed = self._connector.malformed

    def finish(self, out: list[Event], *, files_drained: bool, files_read: bool) -> None:
        """End of a pass: apply the exits read in it, and build the held execs whose wait is over (the file
        reader drained its queue in a later pass than the one that held them)."""
        if files_drained:
            self._files_drained_pass = self._pass
        exits, self._exits = self._exits, []
        for record in exits:
            try:
                self._exit(record, out)
            except Exception:
                log.exception("activity: process record %r", record)
        self._files_read = files_read
        self._release(out)
        self._pass += 1

    # reading: the scope learns at once ----------------------------------------------------------
    def _read(self, record: cn_proc.ProcEvent, out: list[Event]) -> None:
        scope = self._scope
        if isinstance(record, cn_proc.ForkEvent):
            scope.on_fork(record.parent, record.child)
            if record.child == self._self or not scope.in_scope(record.child):
                self._recent.append(record)
                return
            agent = scope.agent_of(record.child)
            if agent == record.child or not self._admit(agent):
                return  # an agent's own fork (read after its AI call was reported): not one of its effects
            self._then(record, agent, out, record.parent)
        elif isinstance(record, cn_proc.ExecEvent):
            pid = record.pid
            if not scope.in_scope(pid):
                # out of scope: no /proc read, except the executable's link when include_exe may take it in
                exe = read_exe(pid) if self._settings.include_exe else None
                if exe is not None:
                    scope.on_exec(pid, exe)
                if not scope.in_scope(pid):
                    self._recent.append(record)
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
            if snap.exe is None and self._files_read and not self._table.has_exec_paths(pid):
                self._held.append((record, (snap, agent), self._pass))
                self._held_pids[pid] = self._held_pids.get(pid, 0) + 1
                return
            self._then(record, (snap, agent), out, pid)
        else:
            self._exits.append(record)

    def _exit(self, record: cn_proc.ExitEvent, out: list[Event]) -> None:
        scope = self._scope
        pid = record.pid
        in_scope = scope.in_scope(pid)
        agent = scope.agent_of(pid)
        scope.on_exit(pid)
        if pid == self._self or not in_scope:
            self._table.pop(pid)
            self._recent.append(record)
            return
        self._then(record, agent, out, pid)

    # an agent learned late ----------------------------------------------------------------------
    def tree_since(self, agent: int, since: int) -> set[int]:
        """The pids ``agent`` forked (and they forked) since ``since``, from the recent out-of-scope records."""
        tree = {agent}
        for record in self._recent:
            if isinstance(record, cn_proc.ForkEvent) and record.timestamp_ns >= since and record.parent in tree:
                tree.add(record.child)
        return tree

    def replay(self, agent: int, tree: set[int], since: int, out: list[Event], *, exits: bool) -> None:
        """Emit what the processes of ``tree`` did since ``since`` while they were not known to be in scope
        (the AI call that made ``agent`` an agent was reported after its first effects were read): forks and
        execs, or (``exits``, after their file effects) exits."""
        kept: deque[cn_proc.ProcEvent] = deque(maxlen=RECENT)
        scope = self._scope
        for record in self._recent:
            if record.timestamp_ns < since or not _of_tree(record, tree) \
                    or isinstance(record, cn_proc.ExitEvent) is not exits:
                kept.append(record)
                continue
            try:
                if isinstance(record, cn_proc.ForkEvent):
                    scope.on_fork(record.parent, record.child)
                    self._build(record, agent, out)
                elif isinstance(record, cn_proc.ExecEvent):
                    snap = read_process(record.pid)
                    if snap.exe:
                        scope.on_exec(record.pid, snap.exe)
                    self._build(record, (snap, agent), out)
                else:
                    scope.on_exit(record.pid)
                    self._build(record, agent, out)
            except Exception:
                log.exception("activity: replaying %r", record)
        self._recent = kept

    def _then(self, record: cn_proc.ProcEvent, state: Any, out: list[Event], pid: int) -> None:
        if pid in self._held_pids:
            self._held.append((record, state, self._pass))
            self._held_pids[pid] += 1
        else:
            self._build(record, state, out)

    def _release(self, out: list[Event]) -> None:
        held = self._held
        if not held:
            return
        while held:
            record, state, since = held[0]
            # the exec's FAN_OPEN_EXEC was queued before its record: the file reader's next pass has read it
            if isinstance(record, cn_proc.ExecEvent) and since >= self._files_drained_pass \
                    and not self._table.has_exec_paths(record.pid) and len(held) <= MAX_HELD:
                return
            held.popleft()
            pid = record.parent if isinstance(record, cn_proc.ForkEvent) else record.pid
            left = self._held_pids.get(pid, 1) - 1
            if left <= 0:
                self._held_pids.pop(pid, None)
            else:
                self._held_pids[pid] = left
            try:
                self._build(record, state, out)
            except Exception:
                log.exception("activity: process record %r", record)

    # building the events ------------------------------------------------------------------------
    def _build(self, record: cn_proc.ProcEvent, state: Any, out: list[Event]) -> None:
        clock = self._clock
        if isinstance(record, cn_proc.ForkEvent):
            agent = state
            parent = self._table.get(record.parent, self._scope.agent_of(record.parent))
            self._table.put(ProcessFacts(record.child, ppid=record.parent, exe=parent.exe, args=parent.args,
                                         cwd=parent.cwd, uid=parent.uid, gid=parent.gid, name=parent.name,
                                         start_ns=record.timestamp_ns, agent=agent))
            if self._settings.fork_events:
                out.append(build.process_fork_event(parent, record.child, record.timestamp_ns, clock))
        elif isinstance(record, cn_proc.ExecEvent):
            snap, agent = state
            pid = record.pid
            before = self._table.pop(pid)
            opened = self._table.take_exec_paths(pid)
            exe, script = snap.exe, None
            missing = list(snap.missing)
            if exe is None and opened:
                exe, script = _exe_of(opened)
                missing.remove("exe")
            if before is not None:  # what the fork inherited stands in for what /proc no longer shows
                missing = [m for m in missing if not (m in ("ppid", "cwd", "uid") and getattr(before, m) is not None)]
            facts = ProcessFacts(pid, ppid=snap.ppid if snap.ppid is not None else (before.ppid if before else None),
                                 exe=exe, args=snap.args, cwd=snap.cwd or (before.cwd if before else None),
                                 uid=snap.uid if snap.uid is not None else (before.uid if before else None),
                                 gid=snap.gid, name=snap.name,
                                 start_ns=before.start_ns if before else record.timestamp_ns, agent=agent,
                                 missing=tuple(missing))
            self._table.put(facts)
            if facts.missing:
                self._stats.partial += 1
            event = build.process_exec_event(facts, record.timestamp_ns, clock, script=script,
                                             exe_from="open_exec" if snap.exe is None and exe else None)
            out.append(event)
        else:
            agent = state
            pid = record.pid
            known = self._table.pop(pid)
            self._table.take_exec_paths(pid)
            if known is None:
                if not self._admit(agent):
                    return
                known = ProcessFacts(pid, ppid=record.parent, agent=agent, missing=("exe", "args"))
            facts = known
            facts.agent = agent
            if record.parent and not facts.ppid:
                facts.ppid = record.parent
                facts.changed()
            out.append(build.process_exit_event(facts, record.timestamp_ns, clock, status=record.status))

    def close(self) -> None:
        """Close the connector's socket."""
        self._connector.close()


def _of_tree(record: cn_proc.ProcEvent, tree: set[int]) -> bool:
    if isinstance(record, cn_proc.ForkEvent):
        return record.parent in tree
    return record.pid in tree


_LOADERS = ("ld-linux", "ld-musl", "ld.so", "ld64.so")


def _exe_of(opened: list[str]) -> tuple[str, str | None]:
    """(executable, script) of the files a process opened for exec: the binary, then (for a ``#!`` script) its
    interpreter, then the dynamic loader."""
    programs = [p for p in opened if not os.path.basename(p).startswith(_LOADERS)] or opened
    if len(programs) > 1:
        return programs[-1], programs[0]
    return programs[0], None


_WRITE_MASK = fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE | fanotify.FAN_DELETE | fanotify.FAN_RENAME \
    | fanotify.FAN_OPEN_EXEC


#: file events kept for an agent learned late (not plain opens: every open on the machine is one)
_EFFECTS = fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE | fanotify.FAN_DELETE | fanotify.FAN_RENAME \
    | fanotify.FAN_OPEN_EXEC


class FileReader:
    """``file.write``/``delete``/``rename``, and ``file.open`` of sensitive paths, from fanotify.

    The filesystems are marked only while there is something to observe (an agent process in scope, or scope
    ``all``): :meth:`arm` when an agent appears, :meth:`sync_marks` after each pass, which removes the marks
    ``DISARM_AFTER`` seconds after the last agent process is gone. Without marks the kernel queues no file event
    at all, so a machine without agents pays for the process connector only."""

    def __init__(self, scope: AgentScope, table: ProcessTable, settings: ActivitySettings, stats: ActivityStats,
                 clock: Clock, admit: Callable[[int | None], bool]) -> None:
        self._group = fanotify.Fanotify()
        self._scope = scope
        self._table = table
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._admit = admit
        self._sensitive = SensitivePaths(settings.sensitive_paths)
        self._mask = mask = _WRITE_MASK | (fanotify.FAN_OPEN if settings.sensitive_paths else 0)
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
        #: the filesystems watched while the marks are armed (all of them were marked once, to know)
        self.marked = marked
        self._arming = threading.Lock()
        #: whether the filesystems are marked now; :meth:`sync_marks` removes the marks while no agent exists
        self.armed = True
        #: monotonic seconds since which the scope has been empty (None: it is not)
        self._empty_since: float | None = None
        self._disarm()  # no agent yet: nothing marked until one appears
        if not self._group.reports_rename:
            stats.limitations.append("renames are not reported (FAN_RENAME needs Linux 5.17)")
        #: paths created (FAN_CREATE) by a process in scope and not closed yet: "created" on their file.write
        self._created: OrderedDict[str, None] = OrderedDict()
        self._self = os.getpid()
        self._records: list[fanotify.FanEvent] = []
        #: directory handle -> its path, for one pass
        self._dirs: dict[tuple[int, bytes], str | None] = {}
        #: whether the last read_raw emptied the queue
        self.drained = True
        #: recent effects of processes out of scope (read time, record), for an agent learned late
        self._recent: deque[tuple[int, fanotify.FanEvent]] = deque(maxlen=RECENT)

    @property
    def mode(self) -> str:
        """Which fanotify reporting mode the kernel granted."""
        return self._group.mode

    # arming: the filesystem-wide marks exist only while there is something to observe ---------------
    def _needed(self) -> bool:
        return self._scope.all_processes or len(self._scope) > 0

    def arm(self) -> None:
        """Mark the filesystems (an agent appeared; idempotent, thread-safe: called from :meth:`Activity.add_agent`
        in the event loop, and by the reader thread when the scope grew by itself, e.g. ``include_exe``)."""
        with self._arming:
            self._empty_since = None
            if self.armed:
                return
            for point in self.marked:
                try:
                    self._group.mark_filesystem(point, self._mask)
                except OSError as exc:
                    log.warning("activity: files on %s are not observed: %s", point, exc.strerror or exc)
            self.armed = True

    def sync_marks(self, now: float) -> None:
        """Arm or disarm after a pass of the reader: with no agent process in scope for ``DISARM_AFTER`` seconds
        (and scope ``agents``) the marks are removed, so that the machine pays no file event while there is no
        agent; they come back with the next agent (:meth:`arm`)."""
        if self._needed():
            self._empty_since = None
            if not self.armed:
                self.arm()
            return
        if not self.armed:
            return
        if self._empty_since is None:
            self._empty_since = now
            return
        if now - self._empty_since < DISARM_AFTER:
            return
        self._disarm()

    def _disarm(self) -> None:
        with self._arming:
            if not self.armed or self._needed():
                return
            for point in self.marked:
                try:
                    self._group.unmark_filesystem(point, self._mask)
                except OSError as exc:
                    log.debug("activity: unmarking %s: %s", point, exc)
            self.armed = False
            self._empty_since = None

    def fileno(self) -> int:
        return self._group.fileno()

    def _wanted(self, pid: int) -> bool:
        return pid != self._self and self._scope.in_scope(pid)

    def read_raw(self, *, limit: int = 64) -> list[bytes]:
        """What is queued, undecoded (at most ``limit`` reads of 64 KiB; :attr:`drained` says if that was all)."""
        raw = self._group.read_raw(limit)
        self.drained = len(raw) < limit
        return raw

    def decode(self, raw: list[bytes], out: list[Event]) -> None:
        """Decode ``raw`` and append the events of processes in scope."""
        self._dirs.clear()  # directory paths are resolved once a pass (what they are now, as before the cache)
        records = self._records
        before = self._group.overflows
        now = time.monotonic_ns()
        for buf in raw:
            records.clear()
            self._group.parse(buf, records, self._wanted, _EFFECTS)
            self._stats.file_records += len(records)
            for record in records:
                if record.mask & fanotify.FAN_Q_OVERFLOW:
                    continue
                if not self._wanted(record.pid):
                    if record.pid != self._self:
                        self._recent.append((now, record))
                    continue
                try:
                    self._handle(record, now, out)
                except Exception:
                    log.exception("activity: file record %r", record)
        self._stats.file_overflows = self._group.overflows
        if self._group.overflows != before:
            log.warning("activity: the kernel's fanotify queue overflowed: file events were lost")

    def replay(self, agent: int, tree: set[int], since: int, out: list[Event], *, exec_opens: bool) -> None:
        """Emit the effects of ``tree`` read since ``since`` while it was not known to be in scope (with
        ``exec_opens``, only note the files opened for exec, for the process records replayed next)."""
        kept: deque[tuple[int, fanotify.FanEvent]] = deque(maxlen=RECENT)
        for read_at, record in self._recent:
            opens_exec = bool(record.mask & fanotify.FAN_OPEN_EXEC)
            if read_at < since or record.pid not in tree or (exec_opens and not opens_exec):
                kept.append((read_at, record))
                continue
            try:
                record = fanotify.decoded(record)
                if exec_opens:
                    if record.dfid_name is not None:
                        path = self._group.path_of(record.dfid_name, self._dirs)
                        if path is not None:
                            self._table.note_exec_open(record.pid, path)
                    kept.append((read_at, record._replace(mask=record.mask & ~fanotify.FAN_OPEN_EXEC)))
                else:
                    self._handle(record, read_at, out, agent=agent)
            except Exception:
                log.exception("activity: replaying %r", record)
        self._recent = kept

    def _handle(self, record: fanotify.FanEvent, now: int, out: list[Event], *, agent: int | None = None) -> None:
        # what the record can produce is decided from its mask and name first: a path is resolved, /proc read
        # and an event built only for a record that makes an event (most opens of an agent's processes do not)
        mask = record.mask
        group = self._group
        clock = self._clock
        dirs = self._dirs
        if mask & fanotify.FAN_RENAME:
            if record.old is None or record.new is None:
                return
            if agent is None:
                agent = self._scope.agent_of(record.pid)
                if not self._admit(agent):
                    return
            old = group.path_of(record.old, dirs) or f"[unresolved]/{record.old.name}"
            new = group.path_of(record.new, dirs) or f"[unresolved]/{record.new.name}"
            facts = self._table.get(record.pid, agent)
            out.append(build.file_rename_event(facts, old, new, now, clock))
            self._created.pop(old, None)
            return
        file_id = record.dfid_name
        if file_id is None or mask & fanotify.FAN_ONDIR:
            return
        effects = mask & (fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE | fanotify.FAN_DELETE)
        plain_open = mask & fanotify.FAN_OPEN and not mask & (fanotify.FAN_CLOSE_WRITE | fanotify.FAN_CREATE
                                                              | fanotify.FAN_OPEN_EXEC)
        if not effects and not mask & fanotify.FAN_OPEN_EXEC \
                and not (plain_open and self._sensitive.may_match_name(file_id.name or "")):
            return
        path = group.path_of(file_id, dirs)
        unresolved = path is None
        if path is None:
            path = f"[unresolved]/{file_id.name}"
        if mask & fanotify.FAN_OPEN_EXEC:
            self._table.note_exec_open(record.pid, path)
            if not effects:
                return
        sensitive = bool(plain_open) and self._sensitive(path)
        if mask & fanotify.FAN_CREATE:
            self._created[path] = None
            while len(self._created) > 4096:
                self._created.popitem(last=False)
        if not (sensitive or mask & (fanotify.FAN_CLOSE_WRITE | fanotify.FAN_DELETE)):
            return
        if agent is None:
            agent = self._scope.agent_of(record.pid)
            if not self._admit(agent):
                return
        facts = self._table.get(record.pid, agent)
        extra = {"oisp.path_unresolved": True} if unresolved else None
        if sensitive:
            out.append(build.file_open_event(facts, path, now, clock, stat=_stat(path),
                                             extra={"oisp.sensitive": True}))
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
        """Close the fanotify group."""
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
