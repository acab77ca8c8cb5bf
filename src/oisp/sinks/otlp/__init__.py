"""``otlp`` sink: events as OpenTelemetry traces (GenAI semantic conventions), logs and metrics over OTLP.

This package imports no OpenTelemetry module until a sink is created: oisp runs without the optional
dependencies (``opentelemetry-proto``, ``grpcio``), and only a configured ``otlp`` sink needs them
(``pip install 'oisp[otlp]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from oisp.errors import ConfigurationError
from oisp.sinks.otlp.options import OtlpOptions

if TYPE_CHECKING:
    from oisp.sinks.otlp.sink import OtlpSink

__all__ = ["OtlpOptions", "create_sink"]


def create_sink(options: Mapping[str, Any]) -> OtlpSink:
    """The ``otlp`` sink factory: validates ``options`` first, then loads opentelemetry-proto and grpcio."""
    parsed = OtlpOptions.from_mapping(options)
    try:
        from oisp.sinks.otlp.sink import OtlpSink

        return OtlpSink(parsed)  # grpcio is imported here, for the grpc protocol only
    except ImportError as exc:
        raise ConfigurationError(
            f"sinks.otlp: the OTLP protobuf classes (opentelemetry-proto) and grpcio are not installed ({exc}); "
            "install them with: pip install 'oisp[otlp]'"
        ) from exc
