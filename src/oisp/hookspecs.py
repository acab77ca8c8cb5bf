"""The oisp plugin contract: every hook a provider plugin or a sink plugin may implement.

Plugins are ordinary Python objects or modules with functions marked ``@oisp.hookimpl``; a package ships them
through the entry point groups ``oisp.providers`` and ``oisp.sinks``::

    [project.entry-points."oisp.sinks"]
    mysink = "my_package.plugin"

oisp's own providers and sinks are registered through exactly these hooks. Every hook is called per plugin in
isolation: an exception in one plugin is logged with the plugin's name and the others go on.

Provider plugins
    ``oisp_endpoints`` says which hosts are AI endpoints (so the proxy intercepts them);
    ``oisp_exchange_decoder`` claims one HTTP exchange and returns an :class:`ExchangeDecoder` that turns it,
    incrementally, into OISP events, honouring the runner's :class:`DecoderSettings` and keeping what outlives
    the exchange in the run's :class:`~oisp.provider_kit.DecoderContext`. :mod:`oisp.provider_kit` has the
    building blocks oisp's own providers use;
    ``oisp_apps`` adds apps (programs) to recognise from processes and request headers (:mod:`oisp.apps`).

Sink plugins
    ``oisp_sink_types`` names the sink kinds a plugin offers and the factory that builds one from its
    configuration; the :class:`Sink` it returns receives batches of events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import pluggy

if TYPE_CHECKING:
    from oisp.events import Event
    from oisp.http.exchange import HttpExchange
    from oisp.http.websocket import WebSocketMessage
    from oisp.provider_kit import DecoderContext
    from oisp.providers.grpc import GrpcCallMessage, GrpcStatus

__all__ = [
    "PROJECT_NAME",
    "DecoderSettings",
    "EndpointSpec",
    "ExchangeDecoder",
    "GrpcMessageDecoder",
    "Sink",
    "SinkFactory",
    "WebSocketDecoder",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "oisp"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a plugin's hook implementation: ``@oisp.hookimpl def oisp_sink_types(): ...``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@attrs.frozen
class EndpointSpec:
    """One AI endpoint a provider serves.

    ``host`` is a DNS name, an IP address or a pattern where ``*`` stands for one or more characters inside
    a label (``*.openai.azure.com``, ``bedrock-runtime.*.amazonaws.com``). ``tls`` is False for plain-HTTP
    local servers such as Ollama.
    """

    provider: str
    host: str
    port: int = 443
    tls: bool = True


@attrs.frozen(kw_only=True)
class DecoderSettings:
    """What the runner asks of every exchange decoder (from the ``[capture]`` configuration).

    ``streaming_chunks``: also emit one ``ai.streaming_chunk`` event per chunk of a streamed response (off by
    default: a long answer has hundreds of them).
    """

    streaming_chunks: bool = False


@runtime_checkable
class ExchangeDecoder(Protocol):
    """Turns one HTTP exchange into events, as it happens (sans-io: no sockets, no waiting).

    The decoder sees the complete request first, then each piece of the response body as it arrives
    (content-encoding already removed), then the end. Each call returns the events it completes; events
    without envelope context are fine, the decoder pipeline adds host, process and connection facts.

    WebSockets: a decoder may also define ``on_websocket_message(exchange, message) -> Iterable[Event]``
    (optional, see :class:`WebSocketDecoder`). When the exchange is upgraded to WebSocket (``101``), it is
    called with each :class:`~oisp.http.websocket.WebSocketMessage` of either direction (text, binary and
    control frames; unmasked, reassembled, decompressed), between the request and ``on_end``, which comes
    when the connection ends. Decoders without the method ignore the messages.
    """

    def on_request(self, exchange: HttpExchange) -> Iterable[Event]: ...

    def on_response_data(self, exchange: HttpExchange, data: bytes) -> Iterable[Event]: ...

    def on_end(self, exchange: HttpExchange) -> Iterable[Event]: ...


@runtime_checkable
class WebSocketDecoder(ExchangeDecoder, Protocol):
    """An :class:`ExchangeDecoder` that also reads the messages of an exchange upgraded to WebSocket."""

    def on_websocket_message(self, exchange: HttpExchange, message: WebSocketMessage) -> Iterable[Event]: ...


@runtime_checkable
class GrpcMessageDecoder(ExchangeDecoder, Protocol):
    """An :class:`ExchangeDecoder` of one gRPC, gRPC-Web or Connect call that reads its messages.

    oisp's built-in :class:`oisp.providers.grpc.GrpcExchangeDecoder` claims every such call on an intercepted
    endpoint and emits metadata-level events (service, method, message counts and sizes, status, timings). A
    plugin that knows a service's schema claims the calls it understands first (``oisp_exchange_decoder``, with
    :func:`oisp.providers.grpc.grpc_call_of` to read the service and method) and returns a *subclass* of
    ``GrpcExchangeDecoder`` that overrides these two methods; the framing (envelopes, compression, trailers,
    size bounds, cut streams) is done for it. ``on_grpc_message`` gets each message of either direction,
    decompressed, in the order oisp saw them complete; ``on_grpc_end`` the call's status once it is over. A
    subclass that builds its own ``ai.request``/``ai.response`` sets ``emit_metadata_events = False``. An
    exception in either method is logged and noted as a limitation of the call's events; nothing else changes.
    """

    def on_grpc_message(self, exchange: HttpExchange, message: GrpcCallMessage) -> Iterable[Event]: ...

    def on_grpc_end(self, exchange: HttpExchange, status: GrpcStatus) -> Iterable[Event]: ...


@runtime_checkable
class Sink(Protocol):
    """Receives events. Called from a worker thread, one batch at a time, never concurrently.

    ``write`` may block (files, network); a slow sink only fills its own bounded queue. ``close`` flushes and
    releases resources; it is called once, after the last ``write``.

    Optionally, a sink may also have ``stats() -> Mapping[str, int]``: its own counters (what a sink that
    delivers in the background really delivered, dropped...). The pipeline copies them into
    ``SinkStats.reported`` after every batch and at close; it is called from another thread than ``write``, so it
    must be quick and thread-safe.
    """

    def write(self, events: Sequence[Event]) -> None: ...

    def close(self) -> None: ...


#: Builds a sink from its options (the sink's table in the configuration file, as a mapping).
SinkFactory = Callable[[Mapping[str, Any]], Sink]


class ProviderSpec:
    """Hooks of provider plugins."""

    @hookspec
    def oisp_endpoints(self) -> Iterable[EndpointSpec]:
        """The AI endpoints this plugin's providers serve; the proxy intercepts connections to them."""
        raise NotImplementedError

    @hookspec
    def oisp_exchange_decoder(self, exchange: HttpExchange, settings: DecoderSettings,
                              context: DecoderContext) -> ExchangeDecoder | None:
        """Claim ``exchange`` by returning a decoder for it, or return None to leave it to others.

        Called once per exchange, when its request is complete. The first plugin asked that returns a decoder
        owns the exchange. Plugins are asked in pluggy's order: the most recently registered first (so installed
        third-party plugins come before oisp's built-ins), ``tryfirst``/``trylast`` respected. ``settings`` say
        what the runner wants decoded; ``context`` is the state of this decoding run, shared by its exchanges and
        by no other run (the tool calls seen, a provider's own tables: ``context.state(key, factory)``). An
        implementation may leave either argument out of its signature, as pluggy allows.
        """
        raise NotImplementedError

    @hookspec
    def oisp_apps(self) -> Iterable[Mapping[str, Any]]:
        """Apps to recognise (named in events' ``app``), as entries of ``oisp/data/apps.json``: ``{"app_id",
        "name", "vendor", "category", "type", "is_ai_host", "match": {...}}`` (or
        :class:`oisp.apps.AppSignature` objects). A plugin's entries are tried before the built-in ones."""
        raise NotImplementedError


class SinkSpec:
    """Hooks of sink plugins."""

    @hookspec
    def oisp_sink_types(self) -> Mapping[str, SinkFactory]:
        """The sink kinds this plugin offers, by name (``"jsonl"``), each with the factory that builds one."""
        raise NotImplementedError
