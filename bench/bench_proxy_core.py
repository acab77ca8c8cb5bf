"""What the sans-io proxy core costs per connection, next to what every connection costs anyway, in one run.

Run ``.venv/bin/python bench/bench_proxy_core.py`` (a few seconds). It plays whole connections through
:class:`oisp.proxy.core.ConnectionCore` (events in, commands out, no sockets: an intercepted connection from its
ClientHello to its end, and a passthrough). Beside them, in the same run: the same work done inline for an
intercepted connection, as the proxy did before the core (the same lookups, report and connection info, no
events or commands), and for scale what every connection costs in any design: parsing its ClientHello (parsed
beforehand for the other rows), creating its report, a cached leaf's server context. The rest of a cold
connection (a TCP connect, two TLS handshakes) costs milliseconds (``bench/bench_proxy.py``).
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from oisp.attribution import Attribution
from oisp.endpoints import EndpointTable
from oisp.events import ProcessInfo
from oisp.hookspecs import EndpointSpec
from oisp.http.exchange import ConnectionInfo
from oisp.proxy import core
from oisp.proxy.pinning import PinnedClients
from oisp.proxy.report import ConnectionReport, Decision
from oisp.tls import CertificateAuthority
from oisp.tls.clienthello import parse_client_hello

ENDPOINTS = EndpointTable([EndpointSpec("openai", "api.openai.com")])
WHO = Attribution(ProcessInfo(pid=4242, exe="/usr/bin/agent", cmdline="agent", start_time="t"))


def client_hello(sni: str) -> bytes:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def timed(run: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of one call, in microseconds."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            run()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="connections per measurement")
    args = parser.parse_args()
    ca = CertificateAuthority.load_or_create(Path(tempfile.mkdtemp()) / "ca")
    ai_hello, other_hello = client_hello("api.openai.com"), client_hello("example.com")
    # The core's own cost: the ClientHellos are parsed beforehand (parsing is timed on its own row).
    parsed = {ai_hello: parse_client_hello(ai_hello), other_hello: parse_client_hello(other_hello)}
    policy = core.RoutingPolicy(ENDPOINTS, PinnedClients(), ca, parsed.__getitem__, "explicit")
    ready = core.UpstreamReady(("10.0.0.1", 443), 1.0, alpn="h2", tls_version="TLSv1.3", cipher="x")

    def intercepted() -> None:
        c = core.ConnectionCore(policy, connection_id="c", client_addr=("127.0.0.1", 1), host="api.openai.com",
                                port=443)
        c.start()
        c.handle(core.ClientData(ai_hello))
        c.handle(ready)
        c.handle(core.ClientHandshakeDone("h2", "TLSv1.3"))
        c.handle(core.Attributed(WHO))
        assert c.handle(core.RelayEnded(1, 1, "server", None)) == [core.Close()]
        assert c.report is not None and c.report.decision is Decision.INTERCEPTED

    def passthrough() -> None:
        c = core.ConnectionCore(policy, connection_id="c", client_addr=("127.0.0.1", 1), host="example.com",
                                port=443, initial=other_hello)
        c.start()
        c.handle(core.Attributed(WHO))
        c.handle(core.UpstreamReady(("10.0.0.2", 443), 1.0))
        assert c.handle(core.RelayEnded(1, 1, "server", None)) == [core.Close()]

    def inline() -> None:
        # What the proxy did inline before the core, for an intercepted connection: the same lookups, the same
        # report and connection info, no events or commands.
        hello = parsed[ai_hello]
        name = hello.sni or "api.openai.com"
        endpoint = ENDPOINTS.match(name, 443)
        report = ConnectionReport(connection_id="c", mode="explicit", client_addr=("127.0.0.1", 1),
                                  target_host=name, target_port=443, decision=Decision.PASSTHROUGH, success=True,
                                  provider=endpoint.provider if endpoint else None, sni=hello.sni)
        assert endpoint is not None and not policy.pinned.knows(name)
        ca.leaf_for(name)
        _ = (hello.sni or (None if core._is_ip(name) else name), "x" if core._is_ip("api.openai.com") else name)
        report.upstream_addr, report.connect_ms = ready.address, ready.connect_ms
        report.alpn, report.tls_version, report.cipher = ready.alpn, ready.tls_version, ready.cipher
        report.decision = Decision.INTERCEPTED
        report.attach(WHO)
        ConnectionInfo(connection_id="c", client_addr=("127.0.0.1", 1), server_addr=(name, 443), mode="explicit",
                       sni=hello.sni, alpn="h2", tls_version="TLSv1.3", tls=True, process=report.process,
                       actor=report.actor, app=report.app, provider=endpoint.provider)

    ca.server_context("api.openai.com", ["h2"])  # cached from here on, as in use
    rows = [
        ("core: intercepted connection, whole transcript", timed(intercepted, args.n)),
        ("before the core: the same work inline, intercepted", timed(inline, args.n)),
        ("core: passthrough connection, whole transcript", timed(passthrough, args.n)),
        ("for scale: create the report of a connection", timed(lambda: ConnectionReport(
            connection_id="c", mode="explicit", client_addr=("127.0.0.1", 1), target_host="api.openai.com",
            target_port=443, decision=Decision.PASSTHROUGH, success=True), args.n)),
        ("for scale: parse the ClientHello (any design)", timed(lambda: parse_client_hello(ai_hello), args.n)),
        ("for scale: server context for a cached leaf", timed(lambda: ca.server_context("api.openai.com", ["h2"]),
                                                              args.n)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'per connection':<{width}}  {'µs':>8}")
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:>8.1f}")


if __name__ == "__main__":
    main()
