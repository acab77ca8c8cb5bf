"""The event pipeline: producers emit events; the pipeline enriches, redacts and conforms them, then fans
them out to every sink through a bounded queue per sink.

Nothing on the capture side ever waits for a sink: :meth:`Pipeline.emit` never blocks. When a queue is full
the event is dropped *for that sink only*, counted in :attr:`Pipeline.stats` and logged (rate-limited), never
silently. Each sink runs in a worker thread of its own, one batch at a time, so a slow or failing sink only
affects itself.

A sink's batch is handed over once enough events wait for it (``batch_size``, less with a small queue), or
``flush_interval`` seconds after the first of them arrived, whichever comes first (and at once when the
pipeline closes): waking a thread costs tens of µs, so it is done for many events at a time.

A pipeline whose event loop does nothing else (the decoder process's) may also pass ``sink_handoff_wait``
(:data:`SINK_HANDOFF_WAIT`): handing a batch over, the loop then waits for the sink's thread that long (a sink
that writes to a local file is done by then), so the thread never waits for the GIL while the loop is busy.
Such a thread gets the GIL late: the loop lets go of it at every pass but takes it back at once, each time
waking the waiting thread for nothing, which costs more CPU than the sink's work itself. A sink still busy
after the wait is waited for without blocking the loop. The default is 0, never blocking the loop: a proxy
that decodes inline must not stall its relay on a sink.
"""

from __future__ import annotations

import collections
import logging
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import attrs
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from oisp.errors import OispError
from oisp.events import PAYLOAD_TYPES, SHARED_CONTEXT, Event, EventEncoder, Host, UnknownPayload
from oisp.events.spec_gaps import conform, map_values
from oisp.hookspecs import Sink
from oisp.redaction import SCANNED_KEYS, Redactor

__all__ = ["SINK_HANDOFF_WAIT", "Enricher", "Pipeline", "PipelineStats", "SinkStats", "Stage", "local_host"]

logger = logging.getLogger(__name__)

#: A step that takes an event and returns it, possibly with more context.
Enricher = Callable[[Event], Event]


class Stage(Protocol):
    """A step between enrichment and redaction that may hold events back and emit others (the activity linker).

    It is fed enriched events in order and returns the events to pass on now: the same ones, changed copies or
    new ones; all of them are then redacted, conformed and encoded (once; the enrichers do not run again: an
    event a stage makes gets the host, and what else it needs from the stage). Events it holds come back from
    :meth:`poll`, which the pipeline calls once :meth:`next_wakeup` seconds have passed (:meth:`feed` may return
    them too), and from :meth:`flush` when the pipeline closes. Runs in the event loop: it must be quick and
    never block.
    """

    def feed(self, event: Event) -> list[Event]:
        """Take one enriched event; return those to pass on now."""
        ...

    def poll(self) -> list[Event]:
        """The held events whose wait is over."""
        ...

    def next_wakeup(self) -> float | None:
        """Seconds until :meth:`poll` is due (None: nothing held)."""
        ...

    def flush(self) -> list[Event]:
        """Every event still held (the pipeline is closing)."""
        ...

_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64", "i686": "i686",
         "i386": "i686", "x86": "i686"}
_OS = {"Linux": "linux", "Darwin": "darwin", "Windows": "windows", "FreeBSD": "freebsd"}

#: The scanned parts of an event that are its own (the shared context records are scanned once, by the encoder).
_SCANNED_PER_EVENT = tuple(key for key in SCANNED_KEYS if key not in SHARED_CONTEXT)
_BLOCK_CACHE_SIZE = 1024
#: Seconds the event loop waits for a sink's thread to finish a batch it was just handed (see the module's
#: documentation) before it waits without blocking.
SINK_HANDOFF_WAIT = 0.005


