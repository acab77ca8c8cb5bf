"""The ``otlp`` sink's I/O: OTLP requests built per batch with ``opentelemetry-proto``'s classes, sent over gRPC
or HTTP/protobuf by one export thread.

Imported only when an ``otlp`` sink is created (``oisp[otlp]`` installs ``opentelemetry-proto`` and ``grpcio``).

* Traces: the spans :class:`~oisp.sinks.otlp.spans.SpanBuilder` pairs up, with their real start and end times.
  Their resource is the agent process (``service.name``, ``host.name``, ``process.*``; a bounded cache of them,
  each encoded once).
* Logs: every event, one log record each: ``event_name`` is the event type, the body is the event (its JSON
  text, what a JSONL line holds, or with ``log_body = "map"`` the same as an OTLP map), timestamp the event's
  time; AI and tool events carry the trace and span id of their span.
* Metrics: ``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration`` and
  ``gen_ai.client.operation.time_to_first_chunk`` histograms with the conventions' buckets and attributes,
  aggregated here and exported cumulatively every ``export_interval``.

:meth:`OtlpSink.write` pairs events into spans and appends spans and log records to the request being filled
for each signal (:mod:`oisp.sinks.otlp.encode`); a request is handed to the export thread when it holds
``_BATCH`` items or about ``_MAX_BYTES``, or has waited ``batch_delay``. The export thread sends them
(:mod:`oisp.sinks.otlp.transport`: retries within ``timeout``). Backpressure: while more than ``_MAX_WAITING``
items wait to be sent, ``write`` waits for the export thread, so nothing is dropped here (the pipeline's own
bounded queue for the sink drops, and counts).

The OpenTelemetry SDK is not used: building its span and log record objects and encoding them through its
exporters cost about 150 µs of CPU an event, most of the sink's time; the generated protobuf classes do the
same encoding directly.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from oisp._version import __version__
from oisp.errors import OispError
from oisp.events import Event
from oisp.sinks.otlp import encode, mapping
from oisp.sinks.otlp.options import OtlpOptions
from oisp.sinks.otlp.spans import CLIENT, LogContext, SpanBuilder, SpanSpec
from oisp.sinks.otlp.transport import Transport, create_transport

__all__ = ["OtlpSink"]

logger = logging.getLogger(__name__)

SCOPE = "oisp"
_BATCH = 2_048  # items per request
_MAX_BYTES = 3 << 20  # per request: under the 4 MiB a gRPC receiver takes by default
_MAX_WAITING = 65_536  # spans and log records handed over and not yet sent, before write() waits
_RESOURCES = 256  # resources (agent processes) kept encoded

TOKEN_USAGE = encode.HistogramSpec("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.",
                                   mapping.TOKEN_BUCKETS)
DURATION = encode.HistogramSpec("gen_ai.client.operation.duration", "s", "GenAI operation duration.",
                                mapping.DURATION_BUCKETS)
FIRST_CHUNK = encode.HistogramSpec("gen_ai.client.operation.time_to_first_chunk", "s",
                                   "Time to receive the first chunk of a streamed response.", mapping.DURATION_BUCKETS)


class _Stats:
    """Items handed over and items sent (or that could not be), per signal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.emitted = {"spans": 0, "logs": 0}
        self.sent = {"spans": 0, "logs": 0}
        self.failed = {"spans": 0, "logs": 0}

    def exported(self, signal: str, count: int, ok: bool, reason: str = "") -> None:
        with self._lock:
            (self.sent if ok else self.failed)[signal] += count
        if not ok:
            logger.warning("sinks.otlp: %d %s could not be exported (%s)", count, signal, reason or "unknown error")


def _probe(options: OtlpOptions) -> None:
    """Say at start-up when nothing listens at the endpoint (oisp starts anyway: the exporters retry, and a
    Collector may come up later)."""
    parts = urlsplit(options.endpoint)
    default = 4317 if options.protocol == "grpc" else 443 if parts.scheme == "https" else 80
    port = parts.port or default
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=1.0):
            pass
    except OSError as exc:
        logger.warning("sinks.otlp: nothing answers at %s (%s:%d: %s); starting anyway, exports will be retried",
                       options.endpoint, parts.hostname, port, exc)


