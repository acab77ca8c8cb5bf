"""File events from watching the working directories of agent processes (watchdog): where the kernel gives no
file events with the writer's pid (Windows: ReadDirectoryChangesW; macOS: FSEvents; Linux without fanotify, or
when forced: inotify).

Such watchers report *what* changed in a directory tree, never *who* changed it. A change under the working
directory of an agent process is attributed to that agent (the nearest directory if several agents' are nested;
the other candidates in ``attrs["oisp.candidate_agents"]``): an editor or a build saving a file in the agent's
folder is reported as the agent's too. Every event says so: ``confidence.level`` ``"low"``,
``process_attribution`` ``"heuristic"``, ``confidence.limitations`` ``file_watcher_directory_attribution``, and
``attrs["oisp.attribution"] = "working_directory"``. Files written outside the watched directories are not seen;
there are no sensitive-file opens (the watchers report changes only).

:class:`WatchCore` is the sans-io part: fed (kind, path, time) changes and which agent watches which directory, it
coalesces a file's many modifications into one ``file.write`` once the file has been quiet for ``quiet_ns`` (on
Windows and macOS there is no close event) and makes the events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from oisp.activity import build, connections
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.scope import AgentScope
from oisp.events import Confidence, Event

__all__ = ["LIMITATION", "DirectoryWatchSource", "WatchCore", "available"]

log = logging.getLogger(__name__)

LIMITATION = "file_watcher_directory_attribution"
#: directories watched at most (each agent's working directory, recursively)
MAX_DIRECTORIES = 64
#: files with a write waiting for quiet at most (more: the oldest is reported at once)
MAX_PENDING = 4096


def available() -> str | None:
    """None when watchdog is installed; else why not."""
    try:
        import watchdog.observers  # noqa: F401
    except ImportError:
        return "the directory watcher needs watchdog (pip install 'oisp[watch]')"
    return None


class WatchCore:
    """Directory changes -> attributed file events (sans-io).

    ``watched``: directory -> the agent pids whose working directory it is. ``facts``: the process facts of an
    agent pid (its envelope blocks).
    """

    def __init__(self, clock: Clock, facts: Callable[[int], ProcessFacts], *, quiet_ns: int = 100_000_000) -> None:
        self.clock = clock
        self.facts = facts
        self.quiet_ns = quiet_ns
        self.watched: dict[str, set[int]] = {}
        #: path -> (first change ns, last change ns, created)
        self._pending: dict[str, tuple[int, int, bool]] = {}
        self.unattributed = 0

    def attribute(self, path: str) -> list[int]:
        """The agents whose watched directory holds ``path``, nearest directory first."""
        best: list[tuple[int, int]] = []
        for directory, agents in self.watched.items():
            if path == directory or path.startswith(directory.rstrip(os.sep) + os.sep):
                best += [(-len(directory), agent) for agent in sorted(agents)]
        best.sort()
        seen: list[int] = []
        for _, agent in best:
            if agent not in seen:
                seen.append(agent)
        return seen

    def change(self, kind: str, path: str, ts_ns: int, dest: str | None = None) -> list[Event]:
        """One change (``created``, ``modified``, ``closed``, ``deleted``, ``moved``); the events due now."""
        out: list[Event] = []
        if kind in ("created", "modified"):
            first, _, created = self._pending.get(path, (ts_ns, ts_ns, False))
            self._pending[path] = (first, ts_ns, created or kind == "created")
            if len(self._pending) > MAX_PENDING:
                oldest = min(self._pending, key=lambda p: self._pending[p][0])
                out += self._write(oldest)
        elif kind == "closed":
            if path in self._pending:
                out += self._write(path)
        elif kind == "deleted":
            self._pending.pop(path, None)
            out += self._make(path, ts_ns, lambda f, extra: build.file_delete_event(
                f, path, ts_ns, self.clock, point="directory_watch", extra=extra))
        elif kind == "moved" and dest:
            pending = self._pending.pop(path, None)
            out += self._make(dest, ts_ns, lambda f, extra: build.file_rename_event(
                f, path, dest, ts_ns, self.clock, point="directory_watch", extra=extra))
            if pending is not None:
                self._pending[dest] = pending
        return out

    def due(self, now_ns: int) -> list[Event]:
        """The writes quiet for ``quiet_ns`` by ``now_ns``."""
        out: list[Event] = []
        for path in [p for p, (_, last, _) in self._pending.items() if now_ns - last >= self.quiet_ns]:
            out += self._write(path)
        return out

    def oldest_pending(self) -> int | None:
        """The time of the oldest change not yet reported (the watermark must stay before it)."""
        return min((first for first, _, _ in self._pending.values()), default=None)

    def _write(self, path: str) -> list[Event]:
        _, last, created = self._pending.pop(path)
        try:
            stat: os.stat_result | None = os.stat(path)
        except OSError:
            stat = None
        return self._make(path, last, lambda f, extra: build.file_write_event(
            f, path, last, self.clock, created=created, stat=stat, point="directory_watch", extra=extra))

    def _make(self, path: str, ts_ns: int, make: Callable[[ProcessFacts, dict[str, Any]], Event]) -> list[Event]:
        agents = self.attribute(path)
        if not agents:
            self.unattributed += 1
            return []
        extra: dict[str, Any] = {"oisp.attribution": "working_directory"}
        if len(agents) > 1:
            extra["oisp.candidate_agents"] = agents
        event = make(self.facts(agents[0]), extra)
        old = event.confidence
        confidence = Confidence(level="low", completeness="partial" if old.missing else "metadata_only",
                                reasons=["directory_watch"], missing=old.missing,
                                limitations=[LIMITATION, *(old.limitations or [])],
                                process_attribution="heuristic", content_source="none")
        return [attrs.evolve(event, confidence=confidence)]


class DirectoryWatchSource:
    """Watches the working directories of the agents of ``scope`` (refreshed every ``poll_interval``) with a
    watchdog observer; changes become attributed file events (:class:`WatchCore`)."""

    name = "files"

    def __init__(self, scope: AgentScope, stats: Any, clock: Clock,
                 deliver: Callable[[Any, list[Event], int], bool], *, poll_interval: float = 0.25,
                 quiet_ns: int = 100_000_000, observer: Any = None) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self._scope = scope
        self._stats = stats
        self._deliver = deliver
        self._interval = poll_interval
        self._facts: dict[int, ProcessFacts] = {}
        self.core = WatchCore(clock, self._facts_of, quiet_ns=quiet_ns)
        self._observer = observer or Observer()
        self._watches: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._changes: list[tuple[str, str, int, str | None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        changes, wake = self._changes, self._wake
        lock = self._lock

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory or event.event_type not in ("created", "modified", "closed", "deleted",
                                                                  "moved"):
                    return
                dest = os.fsdecode(event.dest_path) if event.dest_path else None
                with lock:
                    changes.append((event.event_type, os.fsdecode(event.src_path), time.monotonic_ns(), dest))
                wake.set()

        self._handler = Handler()

    def _facts_of(self, pid: int) -> ProcessFacts:
        facts = self._facts.get(pid)
        if facts is None:
            facts = self._facts[pid] = connections.process_facts(pid, pid)
        return facts

    def start(self) -> None:
        """Start the observer and the thread that keeps the watched directories current."""
        self._observer.start()
        self._refresh()
        self._thread = threading.Thread(target=self._run, name="oisp-activity-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._observer.stop()
            self._observer.join(timeout=5)
        except Exception:  # pragma: no cover - a platform observer failing to stop
            log.exception("activity: stopping the directory watcher failed")

    def _refresh(self) -> None:
        """Watch the working directory of every agent (roots), stop watching those of agents gone."""
        wanted: dict[str, set[int]] = {}
        for pid in self._scope.members():
            if self._scope.agent_of(pid) != pid:
                continue
            cwd = self._facts_of(pid).cwd or _cwd(pid)
            if not cwd or os.path.dirname(cwd) == cwd or not os.path.isdir(cwd):
                continue  # a filesystem's root is not watched recursively (every file of the machine)
            cwd = os.path.realpath(cwd)
            if cwd in wanted or len(wanted) < MAX_DIRECTORIES:
                wanted.setdefault(cwd, set()).add(pid)
        for pid in [p for p in self._facts if self._scope.agent_of(p) != p]:
            del self._facts[pid]
        for directory in [d for d in self._watches if d not in wanted]:
            self._observer.unschedule(self._watches.pop(directory))
        for directory in wanted:
            if directory not in self._watches:
                try:
                    self._watches[directory] = self._observer.schedule(self._handler, directory, recursive=True)
                except OSError as exc:
                    log.warning("activity: cannot watch %s: %s", directory, exc)
        self.core.watched = wanted

    def _run(self) -> None:
        next_refresh = time.monotonic() + self._interval
        while not self._stop.is_set():
            self._wake.wait(min(self._interval, self.core.quiet_ns / 1e9))
            self._wake.clear()
            if time.monotonic() >= next_refresh:
                try:
                    self._refresh()
                except Exception:
                    log.exception("activity: refreshing the watched directories failed")
                next_refresh = time.monotonic() + self._interval
            with self._lock:
                changes, self._changes[:] = list(self._changes), []
            events: list[Event] = []
            for kind, path, ts, dest in changes:
                self._stats.watch_records += 1
                events += self.core.change(kind, path, ts, dest)
            now = time.monotonic_ns()
            events += self.core.due(now)
            oldest = self.core.oldest_pending()
            mark = now if oldest is None else min(now, oldest - 1)
            if not self._deliver(self, events, mark):
                break


def _cwd(pid: int) -> str | None:
    import psutil

    try:
        return psutil.Process(pid).cwd() or None
    except (psutil.Error, OSError):
        return None
