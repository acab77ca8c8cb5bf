"""Processes by polling the process list (psutil): where no kernel process events are available.

Windows and macOS (and Linux without root) get ``process.exec`` and ``process.exit`` of processes in scope, found
by comparing the process list every ``poll_interval`` seconds. A process that starts and ends between two polls is
not seen, exit codes are not known (``exit_code`` -1, named in ``confidence.missing``), and times are the
process's start time and the poll that noticed the exit: every event says ``confidence.completeness = "sampled"``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from oisp.activity import build
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.scope import AgentScope
from oisp.activity.settings import ActivitySettings, ActivityStats
from oisp.events import Event

__all__ = ["PolledSource", "PollingProcessSource"]

log = logging.getLogger(__name__)

LIMITATION = "processes_polled"


class PolledSource:
    """A thread that calls :meth:`poll` every ``poll_interval`` seconds and delivers what it found; the polled
    sources (processes here, connections in :mod:`oisp.activity.sockpoll`) are made of it."""

    name = "polled"
    #: what a failed poll is logged as
    what = "polling"

    def __init__(self, settings: ActivitySettings, deliver: Callable[[Any, list[Event], int], bool]) -> None:
        self._settings = settings
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling in a thread."""
        self._thread = threading.Thread(target=self._run, name=f"oisp-activity-poll-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.poll_interval):
            mark = time.monotonic_ns()
            events: list[Event] = []
            try:
                self.poll(events)
            except Exception:
                log.exception("activity: %s failed", self.what)
            if not self._deliver(self, events, mark):
                break

    def poll(self, out: list[Event]) -> None:
        """One poll: append the events found."""
        raise NotImplementedError


class PollingProcessSource(PolledSource):
    """A thread comparing the process list every ``poll_interval`` seconds."""

    name = "processes"

    def __init__(self, scope: AgentScope, settings: ActivitySettings, stats: ActivityStats, clock: Clock,
                 deliver: Callable[[Any, list[Event], int], bool], admit: Callable[[int | None], bool]) -> None:
        super().__init__(settings, deliver)
        self._scope = scope
        self._stats = stats
        self._clock = clock
        self._admit = admit
        #: pid -> (create time, facts when in scope)
        self._known: dict[int, tuple[float, ProcessFacts | None]] = {}

    def prime(self) -> None:
        """Take the process list as it is: processes running now are not reported as new."""
        self._known = {p.pid: (_created(p), None) for p in psutil.process_iter()}

    what = "polling processes"

    def start(self) -> None:
        """Prime and start polling in a thread."""
        self.prime()
        super().start()

    def poll(self, out: list[Event]) -> None:
        """Compare the process list with the last one; append the events of processes in scope."""
        now = time.monotonic_ns()
        current: dict[int, psutil.Process] = {p.pid: p for p in psutil.process_iter()}
        self._stats.process_records += len(current)
        for pid in list(self._known):
            if pid in current and _created(current[pid]) == self._known[pid][0]:
                continue
            _, facts = self._known.pop(pid)
            self._scope.on_exit(pid)
            if facts is not None:
                out.append(_exit(facts, now, self._clock))
        fresh = sorted((_created(p), pid, p) for pid, p in current.items() if pid not in self._known)
        for created, pid, proc in fresh:
            try:
                with proc.oneshot():
                    ppid = proc.ppid()
                    self._scope.on_fork(ppid, pid)
                    exe = _safe(proc.exe)
                    if exe:
                        self._scope.on_exec(pid, exe)
                    facts = None
                    if self._scope.in_scope(pid) and self._admit(self._scope.agent_of(pid)):
                        start = int(created * 1e9) - self._clock.offset_ns
                        facts = ProcessFacts(pid, ppid=ppid, exe=exe, args=_safe(proc.cmdline),
                                             cwd=_safe(proc.cwd), name=_safe(proc.name), start_ns=start,
                                             agent=self._scope.agent_of(pid))
                        facts.missing = tuple(k for k in ("exe", "args") if getattr(facts, k) is None)
                        out.append(build.process_exec_event(facts, max(start, 0), self._clock,
                                                            point="psutil_poll", limitations=[LIMITATION],
                                                            sampled=True))
            except psutil.Error:
                facts = None
            self._known[pid] = (created, facts)


def _exit(facts: ProcessFacts, now: int, clock: Clock) -> Event:
    return build.process_exit_event(facts, now, clock, status=None, point="psutil_poll", limitations=[LIMITATION],
                                    sampled=True)


def _created(proc: psutil.Process) -> float:
    try:
        return float(proc.create_time())
    except psutil.Error:
        return 0.0


def _safe(getter: Callable[[], Any]) -> Any:
    try:
        return getter() or None
    except psutil.Error:
        return None
