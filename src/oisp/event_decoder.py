"""From what the proxy sees to OISP events: provider plugins turn each HTTP exchange into events, and each
connection's outcome becomes a ``network.connect`` event.

:class:`Decoder` is the decode side as a script uses it: the installed plugins by default, and recorded
exchanges (:mod:`oisp.recorded`) or a JSONL recording replayed into events, returned and emitted.

:class:`EventDecoder` is the proxy's observer. For every exchange it asks the provider plugins (in order) for
an :class:`~oisp.hookspecs.ExchangeDecoder`; the built-in metadata provider answers last, so no exchange with
an AI endpoint is ever dropped. A provider that fails is logged with its name, and the exchange falls back to
metadata events. Events get their envelope context here (process, capture source) and go to the pipeline.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from oisp._version import __version__
from oisp.apps import AppTable, merge
from oisp.endpoints import EndpointTable
from oisp.events import (
    App,
    CertificateInfo,
    Confidence,
    Endpoint,
    Event,
    NetworkConnect,
    Source,
    TlsInfo,
    TraceContext,
)
from oisp.events.envelope import COLLECTOR
from oisp.hookspecs import DecoderSettings, ExchangeDecoder
from oisp.http.exchange import ConnectionInfo, Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.http.websocket import WebSocketMessage
from oisp.plugins import OispPluginManager, create_plugin_manager
from oisp.provider_kit import DecoderContext, MetadataDecoder
from oisp.proxy.report import ConnectionReport, Decision
from oisp.recorded import RecordedExchange, read_recording

__all__ = ["Decoder", "EventDecoder", "network_connect_event", "trace_context_of"]

logger = logging.getLogger(__name__)

Emit = Callable[[Event], None]

#: Classes whose instances passed the ExchangeDecoder protocol check (the methods are the class's).
_DECODER_TYPES: set[type] = set()


#: capture point -> its Source; one (immutable) instance for every event, so that the pipeline's cache of
#: shared records recognizes it.
_SOURCES: dict[str, Source] = {}


def _source(capture_point: str) -> Source:
    source = _SOURCES.get(capture_point)
    if source is None:
        source = _SOURCES[capture_point] = Source(collector=COLLECTOR, collector_version=__version__,
                                                  capture_method="mitm_proxy", capture_point=capture_point)
    return source


def _is_private(ip: str) -> bool | None:
    try:
        return ipaddress.ip_address(ip).is_private
    except ValueError:
        return None


def _process_attribution(report: ConnectionReport) -> str:
    """The OISP confidence value for how the process was found: ``direct`` when the interceptor reported it
    (or how is not known), ``socket_inode`` when it was found through the client's socket."""
    if report.process is None:
        return "unknown"
    if report.pid_source is None or report.pid_source == "flow_layer":
        return "direct"
    return "socket_inode"


def network_connect_event(report: ConnectionReport) -> Event:
    """The ``network.connect`` event of one proxied connection."""
    domain = None
    try:
        ipaddress.ip_address(report.target_host)
    except ValueError:
        domain = report.target_host
    upstream_ip = report.upstream_addr[0] if report.upstream_addr else None
    if upstream_ip is None and domain is None:
        upstream_ip = report.target_host
    certificate = None
    if report.upstream_certificate is not None:
        c = report.upstream_certificate
        certificate = CertificateInfo(subject=c.subject, issuer=c.issuer, fingerprint_sha256=c.fingerprint_sha256,
                                      not_before=c.not_before, not_after=c.not_after, san=list(c.san) or None)
    tls = None
    if report.sni or report.tls_version or certificate:
        tls = TlsInfo(version=report.tls_version, cipher_suite=report.cipher, sni=report.sni, alpn=report.alpn,
                      certificate=certificate)
    attributes: dict[str, Any] = {"oisp.interception": report.decision.value,
                                  "oisp.connection_id": report.connection_id, "oisp.mode": report.mode}
    if report.provider:
        attributes["oisp.provider"] = report.provider
    if report.pid_hint is not None:
        attributes["oisp.pid_hint"] = report.pid_hint
    if report.pid_source is not None:
        attributes["oisp.pid_source"] = report.pid_source
    if report.preconnected:
        attributes["oisp.preconnected"] = True
    if report.upstream_addr is not None and report.upstream_addr[1] != report.target_port:
        attributes["oisp.upstream_addr"] = f"{report.upstream_addr[0]}:{report.upstream_addr[1]}"
    return Event.create(
        NetworkConnect(
            dest=Endpoint(ip=upstream_ip, port=report.target_port, domain=domain,
                          is_private=_is_private(upstream_ip) if upstream_ip else None),
            src=Endpoint(ip=report.client_addr[0], port=report.client_addr[1]),
            protocol=report.protocol, success=report.success, error=report.error, latency_ms=report.connect_ms, tls=tls,
        ),
        confidence=Confidence(
            level="high", completeness="metadata_only",
            reasons=["proxy_connection"],
            process_attribution=_process_attribution(report),
            content_source="none",
            ai_detection_method="known_endpoint" if report.provider else None,
        ),
        source=_source("connect"), process=report.process, actor=report.actor, app=report.app, attrs=attributes,
    )


