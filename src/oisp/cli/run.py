"""``oisp run``: the proxy, the decoders and the pipeline, composed, until Ctrl+C or SIGTERM."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.abc import TaskStatus

from oisp.activity.link_stage import link_activity
from oisp.activity.runner import activity_beside, activity_for
from oisp.apps import AppTable
from oisp.attribution import Attributor
from oisp.config import Config
from oisp.decode_setup import build_event_decoder, build_pipeline, build_sinks
from oisp.decoder_process import DecoderProcess
from oisp.endpoints import EndpointTable, permitted_domains
from oisp.errors import ConfigurationError, InterceptionError
from oisp.events import Event
from oisp.hookspecs import Sink
from oisp.pipeline import Pipeline
from oisp.plugins import OispPluginManager, create_plugin_manager
from oisp.proxy import MitmProxy, ProxyConfig, ProxyMode, UpstreamOverride
from oisp.tls import CertificateAuthority

__all__ = ["Running", "build_sinks", "parse_listen", "run"]

logger = logging.getLogger(__name__)

#: With ``decoder = "inline"``: the most events of one connection that may wait in the pipeline's queue (of 10,000)
#: once it is more than half full; a connection's burst beyond it is cut short (counted), its neighbours' events
#: are not.
INLINE_CONNECTION_BUDGET = 1000


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"proxy.listen: {text!r} is not HOST:PORT") from None
    if not 0 <= port < 65536:
        raise ConfigurationError(f"proxy.listen: port {port} must be 0-65535")
    return host, port


@attrs.define
class Running:
    """A started runner: where it listens and what it has seen so far."""

    address: tuple[str, int]
    proxy: MitmProxy
    #: The pipeline, when decoding runs in this process (``decoder = "inline"``).
    pipeline: Pipeline | None
    ca: CertificateAuthority
    #: The decoder process, when decoding runs in one (``decoder = "process"``, the default).
    decoder_process: DecoderProcess | None = None


def endpoint_table(plugins: OispPluginManager, config: Config) -> EndpointTable:
    """The providers' endpoints, plus the configured additions, minus the configured removals."""
    table = EndpointTable(plugins.endpoints())
    for spec in config.endpoints_add:
        table.add(spec)
    for host in config.endpoints_remove:
        if table.remove(host) == 0:
            raise ConfigurationError(f"endpoints.remove: {host!r} is not in the endpoint table")
    return table


def load_ca(config: Config, endpoints: EndpointTable) -> CertificateAuthority:
    """The CA the configuration asks for: unconstrained, or constrained to the endpoint table's domains."""
    if not config.ca_name_constrained:
        return CertificateAuthority.load_or_create(config.confdir)
    domains = permitted_domains(endpoints.hosts(), config.ca_extra_domains)
    return CertificateAuthority.load_or_create(config.confdir, permitted_domains=domains)


