"""Passive WebSocket decoding after an HTTP/1.1 ``101``: real frames from the ``websockets`` sans-io protocols
(client and server, with and without permessage-deflate), fed to the HTTP/1.1 decoder in pieces."""

from __future__ import annotations

import os
import zlib
from typing import Any

import pytest
from tests.http.transcript import Recorder, connection
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Close, CloseCode, Opcode
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from oisp.http import Http1Decoder, HttpExchange
from oisp.http.websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, FrameReader, WebSocketMessage


class WsRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[WebSocketMessage] = []

    def websocket_message(self, exchange: HttpExchange, message: WebSocketMessage) -> None:
        self.calls.append(("websocket_message", exchange.exchange_id, b""))
        self.messages.append(message)


class Pair:
    """A real client and server (websockets' sans-io protocols) and the passive decoder watching them."""

    def __init__(self, *, deflate: dict[str, Any] | None = None, cap: int = 16 * 1024 * 1024,
                 split: int | None = None) -> None:
        client_ext = [ClientPerMessageDeflateFactory(**deflate)] if deflate is not None else []
        server_ext = [ServerPerMessageDeflateFactory(**{k: v for k, v in (deflate or {}).items()
                                                       if k.endswith("no_context_takeover")})] \
            if deflate is not None else []
        self.client = ClientProtocol(parse_uri("wss://api.openai.com/v1/realtime?model=gpt-realtime"),
                                     extensions=client_ext, max_size=None)
        self.server = ServerProtocol(extensions=server_ext, max_size=None)
        self.recorder = WsRecorder()
        self.decoder = Http1Decoder(connection(), self.recorder, body_cap=cap)
        self.split = split
        self.client.send_request(self.client.connect())
        self.flush()
        (request,) = self.server.events_received()
        self.server.send_response(self.server.accept(request))
        self.flush()
        assert self.client.events_received()[0].status_code == 101

    def _feed(self, side: str, data: bytes) -> None:
        step = self.split or len(data) or 1
        for i in range(0, len(data), step):
            getattr(self.decoder, f"feed_{side}")(data[i:i + step])

    def flush(self) -> None:
        for data in self.client.data_to_send():
            if data:
                self._feed("client", data)
                self.server.receive_data(data)
        for data in self.server.data_to_send():
            if data:
                self._feed("server", data)
                self.client.receive_data(data)


@pytest.mark.parametrize("deflate", [None, {}, {"client_no_context_takeover": True,
                                                 "server_no_context_takeover": True}])
@pytest.mark.parametrize("split", [None, 1, 7])
def test_messages_both_ways_fragmented_and_control_frames(deflate: dict[str, Any] | None, split: int | None) -> None:
    pair = Pair(deflate=deflate, split=split)
    text = ('{"type":"session.update","session":{"instructions":"be brief"}}' * 20).encode()
    pair.client.send_text(text)
    pair.server.send_text(b'{"type":"session.updated"}')
    pair.client.send_text(text[:100], fin=False)
    pair.client.send_ping(b"are you there")  # a control frame inside a fragmented message
    pair.client.send_continuation(text[100:500], fin=False)
    pair.client.send_continuation(text[500:], fin=True)
    audio = os.urandom(3000)
    pair.server.send_binary(audio)
    pair.server.send_text(text)  # the same text again: with context takeover it compresses to almost nothing
    pair.flush()
    pair.client.send_close(CloseCode.NORMAL_CLOSURE, "bye")
    pair.flush()
    pair.decoder.server_closed()

    def sent_by(side: str) -> list[tuple[int, bytes]]:
        return [(m.opcode, m.payload) for m in pair.recorder.messages if m.direction == side]

    bye = Close(CloseCode.NORMAL_CLOSURE, "bye").serialize()
    assert sent_by("client") == [(OP_TEXT, text), (OP_PING, b"are you there"), (OP_TEXT, text), (OP_CLOSE, bye)]
    assert sent_by("server") == [(OP_TEXT, b'{"type":"session.updated"}'), (OP_BINARY, audio), (OP_TEXT, text),
                                 (0xA, b"are you there"), (OP_CLOSE, bye)]  # the pong: the server's automatic one
    fragmented = [m for m in pair.recorder.messages if m.direction == "client"][2]
    assert fragmented.frames == 3
    assert fragmented.compressed == (deflate is not None)
    assert pair.recorder.messages[-1].close_code == 1000 and pair.recorder.messages[-1].close_reason == "bye"
    (exchange,) = pair.recorder.exchanges
    assert exchange.websocket and not exchange.partial, exchange.partial_reasons
    assert exchange.response is not None and exchange.response.status == 101
    kinds = pair.recorder.kinds(exchange)
    assert kinds[:2] == ["request", "response_start"] and kinds[-1] == "end"
    assert set(kinds[2:-1]) == {"websocket_message"}


def test_message_over_the_cap_is_truncated_and_later_messages_still_decode() -> None:
    pair = Pair(deflate={"client_no_context_takeover": True, "server_no_context_takeover": True}, cap=1000)
    pair.server.send_text(b"a" * 50_000)  # a deflate bomb in miniature: 50 kB from a few dozen bytes
    pair.server.send_text(b"small")
    pair.flush()
    big, small = pair.recorder.messages
    assert big.truncated and len(big.payload) == 1000 and big.wire_size < 200
    assert small.payload == b"small" and not small.truncated
    (exchange,) = pair.recorder.exchanges
    assert "websocket server message truncated at cap" in exchange.partial_reasons


