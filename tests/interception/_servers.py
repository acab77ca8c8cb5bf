"""Test servers run inside a namespace. Each prints ``ready`` once listening, then serves until killed.

usage:
  _servers.py echo ADDRESS PORT    greets with ``peer=IP PORT\\n`` then echoes every byte back
  _servers.py http ADDRESS PORT    answers any HTTP request with a JSON body naming the peer it saw
  _servers.py dns ADDRESS ANSWER   a DNS server on UDP 53: A queries get ANSWER (an IPv4 address), TTL 300
  _servers.py udp-echo ADDRESS PORT   answers each UDP datagram with ``seen=N`` (datagrams received so far)
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    sock.listen(128)
    return sock


def _echo(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.sendall(f"peer={peer[0]} {peer[1]}\n".encode())
        while True:
            data = conn.recv(262144)
            if not data:
                break
            conn.sendall(data)


def _http(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        body = json.dumps({"peer": [peer[0], peer[1]], "request": data.split(b"\r\n", 1)[0].decode()}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _serve_tcp(handler: object, address: str, port: int) -> None:
    sock = _listen(address, port)
    print("ready", flush=True)
    while True:
        conn, peer = sock.accept()
        ip = peer[0].removeprefix("::ffff:")
        threading.Thread(target=handler, args=(conn, (ip, peer[1])), daemon=True).start()  # type: ignore[arg-type]


def _dns(address: str, answer: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    print("ready", flush=True)
    while True:
        query, client = sock.recvfrom(4096)
        ident, = struct.unpack_from("!H", query, 0)
        end = 12
        while query[end]:
            end += query[end] + 1
        question = query[12:end + 5]
        header = struct.pack("!6H", ident, 0x8180, 1, 1, 0, 0)
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton(answer)
        sock.sendto(header + question + record, client)


def _udp_echo(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    if ":" in address:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    print("ready", flush=True)
    seen = 0
    while True:
        _, client = sock.recvfrom(65535)
        seen += 1
        sock.sendto(f"seen={seen}".encode(), client)


def main() -> None:
    mode, address, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "echo":
        _serve_tcp(_echo, address, int(arg))
    elif mode == "http":
        _serve_tcp(_http, address, int(arg))
    elif mode == "dns":
        _dns(address, arg)
    elif mode == "udp-echo":
        _udp_echo(address, int(arg))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