async def run(
    config: Config,
    *,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
    extra_sinks: dict[str, Sink] | None = None,
    on_event: Callable[[Event], None] | None = None,
    handle_signals: bool = True,
    stop: anyio.Event | None = None,
) -> dict[str, Any]:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives; returns the summary (pipeline and proxy stats).

    Stopping is graceful: the proxy stops accepting, in-flight connections get ``drain_timeout`` seconds,
    then the pipeline delivers every queued event and closes the sinks before this returns.

    Decoding runs in a separate decoder process (``config.decoder == "process"``, the default), or in this
    process's event loop (``"inline"``, and always when ``extra_sinks`` are given: sink objects live here).
    ``on_event`` is called here with each processed event either way.
    """
    transparent = config.mode == ProxyMode.TRANSPARENT
    if transparent:
        _require_privileges()
    plugins = create_plugin_manager()
    plugins.check_sink_kinds(str(sink.get("kind")) for sink in config.sinks)  # before the CA is written
    endpoints = endpoint_table(plugins, config)
    host, port = parse_listen(config.listen)
    if transparent and config.listen == Config().listen:
        host, port = "::", 0  # diverted connections arrive addressed to the original destination
    interceptor = None
    before_connect = None
    if transparent:
        from oisp.interception import LOOPBACK_MAX_SEGMENT, mark_upstream_socket

        before_connect = mark_upstream_socket
    proxy_config = ProxyConfig(
        mode=config.mode, listen_host=host, listen_port=port, upstream_ca=config.upstream_ca,
        upstream_insecure=config.upstream_insecure,
        overrides=tuple(UpstreamOverride.parse(item) for item in config.resolve),
        reverse_target=config.reverse_target, pinned_ttl=config.pinned_ttl, preconnect_idle=config.preconnect_idle,
        hpack_table_cap=config.hpack_table_cap,
        listen_max_segment=LOOPBACK_MAX_SEGMENT if transparent else None,
        **({"body_cap": config.body_cap} if config.body_cap is not None else {}),
    )
    ca = load_ca(config, endpoints)  # after every check that could refuse the configuration
    stop = stop or anyio.Event()

    async def serve(observer: Any, pipeline: Pipeline | None, decoder_process: DecoderProcess | None,
                    activity: Any = None) -> MitmProxy:
        nonlocal interceptor
        proxy = MitmProxy(proxy_config, ca=ca, endpoints=endpoints, observer=observer,
                          attributor=Attributor(apps=AppTable.from_plugins(plugins)),
                          before_upstream_connect=before_connect)
        async with anyio.create_task_group() as tg:
            if handle_signals:  # before anything can be announced, so an early Ctrl+C stops gracefully too
                await tg.start(_stop_on_signal, stop)
            address = await tg.start(_serve, proxy, tg.cancel_scope)
            if transparent:  # the interceptor needs the port to divert to: it joins once the proxy listens
                interceptor, quic = await _start_interceptor(config, endpoints, address[1], proxy)
                if activity is not None:  # its diverted connections are reported by the proxy, not again
                    from oisp.activity.connections import intercepted_by

                    activity.add_proxied(intercepted_by(interceptor))
                if quic is not None:
                    tg.start_soon(_report_quic, quic, proxy)
            tg.start_soon(_shutdown_when, stop, proxy, config.drain_timeout, interceptor)
            logger.info("oisp %s proxy listening on %s:%d (CA: %s; decoding %s)", config.mode, address[0],
                        address[1], ca.cert_path,
                        "inline" if decoder_process is None else
                        f"in process{'es' if decoder_process.processes > 1 else ''} "
                        f"{', '.join(str(pid) for pid in decoder_process.pids)}")
            # Everything made so far (modules, plugins, the CA, caches) lives as long as the process: out of the
            # garbage collector's way, so that its collections stay short pauses of the relay (a full collection
            # walked all of it: several milliseconds on a request's path).
            gc.freeze()
            task_status.started(Running(address, proxy, pipeline, ca, decoder_process))
        return proxy

    if config.decoder == "process" and not extra_sinks:
        decoder_process = DecoderProcess(config, buffer_limit=config.decoder_buffer, on_event=on_event,
                                         on_status=getattr(on_event, "set_status", None),
                                         on_losses=getattr(on_event, "set_losses", None),
                                         cpu=config.decoder_cpu, protected_paths=(ca.key_path,))
        # activity is observed here, with the privileges the decoder process gives up, and ends before it
        async with decoder_process, activity_beside(config, decoder_process) as activity:
            proxy = await serve(decoder_process, None, decoder_process, activity)
        pipeline_summary = decoder_process.pipeline_summary or {}
        summary = {"pipeline": pipeline_summary, "proxy": attrs.asdict(proxy.stats),
                   "decoder_process": decoder_process.summary()}
    else:
        # the relay emits as it reads: a burst on one connection must not fill the queue its neighbours need
        pipeline = build_pipeline(plugins, config, extra_sinks, connection_budget=INLINE_CONNECTION_BUDGET)
        if on_event is not None:
            pipeline.add_listener(on_event)
        async with pipeline, activity_for(config, pipeline) as activity:
            link_activity(pipeline, activity, hold_ms=config.activity_link_hold_ms)
            proxy = await serve(build_event_decoder(plugins, config, pipeline.emit, emit_for=pipeline.emit_for),
                                pipeline, None, activity)
        summary = {"pipeline": pipeline.summary(), "proxy": attrs.asdict(proxy.stats)}
    logger.info("oisp stopped: %d connections, %d events emitted, %d dropped", proxy.stats.connections,
                summary["pipeline"].get("emitted", 0), summary["pipeline"].get("dropped_total", 0))
    return summary


async def _serve(proxy: MitmProxy, scope: anyio.CancelScope, *, task_status: TaskStatus[tuple[str, int]]) -> None:
    """Serve; once the proxy has stopped (and drained), end the runner's other tasks."""
    await proxy.serve(task_status=task_status)
    scope.cancel()


