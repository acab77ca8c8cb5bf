"""Runs inside the client namespace: the Interceptor plus a small transparent TCP test proxy.

The proxy accepts diverted connections, asks the interceptor (through the original-destination protocol only)
where each was going, connects there with a marked upstream socket and relays bytes both ways.

stdout: one JSON object per line (``ready``, ``conn``, ``proxy-stopped``, ``stats``, ``bye``).
stdin: commands, one per line: ``stop-proxy``, ``stats``, ``quit``. EOF also quits.

usage: _agent.py PROXY_PORT CONFIG_JSON   (CONFIG_JSON: {"targets": [...], "options": {...}})
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from typing import Any

from oisp.attribution import Attributor
from oisp.interception import (
    LOOPBACK_MAX_SEGMENT,
    Interceptor,
    InterceptorConfig,
    OriginalDestinationSource,
    mark_upstream_socket,
)
from oisp.interception.quic import QuicReporter

_out_lock = threading.Lock()


def emit(**record: Any) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(262144)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class TestProxy:
    """A transparent relay that only knows the original-destination protocol and mark_upstream_socket."""

    def __init__(self, port: int, source: OriginalDestinationSource) -> None:
        self.source = source
        self.listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, LOOPBACK_MAX_SEGMENT)
        self.listener.bind(("::", port))
        self.listener.listen(128)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        local = conn.getsockname()
        dest = self.source.original_destination(peer[:2], local[:2])
        if dest is None:
            emit(event="refused", peer=list(peer[:2]), local=list(local[:2]))
            conn.close()
            return
        family = socket.AF_INET6 if ":" in dest.ip else socket.AF_INET
        upstream = socket.socket(family, socket.SOCK_STREAM)
        mark_upstream_socket(upstream)
        try:
            upstream.settimeout(10)
            upstream.connect((dest.ip, dest.port))
            upstream.settimeout(None)
        except OSError as exc:
            emit(event="upstream-failed", error=str(exc))
            conn.close()
            upstream.close()
            return
        emit(event="conn", peer=list(peer[:2]), local=list(local[:2]), ip=dest.ip, port=dest.port,
             pid=dest.pid, interface=dest.interface, client=list(dest.client) if dest.client else None,
             loopback=dest.loopback, upstream_local=list(upstream.getsockname()[:2]))
        threads = [threading.Thread(target=_pipe, args=(conn, upstream), daemon=True),
                   threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.close()
        upstream.close()

    def stop(self) -> None:
        # shutdown() wakes the blocked accept(); close() alone would not on Linux.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


def _report_quic(reporter: QuicReporter) -> None:
    """Each (process, host) whose QUIC was dropped, as the runner would report it."""
    while (report := reporter.next_report()) is not None:
        emit(event="quic", client=list(report.client_addr), host=report.target_host, port=report.target_port,
             pid=report.pid_hint, decision=str(report.decision), protocol=report.protocol,
             process=report.process.name if report.process is not None else None)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    port = int(sys.argv[1])
    cfg = json.loads(sys.argv[2])
    reporter = QuicReporter(Attributor())
    interceptor = Interceptor(InterceptorConfig(proxy_port=port, **cfg.get("options", {})), cfg["targets"],
                              on_quic=reporter.submit)
    threading.Thread(target=_report_quic, args=(reporter,), daemon=True).start()
    proxy = TestProxy(port, interceptor)
    proxy.thread.start()
    interceptor.start()
    if not interceptor.wait_diverting(10):
        emit(event="error", error="interceptor did not start diverting")
        return
    emit(event="ready", filter=interceptor.filter, pid=os.getpid())
    for line in sys.stdin:
        command = line.strip()
        if command == "stop-proxy":
            proxy.stop()
            emit(event="proxy-stopped")
        elif command == "stats":
            emit(event="stats", diverting=interceptor.diverting, filter=interceptor.filter, **interceptor.stats())
        elif command == "quit":
            break
    interceptor.stop()
    emit(event="bye")


if __name__ == "__main__":
    main()
