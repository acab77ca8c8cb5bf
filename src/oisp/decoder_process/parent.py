"""The proxy's side: start the decoder process, hand it copies, collect its summary."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from oisp.config import Config
from oisp.decoder_process.channel import FrameChannel
from oisp.decoder_process.launch import spawn_worker
from oisp.decoder_process.placement import CPU_CHOICES, place_decoder_process
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


@attrs.define
class DecoderProcessStats:
    """What went through the decoder process."""

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
    #: Events the decoder process's pipeline dropped so far (as it last said; the summary has the final count).
    dropped_events: int = 0


class RemoteFeed:
    """The relay's copies of one connection, framed and sent to the decoder process (never blocks)."""

    def __init__(self, owner: DecoderProcess, worker: _Worker, channel: int, connection_id: str) -> None:
        self._owner = owner
        self._worker = worker
        self._channel = channel
        self.connection_id = connection_id
        #: Why decoding of this connection stopped early, if it did.
        self.failure: str | None = None
        self._ended = False
        #: (the channel's bytes_sent after each of this connection's copies still waiting, its size)
        self._waiting: collections.deque[tuple[int, int]] = collections.deque()
        self._waiting_bytes = 0

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
            self._owner.stats.lost_connections += 1
            return
        self.failure = f"the decoder process fell more than {how_far}; decoding of this connection stopped"
        self._owner.stats.overflowed_connections += 1
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


