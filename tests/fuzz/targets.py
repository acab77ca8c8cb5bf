"""Fuzz targets: every parser that reads bytes from the network, fed arbitrary bytes.

A target takes one ``bytes`` input and raises only when the parser broke its contract: an exception other than
its documented error, a listener contract broken (``end`` twice, data after ``end``), output past its bound.
The input is cut into pieces (at points the input itself chooses) so that incremental parsers see every split.
Hangs are caught by the runner's time limit per input. Each target also has seeds: valid inputs that the
mutations start from, so that fuzzing gets past the first length check.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import hpack

from oisp.errors import ProtocolError
from oisp.framing.eventstream import EventStreamDecoder, encode_message
from oisp.framing.jsonarray import JsonArrayDecoder
from oisp.framing.ndjson import NdjsonDecoder
from oisp.framing.sse import SseDecoder
from oisp.http import ConnectionInfo, HttpExchange, make_decoder
from oisp.http.encoding import ContentDecoder
from oisp.http.websocket import FrameReader
from oisp.tls.clienthello import parse_client_hello

__all__ = ["SEEDS", "TARGETS"]

#: Bodies are capped at this in the targets: decoded output past it is a bug (a bomb that got through).
CAP = 64 * 1024
#: Framer items are capped at this.
MAX_ITEM = 16 * 1024


def _pieces(data: bytes) -> Iterator[bytes]:
    """``data`` cut where its own bytes say: the first byte is a piece size (1..256), and so on."""
    if not data:
        return
    step = data[0] + 1
    rest = data[1:]
    while rest:
        yield rest[:step]
        rest = rest[step:]
        step = (step * 7 + 3) % 97 + 1


def _streams(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Two directions of a connection from one input: records ``direction | length | bytes``."""
    position = 0
    while position < len(data):
        head = data[position]
        length = data[position + 1] if position + 1 < len(data) else 0
        chunk = data[position + 2:position + 2 + length * 8 + 1]
        position += 2 + len(chunk)
        yield ("client" if head & 1 else "server"), chunk


class _ContractListener:
    """An exchange listener that checks the contract: request once and first, end once and last, bounded data."""

    def __init__(self) -> None:
        self.requested: set[int] = set()
        self.ended: set[int] = set()
        self.delivered: dict[int, int] = {}

    def request(self, exchange: HttpExchange) -> None:
        assert exchange.exchange_id not in self.requested, "request() twice"
        self.requested.add(exchange.exchange_id)

    def response_start(self, exchange: HttpExchange) -> None:
        assert exchange.exchange_id in self.requested and exchange.exchange_id not in self.ended

    def response_data(self, exchange: HttpExchange, data: bytes) -> None:
        assert exchange.exchange_id in self.requested and exchange.exchange_id not in self.ended
        total = self.delivered[exchange.exchange_id] = self.delivered.get(exchange.exchange_id, 0) + len(data)
        assert total <= CAP, f"{total} bytes delivered past the body cap"

    def end(self, exchange: HttpExchange) -> None:
        assert exchange.exchange_id in self.requested, "end() before request()"
        assert exchange.exchange_id not in self.ended, "end() twice"
        self.ended.add(exchange.exchange_id)

    def websocket_message(self, exchange: HttpExchange, message: object) -> None:
        assert exchange.exchange_id not in self.ended


def _connection(alpn: str) -> ConnectionInfo:
    return ConnectionInfo(connection_id="fuzz", client_addr=("127.0.0.1", 50000), server_addr=("203.0.113.5", 443),
                          sni="api.openai.com", alpn=alpn, tls=True)


def _passive(alpn: str, data: bytes, prefix: bytes = b"") -> None:
    listener = _ContractListener()
    decoder = make_decoder(alpn, _connection(alpn), listener, body_cap=CAP, max_table_size=64 * 1024)
    if prefix:
        decoder.feed_client(prefix)
    for direction, chunk in _streams(data):
        if direction == "client":
            decoder.feed_client(chunk)
        else:
            decoder.feed_server(chunk)
    decoder.client_closed()
    decoder.server_closed()
    assert listener.requested == listener.ended, "an exchange was never ended"


