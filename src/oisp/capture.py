"""Capture the AI calls of code running in this process: an oisp proxy on loopback, in a background thread, whose
events are kept in memory (:func:`capture_ai`). The pytest plugin (:mod:`oisp.testing`) is built on it; scripts
use it directly::

    with oisp.capture_ai() as capture:
        client = openai.OpenAI(http_client=openai.DefaultHttpxClient(proxy=capture.proxy_url,
                                                                     verify=capture.ssl_context()))
        client.chat.completions.create(model="gpt-4o-mini", messages=[...])
        print(capture.wait_for_calls(1)[0].model)
"""

from __future__ import annotations

import contextlib
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oisp.conversation import Call
    from oisp.events import Event
    from oisp.hookspecs import Sink
    from oisp.sinks.memory import MemorySink

__all__ = ["AICapture", "capture_ai"]

#: Environment variables that point the usual SDKs at a proxy and make them trust its CA.
_CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


class AICapture:
    """A running in-process proxy and the events it collected."""

    def __init__(self, proxy_url: str, ca_file: Path, sink: MemorySink) -> None:
        #: ``http://127.0.0.1:PORT``: the proxy (explicit mode: CONNECT for HTTPS, absolute-form for HTTP).
        self.proxy_url = proxy_url
        #: The CA the proxy's certificates are issued by (trust it in the client under test).
        self.ca_file = ca_file
        self._sink = sink

    def env(self) -> dict[str, str]:
        """The environment variables that send a client's traffic through the proxy and make it trust the CA."""
        env = {"HTTPS_PROXY": self.proxy_url, "HTTP_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
               "http_proxy": self.proxy_url, "NO_PROXY": "", "no_proxy": ""}
        env.update({name: str(self.ca_file) for name in _CA_VARIABLES})
        return env

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the proxy's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def events(self) -> list[Event]:
        """Every event so far (``network.connect`` included), in the order they were processed."""
        return list(self._sink.events)

    def calls(self) -> list[Call]:
        """The AI calls so far (see :func:`oisp.calls`)."""
        from oisp.conversation import calls

        return calls(self.events)

    def wait_for_calls(self, count: int, timeout: float = 10.0) -> list[Call]:
        """The calls once ``count`` of them have their response (or ``timeout`` seconds passed: then an
        AssertionError that lists what was seen)."""
        deadline = time.monotonic() + timeout
        while True:
            done = [c for c in self.calls() if c.response is not None]
            if len(done) >= count:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = ", ".join(f"{c.provider}/{c.model}" for c in self.calls()) or "none"
                raise AssertionError(f"expected {count} complete AI call(s) within {timeout:g} s; saw {seen}")
            self._sink.wait_for(len(self._sink.events) + 1, min(0.5, remaining))

    def clear(self) -> None:
        """Forget the events collected so far."""
        self._sink.events.clear()


@contextlib.contextmanager
def capture_ai(*, confdir: str | Path | None = None, resolve: Sequence[str] = (),
               upstream_ca: str | Path | None = None, redaction: str = "default",
               sinks: Mapping[str, Sink] | None = None) -> Iterator[AICapture]:
    """Run an oisp proxy (explicit mode) on loopback in this process, in a background thread, until the block
    ends; leaving it waits until every event reached the sinks.

    ``confdir`` keeps its CA (default: a temporary directory, so a new CA each time); ``resolve`` and
    ``upstream_ca`` as for ``oisp run --resolve/--upstream-ca``; ``redaction`` is the redaction profile;
    ``sinks`` (name -> any object with ``write(events)`` and ``close()``) get every event too.
    """
    import anyio
    import anyio.from_thread

    from oisp.apps import AppTable
    from oisp.attribution import Attributor
    from oisp.endpoints import EndpointTable
    from oisp.event_decoder import EventDecoder
    from oisp.pipeline import Pipeline
    from oisp.plugins import create_plugin_manager
    from oisp.pricing import PricingEnricher
    from oisp.proxy import MitmProxy, ProxyConfig, UpstreamOverride
    from oisp.redaction import Redactor
    from oisp.sinks.memory import MemorySink
    from oisp.tls import CertificateAuthority

    with contextlib.ExitStack() as stack:
        if confdir is None:
            confdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="oisp-capture-"))
        ca = CertificateAuthority.load_or_create(Path(confdir))
        plugins = create_plugin_manager()
        sink = MemorySink()
        pipeline = Pipeline({"capture": sink, **(sinks or {})}, enrichers=[PricingEnricher.load()],
                            redactor=Redactor(profile=redaction))
        config = ProxyConfig(listen_port=0, upstream_ca=Path(upstream_ca) if upstream_ca else None,
                             overrides=tuple(UpstreamOverride.parse(item) for item in resolve))
        proxy = MitmProxy(config, ca=ca, endpoints=EndpointTable(plugins.endpoints()),
                          observer=EventDecoder(plugins, pipeline.emit),
                          attributor=Attributor(apps=AppTable.from_plugins(plugins)))

        async def run_pipeline(stop: anyio.Event, *, task_status: Any) -> None:
            async with pipeline:
                task_status.started()
                await stop.wait()

        portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        stop = portal.call(anyio.Event)
        pipeline_future, _ = portal.start_task(run_pipeline, stop)
        proxy_future, address = portal.start_task(proxy.serve)
        try:
            yield AICapture(f"http://{address[0]}:{address[1]}", ca.cert_path, sink)
        finally:
            portal.call(proxy.shutdown, 2.0)
            proxy_future.result(timeout=10)
            portal.call(stop.set)
            pipeline_future.result(timeout=10)
