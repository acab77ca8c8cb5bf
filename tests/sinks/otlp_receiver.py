"""A real OTLP receiver for tests and benchmarks, on loopback: the collector's gRPC services (traces, logs,
metrics) built from ``opentelemetry-proto`` + ``grpcio``, and the OTLP/HTTP protobuf endpoints (``/v1/traces``,
``/v1/logs``, ``/v1/metrics``, gzip bodies accepted) on ``http.server``. It keeps every decoded request."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["Receiver", "attributes", "decode_value"]

_REQUESTS: dict[str, Any] = {
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
}
_RESPONSES: dict[str, Any] = {
    "traces": trace_service_pb2.ExportTraceServiceResponse,
    "logs": logs_service_pb2.ExportLogsServiceResponse,
    "metrics": metrics_service_pb2.ExportMetricsServiceResponse,
}


def decode_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as Python (kvlist -> dict, array -> list, unset -> None)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "kvlist_value":
        return {kv.key: decode_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    return getattr(value, kind)


def attributes(key_values: Any) -> dict[str, Any]:
    """Repeated KeyValue as a dict."""
    return {kv.key: decode_value(kv.value) for kv in key_values}


class Receiver:
    """Receives OTLP over ``protocol`` (``grpc`` or ``http/protobuf``) on 127.0.0.1; :attr:`endpoint` for the sink."""

    def __init__(self, protocol: str, *, keep: bool = True) -> None:
        self.protocol = protocol
        self.keep = keep
        self.requests: dict[str, list[Any]] = {"traces": [], "logs": [], "metrics": []}
        self.headers: list[dict[str, str]] = []
        self.counts = {"spans": 0, "logs": 0}
        #: (monotonic time received, log record bodies' event ids) per logs request, for latency measurements.
        self.on_logs: Callable[[Any], None] | None = None
        self._changed = threading.Condition()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        if protocol == "grpc":
            self._start_grpc()
        else:
            self._start_http()

    # servers ------------------------------------------------------------------------------------
    def _record(self, signal: str, request: Any, headers: dict[str, str]) -> None:
        if signal == "logs" and self.on_logs is not None:
            self.on_logs(request)
        with self._changed:
            if self.keep:
                self.requests[signal].append(request)
                self.headers.append(headers)
            if signal == "traces":
                self.counts["spans"] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            elif signal == "logs":
                self.counts["logs"] += sum(len(s.log_records) for r in request.resource_logs
                                           for s in r.scope_logs)
            self._changed.notify_all()

    def _start_grpc(self) -> None:
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._record("traces", request, dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._record("logs", request, dict(context.invocation_metadata()))
                return logs_service_pb2.ExportLogsServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._record("metrics", request, dict(context.invocation_metadata()))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc = server

    def _start_http(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                signal = self.path.rsplit("/", 1)[-1]
                if self.path not in ("/v1/traces", "/v1/logs", "/v1/metrics"):
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(415)
                    return
                request = _REQUESTS[signal]()
                request.ParseFromString(body)
                receiver._record(signal, request, {k.lower(): v for k, v in self.headers.items()})
                payload = _RESPONSES[signal]().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="otlp-http-receiver", daemon=True).start()
        self._http = server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    # reading ------------------------------------------------------------------------------------
    def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until ``condition()`` holds (evaluated under the receiver's lock), or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the OTLP receiver did not get what was expected within {timeout} s: "
                                         f"{self.counts}")
                self._changed.wait(remaining)

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        return [(attributes(rs.resource.attributes), span) for request in self.requests["traces"]
                for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]

    def logs(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, log record) of every log record received."""
        return [(attributes(rl.resource.attributes), record) for request in self.requests["logs"]
                for rl in request.resource_logs for sl in rl.scope_logs for record in sl.log_records]

    def metrics(self) -> Iterator[Any]:
        """Every metric received (the latest export last)."""
        for request in self.requests["metrics"]:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    yield from sm.metrics
