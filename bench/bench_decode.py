"""Throughput of provider decoding: streamed response bodies into OISP events, next to the raw framing cost.

Run: ``.venv/bin/python bench/bench_decode.py [--mb 20] [--chunk 16384] [--repeat 3]``

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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_framing import _token, bedrock_eventstream, best_of, openai_sse

from oisp.framing import EventStreamDecoder, EventStreamMessage, SseDecoder, SseEvent, encode_message
from oisp.hookspecs import DecoderSettings, ExchangeDecoder
from oisp.http.exchange import ConnectionInfo, Headers, HttpExchange, HttpRequest, HttpResponse
from oisp.providers import openai

try:
    from oisp.providers import bedrock
except ImportError:  # the Bedrock provider is optional for this benchmark
    bedrock = None  # type: ignore[assignment]

MakeDecoder = Callable[[HttpExchange, DecoderSettings], ExchangeDecoder | None]


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
    decoder = make(exchange, settings)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="size of each stream in MB (default 20)")
    parser.add_argument("--chunk", type=int, default=16384, help="bytes per fed chunk (default 16384)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    parser.add_argument("--chunks", action="store_true", help="also measure with ai.streaming_chunk events on")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
