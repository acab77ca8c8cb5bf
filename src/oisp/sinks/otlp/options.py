"""The options of an ``otlp`` sink (its ``[[sinks]]`` table), validated strictly: no OpenTelemetry import here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from oisp.errors import ConfigurationError

__all__ = ["PROTOCOLS", "OtlpOptions"]

PROTOCOLS = ("grpc", "http/protobuf")
COMPRESSIONS = ("none", "gzip")
LOG_BODIES = ("json", "map")
_PREFIX = "sinks.otlp"


@attrs.frozen(kw_only=True)
class OtlpOptions:
    """Validated options of one ``otlp`` sink.

    ``endpoint``: ``http://HOST:PORT`` (``https://`` for TLS) of an OTLP receiver; with ``http/protobuf`` the
    signal paths ``/v1/traces``, ``/v1/logs`` and ``/v1/metrics`` are appended to it (after any path it has).
    ``content``: message content, system instructions and tool definitions in spans (off by default; events
    reach sinks redacted). ``log_body``: a log record's body is the event's JSON text (``json``, the line a JSONL
    file holds) or the event as an OTLP map (``map``: queryable field by field, several times the CPU).
    ``pending_timeout`` / ``max_pending``: how long, and how many, requests wait for their
    response before they end as a span marked incomplete. ``export_interval``: seconds between metric exports
    (and the longest a span or log record waits in its batch). ``timeout``: seconds one export may take.
    """

    endpoint: str
    protocol: str = "http/protobuf"
    headers: dict[str, str] = attrs.field(factory=dict)
    content: bool = False
    service_name: str = "oisp"
    compression: str = "none"
    log_body: str = "json"
    timeout: float = 10.0
    export_interval: float = 10.0
    batch_delay: float = 0.2
    pending_timeout: float = 600.0
    max_pending: int = 10_000
    traces: bool = True
    logs: bool = True
    metrics: bool = True

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> OtlpOptions:
        """Validate ``options``; an unknown key or a wrong type raises :class:`ConfigurationError` naming it."""
        allowed = [a.name for a in attrs.fields(cls)]
        unknown = set(options) - set(allowed)
        if unknown:
            raise ConfigurationError(f"{_PREFIX}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if options.get("endpoint") is None:
            raise ConfigurationError(f"{_PREFIX}.endpoint: required (the OTLP receiver, http://HOST:PORT)")
        values: dict[str, Any] = {"endpoint": _endpoint(options["endpoint"])}
        if "protocol" in options:
            values["protocol"] = _choice("protocol", options["protocol"], PROTOCOLS)
        if "compression" in options:
            values["compression"] = _choice("compression", options["compression"], COMPRESSIONS)
        if "log_body" in options:
            values["log_body"] = _choice("log_body", options["log_body"], LOG_BODIES)
        if "headers" in options:
            values["headers"] = _headers(options["headers"])
        if "service_name" in options:
            value = options["service_name"]
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"{_PREFIX}.service_name: {value!r} must be a non-empty string")
            values["service_name"] = value
        for key in ("content", "traces", "logs", "metrics"):
            if key in options:
                if not isinstance(options[key], bool):
                    raise ConfigurationError(f"{_PREFIX}.{key}: {options[key]!r} must be true or false")
                values[key] = options[key]
        for key in ("timeout", "export_interval", "batch_delay", "pending_timeout"):
            if key in options:
                values[key] = _seconds(key, options[key])
        if "max_pending" in options:
            value = options["max_pending"]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"{_PREFIX}.max_pending: {value!r} must be a positive integer")
            values["max_pending"] = value
        return cls(**values)

    # derived -------------------------------------------------------------------------------------
    @property
    def insecure(self) -> bool:
        """True for ``http://`` endpoints (plain text), False for ``https://`` (TLS)."""
        return urlsplit(self.endpoint).scheme == "http"

    def signal_url(self, signal: str) -> str:
        """The URL an ``http/protobuf`` exporter posts ``signal`` (traces, logs, metrics) to."""
        return f"{self.endpoint.rstrip('/')}/v1/{signal}"

    @property
    def grpc_target(self) -> str:
        """``HOST:PORT`` for the gRPC exporters (their default port, 4317, when the endpoint names none)."""
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{parts.port or 4317}"


def _endpoint(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{_PREFIX}.endpoint: {value!r} must be a string such as 'http://127.0.0.1:4318'")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ConfigurationError(f"{_PREFIX}.endpoint: {value!r} has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{_PREFIX}.endpoint: {value!r} must be http://HOST:PORT (or https:// for TLS)"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError(
            f"{_PREFIX}.endpoint: {value!r} must not carry a query, a fragment or credentials (use headers)"
        )
    return value


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigurationError(f"{_PREFIX}.{key}: {value!r} must be one of {', '.join(map(repr, choices))}")
    return str(value)


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        # the value itself is not quoted: it may be a credential
        raise ConfigurationError(f"{_PREFIX}.headers: must be a table of strings ({{authorization = ...}}), "
                                 f"not a {type(value).__name__}")
    headers: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise ConfigurationError(f"{_PREFIX}.headers.{name}: must be a string")
        if any(c in name or c in text for c in "\r\n\0"):
            raise ConfigurationError(f"{_PREFIX}.headers.{name}: must not contain line breaks")
        # gRPC metadata keys must be lower case; HTTP does not care.
        headers[name.lower()] = text
    return headers


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{_PREFIX}.{key}: {value!r} must be a positive number of seconds")
    return float(value)
