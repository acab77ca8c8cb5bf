"""``oisp run``: the proxy, the decoders and the pipeline, composed, until Ctrl+C or SIGTERM."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.abc import TaskStatus

from oisp.attribution import Attributor
from oisp.decoder import EventDecoder
from oisp.endpoints import EndpointTable
from oisp.errors import ConfigurationError
from oisp.events import Event
from oisp.hookspecs import Sink
from oisp.pipeline import Pipeline
from oisp.plugins import OispPluginManager, create_plugin_manager
from oisp.proxy import MitmProxy, ProxyConfig, ProxyMode, UpstreamOverride
from oisp.redaction import Redactor
from oisp.tls import CertificateAuthority

__all__ = ["RunOptions", "Running", "parse_listen", "run"]

logger = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"listen: {text!r} is not HOST:PORT") from None
    if not 0 <= port < 65536:
        raise ConfigurationError(f"listen: port {port} must be 0-65535")
    return host, port


@attrs.frozen(kw_only=True)
class RunOptions:
    """What ``oisp run`` was asked to do."""

    mode: ProxyMode = ProxyMode.EXPLICIT
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    confdir: Path | None = None
    output: Path | None = None
    stdout_format: str | None = "line"
    upstream_ca: Path | None = None
    upstream_insecure: bool = False
    resolve: Sequence[str] = ()
    reverse_target: str | None = None
    redaction_profile: str = "default"
    body_cap: int | None = None
    #: Seconds in-flight connections get to finish when stopping.
    drain_timeout: float = 5.0


@attrs.define
class Running:
    """A started runner: where it listens and what it has seen so far."""

    address: tuple[str, int]
    proxy: MitmProxy
    pipeline: Pipeline
    ca: CertificateAuthority


def _sinks(plugins: OispPluginManager, options: RunOptions) -> dict[str, Sink]:
    sinks: dict[str, Sink] = {}
    if options.output is not None:
        sinks["jsonl"] = plugins.create_sink("jsonl", {"path": str(options.output)})
    if options.stdout_format:
        sinks["stdout"] = plugins.create_sink("stdout", {"format": options.stdout_format})
    return sinks


async def run(
    options: RunOptions,
    *,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
    extra_sinks: dict[str, Sink] | None = None,
    on_event: Callable[[Event], None] | None = None,
    handle_signals: bool = True,
    stop: anyio.Event | None = None,
) -> dict[str, Any]:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives; returns the summary (pipeline and proxy stats).

    Stopping is graceful: the proxy stops accepting, then the pipeline delivers every queued event and closes
    the sinks before this returns.
    """
    plugins = create_plugin_manager()
    ca = CertificateAuthority.load_or_create(options.confdir)
    overrides = tuple(UpstreamOverride.parse(item) for item in options.resolve)
    config = ProxyConfig(
        mode=options.mode, listen_host=options.listen[0], listen_port=options.listen[1],
        upstream_ca=options.upstream_ca, upstream_insecure=options.upstream_insecure, overrides=overrides,
        reverse_target=options.reverse_target,
        **({"body_cap": options.body_cap} if options.body_cap else {}),
    )
    if options.mode is ProxyMode.TRANSPARENT:
        raise ConfigurationError("mode: transparent needs the interceptor; use explicit or reverse here")
    sinks = {**_sinks(plugins, options), **(extra_sinks or {})}
    endpoints = EndpointTable(plugins.endpoints())
    pipeline = Pipeline(sinks, redactor=Redactor(profile=options.redaction_profile))
    if on_event is not None:
        pipeline.add_listener(on_event)
    async with pipeline:
        proxy = MitmProxy(config, ca=ca, endpoints=endpoints, observer=EventDecoder(plugins, pipeline.emit),
                          attributor=Attributor())
        stop = stop or anyio.Event()
        async with anyio.create_task_group() as tg:
            address = await tg.start(_serve, proxy, tg.cancel_scope)
            if handle_signals:
                tg.start_soon(_stop_on_signal, stop)
            tg.start_soon(_shutdown_when, stop, proxy, options.drain_timeout)
            task_status.started(Running(address, proxy, pipeline, ca))
    summary = {"pipeline": pipeline.summary(), "proxy": attrs.asdict(proxy.stats)}
    logger.info("oisp stopped: %d connections, %d events emitted, %d dropped", proxy.stats.connections,
                pipeline.stats.emitted, pipeline.stats.dropped)
    return summary


async def _serve(proxy: MitmProxy, scope: anyio.CancelScope, *, task_status: TaskStatus[tuple[str, int]]) -> None:
    """Serve; once the proxy has stopped (and drained), end the runner's other tasks."""
    await proxy.serve(task_status=task_status)
    scope.cancel()


async def _shutdown_when(stop: anyio.Event, proxy: MitmProxy, drain_timeout: float) -> None:
    """Graceful stop: no new connections; in-flight ones get ``drain_timeout`` seconds to finish."""
    await stop.wait()
    await proxy.shutdown(drain_timeout)


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("received %s; stopping (draining in-flight calls, flushing sinks)",
                        signal.Signals(signum).name)
            stop.set()
            return
