"""The runner's part: an :class:`Activity` beside a pipeline, configured from ``[activity]``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import attrs

from oisp.activity.monitor import LEARN_MARGIN_NS, Activity
from oisp.activity.settings import ActivitySettings

if TYPE_CHECKING:
    from oisp.config import Config
    from oisp.decoder_process import DecoderProcess
    from oisp.pipeline import Pipeline
    from oisp.proxy.report import ConnectionReport

#: How often the watermark is sent to a decoder process (the linking stage there waits for it).
WATERMARK_INTERVAL = 0.01

__all__ = ["activity_beside", "activity_for", "settings_from"]

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
        connections=config.activity_connections, watch_directories=config.activity_watch_directories,
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


@asynccontextmanager
async def activity_beside(config: Config, decoder_process: DecoderProcess) -> AsyncIterator[Activity | None]:
    """:func:`activity_for` when a decoder process runs the pipeline: the kernel's sources need privileges the
    decoder process gives up, so the activity is observed here and its events and watermark are handed to the
    decoder process (where they are linked, redacted and written like any other). The scope learns agents
    from the proxy's connection reports: a process whose connection to an AI endpoint was intercepted is an
    agent from then on. Enter it inside the decoder process's context."""
    if not config.activity_enabled:
        yield None
        return
    activity = Activity(emit=decoder_process.activity_event, config=settings_from(config))

    def learn(report: ConnectionReport) -> None:
        process = report.process
        if report.provider is not None and process is not None and process.pid:
            activity.add_agent(process.pid, exe=process.exe,
                               since_ns=time.monotonic_ns() - LEARN_MARGIN_NS)

    decoder_process.connection_listeners.append(learn)
    try:
        async with activity, anyio.create_task_group() as tasks:
            tasks.start_soon(_send_watermarks, activity, decoder_process)
            log.info("observing agent activity (scope %s) with %s", activity.config.scope,
                     "; ".join(f"{k}: {v}" for k, v in activity.running.items()) or "nothing")
            yield activity
            tasks.cancel_scope.cancel()
    finally:
        decoder_process.connection_listeners.remove(learn)
    decoder_process.activity_watermark(activity.watermark_ns())
    log.info("agent activity: %s", attrs.asdict(activity.stats))


async def _send_watermarks(activity: Activity, decoder_process: DecoderProcess) -> None:
    sent = 0
    while True:
        mark = activity.watermark_ns()
        if mark > sent:
            decoder_process.activity_watermark(mark)
            sent = mark
        await anyio.sleep(WATERMARK_INTERVAL)
