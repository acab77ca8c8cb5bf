"""Throughput of provider decoding: streamed response bodies into OISP events, next to the raw framing cost.

Run: ``.venv/bin/python bench/bench_decode.py [--mb 20] [--chunk 16384] [--repeat 3] [--baseline CHECKOUT]``

For each stream the same body is measured three ways, fed in fixed-size chunks as the proxy sees it:

* ``framing``: the framing decoder alone (SSE or AWS eventstream), items returned and dropped;
* ``framing+json``: the framing decoder and ``json.loads`` of every item's payload (the least any decoder that
  reads the content must do);
* ``events``: the provider's :class:`~oisp.hookspecs.ExchangeDecoder` from the request to the end, as the
  proxy drives it, giving the finished ``ai.request``/``ai.response``/``agent.tool_call`` events (with
  ``--chunks``, also one ``ai.streaming_chunk`` per chunk).

Streams: OpenAI chat completions text (with OpenRouter keep-alive comments), chat completions with parallel tool
calls streamed as argument fragments, the Responses API's typed events, and Bedrock ConverseStream
(``application/vnd.amazon.eventstream``). The best of ``--repeat`` runs is printed in MB/s of body
(MB = 10**6 bytes).

A second table gives the CPU cost of one *ordinary* exchange, end to end, in µs per exchange
(``--exchanges N`` of them on one keep-alive connection; ``--no-streams`` skips the stream table): an openai SDK
``POST /v1/chat/completions`` (320-byte body, ``authorization: Bearer sk-...``, ``x-stainless-*`` headers)
answered by a 460-byte non-streamed JSON body with OpenAI's usual response headers, over HTTP/1.1 and HTTP/2.
The raw bytes go into the real passive decoder (``make_decoder``) with :class:`~oisp.event_decoder.EventDecoder`'s
listener and a :class:`~oisp.http.exchange.ConnectionInfo` carrying a realistic process, user and app, as the
proxy builds it. Columns, each including the ones before it:

* ``http``: the passive HTTP decoder alone (a listener that does nothing);
* ``+events``: the provider plugins' decoding into the ``ai.request``/``ai.response`` events, with context;
* ``+process``: :meth:`Pipeline.process <oisp.pipeline.Pipeline.process>` of each event (host enrichment,
  redaction, schema conformance);
* ``+jsonl``: the JSONL sink's serialization and write (to a temporary file, in batches of 128 events);
* ``pipeline``: the same through a running :class:`~oisp.pipeline.Pipeline` (queues, the sink's worker thread),
  the events emitted as the proxy emits them; CPU time of the whole process (all threads).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).parent))

from bench_framing import _token, bedrock_eventstream, best_of, openai_sse
from bench_http import NullListener

from oisp.event_decoder import EventDecoder
from oisp.events import Actor, App, Event, Host, ParentProcess, ProcessInfo
from oisp.framing import EventStreamDecoder, EventStreamMessage, SseDecoder, SseEvent, encode_message
from oisp.hookspecs import DecoderSettings, ExchangeDecoder
from oisp.http.exchange import ConnectionInfo, Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.http.passive import make_decoder
from oisp.pipeline import SINK_HANDOFF_WAIT, Pipeline
from oisp.plugins import create_plugin_manager
from oisp.provider_kit import DecoderContext
from oisp.providers import openai
from oisp.sinks.jsonl import JsonlSink

try:
    from oisp.providers import bedrock
except ImportError:  # the Bedrock provider is optional for this benchmark
    bedrock = None  # type: ignore[assignment]

MakeDecoder = Callable[[HttpExchange, DecoderSettings, DecoderContext], ExchangeDecoder | None]


# --- streams ---------------------------------------------------------------------------------------------------

def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def openai_tool_sse(size: int) -> bytes:
    """Chat completion chunks of four parallel tool calls, their arguments in small interleaved fragments."""
    base = {"id": "chatcmpl-BQw7Lq2Xk9sYtR4uV1wZ3aB5cD7eF", "object": "chat.completion.chunk",
            "created": 1745000000, "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_b376dfbbd5"}
    parts = [_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": n, "id": f"call_{n:024d}", "type": "function", "function": {"name": f"tool_{n}", "arguments": ""}}
        for n in range(4)]}, "finish_reason": None}]})]
    total = len(parts[0])
    i = 0
    while total < size:
        fragment = json.dumps(_token(i))[1:-1]
        chunk = _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": i % 4, "function": {"arguments": fragment}}]}, "logprobs": None, "finish_reason": None}],
            "usage": None})
        parts.append(chunk)
        total += len(chunk)
        i += 1
    parts.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    parts.append(_sse({**base, "choices": [], "usage": {"prompt_tokens": 90, "completion_tokens": i,
                                                         "total_tokens": 90 + i}}))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def responses_sse(size: int) -> bytes:
    """A Responses API stream: lifecycle events around ``response.output_text.delta`` events."""
    response = {"id": "resp_68a1f0d9e8f78190b2c3d4e5f6071829", "object": "response", "status": "in_progress",
                "model": "gpt-4.1-2025-04-14", "output": []}
    parts = [_sse({"type": "response.created", "sequence_number": 0, "response": response}, "response.created"),
             _sse({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                   "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant",
                            "content": []}}, "response.output_item.added")]
    total = sum(map(len, parts))
    i = 0
    while total < size:
        event = _sse({"type": "response.output_text.delta", "sequence_number": i + 2, "item_id": "msg_1",
                      "output_index": 0, "content_index": 0, "delta": _token(i), "logprobs": []},
                     "response.output_text.delta")
        parts.append(event)
        total += len(event)
        i += 1
    done = {**response, "status": "completed", "output": [], "usage": {
        "input_tokens": 240, "input_tokens_details": {"cached_tokens": 128}, "output_tokens": i,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 240 + i}}
    parts.append(_sse({"type": "response.completed", "sequence_number": i + 2, "response": done},
                      "response.completed"))
    return b"".join(parts)


def converse_stream(size: int) -> bytes:
    """Bedrock ConverseStream: messageStart, text deltas, messageStop and metadata."""
    def message(kind: str, body: dict[str, Any]) -> bytes:
        return encode_message({":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
                              json.dumps(body).encode())
    return (message("messageStart", {"role": "assistant"}) + bedrock_eventstream(size)
            + message("contentBlockStop", {"contentBlockIndex": 0})
            + message("messageStop", {"stopReason": "end_turn"})
            + message("metadata", {"usage": {"inputTokens": 20, "outputTokens": 9000, "totalTokens": 9020},
                                   "metrics": {"latencyMs": 900}}))


# --- exchanges -------------------------------------------------------------------------------------------------

def _exchange(provider: str, host: str, target: str, body: dict[str, Any], content_type: str) -> HttpExchange:
    connection = ConnectionInfo(connection_id="bench", client_addr=("127.0.0.1", 50000), server_addr=(host, 443),
                                tls=True, provider=provider)
    request = HttpRequest(method="POST", target=target, authority=host, scheme="https", http_version="1.1",
                          headers=Headers([("content-type", "application/json"),
                                           ("authorization", "Bearer sk-proj-bench")]),
                          body=bytearray(json.dumps(body).encode()))
    exchange = HttpExchange(connection, request)
    exchange.timings.request_start = 1
    exchange.response = HttpResponse(status=200, reason="OK", http_version="1.1",
                                     headers=Headers([("content-type", content_type)]))
    return exchange


def run_events(make: MakeDecoder, new_exchange: Callable[[], HttpExchange], body: bytes, chunk: int,
               settings: DecoderSettings) -> int:
    exchange = new_exchange()
    decoder = make(exchange, settings, DecoderContext())  # a run of its own per measured exchange
    assert decoder is not None, "no decoder claimed the benchmark exchange"
    count = len(list(decoder.on_request(exchange)))
    chunks = exchange.timings.response_chunks
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        chunks.append((start + 2, len(piece)))
        count += len(list(decoder.on_response_data(exchange, piece)))
    exchange.timings.response_end = len(body) + 3
    return count + len(list(decoder.on_end(exchange)))


def run_framing(make: Callable[[], SseDecoder | EventStreamDecoder], body: bytes, chunk: int, parse: bool) -> int:
    decoder = make()
    count = 0
    for start in range(0, len(body), chunk):
        items = decoder.feed(body[start:start + chunk])
        if parse:
            for item in items:
                if isinstance(item, SseEvent) and item.data != "[DONE]":
                    json.loads(item.data)
                elif isinstance(item, EventStreamMessage):
                    json.loads(item.payload)
        count += len(items)
    return count + len(decoder.close())


# --- one ordinary exchange, end to end -------------------------------------------------------------------------

_API_KEY = "sk-proj-" + "Xq7vB2mN9kL4pR8sT1wY5zA3cD6fG0hJ" * 3


def _padded(template: dict[str, Any], path: tuple[Any, ...], size: int) -> bytes:
    """``template`` as compact JSON, the string at ``path`` padded with words so the body is ``size`` bytes."""
    node = template
    for key in path[:-1]:
        node = node[key]
    words = iter(("Please", "summarize", "the", "following", "meeting", "notes", "briefly", "and", "list",
                  "action", "items") * 50)
    while (missing := size - len(json.dumps(template, separators=(",", ":")))) > 0:
        word = next(words)
        node[path[-1]] += f" {word}" if missing > len(word) + 1 else "." * missing
    body = json.dumps(template, separators=(",", ":")).encode()
    assert len(body) == size, (len(body), size)
    return body


def chat_bodies() -> tuple[bytes, bytes]:
    """The request (320 bytes) and response (460 bytes) bodies of an ordinary chat completion."""
    request = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "Hi."}], "model": "gpt-4o-mini", "max_tokens": 256,
               "temperature": 0.2}
    response = {"id": "chatcmpl-BQw7Lq2Xk9sYtR4uV1wZ3aB5cD7eF", "object": "chat.completion", "created": 1745000000,
                "model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": "Sure.", "refusal": None, "annotations": []},
                    "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 61, "completion_tokens": 38, "total_tokens": 99},
                "service_tier": "default", "system_fingerprint": "fp_b376dfbbd5"}
    return (_padded(request, ("messages", 1, "content"), 320),
            _padded(response, ("choices", 0, "message", "content"), 460))


def chat_request_headers(length: int) -> list[tuple[str, str]]:
    """Headers of the openai Python SDK's chat request (without ``host``)."""
    return [("accept-encoding", "gzip, deflate"), ("connection", "keep-alive"), ("accept", "application/json"),
            ("content-type", "application/json"), ("user-agent", "OpenAI/Python 1.75.0"),
            ("x-stainless-lang", "python"), ("x-stainless-package-version", "1.75.0"), ("x-stainless-os", "Linux"),
            ("x-stainless-arch", "x64"), ("x-stainless-runtime", "CPython"),
            ("x-stainless-runtime-version", "3.12.3"), ("authorization", f"Bearer {_API_KEY}"),
            ("x-stainless-async", "false"), ("x-stainless-retry-count", "0"), ("x-stainless-read-timeout", "600"),
            ("content-length", str(length))]


