"""The load generator of ``bench_proxy.py``, run in its own process: ``python _proxy_client.py JSON``.

The JSON names the measurement (``latency``, ``cold``, ``rps``, ``sse``, ``upload``, ``download``), the
upstream address, the proxy (``null`` for a direct connection) and the CA files to trust; the result is one
JSON object on stdout. Through a proxy every connection is ``CONNECT api.openai.com:443`` followed by TLS with
SNI api.openai.com, as an SDK behind ``HTTPS_PROXY`` does; directly it is TLS to the upstream's address with
the same SNI.

Clients are deliberately lean (blocking sockets with hand-written HTTP/1.1, the ``h2`` package for HTTP/2, raw
asyncio streams for the concurrent requests/s run) so that the client costs far less per request than a proxy.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

HOST = "api.openai.com"
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
SSE_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to a thousand"}]}'
COMMON = (b"host: api.openai.com\r\nuser-agent: OpenAI/Python 1.54.0\r\naccept: application/json\r\n"
          b"authorization: Bearer sk-bench-0000000000000000000000000000000000000000\r\n")
CHAT_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\n" + COMMON + b"content-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(CHAT_BODY) + CHAT_BODY)
PIECE = 1 << 20
STAMP = re.compile(rb'"bench_ns":(\d+)\}')


def context(cafiles: list[str], alpn: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        ctx.load_verify_locations(cafile)
    ctx.set_alpn_protocols([alpn])
    return ctx


def tunnel_head() -> bytes:
    return f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode()


def connect(cfg: dict[str, Any], ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection to api.openai.com, directly or through the proxy's CONNECT tunnel."""
    address = tuple(cfg["proxy"] or cfg["upstream"])
    sock = socket.create_connection(address, timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cfg["proxy"]:
        sock.sendall(tunnel_head())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError(f"proxy closed the tunnel: {head!r}")
            head += data
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise ConnectionError(f"proxy refused the tunnel: {head!r}")
    return ctx.wrap_socket(sock, server_hostname=HOST)


class H1:
    """Just enough HTTP/1.1 for content-length responses on a blocking socket."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buf += data

    def head(self) -> dict[bytes, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.fill()
        lines = self.buf[:end].split(b"\r\n")
        self.buf = self.buf[end + 4:]
        if b" 200 " not in lines[0]:
            raise ConnectionError(f"unexpected response {lines[0]!r}")
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}

    def response(self) -> int:
        length = int(self.head()[b"content-length"])
        while len(self.buf) < length:
            self.fill()
        self.buf = self.buf[length:]
        return length


class H2:
    """A blocking HTTP/2 client for one request at a time."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 24)
        sock.sendall(self.conn.data_to_send())
        self.headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", HOST.encode()),
                        (b":path", b"/v1/chat/completions"), (b"content-type", b"application/json"),
                        (b"user-agent", b"OpenAI/Python 1.54.0"),
                        (b"authorization", b"Bearer sk-bench-0000000000000000000000000000000000000000"),
                        (b"content-length", str(len(CHAT_BODY)).encode())]

    def request(self) -> None:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.headers)
        self.conn.send_data(stream_id, CHAT_BODY, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        done = False
        while not done:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed mid-response")
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset: {event}")
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)


def latency(cfg: dict[str, Any]) -> dict[str, Any]:
    """Sequential requests on one keep-alive connection: each request's round trip in ns."""
    ctx = context(cfg["cafiles"], cfg["alpn"])
    sock = connect(cfg, ctx)
    if cfg["alpn"] == "h2":
        if sock.selected_alpn_protocol() != "h2":
            raise ConnectionError(f"asked for h2, got {sock.selected_alpn_protocol()}")
        client = H2(sock)
        one = client.request
    else:
        h1 = H1(sock)

        def one() -> None:
            sock.sendall(CHAT_REQUEST)
            h1.response()

    for _ in range(cfg["warmup"]):
        one()
    samples = []
    for _ in range(cfg["requests"]):
        start = time.perf_counter_ns()
        one()
        samples.append(time.perf_counter_ns() - start)
    sock.close()
    return {"samples": samples}


def cold(cfg: dict[str, Any]) -> dict[str, Any]:
    """A new connection per request (TCP, CONNECT, TLS, one HTTP/1.1 request): connect-to-response in ns."""
    ctx = context(cfg["cafiles"], "http/1.1")
    samples = []
    for i in range(cfg["warmup"] + cfg["requests"]):
        start = time.perf_counter_ns()
        sock = connect(cfg, ctx)
        sock.sendall(CHAT_REQUEST)
        H1(sock).response()
        elapsed = time.perf_counter_ns() - start
        sock.close()
        if i >= cfg["warmup"]:
            samples.append(elapsed)
        time.sleep(cfg["pause"])  # lets the proxy finish tearing the last connection down, as between real calls
    return {"samples": samples}


