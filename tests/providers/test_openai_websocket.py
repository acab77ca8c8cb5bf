"""End to end over WebSocket: the real ``openai`` SDK's realtime client, and a raw WebSocket client through a
CONNECT tunnel, through the proxy to a stand-in server on the test upstream; the relay is compared byte for
byte both ways and the events are checked and validated."""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from tests.oisp_schema import SchemaValidator
from tests.providers.fixtures.openai.replay import load
from tests.stack import Stack, running_stack
from tests.upstream import Request, WsPeer

pytest.importorskip("openai")
pytest.importorskip("websockets")

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.uri import parse_uri

API_KEY = "sk-proj-" + "ws" * 24
AUDIO = bytes(range(256)) * 75  # 19,200 bytes: 400 ms of 24 kHz pcm16
ANSWER = "It is sunny in Paris today, " * 40  # long enough to span many frames


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca) as running:
        yield running


def _usage(audio_in: int, text_in: int, audio_out: int, text_out: int) -> dict[str, Any]:
    return {"total_tokens": audio_in + text_in + audio_out + text_out, "input_tokens": audio_in + text_in,
            "output_tokens": audio_out + text_out,
            "input_token_details": {"cached_tokens": 0, "text_tokens": text_in, "audio_tokens": audio_in},
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}


