"""The proxy's side: start the decoder process, hand it copies, collect its summary."""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from oisp.config import Config
from oisp.decoder_process.channel import FrameChannel
from oisp.decoder_process.wire import Kind, dump_object, load_object
from oisp.errors import OispError
from oisp.events import Event
from oisp.proxy.relay import Direction

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from oisp.http.exchange import ConnectionInfo
    from oisp.proxy.report import ConnectionReport

__all__ = ["DEFAULT_BUFFER", "DecoderProcess", "DecoderProcessStats", "RemoteFeed"]

logger = logging.getLogger(__name__)

#: How far (bytes) the decoder process may fall behind the relay before decoding of a connection stops.
DEFAULT_BUFFER = 32 * 1024 * 1024
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
    #: Connections not decoded because the decoder process was gone.
    lost_connections: int = 0
    #: The decoder process's exit code, once it has ended.
    exit_code: int | None = None


class RemoteFeed:
    """The relay's copies of one connection, framed and sent to the decoder process (never blocks)."""

    def __init__(self, owner: DecoderProcess, channel: int, connection_id: str) -> None:
        self._owner = owner
        self._channel = channel
        self.connection_id = connection_id
        #: Why decoding of this connection stopped early, if it did.
        self.failure: str | None = None
        self._ended = False

    def push(self, direction: Direction, data: bytes | None, now_ns: int) -> None:
        """Send a copy (``None`` data: that direction ended)."""
        if self.failure is not None or self._ended:
            return
        channel = self._owner.channel
        if data is None:
            sent = channel.send(_EOF[direction], self._channel, b"", now_ns, force=True)
        else:
            sent = channel.send(_DATA[direction], self._channel, data, now_ns)
        if not sent:
            self._fail()

    def _fail(self) -> None:
        channel = self._owner.channel
        if channel.broken is not None:
            self.failure = "the decoder process is gone; decoding of this connection stopped"
            return
        self.failure = (f"the decoder process fell more than {channel.limit} bytes behind the relay; decoding of "
                        "this connection stopped")
        self._owner.stats.overflowed_connections += 1
        logger.warning("connection %s: %s", self.connection_id, self.failure)
        self._end(self.failure)

    def finish(self, reason: str | None = None) -> None:
        """No more copies; ``reason`` marks an abnormal end (reset, error)."""
        if not self._ended:
            self._end(reason)

    def _end(self, reason: str | None) -> None:
        self._ended = True
        self._owner.channel.send(Kind.END, self._channel, (reason or "").encode(), force=True)

    async def run(self) -> None:
        """Nothing to run here: the decoding happens in the decoder process."""


