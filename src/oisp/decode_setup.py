"""The decoding side of oisp assembled from a configuration: sinks, the event pipeline and the event decoder.

The runner uses it in the proxy's own process (``decoder = "inline"``) and the decoder process uses it in its
(``decoder = "process"``, :mod:`oisp.decoder_process`), so both build exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

from oisp.config import Config
from oisp.event_decoder import EventDecoder
from oisp.events import Event
from oisp.hookspecs import DecoderSettings, Sink
from oisp.pipeline import Enricher, Pipeline
from oisp.plugins import OispPluginManager
from oisp.redaction import Redactor

__all__ = ["build_event_decoder", "build_pipeline", "build_sinks"]


def build_sinks(plugins: OispPluginManager, config: Config) -> dict[str, Sink]:
    """The configured sinks, by a unique name (``jsonl``, ``jsonl-2``, ...)."""
    sinks: dict[str, Sink] = {}
    for index, table in enumerate(config.sinks):
        options = {k: v for k, v in table.items() if k != "kind"}
        kind = str(table["kind"])
        name = kind if kind not in sinks else f"{kind}-{index + 1}"
        sinks[name] = plugins.create_sink(kind, options)
    return sinks


def build_pipeline(plugins: OispPluginManager, config: Config, extra_sinks: dict[str, Sink] | None = None, *,
                   sink_handoff_wait: float = 0.0, sinks: bool = True,
                   connection_budget: int | None = None) -> Pipeline:
    """The pipeline of ``config``: its sinks (plus ``extra_sinks``), pricing (unless turned off), its redaction.
    ``sink_handoff_wait`` and ``connection_budget``: see :class:`~oisp.pipeline.Pipeline`
    (``sink_handoff_wait`` only for a loop that does nothing else). ``sinks=False``: none of the configured sinks
    (a decoder process that forwards its processed events to the one that writes them)."""
    configured = build_sinks(plugins, config) if sinks else {}
    all_sinks = {**configured, **(extra_sinks or {})}
    enrichers: list[Enricher] = []
    if config.pricing:
        from oisp.pricing import PricingEnricher

        enrichers.append(PricingEnricher.load(config.pricing_bundle))  # None: the prices oisp ships
    return Pipeline(all_sinks, enrichers=enrichers, sink_handoff_wait=sink_handoff_wait,
                    connection_budget=connection_budget,
                    redactor=Redactor(profile=config.redaction_profile, extra_patterns=config.redaction_patterns))


def build_event_decoder(plugins: OispPluginManager, config: Config, emit: Callable[[Event], None], *,
                        emit_for: Callable[[str, Event], None] | None = None) -> EventDecoder:
    """The event decoder of ``config``, emitting to ``emit`` (a pipeline's ``emit``; a connection's events to
    ``emit_for``, a pipeline's ``emit_for``, when given)."""
    return EventDecoder(plugins, emit, settings=DecoderSettings(streaming_chunks=config.streaming_chunks),
                        emit_for=emit_for)
