""":class:`Activity`: runs the process and file sources for this platform and emits their events.

Linux (root): the kernel's process-events connector and fanotify (:mod:`oisp.activity.linux`). Elsewhere, or
without the privileges: processes by polling the process list with psutil (:mod:`oisp.activity.polling`;
``confidence.completeness`` says "sampled") and file changes from watching the agents' working directories
(:mod:`oisp.activity.watcher`, with watchdog installed; attributed by directory, ``confidence.level`` "low").
Outbound connections the proxy does not intercept: pydivert's FLOW layer where it opens
(:mod:`oisp.activity.flow`), else the agents' socket tables polled (:mod:`oisp.activity.sockpoll`).
:attr:`ActivityStats.limitations` says what is missing and why, and the monitor runs on with what it has.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import anyio.from_thread
import anyio.lowlevel

from oisp.activity.build import Clock
from oisp.activity.connections import ConnectionFilter, Proxied
from oisp.activity.scope import AgentScope
from oisp.activity.settings import ActivitySettings, ActivityStats
from oisp.events import Event

__all__ = ["Activity", "ActivitySource"]

log = logging.getLogger(__name__)

#: how long before an AI event's time an agent's effects count as its effects when it is learned from the event
LEARN_MARGIN_NS = 1_000_000_000


class ActivitySource(Protocol):
    """A running source of activity events (a kernel reader thread or a poller)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _RateLimit:
    """Events a second from processes that are not agent processes (scope ``all``): a token bucket."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class Activity:
    """Observe what agent processes do: the processes they start and the files they touch, as OISP events.

    Use as an async context manager; events go to ``emit`` (called in the event loop that entered the context,
    e.g. :meth:`oisp.Pipeline.emit`). ``scope`` says which processes are observed (by default a new
    :class:`AgentScope`: tell it about AI-calling processes with :meth:`add_agent`); ``config`` is an
    :class:`~oisp.activity.settings.ActivitySettings`.

    Example::

        async with Activity(emit=print) as activity:
            activity.add_agent(agent_pid)
            ...
    """

    def __init__(self, *, scope: AgentScope | None = None, emit: Callable[[Event], Any],
                 config: ActivitySettings | None = None) -> None:
        self.config = config or ActivitySettings()
        self.scope = scope or AgentScope(include_exe=self.config.include_exe, exclude_exe=self.config.exclude_exe,
                                         all_processes=self.config.scope == "all",
                                         max_tracked=self.config.max_tracked)
        self.stats = ActivityStats()
        self._emit = emit
        self._clock = Clock()
        self._sources: list[ActivitySource] = []
        #: source name -> monotonic ns up to which its kernel events are read and emitted
        self._marks: dict[str, int] = {}
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._closing = False
        self._limit = _RateLimit(self.config.rate_limit) if self.config.scope == "all" else None
        self._table: Any = None
        #: which connections are left to the proxy's own network.connect (see :meth:`add_proxied`)
        self.connection_filter = ConnectionFilter(self.scope)

    # scope ---------------------------------------------------------------------------------------
    def add_agent(self, pid: int, *, exe: str | None = None, since_ns: int | None = None) -> None:
        """``pid`` made an AI call (at ``since_ns``, monotonic, when known): observe it and the processes it
        starts from then on. What it did between the call and now, while it was not known to be an agent, is
        emitted too where the kernel's records are still at hand (the last 8,192 records of processes out of
        scope; without ``since_ns``, the last 2 seconds)."""
        if self.scope.agent_of(pid) is not None:
            return
        self.scope.add_agent(pid, exe=exe)
        if self.scope.agent_of(pid) != pid:
            return
        for source in self._sources:
            replay = getattr(source, "replay", None)
            if replay is not None:
                replay(pid, since_ns if since_ns is not None else time.monotonic_ns() - 2_000_000_000)

    def add_proxied(self, predicate: Proxied) -> None:
        """Tell the connection sources about connections the proxy intercepts (``predicate(local, remote)``,
        addresses as (ip, port)), which the proxy reports itself: they are not reported again. Connections to a
        port this process listens on (the proxy's listener in explicit mode) are recognised without it."""
        self.connection_filter.proxied.append(predicate)

    def watch_pipeline(self, pipeline: Any) -> None:
        """Learn agents from a :class:`~oisp.Pipeline`'s processed events: any ``ai.*`` or ``network.connect``
        event with ``process.pid`` makes that process an agent."""
        pipeline.add_listener(self.learn)

    def learn(self, event: Event) -> None:
        """A pipeline listener: an ``ai.*``/``network.connect`` event's process becomes an agent."""
        kind = event.event_type
        if not (kind.startswith("ai.") or kind == "network.connect"):
            return
        process = event.process
        if process is not None and process.pid:
            if kind == "network.connect" and (event.attrs or {}).get("oisp.provider") is None:
                return  # a connection to something that is not an AI endpoint
            # the event is made once the call is decoded (batched, in the decoder process): its effects may be
            # older than the event; LEARN_MARGIN covers that (a new agent's last second before its call too)
            since = event.ts_mono - LEARN_MARGIN_NS if event.ts_mono is not None else None
            self.add_agent(process.pid, exe=process.exe, since_ns=since)

    # lifecycle -----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._token = anyio.lowlevel.current_token()
        self._start_sources()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the sources (the events they already read are emitted first)."""
        self._closing = True
        sources, self._sources = self._sources, []
        for source in sources:
            await anyio.to_thread.run_sync(source.stop)

    def _start_sources(self) -> None:
        if sys.platform == "linux":
            self._start_linux()
        if not self._sources and self.config.processes:
            self._start_polling()
        if self.config.connections:
            self._start_connections()
        watch = self.config.watch_directories
        if watch or (watch is None and self.config.files and "files" not in self.stats.sources):
            self._start_watcher()

    def _start_connections(self) -> None:
        from oisp.activity import flow

        why = flow.available()
        if why is None:
            from oisp.errors import InterceptionError

            try:
                source: ActivitySource = flow.FlowConnectionSource(self.connection_filter, self.stats, self._clock,
                                                                   self._deliver, self._admit)
            except (InterceptionError, OSError, ImportError) as exc:
                why = f"pydivert's FLOW layer could not be opened ({exc})"
            else:
                self._add(source, "pydivert FLOW/SOCKET layers (sniffed)")
                return
        from oisp.activity.sockpoll import PolledConnectionSource

        self.stats.limitations.append(f"{why}: the connections of agent processes are polled instead (a connection "
                                      f"opened and closed between two polls is not seen)")
        log.warning("activity: %s", self.stats.limitations[-1])
        self._add(PolledConnectionSource(self.scope, self.connection_filter, self.config, self.stats, self._clock,
                                         self._deliver, self._admit), "socket tables of agent processes polled")

    def _start_watcher(self) -> None:
        from oisp.activity import watcher

        why = watcher.available()
        if why is not None:
            self.stats.limitations.append(why)
            log.warning("activity: %s", why)
            return
        self._add(watcher.DirectoryWatchSource(self.scope, self.stats, self._clock, self._deliver,
                                               poll_interval=self.config.poll_interval),
                  "the working directories of agents watched (attributed by directory)")

    def _start_linux(self) -> None:
        if sys.platform == "linux":  # (mypy: checked for Linux only)
            from oisp.activity import cn_proc

            why = cn_proc.available()
            if why is not None:
                self.stats.limitations.append(f"{why}; processes are polled instead and files are not observed")
                return
            from oisp.activity.linux import FileReader, LinuxSource, ProcessReader, ProcessTable

            self._table = table = ProcessTable(self.config.max_tracked)
            processes = files = None
            if self.config.processes:
                try:
                    processes = ProcessReader(self.scope, table, self.config, self.stats, self._clock, self._admit)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    if exc.errno == errno.ECONNREFUSED:
                        why += " (the kernel's process connector answers only in the initial network namespace)"
                    self.stats.limitations.append(f"process events (netlink CN_PROC) are not available: {why}; "
                                                  "processes are polled instead")
                else:
                    self.stats.sources["processes"] = "cn_proc"
            if self.config.files:
                try:
                    files = FileReader(self.scope, table, self.config, self.stats, self._clock, self._admit)
                except OSError as exc:
                    self.stats.limitations.append(f"file events (fanotify) are not available: {exc}")
                else:
                    self.stats.sources["files"] = f"fanotify {files.mode} on {', '.join(files.marked)}"
            if processes is not None or files is not None:
                self._add(LinuxSource(processes, files, self._deliver), "")
            if processes is None and self.config.processes:
                from oisp.activity.polling import PollingProcessSource

                self._add(PollingProcessSource(self.scope, self.config, self.stats, self._clock, self._deliver,
                                               self._admit), "psutil polling")
            for limitation in self.stats.limitations:
                log.warning("activity: %s", limitation)

    def _start_polling(self) -> None:
        from oisp.activity.polling import PollingProcessSource

        self._add(PollingProcessSource(self.scope, self.config, self.stats, self._clock, self._deliver,
                                       self._admit), "psutil polling")
        if self.config.files:
            self.stats.limitations.append(f"file events with the writer's pid are not observed on {sys.platform} "
                                          "without root/fanotify")

    def _add(self, source: ActivitySource, how: str) -> None:
        self._marks[source.name] = time.monotonic_ns()
        if how:
            self.stats.sources[source.name] = how
        source.start()
        self._sources.append(source)

    # delivery ------------------------------------------------------------------------------------
    def _admit(self, agent: int | None) -> bool:
        """Whether an event of a process in scope may be emitted (the rate limit of non-agent processes)."""
        if agent is not None or self._limit is None:
            return True
        if self._limit.take():
            return True
        self.stats.rate_limited += 1
        return False

    def _deliver(self, source: Any, events: list[Event], mark: int) -> bool:
        """From a source's thread: emit ``events`` in the event loop, then move the source's watermark."""
        if self._token is None:
            return False
        if not events:  # nothing to emit: the watermark moves on without a trip to the event loop
            if self._marks.get(source.name, 0) < mark:
                self._marks[source.name] = mark
            return not self._closing
        try:
            anyio.from_thread.run_sync(self._emit_batch, source.name, events, mark, token=self._token)
        except (RuntimeError, anyio.RunFinishedError) as exc:
            log.debug("activity: the event loop is gone (%s); the %s source stops", exc, source.name)
            return False
        return True

    def _emit_batch(self, name: str, events: list[Event], mark: int) -> None:
        emit = self._emit
        for event in events:
            try:
                emit(event)
            except Exception:
                if self._closing:
                    return
                log.exception("activity: emitting %s failed", event.event_type)
                continue
            self.stats.emitted += 1
        if self._marks.get(name, 0) < mark:
            self._marks[name] = mark

    def watermark_ns(self) -> int:
        """Monotonic nanoseconds (the clock of events' ``ts_mono``) up to which every kernel event of every
        running source has been read and emitted; now when no source runs."""
        if not self._marks:
            return time.monotonic_ns()
        return min(self._marks.values())

    def watermark(self) -> datetime:
        """:meth:`watermark_ns` on the wall clock of events' ``ts``."""
        return self._clock.wall(self.watermark_ns())

    @property
    def running(self) -> dict[str, str]:
        """The sources running, by name, and how they observe."""
        return dict(self.stats.sources)
