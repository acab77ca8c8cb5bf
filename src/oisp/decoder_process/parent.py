"""The proxy's side: start the decoder processes, hand each its connections' copies, collect the summary."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from oisp.config import Config
from oisp.decoder_process.channel import FrameChannel
from oisp.decoder_process.launch import spawn_worker
from oisp.decoder_process.placement import CPU_CHOICES, decoder_process_count, place_decoder_process
from oisp.decoder_process.priority import restore_priority
from oisp.decoder_process.wire import Kind, dump_object, load_object
from oisp.errors import OispError
from oisp.events import Event
from oisp.proxy.relay import Direction

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from oisp.http.exchange import ConnectionInfo
    from oisp.proxy.report import ConnectionReport

__all__ = ["DEFAULT_BUFFER", "DEFAULT_CONNECTION_BUFFER", "DecoderProcess", "DecoderProcessStats",
           "RemoteFeed"]

logger = logging.getLogger(__name__)

#: How far (bytes) the decoder process may fall behind the relay before decoding of a connection stops.
DEFAULT_BUFFER = 32 * 1024 * 1024
#: How far it may fall behind on any one connection (a big upload or download cannot take the whole buffer;
#: with the 16 MiB body cap in the decoder process, one transfer costs at most about 24 MiB of memory).
DEFAULT_CONNECTION_BUFFER = 8 * 1024 * 1024
_DATA = {"client": Kind.CLIENT_DATA, "server": Kind.SERVER_DATA}
_EOF = {"client": Kind.CLIENT_EOF, "server": Kind.SERVER_EOF}
_SKIP = {"client": Kind.CLIENT_SKIP, "server": Kind.SERVER_SKIP}


@attrs.define
class DecoderProcessStats:
    """What went through the decoder process (one shard's, or every shard's together: :attr:`DecoderProcess.stats`)."""

    #: Decoded connections handed to it.
    connections: int = 0
    #: Bytes written to it (frames included).
    bytes_sent: int = 0
    #: The most bytes ever waiting for it in the proxy's buffer.
    peak_buffered: int = 0
    #: Connections whose decoding stopped because the decoder process was too far behind (marked partial).
    overflowed_connections: int = 0
    #: Connections not (fully) decoded because the decoder process was gone.
    lost_connections: int = 0
    #: How often a replacement for a decoder process that died was started (each attempt counts).
    restarts: int = 0
    #: Why decoding was given up for good (no decoder process could be kept running), None while it is on.
    gave_up: str | None = None
    #: Activity events that could not be handed to a decoder process (none was running).
    lost_activity_events: int = 0
    #: The last decoder process's exit code, once it has ended.
    exit_code: int | None = None
    #: Events the decoder process's pipeline dropped so far (as it last said; the summary has the final count),
    #: and, for a shard after the first, its events that could not reach the first (it was gone).
    dropped_events: int = 0


#: A shard stops being read while this many bytes of its forwarded events wait to go to the first decoder process:
#: the shard's own buffer then fills, and it pauses decoding (see :mod:`oisp.decoder_process.worker`).
FORWARD_BACKLOG = 4 * 1024 * 1024
#: The watermark of a shard that is gone for good: never holds the linking stage back.
_NO_MARK = (1 << 63).to_bytes(8, "big")


class RemoteFeed:
    """The relay's copies of one connection, framed and sent to its decoder process (never blocks)."""

    def __init__(self, owner: DecoderProcess, shard: _Shard, worker: _Worker, channel: int,
                 connection_id: str) -> None:
        self._owner = owner
        self._shard = shard
        self._worker = worker
        self._channel = channel
        self.connection_id = connection_id
        #: Why decoding of this connection stopped early, if it did.
        self.failure: str | None = None
        self._ended = False
        #: (the channel's bytes_sent after each of this connection's copies still waiting, its size)
        self._waiting: collections.deque[tuple[int, int]] = collections.deque()
        self._waiting_bytes = 0

    @property
    def shard(self) -> int:
        """The decoder process (shard) that decodes this connection."""
        return self._shard.index

    def push(self, direction: Direction, data: bytes | None, now_ns: int) -> None:
        """Send a copy (``None`` data: that direction ended)."""
        if self.failure is not None or self._ended:
            return
        channel = self._worker.channel
        if data is None:
            sent = channel.send(_EOF[direction], self._channel, b"", now_ns, force=True)
        elif self._behind(channel) + len(data) > self._owner.connection_limit:
            self._fail(f"{self._owner.connection_limit} bytes behind the relay on this connection")
            return
        else:
            sent = channel.send(_DATA[direction], self._channel, data, now_ns)
            if sent:
                self._waiting.append((channel.bytes_sent, len(data)))
                self._waiting_bytes += len(data)
        if not sent:
            self._fail(f"{channel.limit} bytes behind the relay")

    def skip(self, direction: Direction, count: int, now_ns: int) -> None:
        """Tell the decoder that ``count`` body bytes went by uncopied (see :mod:`oisp.proxy.body_skip`)."""
        if self.failure is not None or self._ended:
            return
        channel = self._worker.channel
        if not channel.send(_SKIP[direction], self._channel, count.to_bytes(8, "big"), now_ns):
            self._fail(f"{channel.limit} bytes behind the relay")

    def _behind(self, channel: FrameChannel) -> int:
        """This connection's bytes still waiting in the proxy's buffer."""
        waiting, flushed = self._waiting, channel.bytes_flushed
        while waiting and waiting[0][0] <= flushed:
            self._waiting_bytes -= waiting.popleft()[1]
        return self._waiting_bytes

    def _fail(self, how_far: str) -> None:
        channel = self._worker.channel
        if channel.broken is not None:
            self.failure = "the decoder process is gone; decoding of this connection stopped"
            self._shard.stats.lost_connections += 1
            return
        self.failure = f"the decoder process fell more than {how_far}; decoding of this connection stopped"
        self._shard.stats.overflowed_connections += 1
        self._owner.tell_losses()
        logger.warning("connection %s: %s", self.connection_id, self.failure)
        self._end(self.failure)

    def finish(self, reason: str | None = None) -> None:
        """No more copies; ``reason`` marks an abnormal end (reset, error)."""
        if not self._ended:
            if self.failure is None and self._worker.channel.broken is not None:
                self._fail("")  # its decoder process died with it: counted as lost
            self._end(reason)

    def _end(self, reason: str | None) -> None:
        self._ended = True
        self._worker.channel.send(Kind.END, self._channel, (reason or "").encode(), force=True)

    async def run(self) -> None:
        """Nothing to run here: the decoding happens in the decoder process."""


