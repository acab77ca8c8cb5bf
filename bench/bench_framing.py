"""Throughput of the oisp.framing decoders on large realistic streams, next to a naive whole-buffer baseline.

Run: ``.venv/bin/python bench/bench_framing.py [--mb 20] [--chunk 16384] [--repeat 3]``

Each decoder is fed the stream in fixed-size chunks (as a proxy sees a response body) and closed; the baseline
gets the whole body at once and splits it the simplest way (``bytes.split`` plus ``json.loads`` per line, one
``json.loads`` of the array, an unchecked-header eventstream loop, a gRPC prefix walk). The decoders parse JSON
wherever their baseline does (NDJSON lines, array elements) and nowhere else (SSE, eventstream and gRPC payloads
stay text/bytes). The best of ``--repeat`` runs is printed, in MB/s of input (MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

from oisp.framing import (
    EventStreamDecoder,
    GrpcFrameDecoder,
    JsonArrayDecoder,
    NdjsonDecoder,
    SseDecoder,
    StreamDecoder,
    encode_message,
)

_TOKENS = [
    "Hello",
    " world",
    ",",
    " this",
    " is",
    " a",
    " streamed",
    " r\u00e9ponse",
    " \u4e16\u754c",
    " \U0001f680",
    ".",
]


def _token(i: int) -> str:
    return _TOKENS[i % len(_TOKENS)]


def openai_sse(size: int) -> bytes:
    """Chat-completion chunks as OpenAI streams them, with an OpenRouter-style keep-alive comment now and then."""
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        chunk = {
            "id": "chatcmpl-9xYzAbCdEfGhIjKlMnOpQrStUvWx",
            "object": "chat.completion.chunk",
            "created": 1718000000 + i // 50,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_abc123",
            "choices": [{"index": 0, "delta": {"content": _token(i)}, "logprobs": None, "finish_reason": None}],
        }
        event = b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        if i % 100 == 0:
            event = b": OPENROUTER PROCESSING\n\n" + event
        parts.append(event)
        total += len(event)
        i += 1
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def ollama_ndjson(size: int) -> bytes:
    """Ollama ``/api/chat`` stream lines."""
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        line = {
            "model": "llama3.1:8b",
            "created_at": "2024-07-25T10:00:00.123456Z",
            "message": {"role": "assistant", "content": _token(i)},
            "done": False,
        }
        encoded = json.dumps(line, ensure_ascii=False).encode() + b"\n"
        parts.append(encoded)
        total += len(encoded)
        i += 1
    return b"".join(parts)


def gemini_array(size: int) -> bytes:
    """Gemini ``streamGenerateContent`` (no ``alt=sse``): one array, elements separated by ``\\n,\\r\\n``."""
    parts: list[bytes] = [b"["]
    total = i = 0
    while total < size:
        element = {
            "candidates": [
                {
                    "content": {"parts": [{"text": " ".join(_token(i + k) for k in range(12))}], "role": "model"},
                    "index": 0,
                    "safetyRatings": [
                        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
                    ],
                }
            ],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": i, "totalTokenCount": 9 + i},
            "modelVersion": "gemini-1.5-flash-002",
        }
        encoded = (b"\n,\r\n" if i else b"") + json.dumps(element, indent=2, ensure_ascii=False).encode()
        parts.append(encoded)
        total += len(encoded)
        i += 1
    parts.append(b"\n]")
    return b"".join(parts)


def bedrock_eventstream(size: int) -> bytes:
    """Bedrock ``ConverseStream`` ``contentBlockDelta`` messages."""
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        body = {"contentBlockIndex": 0, "delta": {"text": _token(i)}, "p": "abcdefghijklmnopqrstuvwxyz0123"}
        message = encode_message(
            {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"},
            json.dumps(body, ensure_ascii=False).encode(),
        )
        parts.append(message)
        total += len(message)
        i += 1
    return b"".join(parts)


def grpc_stream(size: int) -> bytes:
    """gRPC messages of a streamed chat answer (protobuf-sized: a token and a few small fields each)."""
    parts: list[bytes] = []
    total = i = 0
    while total < size:
        payload = b"\x0a" + bytes([len(_token(i).encode())]) + _token(i).encode() + b"\x10\x01\x1a\x08abcdefgh"
        message = struct.pack(">BI", 0, len(payload)) + payload
        parts.append(message)
        total += len(message)
        i += 1
    return b"".join(parts)


def naive_grpc(body: bytes) -> list[bytes]:
    """Walk the 5-byte prefixes of a whole buffer and slice out the messages."""
    messages = []
    pos = 0
    while pos < len(body):
        _, length = struct.unpack_from(">BI", body, pos)
        messages.append(body[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return messages


def naive_sse(body: bytes) -> list[str]:
    """Split on blank lines and keep ``data:`` lines: LF-only, no CR, no multi-line care."""
    events = []
    for block in body.decode("utf-8", "replace").split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append("\n".join(data))
    return events


def naive_ndjson(body: bytes) -> list[Any]:
    # Decoding first is faster than json.loads(bytes), which sniffs the encoding and decodes with surrogatepass.
    return [json.loads(line.decode()) for line in body.split(b"\n") if line.strip()]


def naive_json_array(body: bytes) -> list[Any]:
    value = json.loads(body)
    assert isinstance(value, list)
    return value


def naive_eventstream(body: bytes) -> list[bytes]:
    """Walk the messages of a whole buffer, check both CRCs, and take the payloads; headers are not decoded."""
    payloads = []
    pos = 0
    view = memoryview(body)
    while pos < len(body):
        total, headers_length, prelude_crc = struct.unpack_from(">III", body, pos)
        if zlib.crc32(view[pos : pos + 8]) != prelude_crc:
            raise ValueError("prelude CRC")
        if zlib.crc32(view[pos : pos + total - 4]) != struct.unpack_from(">I", body, pos + total - 4)[0]:
            raise ValueError("message CRC")
        payloads.append(body[pos + 12 + headers_length : pos + total - 4])
        pos += total
    return payloads


def run_decoder(make: Callable[[], StreamDecoder[Any]], body: bytes, chunk: int) -> int:
    decoder = make()
    count = 0
    for start in range(0, len(body), chunk):
        count += len(decoder.feed(body[start : start + chunk]))
    return count + len(decoder.close())


def best_of(repeat: int, work: Callable[[], object]) -> float:
    """The shortest of ``repeat`` runs, with the cyclic GC off (as timeit does): the baselines keep every item
    alive at once, and GC passes over them would be charged to the baseline, not to the splitting."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="size of each stream in MB (default 20)")
    parser.add_argument(
        "--chunk", type=int, action="append", help="feed size in bytes; repeat for several (default 16384 and 1024)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (default 3)")
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    chunks: list[int] = args.chunk or [16384, 1024]

    cases: list[tuple[str, bytes, Callable[[], StreamDecoder[Any]], Callable[[bytes], list[Any]]]] = [
        ("SSE (OpenAI chunks)", openai_sse(size), SseDecoder, naive_sse),
        ("NDJSON (Ollama)", ollama_ndjson(size), NdjsonDecoder, naive_ndjson),
        ("JSON array (Gemini)", gemini_array(size), JsonArrayDecoder, naive_json_array),
        ("eventstream (Bedrock)", bedrock_eventstream(size), EventStreamDecoder, naive_eventstream),
        ("gRPC envelopes", grpc_stream(size), GrpcFrameDecoder, naive_grpc),
    ]
    header = f"{'framing':<24}{'MB':>7}{'items':>10}{'chunk':>8}{'decoder MB/s':>14}{'baseline MB/s':>15}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, body, make, baseline in cases:
        items = len(baseline(body))
        base_rate = len(body) / 1e6 / best_of(args.repeat, partial(baseline, body))
        for chunk in chunks:
            decoded = run_decoder(make, body, chunk)
            if decoded != items:
                raise SystemExit(f"{name}: decoder gave {decoded} items, baseline {items}")
            rate = len(body) / 1e6 / best_of(args.repeat, partial(run_decoder, make, body, chunk))
            print(
                f"{name:<24}{len(body) / 1e6:>7.1f}{items:>10}{chunk:>8}{rate:>14.1f}{base_rate:>15.1f}"
                f"{rate / base_rate:>7.2f}"
            )


if __name__ == "__main__":
    main()