def fuzz_h1(data: bytes) -> None:
    """The passive HTTP/1.1 decoder (requests, responses, chunked bodies, upgrades, content codings)."""
    _passive("http/1.1", data)


def fuzz_h2(data: bytes) -> None:
    """The passive HTTP/2 decoder (frames, HPACK, streams, resets, WebSockets over CONNECT)."""
    _passive("h2", data, prefix=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


def fuzz_clienthello(data: bytes) -> None:
    """The ClientHello reader, fed all bytes received so far after each piece (as the proxy does)."""
    seen = b""
    for piece in _pieces(data):
        seen += piece
        try:
            hello = parse_client_hello(seen)
        except ProtocolError:
            return
        if hello is not None:
            assert hello.record_bytes <= len(seen)
            return


def fuzz_websocket(data: bytes) -> None:
    """WebSocket frames (masked and not, with and without permessage-deflate)."""
    if not data:
        return
    flags = data[0]
    reader = FrameReader("client" if flags & 1 else "server", masked=bool(flags & 1), cap=CAP,
                         deflate=bool(flags & 2), reset_context=bool(flags & 4))
    for piece in _pieces(data[1:]):
        for message in reader.feed(piece, 0):
            assert len(message.payload) <= CAP + 1024, f"a {len(message.payload)}-byte message past the cap"


def _framer(make: Callable[[], object], data: bytes) -> None:
    decoder = make()
    for piece in _pieces(data):
        decoder.feed(piece)  # type: ignore[attr-defined]
    decoder.close()  # type: ignore[attr-defined]


def fuzz_sse(data: bytes) -> None:
    """The server-sent events framer."""
    _framer(lambda: SseDecoder(comments=True, max_item_size=MAX_ITEM), data)


def fuzz_ndjson(data: bytes) -> None:
    """The newline-delimited JSON framer."""
    _framer(lambda: NdjsonDecoder(max_item_size=MAX_ITEM), data)


def fuzz_jsonarray(data: bytes) -> None:
    """The streamed JSON array framer (Gemini's streamGenerateContent)."""
    _framer(lambda: JsonArrayDecoder(max_item_size=MAX_ITEM), data)


def fuzz_eventstream(data: bytes) -> None:
    """The AWS event stream framer (Bedrock)."""
    _framer(lambda: EventStreamDecoder(max_item_size=MAX_ITEM), data)


_CODINGS = ("gzip", "deflate", "br", "zstd", "gzip, br", "deflate, gzip", "identity", "x-gzip", "zstd, gzip")


def fuzz_content_decoding(data: bytes) -> None:
    """Content decoding (gzip, deflate, brotli, zstd, stacked): output never past the limit, whatever comes in."""
    if not data:
        return
    decoder = ContentDecoder(_CODINGS[data[0] % len(_CODINGS)], CAP)
    produced = 0
    for piece in _pieces(data[1:]):
        produced += len(decoder.decode(piece))
        assert produced <= CAP, f"{produced} decoded bytes past the limit of {CAP}"
    decoder.finish()


#: (provider, host, request path) the provider target sends its request to.
_PROVIDER_CALLS = (
    ("openai", "api.openai.com", "/v1/chat/completions"),
    ("openai", "api.openai.com", "/v1/responses"),
    ("openai", "api.openai.com", "/v1/embeddings"),
    ("anthropic", "api.anthropic.com", "/v1/messages"),
    ("google", "generativelanguage.googleapis.com", "/v1beta/models/gemini-1.5-pro:streamGenerateContent"),
    ("google", "generativelanguage.googleapis.com", "/v1beta/models/gemini-1.5-pro:generateContent"),
    ("bedrock", "bedrock-runtime.us-east-1.amazonaws.com", "/model/anthropic.claude-3/converse-stream"),
    ("bedrock", "bedrock-runtime.us-east-1.amazonaws.com", "/model/anthropic.claude-3/invoke"),
    ("cohere", "api.cohere.com", "/v2/chat"),
    ("ollama", "localhost", "/api/chat"),
    ("huggingface", "router.huggingface.co", "/v1/chat/completions"),
    ("replicate", "api.replicate.com", "/v1/predictions"),
)
_CONTENT_TYPES = (b"application/json", b"text/event-stream", b"application/x-ndjson",
                  b"application/vnd.amazon.eventstream", b"text/plain", b"application/json; charset=latin-1")
_EVENT_DECODER: object | None = None
_EMITTED: list[object] = []


def fuzz_providers(data: bytes) -> None:
    """Each provider's body parsers, through the event decoder: a request to the provider's endpoint (its body
    from the input), and a response whose content type and body come from the input."""
    global _EVENT_DECODER
    if len(data) < 3:
        return
    from oisp.event_decoder import EventDecoder
    from oisp.plugins import create_plugin_manager

    if _EVENT_DECODER is None:
        _EVENT_DECODER = EventDecoder(create_plugin_manager(entrypoints=False), _EMITTED.append)
    provider, host, path = _PROVIDER_CALLS[data[0] % len(_PROVIDER_CALLS)]
    content_type = _CONTENT_TYPES[data[1] % len(_CONTENT_TYPES)]
    request_body, _, response_body = data[2:].partition(b"\x00\xff")
    info = ConnectionInfo(connection_id="fuzz", client_addr=("127.0.0.1", 50000), server_addr=(host, 443), sni=host,
                          alpn="http/1.1", tls=True, provider=provider)
    decoder = make_decoder("http/1.1", info, _EVENT_DECODER.exchange_listener(info),  # type: ignore[attr-defined]
                           body_cap=CAP)
    decoder.feed_client(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n" % (path.encode(), host.encode(), len(request_body))
                        + request_body)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % content_type
    decoder.feed_server(head)
    for piece in _pieces(response_body):
        decoder.feed_server(b"%x\r\n%s\r\n" % (len(piece), piece))
    decoder.feed_server(b"0\r\n\r\n")
    decoder.client_closed()
    decoder.server_closed()
    del _EMITTED[:]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "clienthello": fuzz_clienthello,
    "h1": fuzz_h1,
    "h2": fuzz_h2,
    "websocket": fuzz_websocket,
    "sse": fuzz_sse,
    "ndjson": fuzz_ndjson,
    "jsonarray": fuzz_jsonarray,
    "eventstream": fuzz_eventstream,
    "content_decoding": fuzz_content_decoding,
    "providers": fuzz_providers,
}