async def rps(cfg: dict[str, Any]) -> dict[str, Any]:
    """``connections`` keep-alive HTTP/1.1 connections, each sending requests back to back for ``duration``."""
    ctx = context(cfg["cafiles"], "http/1.1")

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if cfg["proxy"]:
            reader, writer = await asyncio.open_connection(*cfg["proxy"])
            writer.write(tunnel_head())
            await reader.readuntil(b"\r\n\r\n")
            await writer.start_tls(ctx, server_hostname=HOST)
            return reader, writer
        return await asyncio.open_connection(*cfg["upstream"], ssl=ctx, server_hostname=HOST)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHAT_REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        start = head.find(b"content-length:") + 15
        await reader.readexactly(int(head[start:head.find(b"\r\n", start)]))

    connections = [await open_one() for _ in range(cfg["connections"])]
    for reader, writer in connections:
        for _ in range(cfg["warmup"]):
            await one(reader, writer)
    counts = [0] * len(connections)
    stop = False

    async def worker(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not stop:
            await one(reader, writer)
            counts[index] += 1

    tasks = [asyncio.create_task(worker(i, *conn)) for i, conn in enumerate(connections)]
    started, cpu_started = time.monotonic(), time.process_time()
    await asyncio.sleep(cfg["duration"])
    done, ended, cpu = sum(counts), time.monotonic(), time.process_time() - cpu_started
    elapsed = ended - started
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, writer in connections:
        writer.close()
    return {"requests": done, "rps": done / elapsed, "client_cpu": cpu / elapsed, "window": [started, ended]}


def sse(cfg: dict[str, Any]) -> dict[str, Any]:
    """One SSE stream per run (after a short warm-up stream): per chunk, arrival minus the upstream's stamp, ns."""
    ctx = context(cfg["cafiles"], "http/1.1")
    sock = connect(cfg, ctx)
    h1 = H1(sock)

    def stream(chunks: int) -> list[int]:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n" + COMMON + b"content-type: application/json\r\n"
                     b"accept: text/event-stream\r\nx-bench-chunks: %d\r\nx-bench-interval-us: %d\r\n"
                     b"content-length: %d\r\n\r\n%s" % (chunks, cfg["interval_us"], len(SSE_BODY), SSE_BODY))
        h1.head()
        buf, now = h1.buf, time.monotonic_ns()
        delays: list[int] = []
        while True:
            pos = 0
            for match in STAMP.finditer(buf):
                delays.append(now - int(match[1]))
                pos = match.end()
            buf = buf[pos:]
            if buf.endswith(b"[DONE]\n\n\r\n0\r\n\r\n"):
                break
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                raise ConnectionError("connection closed mid-stream")
            buf += data
        h1.buf = b""
        return delays

    stream(20)
    delays = stream(cfg["chunks"])
    sock.close()
    if len(delays) != cfg["chunks"]:
        raise RuntimeError(f"expected {cfg['chunks']} stamped chunks, got {len(delays)}")
    return {"samples": delays}


def upload(cfg: dict[str, Any]) -> dict[str, Any]:
    """POST a multipart file of ``bytes`` bytes; seconds from the first byte sent to the response."""
    ctx = context(cfg["cafiles"], "http/1.1")
    sock = connect(cfg, ctx)
    h1 = H1(sock)
    size = cfg["bytes"]
    piece = memoryview(bytes(range(256)) * (PIECE // 256))
    prefix = (b'--bench\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--bench\r\n'
              b'content-disposition: form-data; name="file"; filename="bench.bin"\r\n'
              b"content-type: application/octet-stream\r\n\r\n")
    suffix = b"\r\n--bench--\r\n"
    head = (b"POST /v1/files HTTP/1.1\r\n" + COMMON + b"content-type: multipart/form-data; boundary=bench\r\n"
            b"content-length: %d\r\n\r\n" % (len(prefix) + size + len(suffix)))
    start = time.perf_counter()
    sock.sendall(head + prefix)
    sent = 0
    while sent < size:
        part = piece[: min(PIECE, size - sent)]
        sock.sendall(part)
        sent += len(part)
    sock.sendall(suffix)
    h1.response()
    elapsed = time.perf_counter() - start
    sock.close()
    return {"seconds": elapsed, "bytes": size}


def download(cfg: dict[str, Any]) -> dict[str, Any]:
    """GET ``bytes`` bytes of file content; seconds from the request to the last byte."""
    ctx = context(cfg["cafiles"], "http/1.1")
    sock = connect(cfg, ctx)
    h1 = H1(sock)
    start = time.perf_counter()
    sock.sendall(b"GET /v1/files/file-bench/content HTTP/1.1\r\n" + COMMON + b"x-bench-bytes: %d\r\n\r\n"
                 % cfg["bytes"])
    length = int(h1.head()[b"content-length"])
    received = len(h1.buf)
    buffer = bytearray(PIECE)
    while received < length:
        n = sock.recv_into(buffer)
        if not n:
            raise ConnectionError("connection closed mid-download")
        received += n
    elapsed = time.perf_counter() - start
    sock.close()
    return {"seconds": elapsed, "bytes": length}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    kind = cfg["kind"]
    if kind == "rps":
        result = asyncio.run(rps(cfg))
    else:
        result = {"latency": latency, "cold": cold, "sse": sse, "upload": upload, "download": download}[kind](cfg)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
