"""Raw clients for proxy tests: a CONNECT tunnel with TLS on top, so tests control every byte sent."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events
from tests.upstream import Recording, Upstream


def connect_tunnel(proxy: tuple[str, int], host: str, port: int = 443) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"proxy closed the tunnel: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def tls_tunnel(proxy: tuple[str, int], host: str, context: ssl.SSLContext, alpn: list[str] | None = None,
               port: int = 443) -> ssl.SSLSocket:
    if alpn:
        context.set_alpn_protocols(alpn)
    return context.wrap_socket(connect_tunnel(proxy, host, port), server_hostname=host)


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def h2_exchange(
    sock: ssl.SSLSocket, host: str, requests: list[tuple[str, bytes]]
) -> tuple[bytes, bytes, dict[int, bytes]]:
    """Send requests as HTTP/2 streams, wait for every response, then GOAWAY and read to EOF.

    Returns (every byte sent, every byte received, body per stream id).
    """
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sent = bytearray()
    received = bytearray()
    bodies: dict[int, bytes] = {}
    open_streams = set()
    for path, body in requests:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "POST"), (":path", path), (":authority", host),
                                      (":scheme", "https"), ("content-type", "application/json"),
                                      ("content-length", str(len(body)))])
        conn.send_data(stream_id, body, end_stream=True)
        open_streams.add(stream_id)
        bodies[stream_id] = b""
    out = conn.data_to_send()
    sock.sendall(out)
    sent += out
    while open_streams:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before every response arrived"
        received += chunk
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                open_streams.discard(event.stream_id)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
            sent += out
    conn.close_connection()
    out = conn.data_to_send()
    sock.sendall(out)
    sent += out
    received += read_all(sock)
    return bytes(sent), bytes(received), bodies


def served(upstream: Upstream) -> list[Recording]:
    """The upstream connections that carried traffic, oldest first (without the idle spares the proxy opens in
    advance: preconnect)."""
    return [c for c in upstream.connections if c.received]
