"""The runner's part: an :class:`Activity` beside a pipeline, configured from ``[activity]``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs

from oisp.activity.monitor import Activity
from oisp.activity.settings import ActivitySettings

if TYPE_CHECKING:
    from oisp.config import Config
    from oisp.pipeline import Pipeline

__all__ = ["activity_for", "settings_from"]

log = logging.getLogger(__name__)


def settings_from(config: Config) -> ActivitySettings:
    """The monitor's settings of a runner configuration's ``[activity]`` table."""
    defaults = ActivitySettings()
    return ActivitySettings(
        scope=config.activity_scope, include_exe=config.activity_include_exe,
        exclude_exe=config.activity_exclude_exe,
        sensitive_paths=config.activity_sensitive_paths if config.activity_sensitive_paths is not None
        else defaults.sensitive_paths,
        hash_files=config.activity_hash_files, rate_limit=config.activity_rate_limit,
    )


@asynccontextmanager
async def activity_for(config: Config, pipeline: Pipeline) -> AsyncIterator[Activity | None]:
    """While the context lasts, observe agent activity into ``pipeline`` when the configuration enables it:
    the pipeline's AI events tell the scope which processes are agents, and the activity events go through the
    same stages and sinks. Enter it inside the pipeline's context (it must stop emitting before the pipeline
    closes). What cannot be observed (privileges, platform) is logged as a warning; the rest runs on."""
    if not config.activity_enabled:
        yield None
        return
    activity = Activity(emit=pipeline.emit, config=settings_from(config))
    activity.watch_pipeline(pipeline)
    async with activity:
        log.info("observing agent activity (scope %s) with %s", activity.config.scope,
                 "; ".join(f"{k}: {v}" for k, v in activity.running.items()) or "nothing")
        yield activity
    log.info("agent activity: %s", attrs.asdict(activity.stats))
