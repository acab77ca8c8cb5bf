"""Big bodies through the real proxy, with real TLS clients and upstream: byte for byte both ways (content-length
and chunked, HTTP/1.1 and HTTP/2), the stored bodies cut at the cap and marked so, and the bytes past the cap
never copied to the decoder."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from tests.proxy.clients import h2_exchange, read_all, served, tls_tunnel
from tests.stack import running_stack
from tests.upstream import Request, Response

CAP = 512 * 1024
SIZE = 4 * 1024 * 1024
_LETTERS = bytes.maketrans(bytes(range(256)), bytes(b"abcdefghijklmnop "[i % 17] for i in range(256)))


def _json_body(size: int, seed: int) -> bytes:
    """A chat request of about ``size`` bytes (a long prompt of random letters)."""
    text = random.Random(seed).randbytes(size).translate(_LETTERS).decode()
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}).encode()


ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * SIZE},
                                  "finish_reason": "stop"}]}).encode()


async def _big_answers(request: Request) -> Response:
    if request.target.endswith("chunked"):
        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(ANSWER), 100_000):
                yield ANSWER[at:at + 100_000]
        return Response(body=chunks)
    return Response(body=ANSWER)


def _chunked(body: bytes, size: int) -> bytes:
    return b"".join(f"{len(body[at:at + size]):x}\r\n".encode() + body[at:at + size] + b"\r\n"
                    for at in range(0, len(body), size)) + b"0\r\n\r\n"


def test_big_http1_bodies_go_through_byte_for_byte_and_are_stored_up_to_the_cap(
        tmp_path: Path, test_ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    upload = _json_body(SIZE, 1)
    requests = [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(upload) + upload,
        b"POST /v1/chat/completions?chunked HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n" + _chunked(upload, 70_000),
    ]
    with caplog.at_level(logging.DEBUG, logger="oisp.proxy.body_skip"), \
            running_stack(tmp_path, test_ca, handler=_big_answers, config={"body_cap": CAP}) as stack:
        sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["http/1.1"])
        with sock:
            for request in requests:  # pipelined, the second one chunked both ways
                sock.sendall(request)
            received = read_all(sock)
        recording = served(stack.upstream)[-1]
        assert bytes(recording.received) == b"".join(requests)
        assert received == bytes(recording.sent) and len(received) > 2 * SIZE
        assert [r.body for r in recording.requests] == [upload, upload]
        events = stack.wait_for(lambda es: len([e for e in es if e.event_type == "ai.response"]) == 2, timeout=30)
    for event in (e for e in events if e.event_type in ("ai.request", "ai.response")):
        assert event.confidence.completeness == "partial"
        side = "request" if event.event_type == "ai.request" else "response"
        assert f"{side} body truncated at cap" in " ".join(event.confidence.limitations or [])
    skipped = [int(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records if "not copied" in r.getMessage()]
    assert skipped and skipped[0] > 0.99 * 4 * (SIZE - CAP)  # both directions of both exchanges, past the cap


def test_big_http2_bodies_go_through_byte_for_byte(tmp_path: Path, test_ca: trustme.CA) -> None:
    upload = _json_body(16_000, 2)  # the test client sends one DATA frame and never waits for window updates
    with running_stack(tmp_path, test_ca, handler=_big_answers, config={"body_cap": 8 * 1024}) as stack:
        sock = tls_tunnel(stack.proxy_address, "api.openai.com", stack.client_context(), ["h2"])
        with sock:
            sent, received, bodies = h2_exchange(sock, "api.openai.com", [("/v1/chat/completions", upload)])
        recording = served(stack.upstream)[-1]
        assert recording.alpn == "h2"
        assert bytes(recording.received) == sent and received == bytes(recording.sent)
        assert bodies[1] == ANSWER and recording.requests[0].body == upload
        events = stack.wait_for(lambda es: any(e.event_type == "ai.response" for e in es), timeout=30)
    for event in (e for e in events if e.event_type in ("ai.request", "ai.response")):
        side = "request" if event.event_type == "ai.request" else "response"
        assert f"{side} body truncated at cap" in " ".join(event.confidence.limitations or [])