async def _shutdown_when(stop: anyio.Event, proxy: MitmProxy, drain_timeout: float, interceptor: Any) -> None:
    """Graceful stop: diverting stops first (new connections go direct), then the proxy stops accepting and
    in-flight connections get ``drain_timeout`` seconds to finish."""
    try:
        await stop.wait()
    finally:
        if interceptor is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(interceptor.stop)
    await proxy.shutdown(drain_timeout)


async def _start_interceptor(config: Config, endpoints: EndpointTable, proxy_port: int,
                             proxy: MitmProxy) -> tuple[Any, Any]:
    """The running interceptor, and the reporter of the QUIC attempts it drops (None with block_quic off)."""
    from oisp.interception import Interceptor, InterceptorConfig, TargetSet
    from oisp.interception.quic import QuicReporter

    quic = None
    if config.block_quic:
        quic = QuicReporter(Attributor(), provider_for=lambda host: getattr(endpoints.match(host, 443), "provider",
                                                                             None))
    interceptor = Interceptor(InterceptorConfig(proxy_port=proxy_port, interfaces=config.interfaces or None,
                                                block_quic=config.block_quic),
                              TargetSet.from_endpoints(endpoints), on_quic=quic.submit if quic else None)
    proxy.original_destinations = interceptor  # before the first connection is diverted
    await anyio.to_thread.run_sync(interceptor.start)
    logger.info("diverting connections to %d AI endpoint(s) on %s%s", len(endpoints),
                ", ".join(config.interfaces) if config.interfaces else "the machine's interfaces",
                "; QUIC to them is dropped (clients fall back to TCP)" if quic else "")
    return interceptor, quic


async def _report_quic(quic: Any, proxy: MitmProxy) -> None:
    """Hand each blocked QUIC attempt's report to the proxy's observer (its ``network.connect`` event)."""
    try:
        while True:
            report = await anyio.to_thread.run_sync(quic.next_report, abandon_on_cancel=True)
            if report is None:
                return
            if proxy.observer is not None:
                try:
                    proxy.observer.connection(report)
                except Exception:
                    logger.exception("reporting a blocked QUIC attempt failed")
    finally:
        quic.close()  # the worker thread blocked in next_report returns


def _require_privileges() -> None:
    """Transparent mode diverts packets: that takes root (Linux: CAP_NET_ADMIN and CAP_BPF or CAP_SYS_ADMIN) or
    Administrator (Windows)."""
    import os

    status = Path("/proc/self/status")
    if status.is_file():
        caps = next((int(line.split()[1], 16) for line in status.read_text().splitlines()
                     if line.startswith("CapEff:")), 0)
        net_admin, sys_admin, bpf = (caps >> 12) & 1, (caps >> 21) & 1, (caps >> 39) & 1
        if not (net_admin and (bpf or sys_admin)):
            raise InterceptionError("transparent mode diverts packets and needs root: run it with sudo "
                                    "(or use --mode explicit, which needs no privileges)")
        return
    if sys.platform == "win32":
        import ctypes

        if not ctypes.windll.shell32.IsUserAnAdmin():
            raise InterceptionError("transparent mode diverts packets and needs Administrator rights: run the "
                                    "terminal as Administrator (or use --mode explicit)")
        return
    if os.geteuid() != 0:
        raise InterceptionError("transparent mode diverts packets and needs root: run it with sudo "
                                "(or use --mode explicit, which needs no privileges)")


async def _stop_on_signal(stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            logger.info("received %s; stopping (draining in-flight calls, flushing sinks)",
                        signal.Signals(signum).name)
            stop.set()
            return
