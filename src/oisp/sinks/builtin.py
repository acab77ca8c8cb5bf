"""Registers the built-in sinks through the same ``oisp_sink_types`` hook a third-party plugin implements."""

from __future__ import annotations

from collections.abc import Mapping

from oisp.hookspecs import SinkFactory, hookimpl
from oisp.sinks.memory import MemorySink


@hookimpl
def oisp_sink_types() -> Mapping[str, SinkFactory]:
    return {
        "memory": MemorySink.from_options,
    }
