"""OTLP request messages, built with ``opentelemetry-proto``'s generated classes: no I/O here.

The sink builds one request per signal and batch directly, in place (``add()`` on the repeated fields, which
is several times cheaper in protobuf's upb backend than building each message and copying it in): spans and log
records are grouped by resource (the agent process, encoded once per process and kept in a bounded cache by
the sink) under the one ``oisp`` instrumentation scope. Histograms are aggregated here, cumulatively, and a
metrics request is a snapshot of them. The generated classes do all the encoding (``SerializeToString``).

What goes in matches what the OpenTelemetry SDK's OTLP encoders produced for the same spans and log records
(ids, flags, status, observed time, severities), which the sink used before; only the SDK's Python objects in
between are gone (they cost most of the CPU).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import (
    SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK,
    SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK,
    Span,
    Status,
)

from oisp.sinks.otlp import mapping
from oisp.sinks.otlp.spans import CLIENT, SpanSpec

__all__ = ["HistogramSpec", "Histograms", "LogBatch", "SpanBatch", "resource", "scope", "set_attributes",
           "set_value"]

#: Log records are INFO (severity number 9).
SEVERITY_INFO = 9
#: W3C trace flags of a sampled span, as a log record of a span carries them.
SAMPLED = 1
#: A span's own context is local; its parent's (the caller's W3C context) is remote.
_FLAGS_LOCAL = SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE_PARENT = SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_INT64 = (-(1 << 63), (1 << 63) - 1)
#: Bytes a log record takes besides its body (times, ids, severity, event name, oisp.event_id), rounded up.
_RECORD_OVERHEAD = 160


# --- values ----------------------------------------------------------------------------------------
def set_value(target: AnyValue, value: Any) -> None:
    """Fill ``target`` with ``value``: bool, str, int, float, bytes, a sequence (array) or a mapping (kvlist);
    None leaves it empty. Anything else (and an int beyond 64 bits) is sent as its text."""
    if isinstance(value, str):
        target.string_value = value if value.isascii() else mapping.safe_text(value)
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif value is None:
        return
    elif isinstance(value, Mapping):
        set_attributes(target.kvlist_value.values, value)
    elif isinstance(value, bytes | bytearray):
        target.bytes_value = bytes(value)
    elif isinstance(value, Sequence):
        values = target.array_value.values
        for item in value:
            set_value(values.add(), item)
    else:
        target.string_value = mapping.safe_text(str(value))


def set_attributes(target: Any, attributes: Mapping[Any, Any]) -> None:
    """Append ``attributes`` to a repeated ``KeyValue`` field, in their order."""
    add = target.add
    for key, value in attributes.items():
        item = add(key=key if isinstance(key, str) else str(key))
        set_value(item.value, value)


def resource(attributes: Mapping[str, Any]) -> Resource:
    """The OTLP resource of ``attributes`` (encoded once per agent process; requests copy it)."""
    out = Resource()
    set_attributes(out.attributes, attributes)
    return out


def scope(name: str, version: str) -> InstrumentationScope:
    return InstrumentationScope(name=name, version=version)


# --- spans and log records ---------------------------------------------------------------------------
class _Batch:
    """One export request being filled: items grouped by resource (one ``Resource*`` each), one scope."""

    def __init__(self, request: Any, scope: InstrumentationScope) -> None:
        self.request = request
        self.scope = scope
        self.count = 0
        #: Encoded size of the items so far (bytes), to keep a request under a receiver's message limit.
        self.size = 0
        self._groups: dict[Hashable, Any] = {}

    def _items(self, key: Hashable, resource: Resource) -> Any:
        items = self._groups.get(key)
        if items is None:
            items = self._groups[key] = self._new_group(resource)
        return items

    def _new_group(self, resource: Resource) -> Any:
        raise NotImplementedError


class SpanBatch(_Batch):
    """An ``ExportTraceServiceRequest`` being filled with finished spans."""

    def __init__(self, scope: InstrumentationScope) -> None:
        super().__init__(ExportTraceServiceRequest(), scope)

    def _new_group(self, resource: Resource) -> Any:
        group = self.request.resource_spans.add()
        group.resource.CopyFrom(resource)
        scope_spans = group.scope_spans.add()
        scope_spans.scope.CopyFrom(self.scope)
        return scope_spans.spans

    def add(self, resource_key: Hashable, resource: Resource, spec: SpanSpec) -> None:
        """Append the span ``spec`` describes (its attributes made valid UTF-8 first)."""
        span = self._items(resource_key, resource).add(
            trace_id=spec.trace_id.to_bytes(16, "big"), span_id=spec.span_id.to_bytes(8, "big"),
            name=mapping.safe_text(spec.name),
            kind=Span.SPAN_KIND_CLIENT if spec.kind == CLIENT else Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=spec.start_ns, end_time_unix_nano=spec.end_ns,
            flags=_FLAGS_LOCAL if spec.parent_span_id is None else _FLAGS_REMOTE_PARENT,
        )
        if spec.parent_span_id is not None:
            span.parent_span_id = spec.parent_span_id.to_bytes(8, "big")
        set_attributes(span.attributes, mapping.safe_attributes(spec.attributes))
        for trace_id, span_id in spec.links:
            span.links.add(trace_id=trace_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"),
                           flags=_FLAGS_LOCAL)
        if spec.error_type is not None:
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = mapping.safe_text(spec.error_description or spec.error_type)
        else:
            span.status.SetInParent()  # UNSET, present as the SDK sent it
        self.count += 1
        self.size += span.ByteSize()


class LogBatch(_Batch):
    """An ``ExportLogsServiceRequest`` being filled with log records."""

    def __init__(self, scope: InstrumentationScope) -> None:
        super().__init__(ExportLogsServiceRequest(), scope)

    def _new_group(self, resource: Resource) -> Any:
        group = self.request.resource_logs.add()
        group.resource.CopyFrom(resource)
        scope_logs = group.scope_logs.add()
        scope_logs.scope.CopyFrom(self.scope)
        return scope_logs.log_records

    def add(self, resource_key: Hashable, resource: Resource, *, time_ns: int, observed_ns: int, event_name: str,
            event_id: str, body: Any, trace_id: int | None, span_id: int | None) -> None:
        """Append one INFO log record (``body``: a string or, as an OTLP map, a mapping)."""
        record = self._items(resource_key, resource).add(
            time_unix_nano=time_ns, observed_time_unix_nano=observed_ns, severity_number=SEVERITY_INFO,
            severity_text="INFO", event_name=event_name,
        )
        if trace_id and span_id:
            record.trace_id = trace_id.to_bytes(16, "big")
            record.span_id = span_id.to_bytes(8, "big")
            record.flags = SAMPLED
        record.attributes.add(key="oisp.event_id").value.string_value = mapping.safe_text(event_id)
        self.count += 1
        if isinstance(body, str):
            record.body.string_value = body
            # The body is nearly all of a record: its length instead of ByteSize(), which walks the record.
            self.size += _RECORD_OVERHEAD + (len(body) if body.isascii() else len(body.encode("utf-8")))
        else:
            set_value(record.body, body)
            self.size += record.ByteSize()


# --- metrics -------------------------------------------------------------------------------------
class HistogramSpec:
    """A histogram instrument: name, unit, description and explicit bucket boundaries."""

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.bounds = [float(b) for b in bounds]


class _Point:
    __slots__ = ("attributes", "count", "counts", "max", "min", "sum")

    def __init__(self, attributes: Mapping[str, Any], buckets: int) -> None:
        self.attributes = dict(attributes)
        self.counts = [0] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class Histograms:
    """Explicit-bucket histograms aggregated in the sink, exported with cumulative temporality: every export
    holds every series recorded since ``start_ns``, as the SDK's default reader did."""

    def __init__(self, specs: Sequence[HistogramSpec], start_ns: int) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.start_ns = start_ns
        self._series: dict[str, dict[frozenset[tuple[str, Any]], _Point]] = {spec.name: {} for spec in specs}

    def record(self, name: str, value: float, attributes: Mapping[str, Any]) -> None:
        spec = self.specs[name]
        key = frozenset(attributes.items())
        series = self._series[name]
        point = series.get(key)
        if point is None:
            point = series[key] = _Point(attributes, len(spec.bounds) + 1)
        # Bucket i holds (bounds[i-1], bounds[i]]: a value equal to a boundary is in the bucket it closes.
        point.counts[bisect.bisect_left(spec.bounds, value)] += 1
        point.count += 1
        point.sum += value
        point.min = min(point.min, value)
        point.max = max(point.max, value)

    def __bool__(self) -> bool:
        return any(self._series.values())

    def request(self, resource: Resource, scope: InstrumentationScope, now_ns: int) -> ExportMetricsServiceRequest:
        """A snapshot of every series, as one request (its metrics in the instruments' order)."""
        request = ExportMetricsServiceRequest()
        group = request.resource_metrics.add()
        group.resource.CopyFrom(resource)
        scope_metrics = group.scope_metrics.add()
        scope_metrics.scope.CopyFrom(scope)
        for name, series in self._series.items():
            if not series:
                continue
            spec = self.specs[name]
            metric = scope_metrics.metrics.add(name=spec.name, unit=spec.unit, description=spec.description)
            metric.histogram.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
            points = metric.histogram.data_points
            for point in series.values():
                data = points.add(start_time_unix_nano=self.start_ns, time_unix_nano=now_ns, count=point.count,
                                  sum=point.sum, bucket_counts=point.counts, explicit_bounds=spec.bounds,
                                  min=point.min, max=point.max)
                set_attributes(data.attributes, point.attributes)
        return request