class DecoderProcess:
    """Decoding, the event pipeline and the sinks of ``config``, in a separate process.

    It is the proxy's observer (:class:`~oisp.proxy.report.ProxyObserver`): the relay hands it copies of each
    decoded connection, which go to the decoder process over a socket pair as they are read. The relay never
    waits for it: when the decoder process is more than ``buffer_limit`` bytes behind, decoding of the
    connection whose copy did not fit stops there (its exchange is marked partial, and the count is in
    :attr:`stats`). So decoding, events, redaction and sinks never share a core, or the GIL, with the relay.

    Use as an async context manager: entering starts the process and waits until it is ready (its sinks are
    open), raising the error it met otherwise; leaving sends what is buffered, lets it finish every
    connection and drain its pipeline, and collects its summary (:attr:`pipeline_summary`).
    ``on_event`` is called in this process with each processed event (the live view uses it).
    """

    def __init__(self, config: Config, *, buffer_limit: int = DEFAULT_BUFFER,
                 on_event: Callable[[Event], None] | None = None, start_timeout: float = 60.0,
                 finish_timeout: float = 300.0) -> None:
        if buffer_limit <= 0:
            raise OispError(f"buffer_limit must be positive, not {buffer_limit}")
        self.config = config
        self.buffer_limit = buffer_limit
        self.on_event = on_event
        self.start_timeout = start_timeout
        self.finish_timeout = finish_timeout
        self.stats = DecoderProcessStats()
        #: The decoder process's pipeline summary, once it has finished.
        self.pipeline_summary: dict[str, Any] | None = None
        self._channels = itertools.count(1)
        self._process: Any = None
        self._channel: FrameChannel | None = None
        self._tasks: TaskGroup | None = None
        self._finished = anyio.Event()
        self._ready = anyio.Event()
        self._start_error: BaseException | None = None

    @property
    def channel(self) -> FrameChannel:
        if self._channel is None:
            raise OispError("the decoder process is not running (use it as an async context manager)")
        return self._channel

    @property
    def pid(self) -> int | None:
        """The decoder process's id, while it runs."""
        return None if self._process is None else int(self._process.pid)

    # ProxyObserver ------------------------------------------------------------------------------
    def connection(self, report: ConnectionReport) -> None:
        """Forward a connection's report (its ``network.connect`` event is made in the decoder process)."""
        if self._channel is not None:
            self._channel.send(Kind.REPORT, 0, dump_object(report), force=True)

    def exchange_listener(self, connection: ConnectionInfo) -> None:
        """Exchanges are decoded in the decoder process (see :meth:`open_feed`), never here."""
        return None

    def open_feed(self, connection: ConnectionInfo, alpn: str, *, body_cap: int) -> RemoteFeed | None:
        """A feed for one decoded connection's copies."""
        channel = self.channel
        if channel.broken is not None:
            self.stats.lost_connections += 1
            return None
        number = next(self._channels)
        payload = dump_object((connection, alpn, body_cap))
        if not channel.send(Kind.OPEN, number, payload, force=True):
            self.stats.lost_connections += 1
            return None
        self.stats.connections += 1
        return RemoteFeed(self, number, connection.connection_id)

    # lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        from oisp.decoder_process.worker import WorkerSettings

        settings = WorkerSettings(config=self.config, forward_events=self.on_event is not None,
                                  log_level=logging.getLogger("oisp").getEffectiveLevel(),
                                  configure_logging=bool(logging.getLogger().handlers))
        ours, theirs = socket.socketpair()
        try:
            self._process = await anyio.to_thread.run_sync(_spawn, theirs)
        except OSError as exc:
            ours.close()
            raise OispError(f"could not start the decoder process ({sys.executable}): {exc}") from exc
        finally:
            theirs.close()
        self._channel = FrameChannel(ours, limit=self.buffer_limit)
        self._channel.send(Kind.SETTINGS, 0, dump_object(settings), force=True)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._channel.run_writer)
        self._tasks.start_soon(self._read)
        with anyio.move_on_after(self.start_timeout):
            await self._ready.wait()
        if not self._ready.is_set() or self._start_error is not None:
            error = self._start_error or OispError(
                f"the decoder process did not start within {self.start_timeout:g} s")
            await self._abandon()
            raise error
        logger.info("decoder process %d ready", self._process.pid)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        channel = self.channel
        with anyio.CancelScope(shield=True):
            if channel.buffered:
                logger.info("waiting for the decoder process to take the last %d bytes", channel.buffered)
            await channel.close_sending()
            with anyio.move_on_after(self.finish_timeout):
                await self._finished.wait()
            if not self._finished.is_set():
                logger.error("the decoder process did not finish within %g s; stopping it (events it still held "
                             "are lost)", self.finish_timeout)
        await self._abandon()
        return None

    async def _abandon(self) -> None:
        """Stop the reader and writer, end the process if it still runs, release the socket."""
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        await self._tasks.__aexit__(None, None, None)
        channel = self.channel
        self.stats.peak_buffered = channel.peak_buffered
        self.stats.bytes_sent = channel.bytes_sent
        process = self._process

        def reap() -> int | None:
            try:
                return int(process.wait(5.0))
            except subprocess.TimeoutExpired:
                process.terminate()
            try:
                return int(process.wait(5.0))
            except subprocess.TimeoutExpired:
                process.kill()
            return int(process.wait())

        with anyio.CancelScope(shield=True):
            self.stats.exit_code = await anyio.to_thread.run_sync(reap)
        channel.sock.close()

    async def _read(self) -> None:
        summary_seen = False
        async for frames in self.channel.frames():
            for kind, _channel, _timestamp, payload in frames:
                if kind is Kind.EVENT:
                    self._deliver(payload)
                elif kind is Kind.READY:
                    self._ready.set()
                elif kind is Kind.FAILED:
                    self._start_error = _error_from(payload)
                    self._ready.set()
                elif kind is Kind.SUMMARY:
                    self.pipeline_summary = load_object(payload)
                    summary_seen = True
        if not summary_seen:
            code = await anyio.to_thread.run_sync(self._exit_code)
            reason = (f"the decoder process ended unexpectedly (exit code {code}); the proxy goes on relaying "
                      "without decoding")
            if self._ready.is_set():
                logger.error("%s", reason)
            else:
                self._start_error = self._start_error or OispError(reason)
                self._ready.set()
            self.channel.mark_broken(reason)
        self._finished.set()

    def _exit_code(self) -> int | None:
        try:
            return int(self._process.wait(2.0))
        except subprocess.TimeoutExpired:
            return None

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


def _spawn(sock: socket.socket) -> subprocess.Popen[bytes]:
    """Start ``python -m oisp.decoder_process`` with our end of the socket pair as its file descriptor 3
    (POSIX) or, on Windows, with the socket shared through its pipe (``socket.share``)."""
    import oisp

    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(oisp.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "oisp.decoder_process"]
    if os.name == "nt":  # pragma: no cover - not run here
        process = subprocess.Popen([*command, "--shared"], stdin=subprocess.PIPE, env=env)
        assert process.stdin is not None
        process.stdin.write(sock.share(process.pid))  # type: ignore[attr-defined,unused-ignore]
        process.stdin.close()
        return process
    return subprocess.Popen([*command, "--fd", str(sock.fileno())], pass_fds=(sock.fileno(),), env=env,
                            stdin=subprocess.DEVNULL)


def _error_from(payload: bytes) -> BaseException:
    try:
        error = load_object(payload)
    except Exception:
        return OispError(f"the decoder process could not start: {payload[:500]!r}")
    if isinstance(error, BaseException):
        return error
    return OispError(f"the decoder process could not start: {error}")