# seeds ------------------------------------------------------------------------------------------------------


def _records(*parts: tuple[str, bytes]) -> bytes:
    """The :func:`_streams` encoding of ``parts`` (each cut into records of at most 249 bytes)."""
    out = bytearray()
    for direction, chunk in parts:
        while chunk:
            length = min(31, (len(chunk) - 1) // 8)
            piece, chunk = chunk[:length * 8 + 1], chunk[length * 8 + 1:]
            out += bytes([1 if direction == "client" else 0, length]) + piece
    return bytes(out)


def _h2_seed() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    client.send_headers(1, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
                            (":authority", "api.openai.com"), ("content-type", "application/json")])
    client.send_data(1, body, end_stream=True)
    client.send_headers(3, [(":method", "GET"), (":path", "/v1/models"), (":scheme", "https"),
                            (":authority", "api.openai.com")], end_stream=True)
    client.reset_stream(3)
    to_server = client.data_to_send()[24:]  # the preface is the target's own prefix
    encoder = hpack.Encoder()
    head = encoder.encode([(":status", "200"), ("content-type", "text/event-stream"), ("content-encoding", "gzip")])
    frames = struct.pack(">I", len(head))[1:] + b"\x01\x04" + struct.pack(">I", 1) + head
    payload = gzip.compress(b"data: {\"choices\": []}\n\ndata: [DONE]\n\n")
    frames += struct.pack(">I", len(payload))[1:] + b"\x00\x01" + struct.pack(">I", 1) + payload
    return _records(("client", to_server), ("server", server.data_to_send() + frames))


