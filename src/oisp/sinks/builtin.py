"""Registers the built-in sinks through the same ``oisp_sink_types`` hook a third-party plugin implements.

``otlp`` is registered here like the others, but its factory imports ``opentelemetry-proto`` (and ``grpcio``) only
when an ``otlp`` sink is created (the ``oisp[otlp]`` extra): listing or using the other sinks never needs them.
"""

from __future__ import annotations

from collections.abc import Mapping

from oisp.hookspecs import SinkFactory, hookimpl
from oisp.sinks.jsonl import JsonlSink
from oisp.sinks.kafka import KafkaSink
from oisp.sinks.memory import MemorySink
from oisp.sinks.otlp import create_sink as create_otlp_sink
from oisp.sinks.stdout import StdoutSink
from oisp.sinks.webhook import WebhookSink


@hookimpl
def oisp_sink_types() -> Mapping[str, SinkFactory]:
    return {
        "jsonl": JsonlSink.from_options,
        "kafka": KafkaSink.from_options,  # confluent-kafka is imported only when one is created
        "memory": MemorySink.from_options,
        "otlp": create_otlp_sink,
        "stdout": StdoutSink.from_options,
        "webhook": WebhookSink.from_options,
    }
