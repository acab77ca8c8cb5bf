"""The plugin module named by the ``oisp.sinks`` entry point: it offers one sink kind, ``type-counter``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import oisp
from oisp.hookspecs import SinkFactory, hookimpl


class TypeCounterSink:
    """Counts events by type and, on every batch, rewrites ``path`` with the counts and the last event ids."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: Counter[str] = Counter()
        self.event_ids: list[str] = []

    def write(self, events: Sequence[oisp.Event]) -> None:
        for event in events:
            self.counts[event.event_type] += 1
            self.event_ids.append(event.event_id)
        self.path.write_text(json.dumps({"counts": self.counts, "event_ids": self.event_ids}))

    def close(self) -> None:
        self.write([])


def _create(options: Mapping[str, Any]) -> TypeCounterSink:
    if "path" not in options:
        raise oisp.ConfigurationError("sinks.type-counter.path: required (a file to write the counts to)")
    return TypeCounterSink(Path(options["path"]))


@hookimpl
def oisp_sink_types() -> Mapping[str, SinkFactory]:
    return {"type-counter": _create}