class DecoderProcess:
    """Decoding, the event pipeline and the sinks of ``config``, in a separate process.

    It is the proxy's observer (:class:`~oisp.proxy.report.ProxyObserver`): the relay hands it copies of each
    decoded connection, which go to the decoder process over a socket pair as they are read. The relay never
    waits for it: when the decoder process is more than ``buffer_limit`` bytes behind, or more than
    ``connection_limit`` bytes on one connection, decoding of the connection whose copy did not fit stops there
    (its exchange is marked partial, and the count is in :attr:`stats`). So decoding, events, redaction and
    sinks never share a core, or the GIL, with the relay.

    A decoder process that dies is logged and replaced (at most ``max_restarts`` times): the connections it
    was decoding are lost to decoding (counted), the next ones are decoded by its successor; the relay never
    notices.

    Use as an async context manager: entering starts the process and waits until it is ready (its sinks are
    open), raising the error it met otherwise; leaving sends what is buffered, lets it finish every
    connection and drain its pipeline, and collects its summary (:attr:`pipeline_summary`).
    ``on_event`` is called in this process with each processed event (the live view uses it).
    """

    def __init__(self, config: Config, *, buffer_limit: int = DEFAULT_BUFFER,
                 connection_limit: int = DEFAULT_CONNECTION_BUFFER,
                 on_event: Callable[[Event], None] | None = None, start_timeout: float = 60.0,
                 finish_timeout: float = 300.0, max_restarts: int = 5, cpu: str = "any",
                 on_status: Callable[[str], None] | None = None, restart_backoff: float = 0.5,
                 give_up_warning_interval: float = 60.0, protected_paths: Sequence[Path] = (),
                 on_losses: Callable[[int, int], None] | None = None) -> None:
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
        #: Told ``(events dropped, connections not decoded to the end)`` whenever either grows (the live view).
        self.on_losses = on_losses
        self.stats = DecoderProcessStats()
        #: Called in this process with each connection's report before it is forwarded (the activity monitor
        #: learns agent processes from them); an exception is logged, never raised to the proxy.
        self.connection_listeners: list[Callable[[ConnectionReport], None]] = []
        #: The decoder process's pipeline summary, once it has finished.
        self.pipeline_summary: dict[str, Any] | None = None
        self._channels = itertools.count(1)
        self._worker: _Worker | None = None
        self._tasks: TaskGroup | None = None
        self._bytes_sent_before = 0
        #: Drops reported by decoder processes that have since been replaced.
        self._dropped_before = 0
        self._closing = False
        #: Set while no replacement of a dead decoder process is under way.
        self._settled = anyio.Event()
        self._settled.set()

    @property
    def channel(self) -> FrameChannel:
        """The channel to the current decoder process."""
        if self._worker is None:
            raise OispError("the decoder process is not running (use it as an async context manager)")
        return self._worker.channel

    @property
    def pid(self) -> int | None:
        """The current decoder process's id."""
        return None if self._worker is None else int(self._worker.process.pid)

    async def wait_ready(self) -> bool:
        """Wait until a replacement for a decoder process that died (if any) has started; False when there is no
        working decoder process (it could not be restarted, or the restarts are used up)."""
        await self._settled.wait()
        worker = self._worker
        return worker is not None and worker.ready.is_set() and worker.channel.broken is None

    async def wait_ended(self) -> None:
        """Wait until the current decoder process has ended (its socket closed), for supervision and tests."""
        if self._worker is not None:
            await self._worker.finished.wait()

    # ProxyObserver ------------------------------------------------------------------------------
    def connection(self, report: ConnectionReport) -> None:
        """Forward a connection's report (its ``network.connect`` event is made in the decoder process)."""
        for listener in self.connection_listeners:
            try:
                listener(report)
            except Exception:
                logger.exception("a connection listener failed")
        worker = self._worker
        if worker is not None and worker.ready.is_set():
            worker.channel.send(Kind.REPORT, 0, dump_object(report), force=True)

    # activity observed in this process -------------------------------------------------------------
    def activity_event(self, event: Event) -> None:
        """Hand an activity event observed in this process (:class:`~oisp.activity.Activity` needs the
        privileges the decoder process gives up) to the decoder process's pipeline; counted when none runs."""
        worker = self._worker
        if worker is None or not worker.ready.is_set() \
                or not worker.channel.send(Kind.ACTIVITY, 0, event.to_json().encode(), force=True):
            self.stats.lost_activity_events += 1

    def activity_watermark(self, mark_ns: int) -> None:
        """Tell the decoder process's linking stage that every activity event before ``mark_ns`` (monotonic)
        has been handed over (:meth:`activity_event` calls made before this one)."""
        worker = self._worker
        if worker is not None and worker.ready.is_set():
            worker.channel.send(Kind.WATERMARK, 0, max(0, mark_ns).to_bytes(8, "big"), force=True)

    def exchange_listener(self, connection: ConnectionInfo) -> None:
        """Exchanges are decoded in the decoder process (see :meth:`open_feed`), never here."""
        return None

    def open_feed(self, connection: ConnectionInfo, alpn: str, *, body_cap: int) -> RemoteFeed | None:
        """A feed for one decoded connection's copies."""
        worker = self._worker
        if worker is None or not worker.ready.is_set():
            self.stats.lost_connections += 1
            return None
        number = next(self._channels)
        if not worker.channel.send(Kind.OPEN, number, dump_object((connection, alpn, body_cap)), force=True):
            self.stats.lost_connections += 1
            return None
        self.stats.connections += 1
        return RemoteFeed(self, worker, number, connection.connection_id)

    # lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        try:
            worker = await self._start()
        except BaseException:
            self._tasks.cancel_scope.cancel()
            await self._tasks.__aexit__(None, None, None)
            raise
        logger.info("decoder process %d ready", worker.process.pid)
        return self

    async def _start(self) -> _Worker:
        """Start a decoder process and wait until it is ready; raises what kept it from starting."""
        from oisp.decoder_process.worker import WorkerSettings

        assert self._tasks is not None
        settings = WorkerSettings(config=self.config, forward_events=self.on_event is not None,
                                  log_level=logging.getLogger("oisp").getEffectiveLevel(),
                                  configure_logging=bool(logging.getLogger().handlers),
                                  protected_paths=self.protected_paths)
        ours, theirs = socket.socketpair()
        try:
            process = await anyio.to_thread.run_sync(spawn_worker, theirs)
        except OSError as exc:
            ours.close()
            raise OispError(f"could not start the decoder process ({sys.executable}): {exc}") from exc
        finally:
            theirs.close()
        placed = place_decoder_process(process.pid, self.cpu)
        if placed:
            logger.debug("decoder process %d placed on %s", process.pid, placed)
        worker = _Worker(process, FrameChannel(ours, limit=self.buffer_limit,
                                               coalesce=self.config.decoder_batch_ms / 1000))
        worker.channel.send(Kind.SETTINGS, 0, dump_object(settings), force=True)
        self._worker = worker
        self._tasks.start_soon(worker.channel.run_writer)
        self._tasks.start_soon(self._read, worker)
        with anyio.move_on_after(self.start_timeout):
            await worker.ready.wait()
        if worker.ready.is_set() and worker.start_error is None:
            return worker
        error = worker.start_error or OispError(f"the decoder process did not start within {self.start_timeout:g} s")
        worker.closing = True
        worker.channel.mark_broken(f"the decoder process did not start: {error}", log=False)
        await self._reap(worker)
        raise error

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._tasks is not None
        self._closing = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.start_timeout):
                await self._settled.wait()  # a replacement being started: finish with it
            worker = self._worker
            if worker is not None and worker.channel.broken is None:
                worker.closing = True
                if worker.channel.buffered:
                    logger.info("waiting for the decoder process to take the last %d bytes", worker.channel.buffered)
                with anyio.move_on_after(self.finish_timeout):
                    await worker.channel.close_sending()
                    await worker.finished.wait()
                if not worker.finished.is_set():
                    logger.error("the decoder process did not finish within %g s; stopping it (events it still "
                                 "held are lost)", self.finish_timeout)
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(None, None, None)
        worker = self._worker
        if worker is not None:
            with anyio.CancelScope(shield=True):
                await self._reap(worker)
            self.pipeline_summary = worker.summary
        return None

    async def _reap(self, worker: _Worker) -> None:
        if worker.reaped:
            return
        worker.reaped = True
        channel = worker.channel
        channel.sock.close()
        self.stats.exit_code = await anyio.to_thread.run_sync(worker.reap)
        self.stats.peak_buffered = max(self.stats.peak_buffered, channel.peak_buffered)
        self.stats.bytes_sent = self._bytes_sent_before + channel.bytes_flushed
        self._bytes_sent_before = self.stats.bytes_sent

    async def _read(self, worker: _Worker) -> None:
        try:
            async for frames in worker.channel.frames():
                for kind, _channel, _timestamp, payload in frames:
                    if kind is Kind.EVENT:
                        self._deliver(payload)
                    elif kind is Kind.READY:
                        worker.ready.set()
                    elif kind is Kind.FAILED:
                        worker.start_error = _error_from(payload)
                        worker.ready.set()
                    elif kind is Kind.SUMMARY:
                        worker.summary = load_object(payload)
                    elif kind is Kind.DROPS:
                        self.stats.dropped_events = self._dropped_before + int(load_object(payload))
                        self.tell_losses()
                    elif kind is Kind.PRIORITY:
                        restore_priority(worker.process.pid, int(load_object(payload)))
        except Exception:  # a corrupt stream: handled like a decoder process that died
            logger.exception("reading from the decoder process failed")
            worker.summary = None
        unexpected = worker.summary is None and not worker.closing
        restart = unexpected and worker.ready.is_set() and not self._closing and self.stats.restarts < self.max_restarts
        give_up = unexpected and worker.ready.is_set() and not self._closing and not restart
        self._dropped_before = self.stats.dropped_events
        if unexpected:  # before anyone waiting for the end can ask wait_ready()
            worker.channel.mark_broken("the decoder process ended unexpectedly", log=False)
        if restart:
            self._settled = anyio.Event()
        worker.finished.set()
        if not unexpected:
            return
        code = await anyio.to_thread.run_sync(worker.exit_code, 2.0)
        reason = f"the decoder process ended unexpectedly (exit code {code})"
        if not worker.ready.is_set():
            worker.start_error = OispError(reason)
            worker.ready.set()
            return
        if give_up:
            self._give_up(f"{reason}, and no restarts are left ({self.stats.restarts} of {self.max_restarts} used)")
            return
        if not restart:
            logger.error("%s", reason)  # while shutting down
            return
        try:
            await self._reap(worker)
            attempt = 0
            while True:
                attempt += 1
                self.stats.restarts += 1
                logger.error("%s; starting another (restart %d of at most %d); connections it was decoding are not "
                             "decoded to the end", reason, self.stats.restarts, self.max_restarts)
                if attempt > 1:  # paced: a replacement that dies at once is not replaced at once again
                    await anyio.sleep(min(self.restart_backoff * 2 ** (attempt - 2), 30.0))
                try:
                    await self._start()
                except Exception as exc:
                    reason = f"the replacement decoder process could not start ({exc})"
                    if self._closing:
                        logger.error("%s", reason)
                        return
                    if self.stats.restarts >= self.max_restarts:
                        self._give_up(f"{reason}, and no restarts are left ({self.stats.restarts} of "
                                      f"{self.max_restarts} used)")
                        return
                    continue
                return
        finally:
            self._settled.set()

    def tell_losses(self) -> None:
        """Tell ``on_losses`` the events dropped and the connections not decoded to the end, so far."""
        if self.on_losses is not None:
            stats = self.stats
            try:
                self.on_losses(stats.dropped_events, stats.overflowed_connections + stats.lost_connections)
            except Exception:
                logger.exception("losses listener failed")

    def _give_up(self, reason: str) -> None:
        """Decoding is off for good: say so loudly, now, every ``give_up_warning_interval`` seconds, in the live
        view (``on_status``) and in the exit summary (:attr:`stats`)."""
        self.stats.gave_up = reason
        logger.error("%s; DECODING IS OFF: the proxy goes on relaying without decoding", reason)
        if self.on_status is not None:
            try:
                self.on_status(f"DECODING IS OFF: {reason}")
            except Exception:
                logger.exception("status listener failed")
        if self._tasks is not None and not self._closing:
            self._tasks.start_soon(self._remind, reason)

    async def _remind(self, reason: str) -> None:
        while not self._closing:
            await anyio.sleep(self.give_up_warning_interval)
            if not self._closing:
                logger.warning("DECODING IS OFF since the decoder process could not be kept running (%s); the proxy "
                               "relays without decoding", reason)

    def _deliver(self, payload: bytes) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(Event.from_dict(json.loads(payload)))
        except Exception:
            logger.exception("event listener failed")

    def summary(self) -> dict[str, Any]:
        """The stats as a plain dict (for the runner's exit summary)."""
        return attrs.asdict(self.stats) | {"pid": self.pid}


def _error_from(payload: bytes) -> BaseException:
    try:
        error = load_object(payload)
    except Exception:
        return OispError(f"the decoder process could not start: {payload[:500]!r}")
    if isinstance(error, BaseException):
        return error
    return OispError(f"the decoder process could not start: {error}")
