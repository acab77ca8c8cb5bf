"""``oisp replay``: read recorded events back (any valid OISP JSONL) and emit them to sinks again."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import attrs

from oisp.config import Config
from oisp.errors import ConfigurationError, EventValidationError
from oisp.events import Event
from oisp.hookspecs import Sink
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.redaction import Redactor

__all__ = ["ReplayResult", "replay"]


@attrs.define
class ReplayResult:
    """How many events were replayed, and the lines that were not events (line number, reason)."""

    events: int = 0
    errors: list[tuple[int, str]] = attrs.field(factory=list)


def replay(path: Path, config: Config) -> ReplayResult:
    """Emit every event of ``path`` to the configured sinks (redaction applies again: nothing is loosened)."""
    from oisp.cli.run import build_sinks

    if not path.is_file():
        raise ConfigurationError(f"replay: {str(path)!r} is not a file")
    sinks = build_sinks(create_plugin_manager(), config)
    return anyio.run(functools.partial(_replay, path, sinks, config))


async def _replay(path: Path, sinks: dict[str, Sink], config: Config) -> ReplayResult:
    result = ReplayResult()
    redactor = Redactor(profile=config.redaction_profile, extra_patterns=config.redaction_patterns)
    async with Pipeline(sinks, redactor=redactor) as pipeline:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    event = Event.from_json(line)
                except EventValidationError as exc:
                    result.errors.append((number, str(exc)))
                    continue
                pipeline.emit(event)
                result.events += 1
                await anyio.lowlevel.checkpoint()
    return result