def chat_response_headers(length: int) -> list[tuple[str, str]]:
    """Headers of an OpenAI chat completion response (without the status line)."""
    return [("date", "Tue, 22 Apr 2025 10:00:00 GMT"), ("content-type", "application/json"),
            ("content-length", str(length)), ("connection", "keep-alive"),
            ("access-control-expose-headers", "X-Request-ID"), ("openai-organization", "user-abc123def456"),
            ("openai-processing-ms", "412"), ("openai-version", "2020-10-01"),
            ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"), ("x-ratelimit-remaining-tokens", "29999975"),
            ("x-ratelimit-reset-requests", "6ms"), ("x-ratelimit-reset-tokens", "0s"),
            ("x-request-id", "req_4c1e2f3a5b6d7e8f9a0b1c2d3e4f5a6b"),
            ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
            ("cf-cache-status", "DYNAMIC"),
            ("set-cookie", "__cf_bm=Zx8yW7vU6tS5rQ4pO3nM2lK1jI0hG9fE8dC7bA6-1745000000-1.0.1.1-AbCdEfGhIjKlMnOpQrSt; "
                           "path=/; expires=Tue, 22-Apr-25 10:30:00 GMT; domain=.api.openai.com; HttpOnly; Secure; "
                           "SameSite=None"),
            ("x-content-type-options", "nosniff"), ("server", "cloudflare"), ("cf-ray", "9342a1b2c3d4e5f6-FRA"),
            ("alt-svc", 'h3=":443"; ma=86400')]


