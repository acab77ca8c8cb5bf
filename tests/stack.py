"""A running oisp stack for end-to-end tests: upstream TLS server(s), the proxy, the pipeline and a memory sink,
all on an event loop in a background thread (anyio blocking portal), with real clients in the test thread."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import attrs
import trustme
from tests.upstream import Handler, Upstream, json_ok, server_context

from oisp.endpoints import EndpointTable
from oisp.event_decoder import EventDecoder
from oisp.events import Event
from oisp.hookspecs import EndpointSpec
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.proxy import MitmProxy, ProxyConfig, UpstreamOverride
from oisp.sinks.memory import MemorySink
from oisp.tls import CertificateAuthority

UPSTREAM_HOSTS = (
    "api.openai.com", "api.anthropic.com", "example.com", "generativelanguage.googleapis.com",
    "us-central1-aiplatform.googleapis.com", "aiplatform.googleapis.com", "myres.openai.azure.com",
    "bedrock-runtime.us-east-1.amazonaws.com", "api.cohere.com", "api.cohere.ai", "api.mistral.ai", "api.groq.com",
    "api.together.xyz", "api.fireworks.ai", "api.perplexity.ai", "openrouter.ai", "api.deepseek.com", "api.x.ai",
    "router.huggingface.co", "api-inference.huggingface.co", "api.replicate.com", "api.acme-llm.example",
    "api.githubcopilot.com", "api.business.githubcopilot.com", "chatgpt.com", "cloudcode-pa.googleapis.com",
    "api.cerebras.ai", "localhost", "127.0.0.1",
)


async def _run_pipeline(pipeline: Pipeline, stop: anyio.Event, *, task_status: Any) -> None:
    async with pipeline:
        task_status.started()
        await stop.wait()


@attrs.define
class Stack:
    portal: anyio.from_thread.BlockingPortal
    proxy: MitmProxy
    upstream: Upstream
    plain_upstream: Upstream
    sink: MemorySink
    ca: CertificateAuthority
    proxy_address: tuple[str, int]
    upstream_ca_file: Path

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_address[0]}:{self.proxy_address[1]}"

    @property
    def ca_file(self) -> str:
        return str(self.ca.cert_path)

    def client_env(self, *, drop: tuple[str, ...] = (), proxy_var: str = "HTTPS_PROXY",
                   trust_var: str | None = "SSL_CERT_FILE", **extra: str) -> dict[str, str]:
        """The environment of a client process configured the way a user would: the proxy in ``proxy_var``, the
        oisp CA in ``trust_var``; inherited proxy settings and variables starting with ``drop`` are removed."""
        import os

        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not (drop and k.startswith(drop))}
        env.update({proxy_var: self.proxy_url, "NO_PROXY": "", "PYTHONUNBUFFERED": "1"})
        if trust_var is not None:
            env[trust_var] = self.ca_file
        env.update(extra)
        return env

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext that trusts only the oisp CA (what a configured client uses)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def events(self, count: int, timeout: float = 10.0) -> list[Event]:
        return self.sink.wait_for(count, timeout)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[Event]:
        """Events once ``predicate(events)`` holds (polls the sink's condition, no sleeping)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            events = list(self.sink.events)
            if predicate(events) or time.monotonic() > deadline:
                return events
            self.sink.wait_for(len(events) + 1, max(0.0, min(0.5, deadline - time.monotonic())))

    def of_type(self, event_type: str) -> list[Event]:
        return [e for e in self.sink.events if e.event_type == event_type]


@contextlib.contextmanager
def running_stack(tmp_path: Path, test_ca: trustme.CA, *, handler: Handler = json_ok,
                  config: dict[str, Any] | None = None, upstream_alpn: tuple[str, ...] = ("h2", "http/1.1"),
                  upstream_cert_hosts: tuple[str, ...] = UPSTREAM_HOSTS,
                  attributor: Any = None, original_destinations: Any = None,
                  endpoints: tuple[EndpointSpec, ...] = (),
                  extra_overrides: tuple[UpstreamOverride, ...] = ()) -> Iterator[Stack]:
    """``endpoints`` are added to the plugins' endpoint table (as ``[endpoints] add`` does); ``extra_overrides``
    send more hosts to servers of the test's own (an MCP server under uvicorn)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    upstream_ca_file = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(upstream_ca_file))
    ca = CertificateAuthority.load_or_create(tmp_path / "oisp-conf")
    sink = MemorySink()
    with anyio.from_thread.start_blocking_portal() as portal:
        upstream = Upstream(server_context(test_ca.issue_cert(*upstream_cert_hosts), upstream_alpn), handler)
        upstream_future, port = portal.start_task(upstream.serve)
        plain_upstream = Upstream(None, handler, strict=True)  # an origin server: rejects absolute-form targets
        plain_future, plain_port = portal.start_task(plain_upstream.serve)
        overrides = tuple(UpstreamOverride(h, 443, "127.0.0.1", port) for h in UPSTREAM_HOSTS) + tuple(
            UpstreamOverride(h, p, "127.0.0.1", plain_port) for h in UPSTREAM_HOSTS for p in (80, 1234, 11434)) \
            + extra_overrides
        options = {"listen_port": 0, "upstream_ca": upstream_ca_file, "overrides": overrides, **(config or {})}
        plugins = create_plugin_manager()
        pipeline = Pipeline({"memory": sink})
        stop = portal.call(anyio.Event)
        pipeline_future, _ = portal.start_task(_run_pipeline, pipeline, stop)
        table = EndpointTable(plugins.endpoints())
        for spec in endpoints:
            table.add(spec)
        proxy = MitmProxy(ProxyConfig(**options), ca=ca, observer=EventDecoder(plugins, pipeline.emit),
                          endpoints=table,
                          attributor=attributor, original_destinations=original_destinations)
        proxy_future, address = portal.start_task(proxy.serve)
        try:
            yield Stack(portal, proxy, upstream, plain_upstream, sink, ca, address, upstream_ca_file)
        finally:
            for future in (proxy_future, upstream_future, plain_future):
                _cancel(future)
            portal.call(stop.set)
            pipeline_future.result(timeout=10)


def _cancel(future: Future[Any]) -> None:
    future.cancel()
