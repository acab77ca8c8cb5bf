"""The embedded default main job: a local provider endpoint that answers like OpenAI and Anthropic, so the
whole pipeline can be shown offline (``oisp demo``, and the examples in ``docs/library.md``)."""

from __future__ import annotations

import contextlib
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from oisp.tls import CertificateAuthority

__all__ = ["HOSTS", "LocalProvider", "local_provider", "stand_in_context"]

#: The hosts the local provider stands in for.
HOSTS = ("api.openai.com", "api.anthropic.com")


@attrs.frozen
class LocalProvider:
    """A running stand-in: where to send its hosts (``resolve`` entries, as ``oisp run --resolve`` takes them)
    and the CA its certificates are issued by (``upstream_ca``)."""

    port: int
    ca_file: Path

    @property
    def resolve(self) -> list[str]:
        """``HOST:443:127.0.0.1:PORT`` for each host it stands in for."""
        return [f"{host}:443:127.0.0.1:{self.port}" for host in HOSTS]


def stand_in_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for whichever stand-in host the client names (SNI)."""
    context = ca.server_context(HOSTS[0], ["http/1.1"])

    def by_sni(ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name:
            ssl_object.context = ca.server_context(name, ["http/1.1"])

    context.sni_callback = by_sni
    return context


@contextlib.contextmanager
def local_provider() -> Iterator[LocalProvider]:
    """Serve the stand-in for api.openai.com and api.anthropic.com (TLS with a throwaway CA, on loopback, in a
    background thread) until the block ends."""
    import anyio.from_thread

    from oisp.demo.provider import DemoProvider
    from oisp.tls import CertificateAuthority

    with tempfile.TemporaryDirectory(prefix="oisp-stand-in-") as tmp, \
            anyio.from_thread.start_blocking_portal() as portal:
        ca = CertificateAuthority.load_or_create(Path(tmp))
        future, port = portal.start_task(DemoProvider(stand_in_context(ca)).serve)
        try:
            yield LocalProvider(port, ca.cert_path)
        finally:
            future.cancel()
