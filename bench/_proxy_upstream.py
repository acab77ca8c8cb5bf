"""The upstream of ``bench_proxy.py``: a lean TLS server that stands in for api.openai.com on loopback.

Run by ``bench_proxy.py`` in its own process (it never shares the proxy's or the client's event loop):
``python _proxy_upstream.py CERT KEY PORT_FILE``. It serves HTTP/1.1 (hand-parsed: the upstream must cost far
less per request than the proxies it measures) and HTTP/2 (the ``h2`` package), chosen by ALPN:

* ``POST /v1/chat/completions``: a small chat completion (about 600 bytes of JSON); with ``"stream":true`` in
  the body (HTTP/1.1 only) a chunked SSE stream of ``x-bench-chunks`` chat.completion.chunk events, one every
  ``x-bench-interval-us`` µs, each stamped with ``"bench_ns"``: ``time.monotonic_ns()`` right before it is
  written (the monotonic clock is system-wide, so the client's arrival time is comparable);
* ``POST /v1/files``: reads and discards the body (any size), answers with a small file object;
* ``GET /v1/files/file-bench/content``: ``x-bench-bytes`` bytes of application/octet-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

COMPLETION = json.dumps({
    "id": "chatcmpl-bench0001", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                                         "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
    "system_fingerprint": "fp_bench",
}, separators=(",", ":")).encode()
SMALL_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                  + str(len(COMPLETION)).encode() + b"\r\nx-request-id: req_bench\r\n\r\n" + COMPLETION)
FILE_OBJECT = b'{"id":"file-bench","object":"file","bytes":%d,"created_at":1700000000,"filename":"bench.bin",' \
              b'"purpose":"batch"}'
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
            b"cache-control: no-cache\r\nx-request-id: req_bench\r\n\r\n")
SSE_EVENT = (b'data: {"id":"chatcmpl-bench0002","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":" token"},'
             b'"logprobs":null,"finish_reason":null}],"bench_ns":%d}\n\n')
SSE_LAST = (b'data: {"id":"chatcmpl-bench0002","object":"chat.completion.chunk","created":1700000000,'
            b'"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{},"logprobs":null,'
            b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
PIECE = 1 << 20
FILLER = memoryview(os.urandom(PIECE))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def parse_head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].split(b" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def serve_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        method, path, headers = parse_head(head)
        length = int(headers.get(b"content-length", b"0"))
        if path == b"/v1/files" and method == b"POST":
            remaining = length
            while remaining:
                data = await reader.read(min(remaining, PIECE))
                if not data:
                    return
                remaining -= len(data)
            body = FILE_OBJECT % length
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            continue
        body = await reader.readexactly(length) if length else b""
        if path.startswith(b"/v1/files/") and method == b"GET":
            size = int(headers.get(b"x-bench-bytes", b"0"))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
                         % size)
            sent = 0
            while sent < size:
                piece = FILLER[: min(PIECE, size - sent)]
                writer.write(piece)
                sent += len(piece)
                await writer.drain()
        elif b'"stream":true' in body:
            chunks = int(headers.get(b"x-bench-chunks", b"100"))
            interval = int(headers.get(b"x-bench-interval-us", b"2000")) / 1e6
            writer.write(SSE_HEAD)
            await writer.drain()
            for _ in range(chunks):
                await asyncio.sleep(interval)
                writer.write(chunk(SSE_EVENT % time.monotonic_ns()))
                await writer.drain()
            writer.write(chunk(SSE_LAST) + b"0\r\n\r\n")
            await writer.drain()
        else:
            writer.write(SMALL_RESPONSE)


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24,
    })
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 24)
    writer.write(conn.data_to_send())
    response_headers = [(b":status", b"200"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(COMPLETION)).encode()), (b"x-request-id", b"req_bench")]
    while True:
        try:
            data = await reader.read(65536)
        except ConnectionError:
            return
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                conn.send_headers(event.stream_id, response_headers)
                conn.send_data(event.stream_id, COMPLETION, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                writer.write(conn.data_to_send())
                return
        out = conn.data_to_send()
        if out:
            writer.write(out)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ssl_object = writer.get_extra_info("ssl_object")
    try:
        if ssl_object.selected_alpn_protocol() == "h2":
            await serve_h2(reader, writer)
        else:
            await serve_h1(reader, writer)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def main(cert: str, key: str, port_file: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context, backlog=1024, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(*sys.argv[1:4]))