class OtlpSink:
    """Exports events as OTLP traces, logs and metrics (see the module)."""

    def __init__(self, options: OtlpOptions) -> None:
        self.options = options
        self.stats = _Stats()
        self.builder = SpanBuilder(content=options.content, pending_timeout=options.pending_timeout,
                                   max_pending=options.max_pending)
        self._closed = False
        self._scope = encode.scope(SCOPE, __version__)
        self._resources: OrderedDict[Hashable, Resource] = OrderedDict()
        self._transport: Transport = create_transport(options)
        self._cond = threading.Condition()
        # The request being filled per signal ("traces", "logs"), when it was opened, and the requests to send.
        self._filling: dict[str, encode.SpanBatch | encode.LogBatch] = {}
        if options.traces:
            self._filling["traces"] = encode.SpanBatch(self._scope)
        if options.logs:
            self._filling["logs"] = encode.LogBatch(self._scope)
        self._opened: dict[str, float] = {}
        self._ready: deque[tuple[str, encode.SpanBatch | encode.LogBatch]] = deque()
        self._waiting = 0  # spans and log records handed over, not yet sent (or failed)
        self._failures = 0  # exports that failed, for flush()'s answer
        self._metrics_wanted = self._metrics_done = 0  # flush() asks for a metrics export; the thread counts them
        self._stopping = False
        self._close_deadline = float("inf")
        self._histograms = encode.Histograms([TOKEN_USAGE, DURATION, FIRST_CHUNK], time.time_ns()) \
            if options.metrics else None
        # Metrics are the machine's (oisp's): per-process resources would multiply the series. The attributes the
        # SDK's default resource gave them, with oisp as the telemetry SDK now, and an instance id per sink that
        # keeps the cumulative series of two oisp instances (or a restart) apart.
        self._metrics_resource = encode.resource({
            "telemetry.sdk.language": "python", "telemetry.sdk.name": "oisp", "telemetry.sdk.version": __version__,
            "service.instance.id": str(uuid.uuid4()), "service.name": options.service_name,
            "host.name": mapping.safe_text(socket.gethostname())})
        self._thread = threading.Thread(target=self._run, name="oisp-otlp-export", daemon=True)
        self._thread.start()
        _probe(options)
        logger.info("sinks.otlp: exporting to %s over %s (traces %s, logs %s, metrics %s, content %s)",
                    options.endpoint, options.protocol, options.traces, options.logs, options.metrics,
                    options.content)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OtlpSink:
        return cls(OtlpOptions.from_mapping(options))

    # Sink ---------------------------------------------------------------------------------------
    def write(self, events: Sequence[Event]) -> None:
        """Pair ``events`` into spans and add them and one log record each to the requests being filled."""
        if self._closed:
            raise OispError("sinks.otlp: write() was called after close()")
        observed = time.time_ns()
        logs = "logs" in self._filling
        with self._cond:
            # Backpressure: wait for the export thread rather than hold ever more.
            while self._waiting and self._waiting + len(events) > _MAX_WAITING and self._thread.is_alive():
                self._cond.wait(1.0)
            spans: list[SpanSpec] = []
            for event in events:
                completed, context = self.builder.feed(event)
                if completed:
                    spans += completed
                if logs:
                    self._add_log(event, context, observed)
            spans += self.builder.expire()
            self._add_spans(spans)

    def flush(self, timeout: float = 30.0) -> bool:
        """Export everything handed over so far (spans, log records, metrics); True when all went out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            failures = self._failures
            for signal in list(self._opened):
                self._seal(signal)
            self._metrics_wanted += 1
            wanted = self._metrics_wanted
            self._cond.notify_all()
            while self._waiting or self._metrics_done < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
            return self._failures == failures

    def close(self) -> None:
        """End waiting requests as incomplete spans, export everything (within ``timeout``), stop."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            try:
                self._add_spans(self.builder.drain())
            finally:
                for signal in list(self._opened):
                    self._seal(signal)
                self._metrics_wanted += 1
                self._stopping = True
                self._close_deadline = time.monotonic() + self.options.timeout
                self._cond.notify_all()
        self._thread.join(self.options.timeout + 5.0)
        if self._thread.is_alive():
            logger.warning("sinks.otlp: the export thread did not end within %g s", self.options.timeout + 5.0)

    # filling requests (under self._cond) -----------------------------------------------------------
    def _add_log(self, event: Event, context: LogContext | None, observed: int) -> None:
        batch = self._filling["logs"]
        assert isinstance(batch, encode.LogBatch)
        key, resource = self._resource(event)
        if not batch.count:
            self._opened["logs"] = time.monotonic()
            self._cond.notify_all()  # the export thread now has a batch_delay to keep
        batch.add(key, resource, time_ns=mapping.ts_ns(event.ts), observed_ns=observed,
                  event_name=event.event_type, event_id=event.event_id, body=self._body(event),
                  trace_id=context.trace_id if context else None, span_id=context.span_id if context else None)
        self._waiting += 1
        self.stats.emitted["logs"] += 1
        if batch.count >= _BATCH or batch.size >= _MAX_BYTES:
            self._seal("logs")

    def _add_spans(self, spans: Sequence[SpanSpec]) -> None:
        batch = self._filling.get("traces")
        for spec in spans:
            if batch is not None:
                assert isinstance(batch, encode.SpanBatch)
                key, resource = self._resource(spec.resource_event)
                if not batch.count:
                    self._opened["traces"] = time.monotonic()
                    self._cond.notify_all()  # the export thread now has a batch_delay to keep
                batch.add(key, resource, spec)
                self._waiting += 1
                self.stats.emitted["spans"] += 1
                if batch.count >= _BATCH or batch.size >= _MAX_BYTES:
                    self._seal("traces")
                    batch = self._filling["traces"]
            if spec.operation and self._histograms is not None and spec.kind == CLIENT:
                self._record_metrics(spec)

    def _seal(self, signal: str) -> None:
        """Hand the request being filled to the export thread, and start a new one."""
        batch = self._filling[signal]
        self._opened.pop(signal, None)
        if not batch.count:
            return
        self._ready.append((signal, batch))
        self._filling[signal] = encode.SpanBatch(self._scope) if signal == "traces" else encode.LogBatch(self._scope)
        self._cond.notify_all()

    def _record_metrics(self, spec: SpanSpec) -> None:
        histograms = self._histograms
        assert histograms is not None
        attributes = mapping.safe_attributes(mapping.metric_attributes(spec.attributes))
        histograms.record(DURATION.name, (spec.end_ns - spec.start_ns) / 1e9, attributes)
        if spec.error_type is None:
            for key, token_type in (("gen_ai.usage.input_tokens", "input"), ("gen_ai.usage.output_tokens", "output")):
                value = spec.attributes.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    histograms.record(TOKEN_USAGE.name, value, {**attributes, "gen_ai.token.type": token_type})
        first = spec.attributes.get("gen_ai.response.time_to_first_chunk")
        if isinstance(first, int | float) and not isinstance(first, bool):
            histograms.record(FIRST_CHUNK.name, float(first), attributes)

    @staticmethod
    def _resource_key(event: Event) -> tuple[Any, ...]:
        """What tells agent processes apart, cheaply: the resource's attributes are made only for a new one."""
        host, process, actor = event.host, event.process, event.actor
        return (host.hostname if host is not None else None, host.arch if host is not None else None,
                process.pid if process is not None else None, process.start_time if process is not None else None,
                process.exe if process is not None else None, process.cmdline if process is not None else None,
                actor.user if actor is not None else None)

    def _resource(self, event: Event) -> tuple[Hashable, Resource]:
        """The resource of the agent process ``event`` belongs to, encoded (a bounded cache of them)."""
        key = self._resource_key(event)
        resource = self._resources.get(key)
        if resource is None:
            attributes = mapping.safe_attributes(mapping.resource_attributes(event, self.options.service_name))
            resource = self._resources[key] = encode.resource(attributes)
            while len(self._resources) > _RESOURCES:
                self._resources.popitem(last=False)
        else:
            self._resources.move_to_end(key)
        return key, resource

    def _body(self, event: Event) -> Any:
        text = event.to_json()  # made once by the pipeline for every sink
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                # Undecodable bytes a decoder kept (lone surrogates) are no valid protobuf string: escaped they are.
                return json.dumps(event.to_dict(), separators=(",", ":"))
        return json.loads(text) if self.options.log_body == "map" else text

    # the export thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        interval = self.options.export_interval
        delay = self.options.batch_delay
        next_metrics = time.monotonic() + interval
        try:
            while True:
                with self._cond:
                    while True:
                        now = time.monotonic()
                        for signal, opened in list(self._opened.items()):
                            if now - opened >= delay:
                                self._seal(signal)
                        metrics = self._metrics_wanted > self._metrics_done or now >= next_metrics
                        if self._ready or metrics or self._stopping:
                            break
                        wake = min([next_metrics, *(opened + delay for opened in self._opened.values())])
                        self._cond.wait(max(wake - now, 0.001))
                    job = self._ready.popleft() if self._ready else None
                    wanted = self._metrics_wanted
                    stopping = self._stopping
                if job is not None:
                    self._send(*job)
                    continue
                if metrics or stopping:
                    self._export_metrics()
                    next_metrics = time.monotonic() + interval
                    with self._cond:
                        self._metrics_done = wanted
                        self._cond.notify_all()
                if stopping:
                    return
        finally:
            self._transport.close()

    def _deadline(self) -> float:
        return min(time.monotonic() + self.options.timeout, self._close_deadline)

    def _send(self, signal: str, batch: encode.SpanBatch | encode.LogBatch) -> None:
        name = "spans" if signal == "traces" else "logs"
        ok, reason = False, ""
        try:
            result = self._transport.export(signal, batch.request, self._deadline())
            ok, reason = result.ok, result.reason
            if result.ok and result.rejected:
                logger.warning("sinks.otlp: the receiver rejected %d of %d %s", result.rejected, batch.count, name)
        except Exception as exc:  # the export thread must go on: count the batch as failed
            logger.exception("sinks.otlp: exporting %d %s failed", batch.count, name)
            reason = f"{type(exc).__name__}: {exc}"
        self.stats.exported(name, batch.count, ok, reason)
        with self._cond:
            self._waiting -= batch.count
            if not ok:
                self._failures += 1
            self._cond.notify_all()

    def _export_metrics(self) -> None:
        with self._cond:
            if not self._histograms:
                return
            request = self._histograms.request(self._metrics_resource, self._scope, time.time_ns())
        try:
            result = self._transport.export("metrics", request, self._deadline())
        except Exception:
            logger.exception("sinks.otlp: exporting metrics failed")
            result = None
        if result is None or not result.ok:
            if result is not None:
                logger.warning("sinks.otlp: metrics could not be exported (%s)", result.reason)
            with self._cond:
                self._failures += 1