def chat_h1() -> tuple[bytes, bytes]:
    """The raw HTTP/1.1 request and response of one ordinary chat completion."""
    request_body, response_body = chat_bodies()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in chat_request_headers(len(request_body)))
    response = "HTTP/1.1 200 OK\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in chat_response_headers(len(response_body)))
    return (head + "\r\n").encode() + request_body, (response + "\r\n").encode() + response_body


def chat_h2(count: int) -> Iterator[tuple[bytes, bytes]]:
    """The client and server bytes of ``count`` chat completions on one HTTP/2 connection, one pair each (the
    first pair also carries the connection preface and settings)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    request_body, response_body = chat_bodies()
    request_headers = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "api.openai.com"),
                       (":scheme", "https"), *((k, v) for k, v in chat_request_headers(len(request_body))
                                               if k != "connection")]
    response_headers = [(":status", "200"), *((k, v) for k, v in chat_response_headers(len(response_body))
                                              if k != "connection")]
    for _ in range(count):
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, request_headers)
        client.send_data(stream, request_body, end_stream=True)
        client_out = client.data_to_send()  # with the acks and window updates of the previous response
        _acknowledge(server, server.receive_data(client_out))
        server.send_headers(stream, response_headers)
        server.send_data(stream, response_body, end_stream=True)
        server_out = server.data_to_send()
        _acknowledge(client, client.receive_data(server_out))
        yield client_out, server_out


def _acknowledge(connection: h2.connection.H2Connection, events: list[h2.events.Event]) -> None:
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)


def bench_connection(tls: bool = True) -> ConnectionInfo:
    """A connection as the proxy describes it, with the process, user and app :class:`~oisp.attribution.Attributor`
    finds for an SDK script started from a shell in an IDE terminal."""
    venv = "/home/dev/projects/acme-assistant/.venv"
    args = [f"{venv}/bin/python", "-m", "acme_assistant.cli", "summarize", "--model", "gpt-4o-mini",
            "--input", "/home/dev/projects/acme-assistant/data/meeting-notes-2025-04-22.md", "--max-tokens", "256",
            "--output", "/home/dev/projects/acme-assistant/out/summary.md"]
    ancestors = [
        ParentProcess(pid=41200, exe="/usr/bin/bash", name="bash", cmdline="/bin/bash --init-file "
                      "/usr/share/code/resources/app/out/vs/workbench/contrib/terminal/common/scripts/"
                      "shellIntegration-bash.sh"),
        ParentProcess(pid=41100, exe="/usr/share/code/code", name="code"),
        ParentProcess(pid=40000, exe="/usr/lib/systemd/systemd", name="systemd"),
    ]
    process = ProcessInfo(pid=41234, ppid=41200, exe="/usr/bin/python3.12", name="python", cmdline=" ".join(args),
                          cmdline_args=args, cwd="/home/dev/projects/acme-assistant",
                          start_time="2025-04-22T09:59:58.123456Z", parent=ancestors[0], ancestors=ancestors)
    return ConnectionInfo(connection_id="c-bench", client_addr=("127.0.0.1", 51234),
                          server_addr=("api.openai.com", 443), sni="api.openai.com", tls=tls, tls_version="TLSv1.3",
                          process=process, actor=Actor(uid=1000, gid=1000, user="dev", is_elevated=False),
                          app=App(app_id="vscode", name="Visual Studio Code", vendor="Microsoft",
                                  category="dev_tools", type="native", is_ai_host=True, tier="identified",
                                  is_ai_app=True), provider="openai")


def exchange_traffic(alpn: str, count: int) -> list[tuple[bytes, bytes]]:
    """(client bytes, server bytes) of each of ``count`` ordinary exchanges on one connection."""
    if alpn == "h2":
        return list(chat_h2(count))
    return [chat_h1()] * count


_HOST = Host(hostname="bench-host", os="linux", os_version="Ubuntu 24.04.2 LTS", arch="x86_64",
             kernel_version="6.8.0-58-generic")


def run_exchanges(alpn: str, traffic: list[tuple[bytes, bytes]], stage: str, directory: Path) -> float:
    """CPU seconds to decode ``traffic`` up to ``stage`` (``http``, ``events``, ``process``, ``jsonl``)."""
    connection = bench_connection()
    events: list[Event] = []
    pipeline = Pipeline({}, host=_HOST)
    sink = JsonlSink(directory / f"{alpn}-{stage}.jsonl", compress=False)
    observer = EventDecoder(create_plugin_manager(entrypoints=False), events.append)
    listener = NullListener() if stage == "http" else observer.exchange_listener(connection)
    decoder = make_decoder(alpn, connection, listener)
    process = pipeline.process
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        for client, server in traffic:
            decoder.feed_client(client)
            decoder.feed_server(server)
            if stage == "events":
                events.clear()
            elif len(events) >= 128:
                processed = [process(event) for event in events]
                events.clear()
                if stage == "jsonl":
                    sink.write(processed)
        processed = [process(event) for event in events]
        if stage == "jsonl":
            sink.write(processed)
        elapsed = time.process_time() - start
    finally:
        gc.enable()
        sink.close()
    assert decoder.error is None, decoder.error
    return elapsed


def run_pipeline(alpn: str, traffic: list[tuple[bytes, bytes]], directory: Path) -> float:
    """CPU seconds (all threads) to decode ``traffic`` through a running pipeline into a JSONL file."""
    sink = JsonlSink(directory / f"{alpn}-pipeline.jsonl", compress=False)

    async def work() -> float:
        start = time.process_time()
        # configured as in the decoder process (the sink's thread may be waited for briefly)
        async with Pipeline({"jsonl": sink}, host=_HOST, queue_size=4 * len(traffic) + 16,
                            sink_handoff_wait=SINK_HANDOFF_WAIT) as pipeline:
            observer = EventDecoder(create_plugin_manager(entrypoints=False), pipeline.emit)
            connection = bench_connection()
            decoder = make_decoder(alpn, connection, observer.exchange_listener(connection))
            for client, server in traffic:
                decoder.feed_client(client)
                decoder.feed_server(server)
                await anyio.sleep(0)
        assert pipeline.stats.sinks["jsonl"].delivered == 2 * len(traffic), pipeline.summary()
        return time.process_time() - start

    return anyio.run(work)


def exchange_table(count: int, repeat: int) -> None:
    """Print the µs per ordinary exchange of each stage, for HTTP/1.1 and HTTP/2."""
    request, response = chat_h1()
    print(f"\none ordinary chat completion ({len(request)}-byte request, {len(response)}-byte response over "
          f"HTTP/1.1), {count} per connection, best of {repeat}; CPU µs per exchange")
    print(f"{'protocol':10} {'http':>8} {'+events':>8} {'+process':>9} {'+jsonl':>8} {'pipeline':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for alpn in ("http/1.1", "h2"):
            line = f"{alpn:10}"
            for stage, width in (("http", 8), ("events", 8), ("process", 9), ("jsonl", 8)):
                best = min(run_exchanges(alpn, exchange_traffic(alpn, count), stage, directory)
                           for _ in range(repeat))
                line += f" {best / count * 1e6:{width}.0f}"
            best = min(run_pipeline(alpn, exchange_traffic(alpn, count), directory) for _ in range(repeat))
            print(f"{line} {best / count * 1e6:9.0f}")


def bench_report(connection_id: str, alpn: str) -> Any:
    """The :class:`~oisp.proxy.report.ConnectionReport` the proxy sends for an intercepted connection to
    api.openai.com (the process, user and app of :func:`bench_connection`, the upstream's certificate)."""
    from oisp.proxy.report import ConnectionReport, Decision, UpstreamCertificate

    info = bench_connection()
    certificate = UpstreamCertificate(
        subject="CN=api.openai.com", issuer="CN=WE1,O=Google Trust Services,C=US",
        fingerprint_sha256="9c" * 32, not_before="2025-03-01T00:00:00Z", not_after="2025-05-30T00:00:00Z",
        san=("api.openai.com",))
    return ConnectionReport(
        connection_id=connection_id, mode="explicit", client_addr=("127.0.0.1", 51234), target_host="api.openai.com",
        target_port=443, decision=Decision.INTERCEPTED, success=True, upstream_addr=("162.159.140.245", 443),
        sni="api.openai.com", alpn=alpn, tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384",
        upstream_certificate=certificate, connect_ms=1.2, provider="openai", process=info.process, actor=info.actor,
        app=info.app, pid_source="sock_diag", preconnected=True)


def run_connections(alpn: str, count: int, exchanges: int, directory: Path) -> float:
    """CPU seconds for ``count`` new connections of ``exchanges`` ordinary exchanges each, as the decoder process
    takes them: the pickled (ConnectionInfo, ALPN, body cap) of the OPEN frame, the passive decoder and listener
    set up, the exchanges, the end, and the pickled report made into a ``network.connect`` event; every event
    processed and written to a JSONL file (as :func:`run_exchanges` does)."""
    from oisp.decoder_process.wire import dump_object, load_object
    from oisp.proxy.relay import CopyDispatcher

    pipeline = Pipeline({}, host=_HOST)
    sink = JsonlSink(directory / f"{alpn}-connections.jsonl", compress=False)
    events: list[Event] = []
    observer = EventDecoder(create_plugin_manager(entrypoints=False), events.append)
    opens, reports = [], []
    for number in range(count):
        info = attrs.evolve(bench_connection(), connection_id=f"c-bench.{number}", client_addr=("127.0.0.1", number))
        opens.append(dump_object((info, alpn, 16 * 1024 * 1024)))
        reports.append(dump_object(bench_report(info.connection_id, alpn)))
    traffic = exchange_traffic(alpn, exchanges)  # h2: the first pair carries the preface and settings
    process = pipeline.process
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        for number in range(count):
            info, protocol, body_cap = load_object(opens[number])
            decoder = make_decoder(protocol, info, observer.exchange_listener(info), body_cap=body_cap)
            dispatcher = CopyDispatcher(decoder, info.connection_id)
            for client, server in traffic:
                dispatcher.dispatch("client", client, 0)
                dispatcher.dispatch("server", server, 0)
            dispatcher.dispatch("client", None, 0)
            dispatcher.dispatch("server", None, 0)
            dispatcher.close(None)
            observer.connection(load_object(reports[number]))
            if len(events) >= 128:
                sink.write([process(event) for event in events])
                events.clear()
        sink.write([process(event) for event in events])
        elapsed = time.process_time() - start
    finally:
        gc.enable()
        sink.close()
    return elapsed


def connection_table(count: int, repeat: int) -> None:
    """Print the CPU µs a new connection costs the decoder process beyond its exchanges, for HTTP/1.1 and HTTP/2."""
    print(f"\na new connection in the decoder process ({count} connections, best of {repeat}): CPU µs per connection "
          "with one exchange, with none (set-up, end and network.connect only), and the exchange's share")
    print(f"{'protocol':10} {'1 exchange':>11} {'0 exchanges':>12} {'difference':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for alpn in ("http/1.1", "h2"):
            one = min(run_connections(alpn, count, 1, directory) for _ in range(repeat)) / count * 1e6
            none = min(run_connections(alpn, count, 0, directory) for _ in range(repeat)) / count * 1e6
            print(f"{alpn:10} {one:11.0f} {none:12.0f} {one - none:11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="size of each stream in MB (default 20)")
    parser.add_argument("--chunk", type=int, default=16384, help="bytes per fed chunk (default 16384)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    parser.add_argument("--chunks", action="store_true", help="also measure with ai.streaming_chunk events on")
    parser.add_argument("--exchanges", type=int, default=2000,
                        help="ordinary exchanges per connection in the per-exchange table (default 2000)")
    parser.add_argument("--no-streams", action="store_true", help="only the per-exchange and per-connection tables")
    parser.add_argument("--connections", type=int, default=500,
                        help="new connections in the per-connection table (default 500; 0: no such table)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="afterwards, the same tables for another checkout's src/ (old code, same run)")
    args = parser.parse_args()
    if args.baseline is not None:
        import os
        import subprocess

        argv, rest = [], iter(sys.argv[1:])
        for arg in rest:
            if arg == "--baseline":
                next(rest, None)  # and its value
            elif not arg.startswith("--baseline="):
                argv.append(arg)
        print(f"this tree ({Path(__file__).resolve().parent.parent})", flush=True)
        subprocess.run([sys.executable, __file__, *argv], check=True)
        print(f"\nbaseline ({args.baseline})", flush=True)
        subprocess.run([sys.executable, __file__, *argv], check=True,
                       env={**os.environ, "PYTHONPATH": str(args.baseline.resolve() / "src")})
        return
    if args.no_streams:
        exchange_table(args.exchanges, args.repeat)
        if args.connections:
            connection_table(args.connections, args.repeat)
        return
    size = int(args.mb * 1_000_000)

    sse_type = "text/event-stream; charset=utf-8"
    chat = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Write a long story."}]}
    streams: list[tuple[str, bytes, Callable[[], SseDecoder | EventStreamDecoder], MakeDecoder,
                        Callable[[], HttpExchange]]] = [
        ("openai chat text (SSE)", openai_sse(size), SseDecoder, openai.oisp_exchange_decoder,
         lambda: _exchange("openai", "api.openai.com", "/v1/chat/completions", chat, sse_type)),
        ("openai chat tool calls (SSE)", openai_tool_sse(size), SseDecoder, openai.oisp_exchange_decoder,
         lambda: _exchange("openai", "api.openai.com", "/v1/chat/completions", chat, sse_type)),
        ("openai responses (SSE)", responses_sse(size), SseDecoder, openai.oisp_exchange_decoder,
         lambda: _exchange("openai", "api.openai.com", "/v1/responses",
                           {"model": "gpt-4.1", "stream": True, "input": "Write a long story."}, sse_type)),
    ]
    if bedrock is not None:
        streams.append((
            "bedrock converse-stream (eventstream)", converse_stream(size), EventStreamDecoder,
            bedrock.oisp_exchange_decoder,
            lambda: _exchange("aws_bedrock", "bedrock-runtime.us-east-1.amazonaws.com",
                              "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream",
                              {"messages": [{"role": "user", "content": [{"text": "Write a long story."}]}]},
                              "application/vnd.amazon.eventstream")))
    else:
        print("oisp.providers.bedrock is not available: eventstream decoding is not measured")

    print(f"{args.mb:g} MB per stream, fed in {args.chunk}-byte chunks, best of {args.repeat}; MB/s of body")
    header = f"{'stream':40} {'framing':>9} {'+json':>9} {'events':>9} {'events/framing':>15}"
    if args.chunks:
        header += f" {'+chunk events':>14}"
    print(header)
    for name, body, framing, make, new_exchange in streams:
        mb = len(body) / 1_000_000
        plain = DecoderSettings()
        t_framing = best_of(args.repeat, lambda f=framing, b=body: run_framing(f, b, args.chunk, False))
        t_json = best_of(args.repeat, lambda f=framing, b=body: run_framing(f, b, args.chunk, True))
        t_events = best_of(args.repeat, lambda m=make, n=new_exchange, b=body, s=plain: run_events(
            m, n, b, args.chunk, s))
        line = (f"{name:40} {mb / t_framing:9.1f} {mb / t_json:9.1f} {mb / t_events:9.1f} "
                f"{t_framing / t_events:14.0%}")
        if args.chunks:
            on = DecoderSettings(streaming_chunks=True)
            t_chunks = best_of(args.repeat, lambda m=make, n=new_exchange, b=body, s=on: run_events(
                m, n, b, args.chunk, s))
            line += f" {mb / t_chunks:14.1f}"
        print(line)
    exchange_table(args.exchanges, args.repeat)
    if args.connections:
        connection_table(args.connections, args.repeat)


if __name__ == "__main__":
    main()
