"""An AI-provider-like HTTPS server for the end-to-end transparent tests, run inside the upstream namespace.

usage: _ai_upstream.py CERTFILE KEYFILE    (listens on [::]:443, prints ``ready``)

Routes: POST /v1/chat/completions (OpenAI-like answer), POST /v1/messages (Anthropic-like answer),
GET /bulk/N (N bytes of a fixed pattern), anything else: a small JSON body.
"""

from __future__ import annotations

import json
import ssl
import sys

import anyio
from tests.upstream import Request, Response, Upstream

PATTERN = bytes(range(256)) * 4096  # 1 MiB


async def handler(request: Request) -> Response:
    if request.target.startswith("/bulk/"):
        size = int(request.target.rsplit("/", 1)[1])

        async def body():  # type: ignore[no-untyped-def]
            remaining = size
            while remaining:
                chunk = PATTERN[: min(remaining, len(PATTERN))]
                remaining -= len(chunk)
                yield chunk
        return Response(headers=[("content-type", "application/octet-stream"), ("content-length", str(size))],
                        body=body)
    if request.target.startswith("/v1/chat/completions"):
        answer = {"id": "chatcmpl-e2e", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from upstream"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
        return Response(headers=[("content-type", "application/json"), ("x-request-id", "req_e2e")],
                        body=json.dumps(answer).encode())
    if request.target.startswith("/v1/messages"):
        answer = {"id": "msg_e2e", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                  "content": [{"type": "text", "text": "Hello over IPv6"}], "stop_reason": "end_turn",
                  "usage": {"input_tokens": 7, "output_tokens": 4}}
        return Response(body=json.dumps(answer).encode())
    return Response(body=b'{"ok": true}')


async def main() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    context.set_alpn_protocols(["h2", "http/1.1"])
    server = Upstream(context, handler)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, None, 443)  # every address, IPv4 and IPv6
        print("ready", flush=True)


anyio.run(main)