def trace_context_of(traceparent: str | None) -> TraceContext | None:
    """The W3C trace context of a ``traceparent`` header (``00-<trace id>-<parent id>-<flags>``), so that an
    exchange's events join the app's own trace; None when absent or malformed (all-zero ids, version ff)."""
    if not traceparent:
        return None
    parts = traceparent.strip().lower().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace_id, span_id, flags = parts[:4]
    try:
        if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2 or not int(trace_id, 16) \
                or not int(span_id, 16):
            return None
        int(version, 16)
        return TraceContext(trace_id=trace_id, span_id=span_id, trace_flags=int(flags, 16))
    except ValueError:
        return None


@attrs.define
class _Active:
    decoder: ExchangeDecoder
    plugin: str
    #: From the request's ``traceparent`` header, for every event of the exchange.
    trace: TraceContext | None = None
    #: The app of the exchange: the connection's (from the process), refined by the request's headers.
    app: App | None = None


class _ConnectionListener:
    """The :class:`~oisp.http.exchange.ExchangeListener` of one decoded connection."""

    def __init__(self, owner: EventDecoder, connection: ConnectionInfo) -> None:
        self.owner = owner
        self.connection = connection
        self.active: dict[int, _Active] = {}

    def request(self, exchange: HttpExchange) -> None:
        plugin, decoder = self.owner.decoder_for(exchange)
        self.active[exchange.exchange_id] = _Active(decoder, plugin,
                                                    trace_context_of(exchange.request.headers.get("traceparent")),
                                                    self.owner.app_for(self.connection, exchange))
        self._run(exchange, "on_request")

    def response_start(self, exchange: HttpExchange) -> None:
        pass

    def response_data(self, exchange: HttpExchange, data: bytes) -> None:
        self._run(exchange, "on_response_data", data)

    def end(self, exchange: HttpExchange) -> None:
        self._run(exchange, "on_end")
        self.active.pop(exchange.exchange_id, None)

    def websocket_message(self, exchange: HttpExchange, message: WebSocketMessage) -> None:
        """A WebSocket message of an upgraded exchange: to the decoder's optional ``on_websocket_message``."""
        active = self.active.get(exchange.exchange_id)
        if active is not None and hasattr(active.decoder, "on_websocket_message"):
            self._run(exchange, "on_websocket_message", message)

    def _run(self, exchange: HttpExchange, method: str, *args: Any) -> None:
        active = self.active.get(exchange.exchange_id)
        if active is None:
            return
        try:
            events = list(getattr(active.decoder, method)(exchange, *args))
        except Exception as exc:
            logger.error("provider %s failed in %s for %s %s: %s; falling back to metadata events",
                         active.plugin, method, exchange.request.method, exchange.request.path, exc, exc_info=True)
            events = self._fall_back(exchange, active, method)
        for event in events:
            self.owner.emit_for(self.connection, event, active.trace, active.app)

    def _fall_back(self, exchange: HttpExchange, active: _Active, method: str) -> list[Event]:
        fallback = MetadataDecoder()
        self.active[exchange.exchange_id] = _Active(fallback, "oisp.providers.metadata", active.trace, active.app)
        if method == "on_request":
            return list(fallback.on_request(exchange))
        if method == "on_end":
            return list(fallback.on_end(exchange))
        return []


_INTERNED_MAX = 1024


class _Interner:
    """One instance of each distinct context record (process, actor, app) that connections arrive with.

    The decoder process receives every connection's records pickled, twice (with the connection, and with its
    report): equal values, new objects each time. The pipeline's encoder converts, scans and encodes a shared
    record once per *object*; handing it the same object for equal values lets every connection of a process
    reuse that work. Bounded (starts over when full); values are compared in full before one stands for another.
    """

    def __init__(self) -> None:
        self._known: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            key: Any = (type(value), hash(value))
        except TypeError:  # a record with lists in it (a process's arguments and ancestors)
            key = (type(value), getattr(value, "pid", None), getattr(value, "start_time", None))
        known = self._known.get(key)
        if known is value or (known is not None and known == value):
            return known
        if len(self._known) >= _INTERNED_MAX:
            self._known.clear()
        self._known[key] = value
        return value


