"""The ``otlp`` sink's I/O: OpenTelemetry SDK providers, batch processors and OTLP exporters (gRPC or HTTP).

Imported only when an ``otlp`` sink is created (``oisp[otlp]`` installs the SDK and its exporters).

* Traces: the spans :class:`~oisp.sinks.otlp.spans.SpanBuilder` pairs up, with their real start and end times,
  handed finished to the SDK's batch span processor. Their resource is the agent process (``service.name``,
  ``host.name``, ``process.*``; a bounded cache of them).
* Logs: every event, one log record each: ``event_name`` is the event type, the body is the event (its JSON
  text, what a JSONL line holds, or with ``log_body = "map"`` the same as an OTLP map), timestamp the event's
  time; AI and tool events carry the trace and span id of their span.
* Metrics: ``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration`` and
  ``gen_ai.client.operation.time_to_first_chunk`` histograms with the conventions' buckets and attributes.

The SDK's batch processors send in the background. :meth:`OtlpSink.write` gives the pipeline backpressure:
when more than half a processor's queue waits, it exports in the caller's thread before it adds more, so
nothing is dropped by the SDK for a full queue (the pipeline's own queue counts drops).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import LogRecordLimits, ReadableLogRecord, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from oisp._version import __version__
from oisp.errors import OispError
from oisp.events import Event
from oisp.sinks.otlp import mapping
from oisp.sinks.otlp.options import OtlpOptions
from oisp.sinks.otlp.spans import CLIENT, SpanBuilder, SpanSpec

__all__ = ["OtlpSink"]

logger = logging.getLogger(__name__)

SCOPE = "oisp"
_QUEUE = 65_536
_BATCH = 2_048
_PROVIDERS = 256  # resources (agent processes) whose providers are kept
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class _Resource(Resource):
    """A resource whose hash is computed once: the OTLP encoders group every span and log record by resource,
    and ``Resource.__hash__`` serializes all its attributes to JSON each time (a third of encoding a log
    record). Resources are immutable, so the hash never changes."""

    _hash: int | None = None

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = super().__hash__()
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


class _CountingSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, stats: _Stats) -> None:
        self.inner, self.stats = inner, stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.stats.exported("spans", len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _CountingLogExporter(LogRecordExporter):
    def __init__(self, inner: LogRecordExporter, stats: _Stats) -> None:
        self.inner, self.stats = inner, stats

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        result = self.inner.export(batch)
        self.stats.exported("logs", len(batch), result is LogRecordExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Stats:
    """Items handed to the SDK and items its exporters sent (or failed to), per signal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.emitted = {"spans": 0, "logs": 0}
        self.sent = {"spans": 0, "logs": 0}
        self.failed = {"spans": 0, "logs": 0}

    def exported(self, signal: str, count: int, ok: bool) -> None:
        with self._lock:
            (self.sent if ok else self.failed)[signal] += count
        if not ok:
            logger.warning("sinks.otlp: %d %s could not be exported (see the OpenTelemetry exporter's log)",
                           count, signal)

    def waiting(self, signal: str) -> int:
        with self._lock:
            return self.emitted[signal] - self.sent[signal] - self.failed[signal]


