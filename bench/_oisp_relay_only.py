"""oisp's proxy without decoding, for ``bench_proxy.py --relay-only``: what TLS interception and relaying cost.

``python _oisp_relay_only.py PORT UPSTREAM_PORT CONFDIR UPSTREAM_CA`` runs :class:`oisp.proxy.MitmProxy` in
explicit mode exactly as ``oisp run`` configures it (``gc.freeze()`` once it listens included), but with no
observer: connections are intercepted (leaf certificate, upstream verification, ALPN mirrored) and relayed byte
for byte, and nothing is decoded or written.
The difference between this column and ``oisp`` is the cost of decoding, events, redaction and sinks.
"""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path

import anyio

from oisp.proxy import MitmProxy, ProxyConfig, ProxyMode, UpstreamOverride
from oisp.tls import CertificateAuthority


async def main(port: int, upstream_port: int, confdir: Path, upstream_ca: Path) -> None:
    config = ProxyConfig(mode=ProxyMode.EXPLICIT, listen_host="127.0.0.1", listen_port=port, upstream_ca=upstream_ca,
                         overrides=(UpstreamOverride.parse(f"api.openai.com:443:127.0.0.1:{upstream_port}"),))
    proxy = MitmProxy(config, ca=CertificateAuthority.load_or_create(confdir))
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        # As `oisp run` does once it listens: what start-up made stays out of the collector's way. Without it a
        # full collection (20 ms on a quiet machine) landed in the cold requests and made this column's p99.
        gc.freeze()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
