"""A local HTTPS server that answers like the OpenAI and Anthropic APIs (chat completions and messages,
streaming and not, with tool calls), for the demo and for tests. It never talks to the internet.

The conversation is scripted: a first request gets a tool call for ``get_weather``; once the client sends the
tool's result back, the answer is text.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import h11
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

__all__ = ["DemoProvider"]

logger = logging.getLogger(__name__)

OPENAI_MODEL = "gpt-4o-mini-2024-07-18"
ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
ANSWER = "It is 11°C and cloudy in Paris."
TOOL_ARGUMENTS = {"city": "Paris", "unit": "celsius"}


def _has_tool_result_openai(body: dict[str, Any]) -> bool:
    return any(m.get("role") == "tool" for m in body.get("messages", []) if isinstance(m, dict))


def _has_tool_result_anthropic(body: dict[str, Any]) -> bool:
    for message in body.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result"
                                             for b in content):
            return True
    return False


def _sse(data: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class DemoProvider:
    """Serves OpenAI ``/v1/chat/completions`` and Anthropic ``/v1/messages`` over TLS (HTTP/1.1)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.requests = 0
        self._counter = 0

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port; reports it through ``task_status``."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(int(listener.extra(SocketAttribute.local_port)))
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        from anyio.streams.tls import TLSStream

        try:
            tls = await TLSStream.wrap(stream, server_side=True, ssl_context=self.context,
                                       standard_compatible=False)
        except (ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await stream.aclose()
            return
        conn = h11.Connection(h11.SERVER)
        try:
            async with tls:
                while await self._one_request(tls, conn):
                    conn.start_next_cycle()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                h11.RemoteProtocolError, ssl.SSLError):
            pass

    async def _one_request(self, tls: Any, conn: h11.Connection) -> bool:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await tls.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        assert request is not None
        self.requests += 1
        self._counter += 1
        path = request.target.decode().split("?")[0]
        try:
            payload = json.loads(body) if body else {}
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            await self._send(tls, conn, 400, "application/json",
                             [json.dumps({"error": {"message": "invalid JSON body", "type": "invalid_request_error"}}
                                         ).encode()])
        elif path.endswith("/chat/completions"):
            if payload.get("stream"):
                await self._send(tls, conn, 200, "text/event-stream", self._openai_stream(payload))
            else:
                await self._send(tls, conn, 200, "application/json", [self._openai(payload)])
        elif path.endswith("/messages"):
            if payload.get("stream"):
                await self._send(tls, conn, 200, "text/event-stream", self._anthropic_stream(payload))
            else:
                await self._send(tls, conn, 200, "application/json", [self._anthropic(payload)])
        else:
            await self._send(tls, conn, 404, "application/json",
                             [json.dumps({"error": {"message": f"no route for {path}", "type": "not_found"}}).encode()])
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _send(self, tls: Any, conn: h11.Connection, status: int, content_type: str,
                    chunks: Iterator[bytes] | list[bytes]) -> None:
        headers = [("content-type", content_type), ("x-request-id", f"req_demo_{self._counter}"),
                   ("request-id", f"req_demo_{self._counter}"), ("openai-processing-ms", "12")]
        if isinstance(chunks, list):
            headers.append(("content-length", str(sum(len(c) for c in chunks))))
        else:
            headers.append(("cache-control", "no-cache"))
        await tls.send(conn.send(h11.Response(status_code=status, headers=headers)))
        async for chunk in _aiter(chunks):
            await tls.send(conn.send(h11.Data(data=chunk)))
        await tls.send(conn.send(h11.EndOfMessage()))

    # OpenAI ---------------------------------------------------------------------------------------
    def _openai(self, body: dict[str, Any]) -> bytes:
        created = int(time.time())
        if _has_tool_result_openai(body):
            message: dict[str, Any] = {"role": "assistant", "content": ANSWER, "refusal": None}
            finish = "stop"
        else:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": "call_demo_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps(TOOL_ARGUMENTS)}}]}
            finish = "tool_calls"
        return json.dumps({
            "id": f"chatcmpl-demo{self._counter}", "object": "chat.completion", "created": created,
            "model": OPENAI_MODEL, "system_fingerprint": "fp_demo",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99,
                      "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        }).encode()

    def _openai_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        base = {"id": f"chatcmpl-demo{self._counter}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": OPENAI_MODEL, "system_fingerprint": "fp_demo"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": "", "refusal": None})
        if _has_tool_result_openai(body):
            for piece in ("It is 11", "°C and cloudy", " in Paris."):
                yield chunk({"content": piece})
            yield chunk({}, "stop")
        else:
            arguments = json.dumps(TOOL_ARGUMENTS)
            yield chunk({"tool_calls": [{"index": 0, "id": "call_demo_1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]})
            for start in range(0, len(arguments), 7):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[start:start + 7]}}]})
            yield chunk({}, "tool_calls")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse({**base, "choices": [], "usage": {"prompt_tokens": 82, "completion_tokens": 17,
                                                         "total_tokens": 99}})
        yield b"data: [DONE]\n\n"

    # Anthropic ------------------------------------------------------------------------------------
    def _anthropic(self, body: dict[str, Any]) -> bytes:
        if _has_tool_result_anthropic(body):
            content: list[dict[str, Any]] = [{"type": "text", "text": ANSWER}]
            stop = "end_turn"
        else:
            content = [{"type": "text", "text": "Let me check the weather."},
                       {"type": "tool_use", "id": "toolu_demo_1", "name": "get_weather", "input": TOOL_ARGUMENTS}]
            stop = "tool_use"
        return json.dumps({
            "id": f"msg_demo{self._counter}", "type": "message", "role": "assistant", "model": ANTHROPIC_MODEL,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 95, "output_tokens": 24, "cache_read_input_tokens": 40,
                      "cache_creation_input_tokens": 12},
        }).encode()

    def _anthropic_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        message: dict[str, Any] = {"id": f"msg_demo{self._counter}", "type": "message", "role": "assistant",
                   "model": ANTHROPIC_MODEL, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 95, "output_tokens": 1, "cache_read_input_tokens": 40,
                             "cache_creation_input_tokens": 12}}
        yield _sse({"type": "message_start", "message": message}, "message_start")
        yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")
        yield _sse({"type": "ping"}, "ping")
        final = _has_tool_result_anthropic(body)
        text = ANSWER if final else "Let me check the weather."
        for start in range(0, len(text), 9):
            yield _sse({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text[start:start + 9]}}, "content_block_delta")
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        if not final:
            yield _sse({"type": "content_block_start", "index": 1,
                        "content_block": {"type": "tool_use", "id": "toolu_demo_1", "name": "get_weather",
                                          "input": {}}}, "content_block_start")
            arguments = json.dumps(TOOL_ARGUMENTS)
            for start in range(0, len(arguments), 6):
                yield _sse({"type": "content_block_delta", "index": 1,
                            "delta": {"type": "input_json_delta", "partial_json": arguments[start:start + 6]}},
                           "content_block_delta")
            yield _sse({"type": "content_block_stop", "index": 1}, "content_block_stop")
        yield _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn" if final else "tool_use",
                                                       "stop_sequence": None},
                    "usage": {"output_tokens": 24}}, "message_delta")
        yield _sse({"type": "message_stop"}, "message_stop")


async def _aiter(chunks: Iterator[bytes] | list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await anyio.lowlevel.checkpoint()