def _exporters(options: OtlpOptions) -> tuple[SpanExporter, LogRecordExporter, MetricExporter]:
    if options.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        grpc_kwargs: dict[str, Any] = {
            "endpoint": options.grpc_target, "insecure": options.insecure, "timeout": options.timeout,
            "headers": tuple(options.headers.items()) or None,
            "compression": grpc.Compression.Gzip if options.compression == "gzip" else grpc.Compression.NoCompression,
        }
        return GrpcSpans(**grpc_kwargs), GrpcLogs(**grpc_kwargs), GrpcMetrics(**grpc_kwargs)
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    http_kwargs: dict[str, Any] = {
        "headers": dict(options.headers) or None, "timeout": options.timeout,
        "compression": Compression.Gzip if options.compression == "gzip" else Compression.NoCompression,
    }
    return (HttpSpans(endpoint=options.signal_url("traces"), **http_kwargs),
            HttpLogs(endpoint=options.signal_url("logs"), **http_kwargs),
            HttpMetrics(endpoint=options.signal_url("metrics"), **http_kwargs))


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
        span_exporter, log_exporter, metric_exporter = _exporters(options)
        delay_ms = options.batch_delay * 1000
        timeout_ms = options.timeout * 1000
        self._span_processor = BatchSpanProcessor(
            _CountingSpanExporter(span_exporter, self.stats), max_queue_size=_QUEUE, schedule_delay_millis=delay_ms,
            max_export_batch_size=_BATCH, export_timeout_millis=timeout_ms) if options.traces else None
        self._log_processor = BatchLogRecordProcessor(
            _CountingLogExporter(log_exporter, self.stats), max_queue_size=_QUEUE, schedule_delay_millis=delay_ms,
            max_export_batch_size=_BATCH, export_timeout_millis=timeout_ms) if options.logs else None
        if not options.traces:
            span_exporter.shutdown()
        if not options.logs:
            log_exporter.shutdown()  # type: ignore[no-untyped-call]
        self._scope = InstrumentationScope(SCOPE, __version__)
        self._log_limits = LogRecordLimits()  # once: each instance reads the environment
        self._resources: OrderedDict[tuple[Any, ...], Resource] = OrderedDict()
        self._meter_provider: MeterProvider | None = None
        if options.metrics:
            reader = PeriodicExportingMetricReader(metric_exporter,
                                                   export_interval_millis=options.export_interval * 1000,
                                                   export_timeout_millis=timeout_ms)
            self._meter_provider = MeterProvider(
                # No exemplars: oisp records after the fact, there is never a current span to sample from.
                metric_readers=[reader], shutdown_on_exit=False, exemplar_filter=AlwaysOffExemplarFilter(),
                resource=Resource.create({"service.name": options.service_name, "host.name": socket.gethostname()}),
            )
            meter = self._meter_provider.get_meter(SCOPE, __version__)
            self._token_usage = meter.create_histogram(
                "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=list(mapping.TOKEN_BUCKETS))
            self._duration = meter.create_histogram(
                "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=list(mapping.DURATION_BUCKETS))
            self._first_chunk = meter.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk", unit="s",
                description="Time to receive the first chunk of a streamed response.",
                explicit_bucket_boundaries_advisory=list(mapping.DURATION_BUCKETS))
        else:
            metric_exporter.shutdown()
        _probe(options)
        logger.info("sinks.otlp: exporting to %s over %s (traces %s, logs %s, metrics %s, content %s)",
                    options.endpoint, options.protocol, options.traces, options.logs, options.metrics,
                    options.content)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OtlpSink:
        return cls(OtlpOptions.from_mapping(options))

    # Sink ---------------------------------------------------------------------------------------
    def write(self, events: Sequence[Event]) -> None:
        """Hand ``events`` to the SDK's batch processors (spans as their pairs complete, one log record each)."""
        if self._closed:
            raise OispError("sinks.otlp: write() was called after close()")
        self._make_room(len(events))
        spans: list[SpanSpec] = []
        for event in events:
            completed, context = self.builder.feed(event)
            spans += completed
            if self._log_processor is not None:
                self._emit_log(event, context.trace_id if context else None, context.span_id if context else None)
        spans += self.builder.expire()
        self._export_spans(spans)

    def flush(self, timeout: float = 30.0) -> bool:
        """Export everything handed over so far (spans, log records, metrics); True when all went out."""
        ok = True
        if self._span_processor is not None:
            ok = self._span_processor.force_flush(int(timeout * 1000)) and ok
        if self._log_processor is not None:
            ok = self._log_processor.force_flush(int(timeout * 1000)) and ok
        if self._meter_provider is not None:
            ok = self._meter_provider.force_flush(int(timeout * 1000)) and ok
        return ok

    def close(self) -> None:
        """End waiting requests as incomplete spans, export everything, shut the exporters down."""
        if self._closed:
            return
        self._closed = True
        try:
            self._export_spans(self.builder.drain())
        finally:
            timeout_ms = int(self.options.timeout * 1000)
            if self._span_processor is not None:
                self._span_processor.shutdown()  # type: ignore[no-untyped-call]
            if self._log_processor is not None:
                self._log_processor.shutdown()  # type: ignore[no-untyped-call]
            if self._meter_provider is not None:
                self._meter_provider.shutdown(timeout_millis=timeout_ms)

    # internals ----------------------------------------------------------------------------------
    def _make_room(self, incoming: int) -> None:
        """Backpressure: export in this thread while a processor's queue is more than half full."""
        for signal, processor in (("logs", self._log_processor), ("spans", self._span_processor)):
            if processor is not None and self.stats.waiting(signal) + incoming > _QUEUE // 2:
                processor.force_flush()

    @staticmethod
    def _resource_key(event: Event) -> tuple[Any, ...]:
        """What tells agent processes apart, cheaply: the resource's attributes are made only for a new one."""
        host, process, actor = event.host, event.process, event.actor
        return (host.hostname if host is not None else None, host.arch if host is not None else None,
                process.pid if process is not None else None, process.start_time if process is not None else None,
                process.exe if process is not None else None, process.cmdline if process is not None else None,
                actor.user if actor is not None else None)

    def _resource(self, event: Event) -> Resource:
        """The resource of the agent process ``event`` belongs to (a bounded cache of them)."""
        key = self._resource_key(event)
        resource = self._resources.get(key)
        if resource is None:
            attributes = mapping.safe_attributes(mapping.resource_attributes(event, self.options.service_name))
            resource = self._resources[key] = _Resource(attributes)
            while len(self._resources) > _PROVIDERS:
                self._resources.popitem(last=False)
        else:
            self._resources.move_to_end(key)
        return resource

    def _emit_log(self, event: Event, trace_id: int | None, span_id: int | None) -> None:
        record = LogRecord(
            timestamp=mapping.ts_ns(event.ts), severity_number=SeverityNumber.INFO, severity_text="INFO",
            body=self._body(event), attributes={"oisp.event_id": event.event_id}, event_name=event.event_type,
        )
        if trace_id is not None and span_id is not None:
            record.trace_id, record.span_id, record.trace_flags = trace_id, span_id, _SAMPLED
        assert self._log_processor is not None
        # Straight to the batch processor, with the agent process's resource: a LoggerProvider per process would
        # only add its per-record overhead (this sink emits every event, and must keep up with them).
        self._log_processor.on_emit(ReadWriteLogRecord(record, resource=self._resource(event),
                                                       instrumentation_scope=self._scope, limits=self._log_limits))
        self.stats.emitted["logs"] += 1

    def _body(self, event: Event) -> Any:
        text = event.to_json()  # made once by the pipeline for every sink
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Undecodable bytes a decoder kept (lone surrogates) are no valid protobuf string: escaped they are.
            return json.dumps(event.to_dict(), separators=(",", ":"))
        return json.loads(text) if self.options.log_body == "map" else text

    def _export_spans(self, spans: Sequence[SpanSpec]) -> None:
        for spec in spans:
            if self._span_processor is not None:
                self._export_span(spec)
            if spec.operation and self._meter_provider is not None and spec.kind == CLIENT:
                self._record_metrics(spec)

    def _export_span(self, spec: SpanSpec) -> None:
        # A finished span, with the ids, times and resource the span builder determined, handed to the batch
        # processor as a tracer would hand it (spans are made after the fact here, never "current").
        parent = SpanContext(spec.trace_id, spec.parent_span_id, is_remote=True, trace_flags=_SAMPLED) \
            if spec.parent_span_id is not None else None
        status = Status(StatusCode.ERROR, mapping.safe_text(spec.error_description or spec.error_type)) \
            if spec.error_type is not None else Status(StatusCode.UNSET)
        span = ReadableSpan(
            name=mapping.safe_text(spec.name),
            context=SpanContext(spec.trace_id, spec.span_id, is_remote=False, trace_flags=_SAMPLED),
            parent=parent, resource=self._resource(spec.resource_event),
            attributes=mapping.safe_attributes(spec.attributes),
            links=[Link(SpanContext(t, s, is_remote=False, trace_flags=_SAMPLED)) for t, s in spec.links],
            kind=SpanKind.CLIENT if spec.kind == CLIENT else SpanKind.INTERNAL, status=status,
            start_time=spec.start_ns, end_time=spec.end_ns, instrumentation_scope=self._scope,
        )
        assert self._span_processor is not None
        self._span_processor.on_end(span)
        self.stats.emitted["spans"] += 1

    def _record_metrics(self, spec: SpanSpec) -> None:
        attributes = mapping.safe_attributes(mapping.metric_attributes(spec.attributes))
        self._duration.record((spec.end_ns - spec.start_ns) / 1e9, attributes)
        if spec.error_type is None:
            for key, token_type in (("gen_ai.usage.input_tokens", "input"), ("gen_ai.usage.output_tokens", "output")):
                value = spec.attributes.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    self._token_usage.record(value, {**attributes, "gen_ai.token.type": token_type})
        first = spec.attributes.get("gen_ai.response.time_to_first_chunk")
        if isinstance(first, int | float) and not isinstance(first, bool):
            self._first_chunk.record(float(first), attributes)