async def realtime_server(request: Request, ws: WsPeer) -> None:
    """Answers like the Realtime API (GA event names): a tool call first, then a spoken answer."""
    await ws.send_json({"type": "session.created", "event_id": "ev_1",
                        "session": {"type": "realtime", "id": "sess_1", "model": "gpt-realtime",
                                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                              "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}})
    responses = 0
    while (message := await ws.recv()) is not None:
        event = json.loads(message)
        kind = event["type"]
        if kind == "session.update":
            await ws.send_json({"type": "session.updated", "event_id": "ev_2",
                                "session": {"type": "realtime", "model": "gpt-realtime", **event["session"]}})
        elif kind == "response.create":
            responses += 1
            rid = f"resp_{responses}"
            await ws.send_json({"type": "response.created", "event_id": f"ev_c{responses}",
                                "response": {"id": rid, "object": "realtime.response", "status": "in_progress",
                                             "output": []}})
            if responses == 1:
                call = {"id": "item_f", "type": "function_call", "status": "completed", "name": "get_weather",
                        "call_id": "call_rt_1", "arguments": '{"city": "Paris"}'}
                await ws.send_json({"type": "response.output_item.added", "event_id": "ev_3", "response_id": rid,
                                    "output_index": 0, "item": {**call, "arguments": "", "status": "in_progress"}})
                await ws.send_json({"type": "response.function_call_arguments.delta", "event_id": "ev_4",
                                    "response_id": rid, "item_id": "item_f", "output_index": 0, "call_id":
                                    "call_rt_1", "delta": '{"city": "Paris"}'})
                await ws.send_json({"type": "response.done", "event_id": "ev_5", "response": {
                    "id": rid, "object": "realtime.response", "status": "completed", "output": [call],
                    "usage": _usage(100, 20, 0, 15)}})
            else:
                for i in range(0, len(AUDIO), 4800):
                    await ws.send_json({"type": "response.output_audio.delta", "event_id": f"ev_a{i}",
                                        "response_id": rid, "item_id": "item_m", "output_index": 0,
                                        "content_index": 0, "delta": base64.b64encode(AUDIO[i:i + 4800]).decode()})
                await ws.send_json({"type": "response.output_audio_transcript.delta", "event_id": "ev_t",
                                    "response_id": rid, "item_id": "item_m", "output_index": 0,
                                    "content_index": 0, "delta": ANSWER}, fragments=25)
                await ws.send_json({"type": "response.done", "event_id": "ev_d2", "response": {
                    "id": rid, "object": "realtime.response", "status": "completed",
                    "output": [{"id": "item_m", "type": "message", "role": "assistant", "status": "completed",
                                "content": [{"type": "output_audio", "transcript": ANSWER}]}],
                    "usage": _usage(150, 60, 400, 90)}}, fragments=9)


def _check(stack: Stack, oisp_schema: SchemaValidator) -> dict[str, list[Any]]:
    events = stack.wait_for(lambda es: sum(e.event_type == "ai.response" for e in es) >= 2)
    by_type: dict[str, list[Any]] = {}
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
        by_type.setdefault(event.event_type, []).append(event)
    return by_type


def _assert_realtime_events(by_type: dict[str, list[Any]]) -> None:
    first, second = by_type["ai.request"]
    done1, done2 = by_type["ai.response"]
    assert first.data.model.id == "gpt-realtime"
    assert first.data.messages[0].content == "What is the weather in Paris?"
    assert [t.name for t in first.data.tools] == ["get_weather"]
    assert first.attrs["oisp.transport"] == "websocket" and first.attrs["http.path"].startswith("/v1/realtime")
    assert first.attrs["openai.realtime.input_audio_bytes"] == len(AUDIO)
    assert first.attrs["openai.realtime.input_audio_ms"] == 400
    assert done1.data.request_id == first.data.request_id != second.data.request_id == done2.data.request_id
    assert done1.related_events[0].event_id == first.event_id
    assert done1.data.finish_reason == "tool_calls" and done1.data.success
    assert done1.data.provider_request_id == "resp_1" and done1.data.status_code is None
    (call,) = by_type["agent.tool_call"]
    assert call.data.call_id == "call_rt_1" and call.data.arguments == {"city": "Paris"}
    (result,) = by_type["agent.tool_result"]
    assert result.data.call_id == "call_rt_1" and result.related_events[0].event_id == call.event_id
    assert result.attrs["oisp.request_id"] == second.data.request_id
    assert done2.data.choices[0].message.content == ANSWER
    assert done2.data.usage.prompt_tokens == 210 and done2.data.usage.completion_tokens == 490
    assert done2.data.usage.extra == {"input_audio_tokens": 150, "input_text_tokens": 60,
                                      "output_audio_tokens": 400, "output_text_tokens": 90}
    assert done2.attrs["openai.realtime.output_audio_bytes"] == len(AUDIO)
    assert done2.attrs["openai.realtime.output_audio_ms"] == 400
    assert "AAEC" not in json.dumps([e.to_dict() for e in by_type["ai.request"] + by_type["ai.response"]])


def _assert_relayed(stack: Stack) -> None:
    (recording,) = [r for r in stack.upstream.connections if r.requests]
    assert recording.requests[0].target.startswith("/v1/realtime")


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_openai_sdk_realtime_client_through_the_proxy(stack: Stack, oisp_schema: SchemaValidator,
                                                      compression: str | None) -> None:
    import openai

    stack.upstream.websocket = realtime_server
    stack.upstream.websocket_segment = 97  # frames split over many TLS records
    client = openai.OpenAI(api_key=API_KEY, base_url="https://api.openai.com/v1")
    options: dict[str, Any] = {"proxy": stack.proxy_url, "ssl": stack.client_context(),
                               "compression": compression, "max_size": 16 * 1024 * 1024}
    seen: list[str] = []
    with client.realtime.connect(model="gpt-realtime", websocket_connection_options=options) as conn:
        conn.session.update(session={"type": "realtime", "instructions": "Be brief.", "tools": [
            {"type": "function", "name": "get_weather", "description": "Weather of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]})
        for i in range(0, len(AUDIO), 3200):
            conn.input_audio_buffer.append(audio=base64.b64encode(AUDIO[i:i + 3200]).decode())
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather in Paris?"}]})
        conn.response.create()
        for event in conn:
            seen.append(event.type)
            if event.type == "response.done":
                break
        conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_rt_1",
                                            "output": '{"weather": "sunny"}'})
        conn.response.create()
        transcript = ""
        for event in conn:
            seen.append(event.type)
            if event.type == "response.output_audio_transcript.delta":
                transcript += event.delta
            if event.type == "response.done":
                break
    assert transcript == ANSWER
    _assert_realtime_events(_check(stack, oisp_schema))
    _assert_relayed(stack)


# --- a raw WebSocket client through a CONNECT tunnel: every plaintext byte it sent and received is kept ---------

class TunnelClient:
    """websockets' sans-io client over TLS through the proxy's CONNECT tunnel, recording the plaintext."""

    def __init__(self, stack: Stack, path: str, *, compression: bool, segment: int | None = None) -> None:
        sock = socket.create_connection(stack.proxy_address, timeout=10)
        sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        self.sock: ssl.SSLSocket = stack.client_context().wrap_socket(sock, server_hostname="api.openai.com")
        extensions = [ClientPerMessageDeflateFactory()] if compression else None
        self.protocol = ClientProtocol(parse_uri(f"wss://api.openai.com{path}"), extensions=extensions,
                                       max_size=None)
        self.segment = segment
        self.sent = bytearray()
        self.received = bytearray()
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {API_KEY}"
        self.protocol.send_request(request)
        self.flush()
        self.response = None
        while self.response is None:
            self._receive()
            for event in self.protocol.events_received():
                self.response = event
        assert self.response.status_code == 101
        self.frames: list[Any] = []

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            step = self.segment or len(data) or 1
            for i in range(0, len(data), step):
                self.sock.sendall(data[i:i + step])
                self.sent += data[i:i + step]

    def _receive(self) -> bytes:
        data = self.sock.recv(65536)
        self.received += data
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        return data

    def send_json(self, value: Any, *, fragments: int = 1) -> None:
        data = json.dumps(value).encode()
        size = max(1, -(-len(data) // fragments))
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        for index, piece in enumerate(pieces):
            fin = index == len(pieces) - 1
            if index == 0:
                self.protocol.send_text(piece, fin=fin)
            else:
                self.protocol.send_continuation(piece, fin=fin)
        self.flush()

    def recv_json(self) -> Any:
        """The next text message as JSON; None once the server closed."""
        parts: list[bytes] = []
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if frame.opcode == Opcode.CLOSE:
                    return None
                if frame.opcode in (Opcode.TEXT, Opcode.CONT):
                    parts.append(frame.data)
                    if frame.fin:
                        return json.loads(b"".join(parts))
            if not self._receive():
                return None
            self.frames += self.protocol.events_received()
            self.flush()

    def close(self) -> None:
        self.protocol.send_close(1000, "done")
        self.flush()
        while self._receive():
            pass
        self.sock.close()


def _sse_datas(name: str) -> list[dict[str, Any]]:
    body = load(name).response_body.decode()
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def responses_server(request: Request, ws: WsPeer) -> None:
    """The Responses API's WebSocket mode: each response.create answered with the SSE stream's events."""
    while (message := await ws.recv()) is not None:
        event = json.loads(message)
        if event["type"] == "response.create":
            for index, data in enumerate(_sse_datas("openai_responses_stream_tools")):
                await ws.send_json(data, fragments=1 + index % 4)


@pytest.mark.parametrize("compression", [False, True])
def test_responses_over_websocket_relayed_byte_for_byte(stack: Stack, oisp_schema: SchemaValidator,
                                                        compression: bool) -> None:
    stack.upstream.websocket = responses_server
    stack.upstream.websocket_compression = compression
    stack.upstream.websocket_segment = 13
    client = TunnelClient(stack, "/v1/responses", compression=compression, segment=11)
    assert ("permessage-deflate" in (client.response.headers.get("Sec-WebSocket-Extensions") or "")) == compression
    body = load("openai_responses_stream_tools").request_body
    request = json.loads(body)
    client.send_json({"type": "response.create", **request}, fragments=5)
    kinds = []
    while (event := client.recv_json()) is not None:
        kinds.append(event["type"])
        if event["type"] == "response.completed":
            break
    client.close()
    assert kinds[-1] == "response.completed"
    events = stack.wait_for(lambda es: any(e.event_type == "ai.response" for e in es))
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    (ai_request,) = [e for e in events if e.event_type == "ai.request"]
    (ai_response,) = [e for e in events if e.event_type == "ai.response"]
    calls = [e for e in events if e.event_type == "agent.tool_call"]
    assert ai_request.data.model.id == "gpt-4.1" and [t.name for t in ai_request.data.tools] == ["read_file",
                                                                                                  "run_shell"]
    assert ai_request.attrs["oisp.transport"] == "websocket"
    assert ai_response.data.request_id == ai_request.data.request_id
    assert ai_response.data.provider_request_id == "resp_68a1f0c2b3d48190a1b2c3d4e5f60718"
    assert ai_response.data.usage is not None and ai_response.data.usage.total_tokens
    assert [c.data.tool.name for c in calls] == ["read_file", "run_shell"]
    assert all(c.related_events[0].event_id == ai_response.event_id for c in calls)
    assert ai_response.confidence.completeness == "full"
    # The relay: what the upstream received is exactly what the client sent, and the other way round.
    (recording,) = [r for r in stack.upstream.connections if r.requests]
    assert bytes(recording.received) == bytes(client.sent)
    assert bytes(recording.sent) == bytes(client.received)


# --- hostile traffic: the relay is untouched, the events say what could not be read ------------------------

def _drain(client: TunnelClient) -> None:
    """Read raw bytes until the server closes (no parsing: the bytes may not be WebSocket at all)."""
    while True:
        try:
            data = client.sock.recv(65536)
        except (ssl.SSLError, OSError):
            return
        if not data:
            return
        client.received += data


def _assert_byte_for_byte(stack: Stack, client: TunnelClient) -> None:
    (recording,) = [r for r in stack.upstream.connections if r.requests]
    assert bytes(recording.received) == bytes(client.sent)
    assert bytes(recording.sent) == bytes(client.received)


def test_decompression_bomb_is_cut_at_the_cap_and_the_connection_carries_on(tmp_path: Path, test_ca: trustme.CA,
                                                                            oisp_schema: SchemaValidator) -> None:
    async def bomb_then_answer(request: Request, ws: WsPeer) -> None:
        while (message := await ws.recv()) is not None:
            if json.loads(message)["type"] == "response.create":
                await ws.send_text('{"type": "response.created", "response": {"id": "resp_bomb", "pad": "'
                                   + "0" * 30_000_000 + '"}}')  # 30 MB that compress to about 30 kB
                for data in _sse_datas("openai_responses_stream_tools"):
                    await ws.send_json(data)

    with running_stack(tmp_path, test_ca, config={"body_cap": 1024 * 1024}) as stack:
        stack.upstream.websocket = bomb_then_answer
        client = TunnelClient(stack, "/v1/responses", compression=True)
        client.send_json({"type": "response.create", **json.loads(load("openai_responses_stream_tools").request_body)})
        kinds = []
        while (event := client.recv_json()) is not None:
            kinds.append(event["type"])
            if event["type"] == "response.completed":
                break
        client.close()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        _assert_byte_for_byte(stack, client)
        assert len(client.received) < 1_000_000  # it was compressed on the wire
        events = stack.wait_for(lambda es: any(e.event_type == "ai.response" for e in es))
        for event in events:
            oisp_schema.assert_valid(event.to_dict())
        (response,) = [e for e in events if e.event_type == "ai.response"]
        assert response.confidence.completeness == "partial"
        limitations = " ".join(response.confidence.limitations or [])
        assert "truncated at cap" in limitations


@pytest.mark.parametrize("raw", [b"\x81\x7e\x10\x00" + b"{" * 100, b"GET / HTTP/1.1\r\n\r\n\xff\xfe garbage"],
                         ids=["truncated-frame", "garbage"])
def test_truncated_frame_or_garbage_after_101(stack: Stack, oisp_schema: SchemaValidator, raw: bytes) -> None:
    async def hostile(request: Request, ws: WsPeer) -> None:
        await ws.recv()  # the response.create
        await ws.stream.send(raw)  # then the connection ends

    stack.upstream.websocket = hostile
    client = TunnelClient(stack, "/v1/responses", compression=False)
    client.send_json({"type": "response.create", **json.loads(load("openai_responses_stream_tools").request_body)})
    _drain(client)
    client.sock.close()
    assert client.received.endswith(raw)
    _assert_byte_for_byte(stack, client)
    events = stack.wait_for(lambda es: any(e.event_type == "ai.response" for e in es))
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    (response,) = [e for e in events if e.event_type == "ai.response"]
    assert response.confidence.completeness == "partial" and not response.data.success
    limitations = " ".join(response.confidence.limitations or [])
    reason = "connection closed inside a WebSocket server message" if raw.startswith(b"\x81") \
        else "websocket server frames"
    assert reason in limitations


def test_a_failing_decoder_never_harms_the_websocket(stack: Stack, oisp_schema: SchemaValidator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from oisp.providers.openai_realtime import ResponsesWebSocketDecoder

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(ResponsesWebSocketDecoder, "server_event", broken)
    stack.upstream.websocket = responses_server
    client = TunnelClient(stack, "/v1/responses", compression=True, segment=50)
    client.send_json({"type": "response.create", **json.loads(load("openai_responses_stream_tools").request_body)})
    kinds = []
    while (event := client.recv_json()) is not None:
        kinds.append(event["type"])
        if event["type"] == "response.completed":
            break
    client.close()
    assert kinds[-1] == "response.completed"
    _assert_byte_for_byte(stack, client)
    events = stack.wait_for(lambda es: any(e.event_type == "ai.response" for e in es))
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    assert "ai.request" in [e.event_type for e in events]  # the request was decoded before the failure


def test_http2_extended_connect_is_claimed_like_an_upgrade() -> None:
    from oisp.http import ConnectionInfo, Headers, HttpExchange, HttpRequest
    from oisp.providers.openai import websocket_decoder_for
    from oisp.providers.openai_realtime import RealtimeDecoder, ResponsesWebSocketDecoder

    def exchange(method: str, path: str, protocol: str | None, headers: list[tuple[str, str]]) -> HttpExchange:
        return HttpExchange(
            connection=ConnectionInfo(connection_id="c1", client_addr=("127.0.0.1", 1),
                                      server_addr=("api.openai.com", 443), tls=True, provider="openai"),
            request=HttpRequest(method=method, target=path, authority="api.openai.com", scheme="https",
                                http_version="2", headers=Headers(headers), protocol=protocol))

    assert isinstance(websocket_decoder_for(exchange("CONNECT", "/v1/realtime?model=m", "websocket", [])),
                      RealtimeDecoder)
    assert isinstance(websocket_decoder_for(exchange("GET", "/v1/responses", None, [("Upgrade", "WebSocket")])),
                      ResponsesWebSocketDecoder)
    assert websocket_decoder_for(exchange("CONNECT", "/v1/realtime", None, [])) is None
    assert websocket_decoder_for(exchange("GET", "/v1/realtime", None, [])) is None


def test_realtime_beta_names_and_a_response_the_server_starts_on_its_own(oisp_schema: SchemaValidator) -> None:
    """Sans-io: beta event names (response.text.delta, response.audio.delta, pcm16), server-side voice
    detection (no response.create: the server's response.created opens the request), a cancelled response."""
    from oisp.http import ConnectionInfo, Headers, HttpExchange, HttpRequest, WebSocketMessage
    from oisp.providers.openai import websocket_decoder_for

    exchange = HttpExchange(
        connection=ConnectionInfo(connection_id="c9", client_addr=("127.0.0.1", 1),
                                  server_addr=("api.openai.com", 443), tls=True, provider="openai"),
        request=HttpRequest(method="GET", target="/v1/realtime?model=gpt-4o-realtime-preview", scheme="https",
                            authority="api.openai.com", http_version="1.1",
                            headers=Headers([("Upgrade", "websocket"), ("Authorization", f"Bearer {API_KEY}")])))
    exchange.websocket = True
    decoder = websocket_decoder_for(exchange)
    assert decoder is not None
    clock = iter(range(1_000_000_000, 10**12, 10_000_000))
    events: list[Any] = []

    def send(direction: str, value: dict[str, Any]) -> None:
        payload = json.dumps(value).encode()
        events.extend(decoder.on_websocket_message(exchange, WebSocketMessage(
            direction=direction, opcode=1, payload=payload, timestamp_ns=next(clock), size=len(payload),  # type: ignore[arg-type]
            wire_size=len(payload))))

    send("server", {"type": "session.created", "session": {"model": "gpt-4o-realtime-preview",
                                                           "input_audio_format": "pcm16"}})
    send("client", {"type": "session.update", "session": {"instructions": "Be nice.", "modalities": ["text", "audio"],
                                                          "turn_detection": {"type": "server_vad"}}})
    send("client", {"type": "input_audio_buffer.append", "audio": base64.b64encode(AUDIO).decode()})
    send("server", {"type": "input_audio_buffer.committed", "item_id": "item_1"})
    send("server", {"type": "response.created", "response": {"id": "resp_a", "status": "in_progress"}})
    send("server", {"type": "response.audio.delta", "response_id": "resp_a", "delta":
                    base64.b64encode(AUDIO[:4800]).decode()})
    send("server", {"type": "response.text.delta", "response_id": "resp_a", "delta": "Hello"})
    send("server", {"type": "response.done", "response": {
        "id": "resp_a", "status": "cancelled", "status_details": {"type": "cancelled", "reason": "turn_detected"},
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hello"}]}],
        "usage": {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
                  "input_token_details": {"text_tokens": 5, "audio_tokens": 15, "cached_tokens": 0},
                  "output_token_details": {"text_tokens": 4, "audio_tokens": 6}}}})
    assert [e.event_type for e in events] == ["ai.request", "ai.response"]
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
    request, response = events
    assert request.data.model.id == "gpt-4o-realtime-preview" and request.data.system_prompt_hash
    assert request.attrs["openai.realtime.input_audio_bytes"] == len(AUDIO)
    assert request.attrs["openai.realtime.input_audio_ms"] == 400
    assert request.attrs["openai.realtime.modalities"] == ["text", "audio"]
    assert response.data.choices[0].message.content == "Hello"
    assert response.data.provider_request_id == "resp_a" and response.data.request_id == request.data.request_id
    assert response.data.usage.extra["output_audio_tokens"] == 6
    assert response.attrs["openai.realtime.output_audio_bytes"] == 4800
    assert response.attrs["openai.realtime.output_audio_ms"] == 100
    assert response.data.finish_reason is not None and response.data.finish_reason != "stop"
    assert list(decoder.on_end(exchange)) == []  # nothing left open