def _masked(payload: bytes, key: bytes = b"abcd") -> bytes:
    return bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def _h1_seed() -> bytes:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body) + body)
    chunked = zlib.compress(b'{"id": "x", "choices": []}')
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: deflate\r\n"
                b"transfer-encoding: chunked\r\n\r\n%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n")
    upgrade = (b"GET /v1/realtime HTTP/1.1\r\nhost: api.openai.com\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
               b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
    switched = (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
                b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello")
    return _records(("client", request + request), ("server", response + response), ("client", upgrade),
                    ("server", switched), ("client", b"\x81\x85abcd" + _masked(b"hello")))


def _clienthello_seed() -> bytes:
    import ssl

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.openai.com")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return b"\x07" + outgoing.read()


def _eventstream_seed() -> bytes:
    message = encode_message({":message-type": "event", ":event-type": "chunk", ":content-type": "application/json"},
                             b'{"bytes": "eyJ0eXBlIjoibWVzc2FnZV9zdGFydCJ9"}')
    return b"\x10" + message * 3


_CHAT = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
SEEDS: dict[str, list[bytes]] = {
    "providers": [
        b"\x00\x01" + _CHAT + b"\x00\xff\x10data: {\"id\": \"c\", \"choices\": [{\"index\": 0, "
        b"\"delta\": {\"content\": \"Hi\"}}]"
        b", \"usage\": {\"prompt_tokens\": 1}}\n\ndata: [DONE]\n\n",
        b"\x03\x01" + _CHAT + b"\x00\xff\x10event: message_start\ndata: {\"type\": \"message_start\", \"message\": "
        b"{\"id\": \"m\", \"model\": \"claude\", \"usage\": {\"input_tokens\": 3}}}\n\nevent: content_block_delta\n"
        b"data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", "
        b"\"text\": \"x\"}}\n\n",
        b"\x04\x00" + _CHAT + b"\x00\xff\x10[{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"hi\"}]}}], "
        b"\"usageMetadata\": {\"promptTokenCount\": 2}}]",
        b"\x06\x03" + _CHAT + b"\x00\xff\x10" + _eventstream_seed()[1:],
        b"\x09\x02" + _CHAT + b"\x00\xff\x10{\"message\": {\"role\": \"assistant\", \"content\": \"h\"}, "
        b"\"done\": false}\n"
        b"{\"done\": true, \"prompt_eval_count\": 3}\n",
    ],
    "clienthello": [_clienthello_seed()],
    "h1": [_h1_seed()],
    "h2": [_h2_seed()],
    "websocket": [b"\x01\x81\x85abcd" + _masked(b"hello"),
                  b"\x02\x01\x05hello\x88\x02\x03\xe8", b"\x02\xc1\x07" + zlib.compress(b"hello")[2:-4] + b"\x00"],
    "sse": [b"\x05event: message\ndata: {\"a\": 1}\nid: 7\nretry: 10\n\n: comment\r\ndata: x\r\n\r\n"],
    "ndjson": [b"\x03{\"a\": 1}\n{\"b\": [1, 2]}\r\n\n[]\n"],
    "jsonarray": [b"\x04[{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"hi\"}]}}]},\r\n{\"x\": \"]\"}]"],
    "eventstream": [_eventstream_seed()],
    "content_decoding": [b"\x00\x10" + gzip.compress(b"a" * 200_000), b"\x02\x10" + b"\x1b\xff\xff\x1f",
                         b"\x01\x20" + zlib.compress(b"{}" * 1000),
                         b"\x00\x10" + gzip.compress(gzip.compress(b"\x00" * 1_000_000))],
}
