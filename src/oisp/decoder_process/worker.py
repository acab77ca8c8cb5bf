"""The decoder process: copies in, events out to the sinks.

It builds the same pipeline and event decoder the runner builds inline (:mod:`oisp.decode_setup`), reads frames
from the proxy and feeds each connection's passive HTTP decoder. When the proxy closes its end, every
connection still open is ended (marked partial), the pipeline drains, the sinks close, and the summary goes
back to the proxy.

Interrupts (Ctrl+C reaches the whole process group) are ignored here: the proxy decides when to stop, and
closing the socket is how it says so. If the proxy dies, the socket closes too, and the events already read
are still delivered.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio
import attrs

from oisp.config import Config
from oisp.decoder_process.channel import Frame, FrameChannel
from oisp.decoder_process.launch import socket_from_handle
from oisp.decoder_process.priority import BEHIND_SECONDS, CpuPriority, can_leave_idle
from oisp.decoder_process.privileges import (
    KEEP,
    check_sinks_after_drop,
    drop_privileges,
    hand_over,
    preload,
    restrict_new_privileges,
    target_account,
)
from oisp.decoder_process.wire import Kind, dump_object, load_object
from oisp.errors import OispError
from oisp.events import Event
from oisp.pipeline import SINK_HANDOFF_WAIT
from oisp.proxy.relay import CopyDispatcher, Direction

__all__ = ["WorkerSettings", "main"]

logger = logging.getLogger(__name__)

#: Copies larger than this are decoded in slices of this size, so that one copy cannot make more events at once
#: than the pipeline's queue holds (a slice of tiny pipelined requests makes at most about a thousand).
_SLICE = 16 * 1024
#: A shard after the first pauses decoding while this many bytes of forwarded events wait to go to the proxy (the
#: first decoder process is behind): the backlog then waits in the proxy's buffer, within each connection's budget.
FORWARD_BACKLOG = 4 * 1024 * 1024
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [decoder process]: %(message)s"


@attrs.frozen
class WorkerSettings:
    """What the decoder process is started with."""

    config: Config
    #: Send each processed event back to the proxy's process (for its listeners).
    forward_events: bool = False
    log_level: int = logging.WARNING
    #: Log to stderr like the runner (when the parent process had logging set up).
    configure_logging: bool = True
    #: Files the decoder process must not be able to read once it has dropped its privileges (the CA key).
    protected_paths: tuple[str, ...] = ()
    #: Which decoder process this is (0: the first, which runs the sinks and the linking stage and takes the events
    #: the others forward) of how many.
    shard: int = 0
    shards: int = 1


def main(argv: list[str] | None = None) -> int:
    """The decoder process's entry point: ``python -m oisp.decoder_process --fd N``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m oisp.decoder_process", description=__doc__)
    parser.add_argument("--fd", type=int, help="the socket to the proxy (POSIX)")
    parser.add_argument("--shared", action="store_true", help="read the shared socket from stdin (Windows)")
    args = parser.parse_args(argv)
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        sock = socket_from_handle(args.fd, args.shared)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        anyio.run(_serve, sock)
    except Exception:
        logger.exception("the decoder process failed")
        return 1
    return 0


def _configure_logging(settings: WorkerSettings) -> None:
    if settings.configure_logging:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=_LOG_FORMAT)
    logging.getLogger("oisp").setLevel(settings.log_level)