class EventDecoder:
    """The proxy's observer: exchanges → provider plugins → events; connections → ``network.connect``."""

    def __init__(self, plugins: OispPluginManager, emit: Emit, *, connect_events: bool = True,
                 settings: DecoderSettings | None = None, context: DecoderContext | None = None,
                 apps: AppTable | None = None,
                 emit_for: Callable[[str, Event], None] | None = None) -> None:
        self.plugins = plugins
        #: Emits a connection's events with its id (``Pipeline.emit_for``: within the connection's budget), when set.
        self._emit_for = emit_for
        #: Names the app of an exchange from its request headers (built-in apps plus the plugins' ``oisp_apps``).
        self.apps = apps if apps is not None else AppTable.from_plugins(plugins)
        self._request_apps: dict[tuple[tuple[str, str], ...], App | None] = {}
        #: The headers the app table reads: the cache key of a request's app is their values.
        self._app_headers = frozenset({"user-agent", *(name for signature in self.apps.signatures
                                                        for name, _ in signature.headers)})
        self._emit = emit
        self.connect_events = connect_events
        #: Handed to every ``oisp_exchange_decoder`` call (``streaming_chunks`` and the like).
        self.settings = settings or DecoderSettings()
        #: This run's state (tool calls seen, providers' tables), handed to every ``oisp_exchange_decoder`` call:
        #: each decoder has its own unless one is given, so two decoders in one process share nothing.
        self.context = context if context is not None else DecoderContext()
        self._intern = _Interner()

    def connection(self, report: ConnectionReport) -> None:
        if not self.connect_events:
            return
        if report.decision is Decision.PASSTHROUGH and report.provider is None:
            return  # not an AI endpoint: not ours to report
        intern = self._intern
        process, actor, app = intern(report.process), intern(report.actor), intern(report.app)
        if process is not report.process or actor is not report.actor or app is not report.app:
            report = attrs.evolve(report, process=process, actor=actor, app=app)
        self._emit(network_connect_event(report))

    def exchange_listener(self, connection: ConnectionInfo) -> _ConnectionListener:
        intern = self._intern
        process, actor, app = intern(connection.process), intern(connection.actor), intern(connection.app)
        if process is not connection.process or actor is not connection.actor or app is not connection.app:
            connection = attrs.evolve(connection, process=process, actor=actor, app=app)
        return _ConnectionListener(self, connection)

    def decoder_for(self, exchange: HttpExchange) -> tuple[str, ExchangeDecoder]:
        """The first provider plugin that claims the exchange, and its decoder."""
        for name, decoder in self.plugins.call_each("oisp_exchange_decoder", exchange=exchange,
                                                    settings=self.settings, context=self.context):
            if type(decoder) in _DECODER_TYPES or isinstance(decoder, ExchangeDecoder):
                if len(_DECODER_TYPES) < 256:
                    _DECODER_TYPES.add(type(decoder))  # a protocol check looks at every method: once per type
                return name, decoder
            logger.error("plugin %s returned %r from oisp_exchange_decoder, not an ExchangeDecoder", name, decoder)
        return "oisp.providers.metadata", MetadataDecoder()

    def app_for(self, connection: ConnectionInfo, exchange: HttpExchange) -> App | None:
        """The app of an exchange: what its request headers name, merged with the connection's process app
        (:func:`oisp.apps.merge`). Cached by the values of the headers the app table reads."""
        headers = exchange.request.headers
        names = self._app_headers
        key = tuple(field for field in headers.fields if field[0].lower() in names)  # one pass over the headers
        if key in self._request_apps:
            request_app = self._request_apps[key]
        else:
            request_app = self.apps.for_request(headers)
            if len(self._request_apps) >= 1024:
                self._request_apps.clear()
            self._request_apps[key] = request_app
        return merge(connection.app, request_app)

    def emit_for(self, connection: ConnectionInfo, event: Event, trace: TraceContext | None = None,
                 app: App | None = None) -> None:
        """Add the connection's context (the exchange's trace context and app) to a provider's event and emit it."""
        fields: dict[str, Any] = {}
        if trace is not None and event.trace_context is None:
            fields["trace_context"] = trace
        if event.process is None and connection.process is not None:
            fields["process"] = connection.process
        if event.actor is None and connection.actor is not None:
            fields["actor"] = connection.actor
        app = app if app is not None else connection.app
        if event.app is None and app is not None:
            fields["app"] = app
        if event.source.capture_point is None:
            fields["source"] = _source("tls_terminate" if connection.tls else "plain_http")
        if fields:
            event = event.with_context(**fields)
        if self._emit_for is not None:
            self._emit_for(connection.connection_id, event)
        else:
            self._emit(event)

    def emit_all(self, connection: ConnectionInfo, events: Iterable[Event]) -> None:
        """:meth:`emit_for` each event."""
        for event in events:
            self.emit_for(connection, event)


