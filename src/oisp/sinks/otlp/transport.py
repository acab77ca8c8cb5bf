"""Sending OTLP requests: gRPC (the collector services' stubs from ``opentelemetry-proto``, over ``grpcio``) or
HTTP/protobuf (a POST of the serialized request, ``Content-Type: application/x-protobuf``, gzip optional, on
one kept-alive connection from the standard library).

:meth:`Transport.export` retries what OTLP says to retry (gRPC ``UNAVAILABLE`` and the other transient codes;
HTTP 429, 502, 503, 504 and connection errors) with exponential backoff and jitter, honouring an HTTP
``Retry-After``, all within one deadline (the sink's ``timeout``). Used from one thread only.
"""

from __future__ import annotations

import gzip
import http.client
import importlib
import logging
import random
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import attrs

from oisp._version import __version__
from oisp.sinks.otlp.options import OtlpOptions

__all__ = ["SIGNALS", "Attempt", "GrpcTransport", "HttpTransport", "Transport", "create_transport"]

logger = logging.getLogger(__name__)

SIGNALS = ("traces", "logs", "metrics")
_BACKOFF_BASE = 0.5
_BACKOFF_MAX = 30.0
_RETRY_HTTP = frozenset({429, 502, 503, 504})
#: gRPC status names OTLP calls transient.
_RETRY_GRPC = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "OUT_OF_RANGE",
                         "UNAVAILABLE", "DATA_LOSS"})
_USER_AGENT = f"oisp/{__version__}"


@attrs.frozen
class Attempt:
    """What one try gave: success, whether to try again, why not, how long the receiver asked to wait, and how
    many items a successful answer said it rejected (OTLP partial success)."""

    ok: bool
    retryable: bool = False
    reason: str = ""
    retry_after: float | None = None
    rejected: int = 0


class Transport:
    """Sends a request of one signal; subclasses make one try (:meth:`attempt`)."""

    def __init__(self, options: OtlpOptions) -> None:
        self.options = options

    def attempt(self, signal: str, request: Any, timeout: float) -> Attempt:
        raise NotImplementedError

    def export(self, signal: str, request: Any, deadline: float) -> Attempt:
        """Send ``request``, retrying transient failures until ``deadline`` (a ``time.monotonic()`` value)."""
        delay = _BACKOFF_BASE
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Attempt(False, reason="no time left to send it")
            result = self.attempt(signal, request, remaining)
            if result.ok or not result.retryable:
                return result
            wait = result.retry_after if result.retry_after is not None else delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, _BACKOFF_MAX)
            if time.monotonic() + wait >= deadline:
                return result
            logger.debug("sinks.otlp: %s export failed (%s), retrying in %.2f s", signal, result.reason, wait)
            time.sleep(wait)

    def close(self) -> None:
        pass


class GrpcTransport(Transport):
    """The OTLP collector services over one gRPC channel."""

    def __init__(self, options: OtlpOptions) -> None:
        super().__init__(options)
        import grpc

        self._grpc = grpc
        compression = grpc.Compression.Gzip if options.compression == "gzip" else grpc.Compression.NoCompression
        if options.insecure:
            self._channel = grpc.insecure_channel(options.grpc_target, compression=compression)
        else:
            self._channel = grpc.secure_channel(options.grpc_target, grpc.ssl_channel_credentials(),
                                                compression=compression)
        self._metadata = tuple(options.headers.items()) or None
        self._calls: dict[str, Any] = {}
        for signal, module, stub in (("traces", "trace.v1.trace_service_pb2_grpc", "TraceServiceStub"),
                                     ("logs", "logs.v1.logs_service_pb2_grpc", "LogsServiceStub"),
                                     ("metrics", "metrics.v1.metrics_service_pb2_grpc", "MetricsServiceStub")):
            generated = importlib.import_module(f"opentelemetry.proto.collector.{module}")
            self._calls[signal] = getattr(generated, stub)(self._channel).Export

    def attempt(self, signal: str, request: Any, timeout: float) -> Attempt:
        try:
            response = self._calls[signal](request, metadata=self._metadata, timeout=timeout)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = getattr(code, "name", str(code))
            details = exc.details() if hasattr(exc, "details") else ""
            return Attempt(False, retryable=name in _RETRY_GRPC, reason=f"gRPC {name}: {details}")
        return Attempt(True, rejected=_rejected(response))

    def close(self) -> None:
        self._channel.close()


class HttpTransport(Transport):
    """OTLP/HTTP with protobuf bodies, one persistent connection."""

    def __init__(self, options: OtlpOptions) -> None:
        super().__init__(options)
        parts = urlsplit(options.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._paths = {signal: urlsplit(options.signal_url(signal)).path for signal in SIGNALS}
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": _USER_AGENT, **options.headers}
        if options.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._context = ssl.create_default_context() if self._https else None
        self._connection: http.client.HTTPConnection | None = None
        self._responses = {signal: _response_type(signal) for signal in SIGNALS}

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._https:
                self._connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                                               context=self._context)
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        connection = self._connection
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def attempt(self, signal: str, request: Any, timeout: float) -> Attempt:
        body = request.SerializeToString()
        if self.options.compression == "gzip":
            body = gzip.compress(body, compresslevel=6)
        try:
            connection = self._connect(timeout)
            connection.request("POST", self._paths[signal], body=body, headers=self._headers)
            response = connection.getresponse()
            payload = response.read()
            status = response.status
            retry_after = response.getheader("Retry-After")
            if response.will_close:
                self._drop()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            return Attempt(False, retryable=True, reason=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            rejected = 0
            if payload:
                try:
                    rejected = _rejected(self._responses[signal].FromString(payload))
                except Exception:  # a receiver's odd answer to a delivered export is no failure
                    rejected = 0
            return Attempt(True, rejected=rejected)
        return Attempt(False, retryable=status in _RETRY_HTTP, reason=f"HTTP {status}",
                       retry_after=_retry_after(retry_after))

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop()


def create_transport(options: OtlpOptions) -> Transport:
    return GrpcTransport(options) if options.protocol == "grpc" else HttpTransport(options)


def _response_type(signal: str) -> Any:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    return {"traces": ExportTraceServiceResponse, "logs": ExportLogsServiceResponse,
            "metrics": ExportMetricsServiceResponse}[signal]


def _rejected(response: Any) -> int:
    """The items an OTLP partial-success answer says were rejected (0 for a full success)."""
    if not response.HasField("partial_success"):
        return 0
    partial = response.partial_success
    for field in ("rejected_spans", "rejected_log_records", "rejected_data_points"):
        if hasattr(partial, field):
            return int(getattr(partial, field))
    return 0


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: the backoff decides
    return min(max(seconds, 0.0), 3600.0)
