"""A test client run inside the client namespace; prints one JSON object and exits.

usage:
  _client.py hello HOST PORT          connect, read the echo server's greeting (the peer it saw)
  _client.py bulk HOST PORT BYTES     send BYTES random bytes to the echo server, check the echo's SHA-256
  _client.py resolve-hello DNS NAME   ask the DNS server DNS for NAME's A record, then ``hello`` it on 443
  _client.py pingpong HOST PORT N SIZE   N round trips of SIZE bytes on one connection: RTTs in microseconds
  _client.py connect HOST PORT N      N fresh connections (connect + greeting): setup times in microseconds
  _client.py quic HOST PROBE N [HOLD]   N datagrams to HOST:443 from one socket (QUIC-like), then one from
                                      another socket to PROBE:443, whose answer (``seen=N``) says how many reached
                                      the server; and whether HOST answered. With HOLD (a FIFO), the sockets stay
                                      open until something is written to it (a QUIC client waits for its answer)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=15)
    sock.settimeout(30)
    return sock


def _greeting(sock: socket.socket) -> tuple[str, int]:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise SystemExit("connection closed before the greeting")
        line += chunk
    ip, port = line.decode().strip().removeprefix("peer=").split()
    return ip, int(port)


def hello(host: str, port: int) -> dict[str, object]:
    with _connect(host, port) as sock:
        seen = _greeting(sock)
        return {"pid": os.getpid(), "local": list(sock.getsockname()[:2]), "remote": list(sock.getpeername()[:2]),
                "server_saw": list(seen)}


def bulk(host: str, port: int, size: int) -> dict[str, object]:
    data = os.urandom(size)
    with _connect(host, port) as sock:
        _greeting(sock)
        start = time.monotonic()

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        received = 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        sender.join()
        elapsed = time.monotonic() - start
    return {"sent": size, "received": received, "intact": digest.hexdigest() == hashlib.sha256(data).hexdigest(),
            "seconds": elapsed}


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "median_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6}


def pingpong(host: str, port: int, count: int, size: int) -> dict[str, object]:
    payload = b"x" * size
    samples = []
    with _connect(host, port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _greeting(sock)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise SystemExit("connection closed during ping-pong")
                got += len(chunk)
            samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def connect_times(host: str, port: int, count: int) -> dict[str, object]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(host, port) as sock:
            _greeting(sock)
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def resolve(dns_server: str, name: str) -> str:
    query = struct.pack("!6H", 0x4F15, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query, (dns_server, 53))
        answer, _ = sock.recvfrom(4096)
    return socket.inet_ntoa(answer[-4:])


def quic(host: str, probe: str, count: int, hold: str | None = None) -> dict[str, object]:
    """A QUIC-like sender: Initial-sized datagrams to HOST:443, then a probe datagram to PROBE:443 on another
    socket. The probe's answer comes after any datagram of the first socket the server received (same path, in
    order), so its count tells whether they got through."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sender, \
            socket.socket(socket.AF_INET6 if ":" in probe else socket.AF_INET, socket.SOCK_DGRAM) as prober:
        sender.connect((host, 443))
        for _ in range(count):
            sender.send(b"\xc0" + os.urandom(1199))  # a long-header packet of an Initial's size
        prober.settimeout(15)
        prober.sendto(b"probe", (probe, 443))
        answer = prober.recv(100).decode()
        if hold is not None:
            with open(hold) as fifo:  # blocks until the test opens it for writing
                fifo.read()
        sender.setblocking(False)
        try:
            direct = sender.recv(100).decode()
        except BlockingIOError:
            direct = None
        return {"pid": os.getpid(), "local": list(sender.getsockname()[:2]), "probe_answer": answer,
                "host_answer": direct}


def main() -> None:
    mode = sys.argv[1]
    if mode == "hello":
        result = hello(sys.argv[2], int(sys.argv[3]))
    elif mode == "bulk":
        result = bulk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "pingpong":
        result = pingpong(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "connect":
        result = connect_times(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "quic":
        result = quic(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
    elif mode == "resolve-hello":
        address = resolve(sys.argv[2], sys.argv[3])
        result = {"resolved": address, **hello(address, 443)}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