async def _serve(sock: socket.socket) -> None:
    from oisp.activity.link_stage import FedWatermark, RemoteWatermark, ShardedWatermark, link_activity
    from oisp.decode_setup import build_event_decoder, build_pipeline
    from oisp.http.passive import make_decoder
    from oisp.plugins import create_plugin_manager

    channel = FrameChannel(sock)
    frames = channel.frames()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(channel.run_writer)
        try:
            settings = await _settings(frames)  # nothing else is sent before READY
            _configure_logging(settings)
            account = target_account(settings.config.decoder_user)
            proxy_can_restore = can_leave_idle()  # the proxy's process has the privileges this one starts with
            if account is not None:  # while this is the only thread: every thread started later inherits it
                restrict_new_privileges()
            plugins = create_plugin_manager()
            # this loop only decodes: it may wait for a sink's thread briefly (see oisp.pipeline); a shard after the
            # first has no sinks: it forwards its processed events to the first, which writes them
            forwards = settings.shard > 0
            pipeline = build_pipeline(plugins, settings.config, sink_handoff_wait=SINK_HANDOFF_WAIT,
                                      sinks=not forwards)
            # the decoder too (it reads the app table, package data, as the pipeline read the prices): the files
            # of an installation under a private directory (/root, a 0700 checkout) are unreadable after the drop
            decoder = build_event_decoder(plugins, settings.config, pipeline.emit)
            # the sinks' files and connections are open: from now on, nothing privileged is needed
            if account is not None:
                preload()
                handed = hand_over(pipeline.sinks, account)
                drop_privileges(account, [Path(p) for p in settings.protected_paths])
                check_sinks_after_drop(pipeline.sinks, account, handed)
            elif settings.config.decoder_user == KEEP and sys.platform != "win32" and os.geteuid() == 0:
                logger.warning("decoder_user = \"root\": the decoder process keeps root's privileges while it "
                               "parses bytes from the network")
        except Exception as exc:
            channel.send(Kind.FAILED, 0, _pickled_error(exc), force=True)
            await channel.close_sending()
            return
        if forwards:
            def forward(event: Event) -> None:
                channel.send(Kind.FORWARD, settings.shard, event.to_json().encode(), force=True)

            pipeline.add_listener(forward)
        elif settings.forward_events:
            def deliver(event: Event) -> None:
                channel.send(Kind.EVENT, 0, event.to_json().encode(), force=True)

            pipeline.add_listener(deliver)
        connections: dict[int, CopyDispatcher] = {}
        # Activity is observed in the proxy's process (the kernel's sources need the privileges this process
        # gave up); its events and watermark arrive as ACTIVITY and WATERMARK frames, in the order they were sent.
        # The first decoder process links them; its watermark is also that of every other shard (SHARD_MARK), so
        # an effect waits for the tool call another shard decoded before it. A shard after the first tells the
        # watermarks on (MARK) once its pipeline has forwarded every event made before them.
        activity: ShardedWatermark | None = None
        shard_mark: RemoteWatermark | None = None
        fed_mark: FedWatermark | None = None
        marked = 0
        if settings.config.activity_enabled and not forwards:
            activity = ShardedWatermark(max(1, settings.shards))
        elif settings.config.activity_enabled:
            shard_mark = RemoteWatermark()
            fed_mark = FedWatermark(pipeline, shard_mark)

        def tell_mark() -> None:
            nonlocal marked
            mark = fed_mark() if fed_mark is not None else None
            if mark is not None and mark > marked:
                marked = mark
                channel.send(Kind.MARK, settings.shard, mark.to_bytes(8, "big"), force=True)

        def busy() -> bool:
            return pipeline.backlog >= pause_at or (forwards and channel.buffered > FORWARD_BACKLOG)

        async def room() -> None:
            await pipeline.wait_for_room()
            if forwards:
                await channel.wait_buffered_below(FORWARD_BACKLOG // 2)

        async with pipeline:
            link_activity(pipeline, activity, hold_ms=settings.config.activity_link_hold_ms)
            channel.send(Kind.READY, 0, force=True)
            gc.freeze()  # what start-up made lives as long as the process: keep collections short
            yield_after = settings.config.decoder_yield_ms / 1000
            # A batch (up to a MiB of copies) can hold thousands of exchanges (10,000 pipelined requests fit in
            # one): once a quarter of the pipeline's queue waits, decoding pauses until the pipeline has caught
            # up, so no burst overflows the queue. The proxy buffers meanwhile, within the budget of each
            # connection (DecoderProcess.connection_limit): a connection that outruns it stops being decoded
            # (partial, counted), never another one.
            pause_at = max(1, pipeline.queue_size // 4)
            drops_told, drops_told_at = 0, 0.0
            # idle while it keeps up (the relay and the apps preempt it at once), normal while it falls behind
            priority = CpuPriority(
                settings.config.decoder_priority == "idle", self_return=can_leave_idle(),
                ask=(lambda policy: channel.send(Kind.PRIORITY, 0, dump_object(policy), force=True))
                if proxy_can_restore else None)
            async for batch in frames:
                started = time.perf_counter()
                watch = priority.enabled
                if watch:
                    batch = batch if isinstance(batch, list) else list(batch)
                    if priority.batch(*_batch_facts(batch), time.monotonic()):
                        await anyio.sleep(0)  # the writer sends the request now
                    watch = priority.idle
                for kind, number, timestamp, payload in batch:
                    if watch and time.perf_counter() - started > BEHIND_SECONDS:
                        watch = False
                        if priority.slow(time.monotonic()):
                            await anyio.sleep(0)
                    if busy():
                        await room()
                    if yield_after and time.perf_counter() - started > yield_after:
                        # a long batch: let a task waiting for this core (the relay, an app) run first
                        _yield_cpu()
                        started = time.perf_counter()
                    if kind is Kind.CLIENT_DATA or kind is Kind.SERVER_DATA:
                        dispatcher = connections.get(number)
                        if dispatcher is None:
                            continue
                        side: Direction = "client" if kind is Kind.CLIENT_DATA else "server"
                        if len(payload) <= _SLICE:
                            dispatcher.dispatch(side, payload, timestamp)
                            continue
                        # a big copy may hold thousands of exchanges: in slices, with a pause between them
                        for start in range(0, len(payload), _SLICE):
                            if start and busy():
                                await room()
                            dispatcher.dispatch(side, payload[start:start + _SLICE], timestamp)
                    elif kind is Kind.CLIENT_SKIP or kind is Kind.SERVER_SKIP:
                        dispatcher = connections.get(number)
                        if dispatcher is not None:
                            dispatcher.skip("client" if kind is Kind.CLIENT_SKIP else "server",
                                            int.from_bytes(payload, "big"), timestamp)
                    elif kind is Kind.CLIENT_EOF or kind is Kind.SERVER_EOF:
                        dispatcher = connections.get(number)
                        if dispatcher is not None:
                            dispatcher.dispatch("client" if kind is Kind.CLIENT_EOF else "server", None, timestamp)
                    elif kind is Kind.OPEN:
                        info, alpn, body_cap = load_object(payload)
                        try:
                            passive = make_decoder(alpn, info, decoder.exchange_listener(info), body_cap=body_cap,
                                                   max_table_size=settings.config.hpack_table_cap)
                        except Exception:
                            logger.exception("connection %s: could not set up decoding", info.connection_id)
                            continue
                        connections[number] = CopyDispatcher(passive, info.connection_id)
                    elif kind is Kind.END:
                        ended = connections.pop(number, None)
                        if ended is not None:
                            ended.close(payload.decode("utf-8", "replace") or None)
                    elif kind is Kind.ACTIVITY:
                        try:
                            pipeline.emit(Event.from_json(payload))
                        except Exception:  # one bad event must not end the decoder process
                            logger.exception("could not take an activity event")
                    elif kind is Kind.WATERMARK:
                        if activity is not None:
                            activity.advance(int.from_bytes(payload, "big"))
                        elif shard_mark is not None:
                            shard_mark.advance(int.from_bytes(payload, "big"))
                            tell_mark()
                    elif kind is Kind.FORWARDED:
                        try:
                            event = Event.from_json(payload)
                            event.remember_json(payload.decode())  # processed by its shard: written as it is
                        except Exception:  # one bad event must not end the decoder process
                            logger.exception("could not take an event forwarded by decoder process %d", number)
                        else:
                            pipeline.emit(event)
                    elif kind is Kind.SHARD_MARK:
                        if activity is not None:
                            activity.advance(int.from_bytes(payload, "big"), number)
                    elif kind is Kind.REPORT:
                        try:
                            decoder.connection(load_object(payload))
                        except Exception:  # one bad report must not end the decoder process
                            logger.exception("could not make the network.connect event of a connection")
                await room()  # the proxy buffers meanwhile, and is the one to count
                if fed_mark is not None:
                    tell_mark()
                if pipeline.stats.dropped != drops_told and time.monotonic() - drops_told_at >= 1.0:
                    drops_told, drops_told_at = pipeline.stats.dropped, time.monotonic()
                    channel.send(Kind.DROPS, 0, dump_object(drops_told), force=True)  # for the live view
            priority.stop()
            for dispatcher in connections.values():
                dispatcher.close("the proxy stopped before the connection ended")
            connections.clear()
        channel.send(Kind.SUMMARY, 0, dump_object(pipeline.summary()), force=True)
        await channel.close_sending()


async def _settings(frames: AsyncIterator[Iterable[Frame]]) -> WorkerSettings:
    """The first frame: what to run."""
    async for batch in frames:
        for kind, _number, _timestamp, payload in batch:
            if kind is not Kind.SETTINGS:
                raise OispError(f"the decoder process expected its settings first, got a {kind.name} frame")
            settings = load_object(payload)
            if not isinstance(settings, WorkerSettings):
                raise OispError("the decoder process got settings of the wrong type")
            return settings
    raise OispError("the proxy closed the connection before sending the decoder process's settings")


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return dump_object(exc)
    except Exception:
        return dump_object(f"{type(exc).__name__}: {exc}")


def _batch_facts(batch: Iterable[Frame]) -> tuple[int, int | None]:
    """(bytes of copies, how long ago the relay read the oldest of them; None: no copies) of a batch."""
    size, oldest = 0, 0
    for kind, _number, timestamp, payload in batch:
        if kind is Kind.CLIENT_DATA or kind is Kind.SERVER_DATA:
            size += len(payload)
            if timestamp and (not oldest or timestamp < oldest):
                oldest = timestamp
    return size, (time.monotonic_ns() - oldest if oldest else None)


def _yield_cpu() -> None:
    """Give the CPU to a task waiting for it, if any (``sched_yield``; a zero sleep where there is none)."""
    if sys.platform != "win32":
        os.sched_yield()
    else:
        time.sleep(0)