class Decoder(EventDecoder):
    """The decode side in one object: exchanges in, OISP events out, through the provider plugins.

    ``plugins`` defaults to every installed provider plugin, ``endpoints`` to the table they declare (which names
    the provider of a recorded exchange's host). :meth:`decode` returns the events of one
    :class:`~oisp.recorded.RecordedExchange`; :meth:`replay` yields the events of a whole recording (a JSONL
    file, or an iterable of exchanges and events), in order. With ``emit`` (a
    :meth:`Pipeline.emit <oisp.pipeline.Pipeline.emit>`), every event also goes there. Tool calls link across the
    exchanges of one decoder (its :attr:`context`), never across decoders. As the proxy's observer it works as
    an :class:`EventDecoder`.
    """

    def __init__(self, plugins: OispPluginManager | None = None, emit: Emit | None = None, *,
                 endpoints: EndpointTable | None = None, settings: DecoderSettings | None = None,
                 context: DecoderContext | None = None, connect_events: bool = True) -> None:
        plugins = plugins if plugins is not None else create_plugin_manager()
        super().__init__(plugins, self._deliver, connect_events=connect_events, settings=settings, context=context)
        self.endpoints = endpoints if endpoints is not None else EndpointTable.from_plugins(plugins)
        self._forward = emit
        self._collected: list[Event] | None = None
        self._connections = itertools.count(1)

    def _deliver(self, event: Event) -> None:
        if self._collected is not None:
            self._collected.append(event)
        if self._forward is not None:
            self._forward(event)

    def decode(self, recorded: RecordedExchange) -> list[Event]:
        """The events of one recorded exchange, as the proxy would have emitted them had it seen it."""
        parts = urlsplit(recorded.url)
        spec = self.endpoints.match(recorded.host, recorded.port)
        connection = ConnectionInfo(connection_id=f"replay-{id(self):x}-{next(self._connections)}",
                                    client_addr=("127.0.0.1", 0), server_addr=(recorded.host, recorded.port),
                                    mode="replay", tls=parts.scheme == "https",
                                    provider=recorded.provider or (spec.provider if spec else None))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = recorded.request_body
        exchange = HttpExchange(connection=connection, request=HttpRequest(
            method=recorded.method, target=target, authority=parts.netloc, scheme=parts.scheme or "https",
            http_version="1.1", headers=Headers([("host", parts.netloc), *recorded.request_headers]),
            body=bytearray(body), wire_size=len(body)))
        timings = exchange.timings
        timings.request_start = timings.request_end = time.monotonic_ns()
        listener = self.exchange_listener(connection)
        collected: list[Event] = []
        self._collected = collected
        try:
            listener.request(exchange)
            if recorded.status is None:
                exchange.mark_partial("no response recorded")
            else:
                exchange.response = response = HttpResponse(status=recorded.status, reason="", http_version="1.1",
                                                            headers=Headers(list(recorded.response_headers)))
                timings.response_headers = time.monotonic_ns()
                listener.response_start(exchange)
                for chunk in recorded.response_chunks:
                    now = time.monotonic_ns()
                    timings.response_first_byte = timings.response_first_byte or now
                    timings.response_chunks.append((now, len(chunk)))
                    response.body += chunk
                    response.wire_size += len(chunk)
                    listener.response_data(exchange, chunk)
            timings.response_end = time.monotonic_ns()
            listener.end(exchange)
        finally:
            self._collected = None
        return collected

    def replay(self, source: str | Path | Iterable[RecordedExchange | Event]) -> Iterator[Event]:
        """The events of a recording: a JSONL file (:func:`~oisp.recorded.read_recording`: exchanges, and events
        that pass as they are) or an iterable of :class:`~oisp.recorded.RecordedExchange` and events."""
        items = read_recording(source) if isinstance(source, str | Path) else source
        for item in items:
            if isinstance(item, Event):
                self._deliver(item)
                yield item
            else:
                yield from self.decode(item)