class _Worker:
    """One decoder process and the channel to it."""

    def __init__(self, process: subprocess.Popen[bytes], channel: FrameChannel) -> None:
        self.process = process
        self.channel = channel
        self.ready = anyio.Event()
        self.finished = anyio.Event()
        self.start_error: BaseException | None = None
        self.summary: dict[str, Any] | None = None
        self.closing = False
        self.reaped = False

    def exit_code(self, wait: float) -> int | None:
        try:
            return int(self.process.wait(wait))
        except subprocess.TimeoutExpired:
            return None

    def reap(self) -> int:
        """Wait for the process to end (its socket is closed by then, so it sees EOF); kill it if it does not
        (it ignores SIGINT and SIGTERM, which are the proxy's to act on)."""
        code = self.exit_code(5.0)
        if code is None:
            self.process.kill()
            code = int(self.process.wait())
        return code

    @property
    def working(self) -> bool:
        return self.ready.is_set() and self.start_error is None and self.channel.broken is None


class _Shard:
    """One slot of decoder processes: the current one, its replacements, and what they did."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: _Worker | None = None
        self.stats = DecoderProcessStats()
        #: Set while no replacement of a dead decoder process is under way.
        self.settled = anyio.Event()
        self.settled.set()
        self.bytes_sent_before = 0
        #: Drops reported by decoder processes of this shard that have since been replaced.
        self.dropped_before = 0
        #: Drops the current one reported, and forwarded events lost on the way to the first shard.
        self.dropped_now = 0
        self.forward_lost = 0

    @property
    def name(self) -> str:
        return "the decoder process" if self.index == 0 else f"decoder process {self.index}"

    def routable(self) -> bool:
        """Whether new connections can go to it now."""
        return self.worker is not None and self.worker.working and self.stats.gave_up is None

    def count_drops(self) -> None:
        self.stats.dropped_events = self.dropped_before + self.dropped_now + self.forward_lost


class DecoderProcess:
    """Decoding, the event pipeline and the sinks of ``config``, in separate processes.

    It is the proxy's observer (:class:`~oisp.proxy.report.ProxyObserver`): the relay hands it copies of each
    decoded connection, which go to a decoder process over a socket pair as they are read. The relay never
    waits for it: when a decoder process is more than ``buffer_limit`` bytes behind, or more than
    ``connection_limit`` bytes on one connection, decoding of the connection whose copy did not fit stops there
    (its exchange is marked partial, and the count is in :attr:`stats`). So decoding, events, redaction and
    sinks never share a core, or the GIL, with the relay.

    ``processes`` decoder processes (default: ``config.decoder_processes``, "auto": one per CPU beyond the
    relay's) share the connections: each connection goes, whole and in order, to the one a stable hash of its id
    picks (or the next one that is running). The first (shard 0) also runs the sinks and the linking stage and
    takes the activity events; the others decode, process and redact their connections' events and forward them,
    encoded, through this process to the first, which writes them as they are: one ordered stream per run for the
    sinks. The linking stage's watermark is the lowest of the activity's and every shard's (each tells on the
    activity watermark once it has forwarded every event before it), so an effect waits for the tool call another
    shard decoded before it.

    A decoder process that dies is logged and replaced (at most ``max_restarts`` times per shard): the
    connections it was decoding are lost to decoding (counted), the next ones are decoded by the other shards
    meanwhile and by its successor after; the relay never notices. A shard that cannot be kept running is given up
    (its connections go to the others); when the first is given up, decoding is off.

    Use as an async context manager: entering starts the processes and waits until they are ready (the sinks are
    open), raising the error one met otherwise; leaving sends what is buffered, lets every shard finish its
    connections and forward their events, then the first drain its pipeline, and collects its summary
    (:attr:`pipeline_summary`). ``on_event`` is called in this process with each processed event (the live view
    uses it).
    """

    def __init__(self, config: Config, *, buffer_limit: int = DEFAULT_BUFFER,
                 connection_limit: int = DEFAULT_CONNECTION_BUFFER,
                 on_event: Callable[[Event], None] | None = None, start_timeout: float = 60.0,
                 finish_timeout: float = 300.0, max_restarts: int = 5, cpu: str = "any",
                 on_status: Callable[[str], None] | None = None, restart_backoff: float = 0.5,
                 give_up_warning_interval: float = 60.0, protected_paths: Sequence[Path] = (),
                 on_losses: Callable[..., None] | None = None, processes: int | None = None) -> None:
        if buffer_limit <= 0 or connection_limit <= 0:
            raise OispError(f"buffer_limit ({buffer_limit}) and connection_limit ({connection_limit}) must be "
                            "positive")
        self.config = config
        self.buffer_limit = buffer_limit
        self.connection_limit = min(connection_limit, buffer_limit)
        self.on_event = on_event
        self.start_timeout = start_timeout
        self.finish_timeout = finish_timeout
        self.max_restarts = max_restarts
        if cpu not in CPU_CHOICES:
            raise OispError(f"cpu must be one of {', '.join(CPU_CHOICES)}, not {cpu!r}")
        self.cpu = cpu
        #: Wait before the second restart attempt in a row, doubled for each further one (at most 30 s).
        self.restart_backoff = restart_backoff
        self.give_up_warning_interval = give_up_warning_interval
        #: Files a decoder process that dropped its privileges must not be able to read (the CA key): it does not
        #: start if it can (see :mod:`oisp.decoder_process.privileges`).
        self.protected_paths = tuple(str(path) for path in protected_paths)
        #: Told a line to show when decoding is given up for good (the live view's status).
        self.on_status = on_status
        #: Told ``(events dropped, connections not decoded to the end)`` whenever either grows (the live view);
        #: with several shards also ``shards=[(dropped, not decoded) of each]``.
        self.on_losses = on_losses
        #: How many decoder processes share the connections.
        self.processes = decoder_process_count(config.decoder_processes if processes is None else processes)
        self._shards = [_Shard(index) for index in range(self.processes)]
        #: Called in this process with each connection's report before it is forwarded (the activity monitor
        #: learns agent processes from them); an exception is logged, never raised to the proxy.
        self.connection_listeners: list[Callable[[ConnectionReport], None]] = []
        #: The decoder process's pipeline summary, once it has finished.
        self.pipeline_summary: dict[str, Any] | None = None
        self._channels = itertools.count(1)
        self._tasks: TaskGroup | None = None
        self._closing = False
        self._reminding = False

    @property
    def stats(self) -> DecoderProcessStats:
        """Every shard's stats together (a new object each time; :meth:`shard_stats` has each shard's)."""
        shards = [shard.stats for shard in self._shards]
        first = shards[0]
        if first.gave_up is not None or all(s.gave_up is not None for s in shards):
            gave_up = first.gave_up if len(shards) == 1 else \
                "; ".join(f"decoder process {i}: {s.gave_up}" for i, s in enumerate(shards) if s.gave_up)
        else:
            gave_up = None
        return DecoderProcessStats(
            connections=sum(s.connections for s in shards), bytes_sent=sum(s.bytes_sent for s in shards),
            peak_buffered=max(s.peak_buffered for s in shards),
            overflowed_connections=sum(s.overflowed_connections for s in shards),
            lost_connections=sum(s.lost_connections for s in shards), restarts=sum(s.restarts for s in shards),
            gave_up=gave_up, lost_activity_events=sum(s.lost_activity_events for s in shards),
            exit_code=first.exit_code, dropped_events=sum(s.dropped_events for s in shards))

    def shard_stats(self) -> list[DecoderProcessStats]:
        """Each shard's stats (index 0: the first, with the sinks)."""
        return [shard.stats for shard in self._shards]

    @property
    def _worker(self) -> _Worker | None:
        return self._shards[0].worker

    @property
    def channel(self) -> FrameChannel:
        """The channel to the current first decoder process."""
        return self.shard_channel(0)

    def shard_channel(self, index: int) -> FrameChannel:
        """The channel to shard ``index``'s current decoder process."""
        worker = self._shards[index].worker
        if worker is None:
            raise OispError("the decoder process is not running (use it as an async context manager)")
        return worker.channel

    @property
    def pid(self) -> int | None:
        """The current first decoder process's id."""
        return self.shard_pid(0)

    def shard_pid(self, index: int) -> int | None:
        """Shard ``index``'s current decoder process's id."""
        worker = self._shards[index].worker
        return None if worker is None else int(worker.process.pid)

    @property
    def pids(self) -> list[int | None]:
        """Every shard's current decoder process id."""
        return [self.shard_pid(index) for index in range(self.processes)]

    def shard_of(self, connection_id: str) -> int:
        """The shard a connection's copies go to now: the one its id hashes to, else the next that is running
        (one restarting or given up takes none); the first hashed to when none runs."""
        count = self.processes
        first = zlib.crc32(connection_id.encode("utf-8", "surrogatepass")) % count
        for step in range(count):
            index = (first + step) % count
            if self._shards[index].routable():
                return index
        return first

    async def wait_ready(self) -> bool:
        """Wait until replacements for decoder processes that died (if any) have started; False when decoding is
        off (the first decoder process, which runs the sinks, could not be kept running)."""
        for shard in self._shards:
            await shard.settled.wait()
        first = self._shards[0]
        return first.routable()

    async def wait_ended(self, shard: int = 0) -> None:
        """Wait until shard ``shard``'s current decoder process has ended (its socket closed), for supervision and
        tests."""
        worker = self._shards[shard].worker
        if worker is not None:
            await worker.finished.wait()

    # ProxyObserver ------------------------------------------------------------------------------
    def connection(self, report: ConnectionReport) -> None:
        """Forward a connection's report (its ``network.connect`` event is made in the decoder process of its
        shard)."""
        for listener in self.connection_listeners:
            try:
                listener(report)
            except Exception:
                logger.exception("a connection listener failed")
        worker = self._shards[self.shard_of(report.connection_id)].worker
        if worker is not None and worker.ready.is_set():
            worker.channel.send(Kind.REPORT, 0, dump_object(report), force=True)

    # activity observed in this process -------------------------------------------------------------
    def activity_event(self, event: Event) -> None:
        """Hand an activity event observed in this process (:class:`~oisp.activity.Activity` needs the
        privileges the decoder process gives up) to the first decoder process's pipeline; counted when none
        runs."""
        first = self._shards[0]
        worker = first.worker
        if worker is None or not worker.ready.is_set() \
                or not worker.channel.send(Kind.ACTIVITY, 0, event.to_json().encode(), force=True):
            first.stats.lost_activity_events += 1

    def activity_watermark(self, mark_ns: int) -> None:
        """Tell the linking stage that every activity event before ``mark_ns`` (monotonic) has been handed over
        (:meth:`activity_event` calls made before this one). Every shard is told too, after the copies sent before
        it: once it has forwarded their events it tells the first (so the watermark covers every shard)."""
        payload = max(0, mark_ns).to_bytes(8, "big")
        for shard in self._shards:
            worker = shard.worker
            if worker is not None and worker.ready.is_set():
                worker.channel.send(Kind.WATERMARK, 0, payload, force=True)

    def exchange_listener(self, connection: ConnectionInfo) -> None:
        """Exchanges are decoded in the decoder process (see :meth:`open_feed`), never here."""
        return None

    def open_feed(self, connection: ConnectionInfo, alpn: str, *, body_cap: int) -> RemoteFeed | None:
        """A feed for one decoded connection's copies, to the decoder process of its shard."""
        shard = self._shards[self.shard_of(connection.connection_id)]
        worker = shard.worker
        if worker is None or not worker.ready.is_set():
            shard.stats.lost_connections += 1
            return None
        number = next(self._channels)
        if not worker.channel.send(Kind.OPEN, number, dump_object((connection, alpn, body_cap)), force=True):
            shard.stats.lost_connections += 1
            return None
        shard.stats.connections += 1
        return RemoteFeed(self, shard, worker, number, connection.connection_id)

    # lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        errors: list[BaseException] = []

        async def start(shard: _Shard) -> None:
            try:
                await self._start(shard)
            except Exception as exc:
                errors.append(exc)

        try:
            async with anyio.create_task_group() as starting:
                for shard in self._shards:
                    starting.start_soon(start, shard)
            if errors:
                raise errors[0]
        except BaseException:
            self._closing = True
            with anyio.CancelScope(shield=True):
                for shard in self._shards:
                    if shard.worker is not None:
                        shard.worker.closing = True
                        shard.worker.channel.mark_broken("the decoder processes did not start", log=False)
                        await self._reap(shard, shard.worker)
            self._tasks.cancel_scope.cancel()
            await self._tasks.__aexit__(None, None, None)
            raise
        logger.info("decoder process%s %s ready", "es" if self.processes > 1 else "",
                    ", ".join(str(pid) for pid in self.pids))
        return self

    async def _start(self, shard: _Shard) -> _Worker:
        """Start a decoder process for ``shard`` and wait until it is ready; raises what kept it from starting."""
        from oisp.decoder_process.worker import WorkerSettings

        assert self._tasks is not None
        settings = WorkerSettings(config=self.config, forward_events=self.on_event is not None and shard.index == 0,
                                  log_level=logging.getLogger("oisp").getEffectiveLevel(),
                                  configure_logging=bool(logging.getLogger().handlers),
                                  protected_paths=self.protected_paths, shard=shard.index, shards=self.processes)
        ours, theirs = socket.socketpair()
        try:
            process = await anyio.to_thread.run_sync(spawn_worker, theirs)
        except OSError as exc:
            ours.close()
            raise OispError(f"could not start the decoder process ({sys.executable}): {exc}") from exc
        finally:
            theirs.close()
        placed = place_decoder_process(process.pid, self.cpu, shard.index)
        if placed:
            logger.debug("decoder process %d placed on %s", process.pid, placed)
        worker = _Worker(process, FrameChannel(ours, limit=self.buffer_limit,
                                               coalesce=self.config.decoder_batch_ms / 1000))
        worker.channel.send(Kind.SETTINGS, 0, dump_object(settings), force=True)
        shard.worker = worker
        shard.dropped_now = 0
        self._tasks.start_soon(worker.channel.run_writer)
        self._tasks.start_soon(self._read, shard, worker)
        with anyio.move_on_after(self.start_timeout):
            await worker.ready.wait()
        if worker.ready.is_set() and worker.start_error is None:
            if shard.index == 0:  # shards gone for good must not hold the new first one's linking back
                for other in self._shards[1:]:
                    if other.stats.gave_up is not None:
                        worker.channel.send(Kind.SHARD_MARK, other.index, _NO_MARK, force=True)
            return worker
        error = worker.start_error or OispError(f"the decoder process did not start within {self.start_timeout:g} s")
        worker.closing = True
        worker.channel.mark_broken(f"the decoder process did not start: {error}", log=False)
        await self._reap(shard, worker)
        raise error

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._tasks is not None
        self._closing = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.start_timeout):
                for shard in self._shards:
                    await shard.settled.wait()  # a replacement being started: finish with it
            # the shards after the first end first: their last events go to the first, which ends last
            with anyio.move_on_after(self.finish_timeout):
                async with anyio.create_task_group() as finishing:
                    for shard in self._shards[1:]:
                        finishing.start_soon(self._finish, shard)
                await self._finish(self._shards[0])
            for shard in self._shards:
                worker = shard.worker
                if worker is not None and worker.channel.broken is None and not worker.finished.is_set():
                    logger.error("%s did not finish within %g s; stopping it (events it still held are lost)",
                                 shard.name, self.finish_timeout)
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            for shard in self._shards:
                if shard.worker is not None:
                    await self._reap(shard, shard.worker)
        first = self._shards[0].worker
        if first is not None:
            self.pipeline_summary = first.summary
        return None

    async def _finish(self, shard: _Shard) -> None:
        worker = shard.worker
        if worker is not None and worker.channel.broken is None:
            worker.closing = True
            if worker.channel.buffered:
                logger.info("waiting for %s to take the last %d bytes", shard.name, worker.channel.buffered)
            await worker.channel.close_sending()
            await worker.finished.wait()

    async def _reap(self, shard: _Shard, worker: _Worker) -> None:
        if worker.reaped:
            return
        worker.reaped = True
        channel = worker.channel
        channel.sock.close()
        shard.stats.exit_code = await anyio.to_thread.run_sync(worker.reap)
        shard.stats.peak_buffered = max(shard.stats.peak_buffered, channel.peak_buffered)
        shard.stats.bytes_sent = shard.bytes_sent_before + channel.bytes_flushed
        shard.bytes_sent_before = shard.stats.bytes_sent

    def _forward(self, shard: _Shard, kind: Kind, payload: bytes) -> None:
        """An event (or a watermark) from a shard after the first, to the first."""
        first = self._shards[0].worker
        if first is not None and first.working:
            first.channel.send(kind, shard.index, payload, force=True)
        elif kind is Kind.FORWARDED:
            shard.forward_lost += 1
            shard.count_drops()
            self.tell_losses()

    async def _read(self, shard: _Shard, worker: _Worker) -> None:
        try:
            async for frames in worker.channel.frames():
                for kind, _channel, _timestamp, payload in frames:
                    if kind is Kind.FORWARD:
                        self._forward(shard, Kind.FORWARDED, payload)
                    elif kind is Kind.MARK:
                        self._forward(shard, Kind.SHARD_MARK, payload)
                    elif kind is Kind.EVENT:
                        self._deliver(payload)
                    elif kind is Kind.READY:
                        worker.ready.set()
                    elif kind is Kind.FAILED:
                        worker.start_error = _error_from(payload)
                        worker.ready.set()
                    elif kind is Kind.SUMMARY:
                        worker.summary = load_object(payload)
                        if shard.index and isinstance(worker.summary, dict):  # its final count (DROPS may lag)
                            shard.dropped_now = int(worker.summary.get("dropped_total", 0))
                            shard.count_drops()
                    elif kind is Kind.DROPS:
                        shard.dropped_now = int(load_object(payload))
                        shard.count_drops()
                        self.tell_losses()
                    elif kind is Kind.PRIORITY:
                        restore_priority(worker.process.pid, int(load_object(payload)))
                first = self._shards[0].worker
                if shard.index and first is not None and first.channel.buffered > FORWARD_BACKLOG:
                    # the first decoder process is behind: stop reading this shard until it has caught up (the
                    # shard's buffer fills, it pauses, and the copies wait here, within each connection's budget)
                    await first.channel.wait_buffered_below(FORWARD_BACKLOG // 2)
        except Exception:  # a corrupt stream: handled like a decoder process that died
            logger.exception("reading from %s failed", shard.name)
            worker.summary = None
        unexpected = worker.summary is None and not worker.closing
        restart = unexpected and worker.ready.is_set() and not self._closing \
            and shard.stats.restarts < self.max_restarts
        give_up = unexpected and worker.ready.is_set() and not self._closing and not restart
        shard.dropped_before += shard.dropped_now
        shard.dropped_now = 0
        shard.count_drops()
        if unexpected:  # before anyone waiting for the end can ask wait_ready()
            worker.channel.mark_broken(f"{shard.name} ended unexpectedly", log=False)
        if restart:
            shard.settled = anyio.Event()
        worker.finished.set()
        if not unexpected:
            return
        code = await anyio.to_thread.run_sync(worker.exit_code, 2.0)
        reason = f"{shard.name} ended unexpectedly (exit code {code})"
        if not worker.ready.is_set():
            worker.start_error = OispError(reason)
            worker.ready.set()
            return
        if give_up:
            self._give_up(shard, f"{reason}, and no restarts are left ({shard.stats.restarts} of "
                                 f"{self.max_restarts} used)")
            return
        if not restart:
            logger.error("%s", reason)  # while shutting down
            return
        try:
            await self._reap(shard, worker)
            attempt = 0
            while True:
                attempt += 1
                shard.stats.restarts += 1
                logger.error("%s; starting another (restart %d of at most %d); connections it was decoding are not "
                             "decoded to the end", reason, shard.stats.restarts, self.max_restarts)
                if attempt > 1:  # paced: a replacement that dies at once is not replaced at once again
                    await anyio.sleep(min(self.restart_backoff * 2 ** (attempt - 2), 30.0))
                try:
                    await self._start(shard)
                except Exception as exc:
                    reason = f"the replacement {shard.name} could not start ({exc})"
                    if self._closing:
                        logger.error("%s", reason)
                        return
                    if shard.stats.restarts >= self.max_restarts:
                        self._give_up(shard, f"{reason}, and no restarts are left ({shard.stats.restarts} of "
                                             f"{self.max_restarts} used)")
                        return
                    continue
                return
        finally:
            shard.settled.set()

    def tell_losses(self) -> None:
        """Tell ``on_losses`` the events dropped and the connections not decoded to the end, so far (with several
        shards, each one's too)."""
        if self.on_losses is None:
            return
        shards = [(s.stats.dropped_events, s.stats.overflowed_connections + s.stats.lost_connections)
                  for s in self._shards]
        dropped, undecoded = sum(d for d, _ in shards), sum(u for _, u in shards)
        try:
            if len(shards) == 1:
                self.on_losses(dropped, undecoded)
            else:
                self.on_losses(dropped, undecoded, shards=shards)
        except Exception:
            logger.exception("losses listener failed")

    def _give_up(self, shard: _Shard, reason: str) -> None:
        """A shard is off for good: say so loudly, now, every ``give_up_warning_interval`` seconds, in the live
        view (``on_status``) and in the exit summary (:attr:`stats`). Decoding is off when the first is (it runs
        the sinks) or every shard is; else the others take the connections."""
        shard.stats.gave_up = reason
        off = self.stats.gave_up is not None
        if off:
            logger.error("%s; DECODING IS OFF: the proxy goes on relaying without decoding", reason)
            status = f"DECODING IS OFF: {reason}"
        else:
            logger.error("%s; the other decoder processes take its connections", reason)
            status = f"{shard.name.upper()} OF {self.processes} IS OFF: {reason}"
            first = self._shards[0].worker
            if first is not None and first.working:  # it never holds the linking stage back again
                first.channel.send(Kind.SHARD_MARK, shard.index, _NO_MARK, force=True)
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                logger.exception("status listener failed")
        if self._tasks is not None and not self._closing and not self._reminding:
            self._reminding = True
            self._tasks.start_soon(self._remind)

    async def _remind(self) -> None:
        while not self._closing:
            await anyio.sleep(self.give_up_warning_interval)
            if self._closing:
                return
            reason = self.stats.gave_up
            if reason is not None:
                logger.warning("DECODING IS OFF since the decoder process could not be kept running (%s); the proxy "
                               "relays without decoding", reason)
            else:
                for shard in self._shards:
                    if shard.stats.gave_up is not None:
                        logger.warning("%s of %d is off since it could not be kept running (%s); the others "
                                       "decode its connections", shard.name, self.processes, shard.stats.gave_up)

    def _deliver(self, payload: bytes) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(Event.from_dict(json.loads(payload)))
        except Exception:
            logger.exception("event listener failed")

    def summary(self) -> dict[str, Any]:
        """The stats as a plain dict (for the runner's exit summary): every shard's together, and each one's."""
        shards = [attrs.asdict(shard.stats) | {"pid": self.shard_pid(shard.index)} for shard in self._shards]
        return attrs.asdict(self.stats) | {"pid": self.pid, "processes": self.processes, "shards": shards}


def _error_from(payload: bytes) -> BaseException:
    try:
        error = load_object(payload)
    except Exception:
        return OispError(f"the decoder process could not start: {payload[:500]!r}")
    if isinstance(error, BaseException):
        return error
    return OispError(f"the decoder process could not start: {error}")