def local_host() -> Host:
    """The :class:`Host` context of this machine."""
    system = platform.system()
    machine = platform.machine().lower()
    arch = _ARCH.get(machine, "arm" if machine.startswith("arm") else "other")
    os_version = None
    if system == "Linux":
        try:
            os_version = platform.freedesktop_os_release().get("PRETTY_NAME")
        except OSError:
            os_version = None
    elif system == "Darwin":
        os_version = "macOS " + platform.mac_ver()[0]
    elif system == "Windows":
        os_version = f"Windows {platform.release()} {platform.version()}"
    return Host(
        hostname=socket.gethostname(),
        os=_OS.get(system, "other"),
        os_version=os_version,
        arch=arch,
        kernel_version=platform.release(),
    )


@attrs.define
class SinkStats:
    """Counters of one sink."""

    delivered: int = 0
    dropped: int = 0
    failed: int = 0
    batches: int = 0
    last_error: str | None = None
    #: The sink's own counters, from its optional ``stats()`` method (refreshed after every batch and at close):
    #: a sink that delivers later than ``write`` returns (a Kafka producer, a webhook's spool) reports there what
    #: actually reached its destination. Empty for sinks without ``stats()``.
    reported: dict[str, int] = attrs.field(factory=dict)


@attrs.define
class PipelineStats:
    """Counters of the pipeline, per stage and per sink."""

    emitted: int = 0
    processed: int = 0
    #: Events dropped before processing because the ingress queue was full.
    dropped_ingress: int = 0
    #: Events dropped because a processing step (an enricher, redaction) failed on them.
    failed_processing: int = 0
    #: Events dropped at ingress because their connection was over its budget while the queues were more than half
    #: full (:meth:`Pipeline.emit_for`): one connection's burst, so that its neighbours' events find room.
    dropped_budget: int = 0
    sinks: dict[str, SinkStats] = attrs.field(factory=dict)

    @property
    def dropped(self) -> int:
        """Every drop, at ingress (a full queue, a connection over its budget) and at each sink."""
        return self.dropped_ingress + self.dropped_budget + sum(s.dropped for s in self.sinks.values())


class _SinkThread:
    """The thread of one sink: runs the calls it is handed (``write``, then ``close``), one at a time."""

    def __init__(self, name: str, handoff_wait: float) -> None:
        self._handoff_wait = handoff_wait
        # Plain locks as signals, held while there is nothing to signal: the cheapest hand-over there is.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._call: Callable[[], object] | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"oisp-sink-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            call = self._call
            if call is None:
                return
            try:
                call()
            except BaseException as exc:  # handed back to the loop, which decides
                self._error = exc
            self._call = None
            self._done.release()

    async def run(self, call: Callable[[], object]) -> None:
        """Run ``call`` in the thread; raises what it raised."""
        self._error = None
        self._call = call
        self._wake.release()
        # Blocks the loop for at most handoff_wait (0: not at all), letting the thread have the GIL right away.
        if not (self._done.acquire(timeout=self._handoff_wait) if self._handoff_wait > 0
                else self._done.acquire(blocking=False)):
            await anyio.to_thread.run_sync(self._done.acquire)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        """Let the thread end once it is idle (never waits)."""
        if not self._stopped:
            self._stopped = True
            self._call = None
            self._wake.release()


@attrs.define
class _SinkLane:
    name: str
    sink: Sink
    send: MemoryObjectSendStream[Event]
    receive: MemoryObjectReceiveStream[Event]
    stats: SinkStats
    thread: _SinkThread | None = None
    #: Set while the lane waits for more events before handing a batch over; set to hand it over now.
    flush: anyio.Event | None = None


def _refresh_reported(lane: _SinkLane) -> None:
    """Copy the counters a sink reports through its optional ``stats()`` into its :class:`SinkStats`."""
    report = getattr(lane.sink, "stats", None)
    if not callable(report):
        return
    try:
        counters = report()
        lane.stats.reported = {str(key): int(value) for key, value in dict(counters).items()}
    except Exception as exc:  # a sink's statistics must never cost its events
        logger.debug("sink %s: stats() failed: %s", lane.name, exc, exc_info=True)


