"""Throughput of the passive HTTP decoders, next to the cost of merely copying the same bytes.

Run: ``.venv/bin/python bench/bench_http.py [--mib 32] [--repeat 3]``. Each case feeds one large response
(in 64 KiB pieces, like socket reads) through a fresh decoder with a no-op listener, storing the whole body
(the cap is set above the body size), and reports wire MB/s; the baseline copies the same pieces into a
bytearray, which is the least any consumer of the bytes pays.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings

from oisp.http import ConnectionInfo, HttpExchange, make_decoder

READ_SIZE = 64 * 1024


class NullListener:
    def request(self, exchange: HttpExchange) -> None:
        pass

    def response_start(self, exchange: HttpExchange) -> None:
        pass

    def response_data(self, exchange: HttpExchange, data: bytes) -> None:
        pass

    def end(self, exchange: HttpExchange) -> None:
        pass


def pieces(data: bytes) -> list[bytes]:
    return [data[i : i + READ_SIZE] for i in range(0, len(data), READ_SIZE)]


def h1_chunked(body: bytes, chunk: int, *, gzipped: bool = False) -> tuple[bytes, bytes]:
    if gzipped:
        body = gzip.compress(body, compresslevel=6)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 2\r\n\r\n{}"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    head += b"Content-Encoding: gzip\r\n\r\n" if gzipped else b"\r\n"
    chunks = [f"{len(body[i:i + chunk]):x}\r\n".encode() + body[i : i + chunk] + b"\r\n"
              for i in range(0, len(body), chunk)]
    return request, head + b"".join(chunks) + b"0\r\n\r\n"


def h2_data(body: bytes) -> tuple[bytes, bytes]:
    """Real bytes from an h2 client and server: one request, a response of 16 KiB DATA frames."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
    client.increment_flow_control_window((1 << 31) - 1 - 65535)
    client_out = bytearray()
    server_out = bytearray()

    def pump() -> None:
        while True:
            c, s = client.data_to_send(), server.data_to_send()
            if not c and not s:
                return
            client_out.extend(c)
            server.receive_data(c)
            server_out.extend(s)
            client.receive_data(s)

    stream = client.get_next_available_stream_id()
    client.send_headers(stream, [(":method", "POST"), (":path", "/v1/messages"), (":authority", "api.example.com"),
                                 (":scheme", "https")], end_stream=True)
    pump()
    server.send_headers(stream, [(":status", "200"), ("content-type", "text/event-stream")])
    view = memoryview(body)
    while view:
        size = min(server.local_flow_control_window(stream), server.max_outbound_frame_size, len(view))
        server.send_data(stream, bytes(view[:size]), end_stream=size == len(view))
        view = view[size:]
    pump()
    return bytes(client_out), bytes(server_out)


def best_of(repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def decode_case(alpn: str, client: bytes, server: bytes, cap: int) -> Callable[[], None]:
    client_pieces, server_pieces = pieces(client), pieces(server)
    connection = ConnectionInfo("bench", ("127.0.0.1", 1), ("127.0.0.1", 2), tls=True, alpn=alpn)

    def run() -> None:
        decoder = make_decoder(alpn, connection, NullListener(), body_cap=cap)
        for piece in client_pieces:
            decoder.feed_client(piece, 0)
        for piece in server_pieces:
            decoder.feed_server(piece, 0)
        decoder.server_closed(0)
        assert decoder.error is None

    return run


def copy_case(client: bytes, server: bytes) -> Callable[[], None]:
    all_pieces = pieces(client) + pieces(server)

    def run() -> None:
        sink = bytearray()
        for piece in all_pieces:
            sink += piece

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="response body size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    cap = 2 * size
    # Half incompressible, half text: content the decoders cannot shortcut.
    random_body = (os.urandom(size // 2) + b'data: {"text": "token"}\n\n' * (size // 25 + 1))[:size]
    sse_body = b"".join(f'data: {{"index": {i}, "delta": "token {i}"}}\n\n'.encode()
                        for i in range(size // 30))[:size]

    cases: list[tuple[str, bytes, bytes, str]] = []
    request, response = h1_chunked(random_body, 16 * 1024)
    cases.append(("h1 chunked, 16 KiB chunks", request, response, "http/1.1"))
    request, response = h1_chunked(sse_body, 512)
    cases.append(("h1 chunked, 512 B chunks (SSE-like)", request, response, "http/1.1"))
    request, response = h1_chunked(sse_body, 16 * 1024, gzipped=True)
    cases.append(("h1 chunked + gzip (SSE text)", request, response, "http/1.1"))
    client, server = h2_data(random_body)
    cases.append(("h2 DATA, 16 KiB frames", client, server, "h2"))

    print(f"body {args.mib} MiB, fed in {READ_SIZE // 1024} KiB pieces, best of {args.repeat}")
    print("MB/s are 10^6 bytes per second of wire bytes; 'body MB/s' counts decoded body bytes")
    print(f"{'case':<38} {'wire MiB':>8} {'copy MB/s':>10} {'decode MB/s':>12} {'body MB/s':>10} {'x copy':>7}")
    for name, client, server, alpn in cases:
        wire = len(client) + len(server)
        copy_time = best_of(args.repeat, copy_case(client, server))
        decode_time = best_of(args.repeat, decode_case(alpn, client, server, cap))
        print(f"{name:<38} {wire / 2**20:>8.1f} {wire / copy_time / 1e6:>10.0f} "
              f"{wire / decode_time / 1e6:>12.0f} {size / decode_time / 1e6:>10.0f} "
              f"{decode_time / copy_time:>7.1f}")


if __name__ == "__main__":
    main()