def test_bomb_with_context_takeover_loses_the_context_not_the_decoder() -> None:
    pair = Pair(deflate={}, cap=4096)
    pair.server.send_text(b"\x00" * 10_000_000)  # 10 MB of zeros: about 10 kB on the wire
    pair.server.send_text(b"after")
    pair.client.send_text(b"client side unaffected")
    pair.flush()
    client, bomb, after = pair.recorder.messages  # flush feeds the client's bytes first
    assert bomb.truncated and len(bomb.payload) == 4096
    assert after.problem == "compression context lost" and after.payload == b""
    assert client.payload == b"client side unaffected"


def test_truncated_frame_at_close_marks_the_exchange_partial() -> None:
    pair = Pair()
    pair.client.send_text(b"x" * 1000)
    data = b"".join(pair.client.data_to_send())
    pair.decoder.feed_client(data[:500])
    pair.decoder.client_closed()
    pair.decoder.server_closed()
    (exchange,) = pair.recorder.exchanges
    assert pair.recorder.messages == []
    assert "connection closed inside a WebSocket client message" in exchange.partial_reasons
    assert pair.recorder.kinds(exchange)[-1] == "end"


def test_garbage_after_101_stops_that_direction_only() -> None:
    pair = Pair()
    pair.decoder.feed_server(b"\x8f\x00not websocket at all")  # reserved opcode
    pair.client.send_text(b"still read")
    pair.flush()
    assert [m.payload for m in pair.recorder.messages] == [b"still read"]
    (exchange,) = pair.recorder.exchanges
    assert any("websocket server frames: reserved opcode" in r for r in exchange.partial_reasons)


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    reader = FrameReader("client", masked=True, cap=100)
    assert reader.feed(b"\x81\x02hi", 0) == []
    assert reader.error == "client frame not masked"


def test_invalid_compressed_data_is_a_message_problem() -> None:
    reader = FrameReader("server", masked=False, cap=100, deflate=True)
    (message,) = reader.feed(b"\xc1\x04\xff\xff\xff\xff", 0)
    assert message.problem is not None and message.problem.startswith("invalid compressed data")
    compressor = zlib.compressobj(wbits=-15)
    payload = compressor.compress(b"next") + compressor.flush(zlib.Z_SYNC_FLUSH)
    (after,) = reader.feed(b"\xc1" + bytes([len(payload) - 4]) + payload[:-4], 0)
    assert after.problem == "compression context lost"


def test_listener_without_websocket_message_still_gets_the_exchange_ended() -> None:
    recorder = Recorder()
    decoder = Http1Decoder(connection(), recorder)
    decoder.feed_client(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    decoder.feed_server(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                        b"\x81\x05hello")
    decoder.server_closed()
    (exchange,) = recorder.exchanges
    assert recorder.kinds(exchange) == ["request", "response_start", "end"]
    assert not exchange.partial


def test_http2_extended_connect_websocket_is_decoded() -> None:
    """RFC 8441: a WebSocket on an HTTP/2 stream (h2's own client and server, extended CONNECT), next to an
    ordinary request on another stream."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    from websockets.frames import Frame

    from oisp.http import Http2Decoder

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    recorder = WsRecorder()
    decoder = Http2Decoder(connection(alpn="h2"), recorder)

    def flush() -> None:
        for _ in range(3):
            data = client.data_to_send()
            if data:
                decoder.feed_client(data)
                server.receive_data(data)
            data = server.data_to_send()
            if data:
                decoder.feed_server(data)
                client.receive_data(data)

    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    flush()
    client.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                            (":path", "/v1/realtime?model=gpt-realtime"), (":authority", "api.openai.com"),
                            ("sec-websocket-version", "13"), ("sec-websocket-extensions", "permessage-deflate")])
    flush()
    server.send_headers(1, [(":status", "200"), ("sec-websocket-extensions", "permessage-deflate")])
    flush()
    compressor = zlib.compressobj(wbits=-15)
    text = b'{"type": "response.create", "pad": "' + bytes(range(32, 127)) * 3 + b'"}'
    compressed = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
    payload = compressed[:-4]
    assert 125 < len(payload) < 65536
    mask = b"\x0f\xf0\xaa\x55"
    masked = bytes([0xC1, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask \
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))  # FIN, RSV1 (compressed), text; masked
    client.send_data(1, masked[:30])
    client.send_data(1, masked[30:])
    server.send_data(1, Frame(Opcode.BINARY, b"\x01\x02\x03").serialize(mask=False, extensions=[]))
    flush()
    client.send_data(1, Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True, extensions=[]), end_stream=True)
    server.send_data(1, Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=False, extensions=[]), end_stream=True)
    flush()
    (exchange,) = recorder.exchanges
    assert exchange.websocket and exchange.stream_id == 1 and exchange.request.asks_websocket
    assert not exchange.partial, exchange.partial_reasons
    assert [(m.direction, m.opcode, m.payload) for m in recorder.messages] == [
        ("client", OP_TEXT, text), ("server", OP_BINARY, b"\x01\x02\x03"),
        ("client", OP_CLOSE, b"\x03\xe8"), ("server", OP_CLOSE, b"\x03\xe8")]
    assert recorder.messages[-1].close_code == 1000
    assert recorder.kinds(exchange)[-1] == "end"
