"""Runs inside the client namespace: the Interceptor plus a small transparent TCP test proxy.

The proxy accepts diverted connections, asks the interceptor (through the original-destination protocol only)
where each was going, connects there with a marked upstream socket and relays bytes both ways.

stdout: one JSON object per line (``ready``, ``conn``, ``proxy-stopped``, ``stats``, ``bye``).
stdin: commands, one per line: ``stop-proxy``, ``stats``, ``quit``. EOF also quits.

With ``"relay": "process"`` in CONFIG_JSON, the bytes are relayed by a child process (``_agent.py relay``) that
receives each accepted connection and its upstream socket over a Unix socket (SCM_RIGHTS): this process then
runs only the interceptor and the proxy's accept/lookup/connect, so a benchmark measures the diverter without
relay threads competing with it for the GIL. The default relays in threads of this process.

usage: _agent.py PROXY_PORT CONFIG_JSON   (CONFIG_JSON: {"targets": [...], "options": {...}, "relay": ...})
       _agent.py relay FD                 (the relay child: FD is its end of the Unix socket)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
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


def _relay(conn: socket.socket, upstream: socket.socket) -> None:
    threads = [threading.Thread(target=_pipe, args=(conn, upstream), daemon=True),
               threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.close()
    upstream.close()


def relay_child(fd: int) -> None:
    """The relay process: each message on the Unix socket ``fd`` carries a client and an upstream socket."""
    channel = socket.socket(fileno=fd)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 1, 2)
        except OSError:
            return
        if len(fds) != 2:
            return  # the agent closed the channel
        pair = [socket.socket(fileno=f) for f in fds]
        threading.Thread(target=_relay, args=(pair[0], pair[1]), daemon=True).start()


class RelayProcess:
    """Hands connection pairs to a child process that relays them (see the module's doc)."""

    def __init__(self) -> None:
        self._channel, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = threading.Lock()
        self.process = subprocess.Popen([sys.executable, __file__, "relay", str(child_end.fileno())],
                                        pass_fds=[child_end.fileno()])
        child_end.close()

    def hand_over(self, conn: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            socket.send_fds(self._channel, [b"c"], [conn.fileno(), upstream.fileno()])
        conn.close()
        upstream.close()

    def stop(self) -> None:
        self._channel.close()
        self.process.wait(timeout=10)


class TestProxy:
    """A transparent relay that only knows the original-destination protocol and mark_upstream_socket."""

    def __init__(self, port: int, source: OriginalDestinationSource, relay: RelayProcess | None = None) -> None:
        self.source = source
        self.relay = relay
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
        if self.relay is not None:
            self.relay.hand_over(conn, upstream)
        else:
            _relay(conn, upstream)

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


def _handle_stats(interceptor: Interceptor) -> dict[str, int]:
    """The NETWORK handle's own counters (pydivert's ``stats()``: diverted, queue_full, ringbuf_full, ...)."""
    handle = getattr(interceptor, "_network", None)
    stats = getattr(handle, "stats", None)
    try:
        return {k: int(v) for k, v in stats().items()} if stats is not None else {}
    except (OSError, TypeError, ValueError):
        return {}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if sys.argv[1] == "relay":
        relay_child(int(sys.argv[2]))
        return
    port = int(sys.argv[1])
    cfg = json.loads(sys.argv[2])
    relay = RelayProcess() if cfg.get("relay") == "process" else None
    reporter = QuicReporter(Attributor())
    interceptor = Interceptor(InterceptorConfig(proxy_port=port, **cfg.get("options", {})), cfg["targets"],
                              on_quic=reporter.submit)
    threading.Thread(target=_report_quic, args=(reporter,), daemon=True).start()
    proxy = TestProxy(port, interceptor, relay)
    proxy.thread.start()
    interceptor.start()
    if not interceptor.wait_diverting(10):
        emit(event="error", error="interceptor did not start diverting")
        return
    emit(event="ready", filter=interceptor.filter, pid=os.getpid(),
         relay_pid=relay.process.pid if relay is not None else None)
    for line in sys.stdin:
        command = line.strip()
        if command == "stop-proxy":
            proxy.stop()
            emit(event="proxy-stopped")
        elif command == "stats":
            emit(event="stats", diverting=interceptor.diverting, filter=interceptor.filter, **interceptor.stats(),
                 network_handle=_handle_stats(interceptor))
        elif command == "quit":
            break
    interceptor.stop()
    if relay is not None:
        relay.stop()
    emit(event="bye")


if __name__ == "__main__":
    main()