class Pipeline:
    """Enrich → redact → conform → fan out to sinks.

    Use as an async context manager; :meth:`emit` events while it runs. Leaving the context drains every
    queue, closes the sinks and returns.

    ``sinks`` maps a name (used in stats and logs) to a :class:`~oisp.hookspecs.Sink`. ``enrichers`` run in
    order before redaction; by default the host context is added. ``redactor`` is on by default
    (``Redactor()``, the ``default`` profile); secrets never reach a sink. ``batch_size`` is the most events a sink
    gets at a time; ``flush_interval`` the longest an event waits for more to go with it (0: none);
    ``sink_handoff_wait`` how long the event loop may block handing a batch to a sink's thread (see above);
    ``stages`` (:class:`Stage`) run in order on enriched events, before redaction, the listeners and the sinks
    (none by default, and then they cost nothing).

    ``connection_budget``: the most events of one connection (:meth:`emit_for`) that may wait at ingress once the
    queues are more than half full; beyond it, that connection's events are dropped (counted in
    ``dropped_budget``), so one connection's burst cannot fill the queue its neighbours need. None: no budget.

    An event that already carries its JSON text (:attr:`Event.remembered_json`: another pipeline processed it,
    a decoder process that forwards its events) is not enriched, redacted or encoded again: it runs through the
    stages and goes to the listeners and sinks as it is (a stage that changes it makes a copy, processed anew).
    """

    def __init__(
        self,
        sinks: Mapping[str, Sink],
        *,
        enrichers: Sequence[Enricher] | None = None,
        redactor: Redactor | None = None,
        host: Host | None = None,
        queue_size: int = 10_000,
        batch_size: int = 256,
        flush_interval: float = 0.05,
        sink_handoff_wait: float = 0.0,
        stages: Sequence[Stage] = (),
        connection_budget: int | None = None,
    ) -> None:
        if connection_budget is not None and connection_budget <= 0:
            raise OispError(f"connection_budget ({connection_budget}) must be positive")
        self._connection_budget = connection_budget
        #: With a budget: the connection (or None) of each event waiting at ingress, in queue order, and how many
        #: wait per connection.
        self._ingress_keys: collections.deque[str | None] = collections.deque()
        self._waiting: dict[str, int] = {}
        if not 0 <= sink_handoff_wait <= 1:
            raise OispError(f"sink_handoff_wait ({sink_handoff_wait}) must be between 0 and 1 second")
        self._sink_handoff_wait = sink_handoff_wait
        if queue_size <= 0 or batch_size <= 0:
            raise OispError(f"queue_size ({queue_size}) and batch_size ({batch_size}) must be positive")
        if not flush_interval >= 0:
            raise OispError(f"flush_interval ({flush_interval}) must be >= 0 seconds")
        self._flush_interval = flush_interval
        #: Events waiting in a sink's queue that make it hand its batch over before flush_interval.
        self._flush_at = max(1, min(batch_size, queue_size // 4))
        self._host = host or local_host()
        self._enrichers: list[Enricher] = [self._add_host, *(enrichers or [])]
        self._redactor = redactor or Redactor()
        self.stats = PipelineStats()
        self._batch_size = batch_size
        self._queue_size = queue_size
        self._ingress_send, self._ingress_receive = anyio.create_memory_object_stream[Event](queue_size)
        self._lanes: list[_SinkLane] = []
        for name, sink in sinks.items():
            send, receive = anyio.create_memory_object_stream[Event](queue_size)
            stats = SinkStats()
            self.stats.sinks[name] = stats
            self._lanes.append(_SinkLane(name, sink, send, receive, stats))
        self._task_group: TaskGroup | None = None
        self._closed = False
        self._last_drop_log = 0.0
        self._listeners: list[Callable[[Event], None]] = []
        self._stages: list[Stage] = list(stages)
        self._room = anyio.Event()
        #: Encodes each event once (for every sink and listener); shared context records are scanned for the
        #: redactor and encoded once per record.
        self._encoder = EventEncoder(check=self._context_is_clean, cache_size=_BLOCK_CACHE_SIZE)

    # producer side ------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Hand an event to the pipeline; never blocks. Must be called from the pipeline's event loop."""
        if self._closed:
            raise OispError("the pipeline is closed; events can no longer be emitted")
        self.stats.emitted += 1
        try:
            self._ingress_send.send_nowait(event)
        except anyio.WouldBlock:
            self.stats.dropped_ingress += 1
            self._log_drop("ingress")
            return
        if self._connection_budget is not None:
            self._ingress_keys.append(None)

    def emit_for(self, connection_id: str, event: Event) -> None:
        """:meth:`emit` an event of one connection, within its budget (``connection_budget``): over it, while the
        queues are more than half full, the event is dropped (counted in ``dropped_budget``). Without a budget,
        the same as :meth:`emit`."""
        budget = self._connection_budget
        if budget is None:
            self.emit(event)
            return
        if self._closed:
            raise OispError("the pipeline is closed; events can no longer be emitted")
        self.stats.emitted += 1
        waiting = self._waiting.get(connection_id, 0)
        if waiting >= budget and not self._has_room():
            self.stats.dropped_budget += 1
            self._log_drop(f"ingress (a connection over its budget of {budget} events)")
            return
        try:
            self._ingress_send.send_nowait(event)
        except anyio.WouldBlock:
            self.stats.dropped_ingress += 1
            self._log_drop("ingress")
            return
        self._ingress_keys.append(connection_id)
        self._waiting[connection_id] = waiting + 1

    def _taken(self) -> None:
        """An event left the ingress queue (with a budget: its connection has one fewer waiting)."""
        key = self._ingress_keys.popleft()
        if key is not None:
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]

    def emit_many(self, events: Iterable[Event]) -> None:
        """:meth:`emit` each event."""
        for event in events:
            self.emit(event)

    @property
    def sinks(self) -> dict[str, Sink]:
        """The sinks, by name."""
        return {lane.name: lane.sink for lane in self._lanes}

    @property
    def queue_size(self) -> int:
        """The most events each queue (ingress, and each sink's) holds."""
        return self._queue_size

    @property
    def backlog(self) -> int:
        """Events emitted but not yet processed."""
        return self._ingress_send.statistics().current_buffer_used

    async def wait_for_room(self) -> None:
        """Wait until the events waiting to be processed and those waiting in any one sink's queue fill at most
        half a queue. A producer that can wait (the decoder process can: the proxy buffers for it) calls this
        between batches smaller than half a queue, so neither :meth:`emit` nor a slow sink's queue drops."""
        while not self._has_room() and not self._closed:
            self._room = anyio.Event()
            await self._room.wait()

    def _has_room(self) -> bool:
        # Every queued event may still end up in each sink's queue: count both.
        room = self._queue_size // 2 - self.backlog
        return room >= 0 and all(lane.send.statistics().current_buffer_used <= room for lane in self._lanes)

    def _maybe_room(self) -> None:
        if not self._room.is_set() and self._has_room():
            self._room.set()

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` (in the event loop, so it must be quick) with each processed event."""
        self._listeners.append(listener)

    def add_stage(self, stage: Stage) -> None:
        """Run ``stage`` on enriched events before redaction, after the stages already added."""
        self._stages.append(stage)

    # lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._process)
        for lane in self._lanes:
            self._task_group.start_soon(self._deliver, lane)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Stop accepting events; let queued events reach the sinks (the context exit waits for it)."""
        if not self._closed:
            self._closed = True
            self._ingress_send.close()
            self._room.set()

    # stages -------------------------------------------------------------------------------------
    def _add_host(self, event: Event) -> Event:
        return event if event.host is not None else event.with_context(host=self._host)

    def process(self, event: Event) -> Event:
        """Run the processing steps on one event (enrichers, redaction, schema conformance).

        The returned event also carries its JSON text (:meth:`Event.to_json` returns it without encoding again),
        since every sink and listener needs it.
        """
        for enrich in self._enrichers:
            event = enrich(event)
        return self._redact_and_encode(event)

    def _redact_and_encode(self, event: Event) -> Event:
        """The steps of :meth:`process` after the enrichers: redaction, conformance, the JSON text."""
        redactor = self._redactor
        if type(redactor) is Redactor and redactor.profile == "default":
            processed = self._process_default(event, redactor)
            if processed is not None:
                return processed
        event = conform(redactor(event))
        event.remember_json(event.to_json())
        return event

    def _context_is_clean(self, key: str, plain: Any) -> bool:
        """Whether a shared context record holds nothing the redactor would change."""
        return key not in SCANNED_KEYS or self._redactor.scan(plain) is plain

    def _process_default(self, event: Event, redactor: Redactor) -> Event | None:
        """:meth:`process` for the ``default`` profile without secrets in the event: the event is turned into its
        dict form once (context records many events share, like ``process``, from a cache), scanned, conformed
        and encoded; None when the event holds something to redact (the general way then does it)."""
        form = self._encoder.form(event)
        raw = form.fields
        if not form.clean:
            return None
        for key in _SCANNED_PER_EVENT:
            value = raw.get(key)
            if value is not None and redactor.scan(value) is not value:
                return None
        original, touched = map_values(raw)
        if original:
            payload = PAYLOAD_TYPES.get(event.event_type, UnknownPayload)
            event = event.with_context(data=payload.from_dict(raw["data"]), attrs=raw["attrs"])
            form = self._encoder.form(event)
        elif touched:  # conform() leaves such an event as it is
            form = self._encoder.form(event)
        event.remember_json(self._encoder.encode(form))
        return event

    async def _process(self) -> None:
        receive = self._ingress_receive
        async with receive:
            while True:
                try:
                    event = await (receive.receive() if not self._stages else self._receive_or_poll(receive))
                except anyio.EndOfStream:
                    break
                budgeted = self._connection_budget is not None
                if event is not None:
                    if budgeted:
                        self._taken()
                    self._handle(event)
                # What queued up meanwhile is taken without a trip through the event loop for each event
                # (at most a batch of it, then the loop gets its turn again).
                for _ in range(self._batch_size - 1):
                    try:
                        event = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    if budgeted:
                        self._taken()
                    self._handle(event)
                self._maybe_room()
                for lane in self._lanes:
                    if (lane.flush is not None
                            and lane.send.statistics().current_buffer_used + 1 >= self._flush_at):
                        lane.flush.set()
        for index in range(len(self._stages)):
            self._run_stages(index, self._stage_call(self._stages[index], "flush"))
        for lane in self._lanes:
            lane.send.close()
            if lane.flush is not None:
                lane.flush.set()

    async def _receive_or_poll(self, receive: MemoryObjectReceiveStream[Event]) -> Event | None:
        """The next event, or None after polling the stages when one of them is due first."""
        waits = [wait for wait in (stage.next_wakeup() for stage in self._stages) if wait is not None]
        if not waits:
            return await receive.receive()
        with anyio.move_on_after(max(0.0, min(waits))):
            return await receive.receive()
        for index, stage in enumerate(self._stages):
            self._run_stages(index, self._stage_call(stage, "poll"))
        return None

    def _stage_call(self, stage: Stage, method: str, *args: Event) -> list[Event]:
        try:
            return list(getattr(stage, method)(*args))
        except Exception:
            logger.exception("pipeline stage %r failed in %s", stage, method)
            return list(args)  # the event passes on as it is: never lost to a failing stage

    def _run_stages(self, first: int, events: list[Event]) -> None:
        """Run ``events`` through the stages from ``first`` on, then redact, conform and encode them and hand them
        to the listeners and sinks."""
        for stage in self._stages[first + 1:]:
            events = [out for event in events for out in self._stage_call(stage, "feed", event)]
        for event in events:
            if event.remembered_json is not None:  # processed by the pipeline of a decoder process that forwards
                self._dispatch(event)
                continue
            try:
                processed = self._redact_and_encode(self._add_host(event))
            except Exception as exc:
                self.stats.failed_processing += 1
                logger.error("event %s (%s) could not be processed and was dropped: %s",
                             event.event_id, event.event_type, exc, exc_info=True)
                continue
            self._dispatch(processed)

    def _handle(self, event: Event) -> None:
        """Process one event (with stages: enrich, run the stages, then the rest) and hand it to the listeners and
        every sink's queue."""
        if event.remembered_json is not None:  # processed already (see the class's docstring): as it is
            self.stats.processed += 1
            if self._stages:
                self._run_stages(0, self._stage_call(self._stages[0], "feed", event))
            else:
                self._dispatch(event)
            return
        try:
            if self._stages:
                for enrich in self._enrichers:
                    event = enrich(event)
            else:
                processed = self.process(event)
        except Exception as exc:
            self.stats.failed_processing += 1
            logger.error("event %s (%s) could not be processed and was dropped: %s",
                         event.event_id, event.event_type, exc, exc_info=True)
            return
        self.stats.processed += 1
        if self._stages:
            self._run_stages(0, self._stage_call(self._stages[0], "feed", event))
        else:
            self._dispatch(processed)

    def _dispatch(self, processed: Event) -> None:
        """Hand a processed event to the listeners and every sink's queue."""
        for listener in self._listeners:
            try:
                listener(processed)
            except Exception:
                logger.exception("pipeline listener %r failed", listener)
        for lane in self._lanes:
            try:
                lane.send.send_nowait(processed)
            except anyio.WouldBlock:
                lane.stats.dropped += 1
                self._log_drop(lane.name)

    async def _deliver(self, lane: _SinkLane) -> None:
        thread = lane.thread = _SinkThread(lane.name, self._sink_handoff_wait)
        try:
            async with lane.receive:
                while True:
                    try:
                        first = await lane.receive.receive()
                    except anyio.EndOfStream:
                        break
                    if (self._flush_interval > 0 and not self._closed
                            and lane.receive.statistics().current_buffer_used + 1 < self._flush_at):
                        lane.flush = anyio.Event()
                        with anyio.move_on_after(self._flush_interval):
                            await lane.flush.wait()
                        lane.flush = None
                    batch = [first]
                    while len(batch) < self._batch_size:
                        try:
                            batch.append(lane.receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    self._maybe_room()
                    await self._write(lane, batch)
            try:
                await thread.run(lane.sink.close)
            except Exception as exc:
                lane.stats.last_error = f"close: {exc}"
                logger.error("sink %s failed to close: %s", lane.name, exc, exc_info=True)
            _refresh_reported(lane)
        finally:
            thread.stop()

    async def _write(self, lane: _SinkLane, batch: list[Event]) -> None:
        assert lane.thread is not None
        try:
            await lane.thread.run(partial(lane.sink.write, batch))
        except Exception as exc:
            lane.stats.failed += len(batch)
            lane.stats.last_error = f"{type(exc).__name__}: {exc}"
            logger.error("sink %s failed to write %d event(s): %s", lane.name, len(batch), exc)
            return
        lane.stats.delivered += len(batch)
        lane.stats.batches += 1
        _refresh_reported(lane)

    def _log_drop(self, where: str) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            logger.warning("pipeline queue %s is full (%d events); events are being dropped (total %d)",
                           where, self._queue_size, self.stats.dropped)

    def refresh_sink_stats(self) -> None:
        """Read every sink's own counters (``stats()``) into :attr:`stats` now."""
        for lane in self._lanes:
            _refresh_reported(lane)

    def summary(self) -> dict[str, Any]:
        """The stats as a plain dict (for logs and the runner's exit summary)."""
        self.refresh_sink_stats()
        return attrs.asdict(self.stats) | {"dropped_total": self.stats.dropped}


