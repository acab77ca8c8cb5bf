"""gRPC and Connect end to end: a real ``grpcio`` client and server (TLS, HTTP/2) through the proxy's CONNECT
tunnel to a Cursor API host, and Connect bodies sent with httpx over HTTP/2 and HTTP/1.1."""

from __future__ import annotations

import base64
import gzip
import json
import os
import struct
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from tests import stack as stack_module
from tests.oisp_schema import SchemaValidator
from tests.stack import Stack, running_stack
from tests.upstream import Request, Response

from oisp.events import Event
from oisp.framing.grpc import FLAG_END_STREAM, encode_envelope
from oisp.hookspecs import GrpcMessageDecoder, hookimpl
from oisp.http.exchange import HttpExchange
from oisp.plugins import OispPluginManager
from oisp.providers.grpc import GrpcCallMessage, GrpcExchangeDecoder, GrpcStatus, grpc_call_of
from oisp.proxy import UpstreamOverride

grpc = pytest.importorskip("grpc")

HOST = "api2.cursor.sh"


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()
SERVICE = "aiserver.v1.ChatService"


# --- a schema-aware plugin, as a third party writes one -----------------------------------------------------
class RecordingDecoder(GrpcExchangeDecoder):
    """Keeps every message and the status (and fails on demand, to show a failure harms nothing)."""

    seen: list[GrpcCallMessage] = []
    statuses: list[GrpcStatus] = []

    def on_grpc_message(self, exchange: HttpExchange, message: GrpcCallMessage) -> list[Event]:
        if message.payload == b"explode":
            raise ValueError("a plugin bug")
        self.seen.append(message)
        return []

    def on_grpc_end(self, exchange: HttpExchange, status: GrpcStatus) -> list[Event]:
        self.statuses.append(status)
        return []


recording_plugin = types.SimpleNamespace(
    oisp_exchange_decoder=hookimpl(lambda exchange: RecordingDecoder(call)
                                   if (call := grpc_call_of(exchange)) is not None and call.service == SERVICE
                                   else None))


@pytest.fixture
def with_recording_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    original = stack_module.create_plugin_manager

    def create() -> OispPluginManager:
        plugins = original()
        plugins.register(recording_plugin, "test-grpc-recorder")
        return plugins

    monkeypatch.setattr(stack_module, "create_plugin_manager", create)
    RecordingDecoder.seen = []
    RecordingDecoder.statuses = []


# --- the grpcio server: generic handlers on raw bytes, no generated code --------------------------------------
def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such conversation")
    return b"answer to " + request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for index in range(3):
        yield b"chunk %d " % index + request * 50


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield b"echo:" + request


@pytest.fixture
def grpc_server(test_ca: trustme.CA) -> Iterator[int]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), compression=grpc.Compression.Gzip)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "StreamChat": grpc.unary_stream_rpc_method_handler(_server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    })])
    cert = test_ca.issue_cert(HOST)
    credentials = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(grace=None)


@pytest.fixture
def grpc_stack(tmp_path: Path, test_ca: trustme.CA, grpc_server: int, with_recording_plugin: None) -> Iterator[Stack]:
    override = UpstreamOverride(HOST, 443, "127.0.0.1", grpc_server)
    with running_stack(tmp_path, test_ca, config={"overrides": (override,)}) as stack:
        yield stack


def _channel(stack: Stack) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(stack.ca_file).read_bytes())
    return grpc.secure_channel(f"{HOST}:443", credentials, compression=grpc.Compression.Gzip,
                               options=[("grpc.http_proxy", stack.proxy_url), ("grpc.enable_retries", 0)])


def _calls(stack: Stack, count: int) -> list[Event]:
    events = stack.wait_for(lambda es: len([e for e in es if e.event_type == "ai.response"]) >= count, timeout=20)
    return [e for e in events if e.event_type in ("ai.request", "ai.response")]


def test_grpcio_calls_through_the_proxy_become_metadata_events(grpc_stack: Stack,
                                                              oisp_schema: SchemaValidator) -> None:
    with _channel(grpc_stack) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hello" * 100, timeout=10) == b"answer to " + b"hello" * 100
        stream = channel.unary_stream(f"/{SERVICE}/StreamChat")
        assert list(stream(b"q", timeout=10)) == [b"chunk %d " % i + b"q" * 50 for i in range(3)]
        bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
        assert list(bidi(iter([b"one", b"two", b"three"]), timeout=10)) == [b"echo:one", b"echo:two", b"echo:three"]
        with pytest.raises(grpc.RpcError) as failure:
            unary(b"fail", timeout=10)
        assert failure.value.code() is grpc.StatusCode.NOT_FOUND

    events = _calls(grpc_stack, 4)
    for event in events:
        oisp_schema.validate(event.to_dict())
    done = [e for e in events if e.event_type == "ai.response"]
    responses = {e.attrs["rpc.method"]: e for e in done if e.attrs.get("oisp.grpc.status") == "OK"}
    failed = [e for e in done if e.attrs.get("oisp.grpc.status") == "NOT_FOUND"]
    assert set(responses) == {"Unary", "StreamChat", "Bidi"} and len(failed) == 1

    unary_done = responses["Unary"]
    assert unary_done.attrs["rpc.system"] == "grpc" and unary_done.attrs["rpc.service"] == SERVICE
    assert unary_done.attrs["oisp.grpc.request_encoding"] == "gzip"
    assert unary_done.attrs["oisp.grpc.request_messages"] == 1
    assert unary_done.attrs["oisp.grpc.request_message_bytes"] == 500
    assert unary_done.attrs["oisp.grpc.response_message_bytes"] == 510
    assert unary_done.attrs["rpc.grpc.status_code"] == 0 and unary_done.attrs["oisp.grpc.status_source"] == "trailers"
    assert unary_done.data.success is True and unary_done.data.status_code == 200
    assert unary_done.confidence.completeness == "metadata_only"
    assert unary_done.data.provider.name == "other" and unary_done.attrs["oisp.provider"] == "cursor"
    assert unary_done.data.latency_ms is not None and unary_done.data.time_to_first_token_ms is not None
    assert responses["StreamChat"].attrs["oisp.grpc.response_messages"] == 3
    assert responses["Bidi"].attrs["oisp.grpc.request_messages"] == 3
    assert responses["Bidi"].attrs["oisp.grpc.response_messages"] == 3

    (error,) = failed
    assert error.data.success is False and error.data.error.type == "grpc_error"
    assert error.data.error.code == "NOT_FOUND" and error.data.error.message == "no such conversation"
    assert error.attrs["rpc.grpc.status_code"] == 5

    # The plugin saw every message decompressed, in both directions, and every status.
    payloads = {(m.call.method, m.direction, m.payload) for m in RecordingDecoder.seen}
    assert ("Unary", "client", b"hello" * 100) in payloads
    assert ("Bidi", "server", b"echo:three") in payloads
    assert ("StreamChat", "server", b"chunk 2 " + b"q" * 50) in payloads
    assert any(m.compressed and m.wire_size < m.payload.__len__() for m in RecordingDecoder.seen)
    assert sorted(s.code or 0 for s in RecordingDecoder.statuses) == [0, 0, 0, 5]


def test_a_large_message_over_many_frames_arrives_whole_and_is_counted(grpc_stack: Stack) -> None:
    big = os.urandom(64 * 1024) * 40  # 2.5 MiB: many DATA frames, flow control windows, gzip
    with _channel(grpc_stack) as channel:
        answer = channel.unary_unary(f"/{SERVICE}/Unary")(big, timeout=30)
    assert answer == b"answer to " + big
    (done,) = [e for e in _calls(grpc_stack, 1) if e.event_type == "ai.response"]
    assert done.attrs["oisp.grpc.request_message_bytes"] == len(big)
    assert done.attrs["oisp.grpc.response_message_bytes"] == len(big) + 10
    assert done.confidence.completeness == "metadata_only" and done.data.success
    assert [m.payload == big for m in RecordingDecoder.seen if m.direction == "client"] == [True]


def test_a_failing_plugin_harms_neither_the_call_nor_the_metadata(grpc_stack: Stack) -> None:
    with _channel(grpc_stack) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"explode", timeout=10) == b"answer to explode"
        assert unary(b"after", timeout=10) == b"answer to after"
    events = _calls(grpc_stack, 2)
    first = next(e for e in events if e.event_type == "ai.response")
    assert first.confidence.completeness == "partial"
    assert "on_grpc_message failed: ValueError" in first.confidence.limitations
    assert first.attrs["oisp.grpc.request_messages"] == 1


def test_the_built_in_decoder_is_a_grpc_message_decoder() -> None:
    assert isinstance(RecordingDecoder(grpc_call_of_for("/x.Y/Z")), GrpcMessageDecoder)


def grpc_call_of_for(path: str) -> Any:
    from oisp.http.exchange import ConnectionInfo, Headers, HttpRequest

    head = Headers([("content-type", "application/grpc")])
    exchange = HttpExchange(ConnectionInfo("c", ("127.0.0.1", 1), ("127.0.0.1", 2)),
                            HttpRequest("POST", path, HOST, "https", "2", head))
    return grpc_call_of(exchange)


# --- Connect with httpx, HTTP/2 and HTTP/1.1, against the test upstream (which records the bytes) ------------
REPLY_MESSAGES = encode_envelope(b'{"text": "one"}') + encode_envelope(b'{"text": "two"}', encoding="gzip")
REPLY_OK = REPLY_MESSAGES + encode_envelope(b'{"metadata": {"x": ["y"]}}', flags=FLAG_END_STREAM)
REPLY_LIMITED = REPLY_MESSAGES + encode_envelope(
    json.dumps({"error": {"code": "resource_exhausted", "message": "slow down"}}).encode(), flags=FLAG_END_STREAM)


async def connect_handler(request: Request) -> Response:
    content_type = request.header("content-type") or ""
    if content_type.startswith("application/connect+"):
        reply = REPLY_LIMITED if request.target.endswith("/Limited") else REPLY_OK

        async def body() -> Any:
            for start in range(0, len(reply), 7):  # in small pieces: envelopes cut anywhere
                yield reply[start : start + 7]
        return Response(headers=[("content-type", "application/connect+json"),
                                 ("connect-content-encoding", "gzip")], body=body)
    if request.target.endswith("/Missing"):
        return Response(status=404, headers=[("content-type", "application/json")],
                        body=b'{"code": "not_found", "message": "no such model"}')
    return Response(headers=[("content-type", "application/proto")], body=b"\x0a\x03abc")


@pytest.fixture
def connect_stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, handler=connect_handler) as stack:
        yield stack


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "h1"])
def test_connect_streaming_and_unary_with_httpx(connect_stack: Stack, oisp_schema: SchemaValidator,
                                                 http2: bool) -> None:
    stack = connect_stack
    streaming_body = encode_envelope(b'{"prompt": "hi"}') + encode_envelope(b'{"more": 1}', encoding="gzip")
    zipped = gzip.compress(b'{"a": 1}')
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), http2=http2) as client:
        base = "https://api.openai.com/aiserver.v1.ChatService"
        answer = client.post(f"{base}/StreamUnifiedChat", content=streaming_body,
                             headers={"content-type": "application/connect+json", "connect-protocol-version": "1",
                                      "connect-content-encoding": "gzip"})
        limited = client.post(f"{base}/Limited", content=streaming_body,
                              headers={"content-type": "application/connect+json",
                                       "connect-content-encoding": "gzip"})
        unary = client.post(f"{base}/GetModel", content=b"\x0a\x01x",
                            headers={"content-type": "application/proto", "connect-protocol-version": "1"})
        missing = client.post(f"{base}/Missing", content=zipped,
                              headers={"content-type": "application/json", "connect-protocol-version": "1",
                                       "content-encoding": "gzip"})
    assert answer.content.startswith(encode_envelope(b'{"text": "one"}')) and unary.content == b"\x0a\x03abc"
    assert missing.status_code == 404 and limited.status_code == 200

    events = _calls(stack, 4)
    for event in events:
        oisp_schema.validate(event.to_dict())
    by_method = {e.attrs["rpc.method"]: e for e in events if e.event_type == "ai.response"}
    streamed = by_method["StreamUnifiedChat"]
    assert streamed.attrs["rpc.system"] == "connect_rpc" and streamed.attrs["oisp.grpc.protocol"] == "connect"
    assert streamed.attrs["oisp.grpc.request_messages"] == 2 and streamed.attrs["oisp.grpc.response_messages"] == 2
    assert streamed.attrs["oisp.grpc.response_message_bytes"] == 30 and streamed.data.success
    assert streamed.attrs["oisp.grpc.status_source"] == "end-stream"
    assert by_method["Limited"].data.error.code == "RESOURCE_EXHAUSTED"
    assert by_method["Limited"].data.error.message == "slow down" and not by_method["Limited"].data.success
    assert by_method["GetModel"].attrs["oisp.grpc.protocol"] == "connect-unary"
    assert by_method["GetModel"].attrs["oisp.grpc.response_message_bytes"] == 5 and by_method["GetModel"].data.success
    assert by_method["Missing"].data.error.code == "NOT_FOUND" and by_method["Missing"].data.status_code == 404
    assert by_method["Missing"].attrs["oisp.grpc.codec"] == "json"

    # Byte-faithful: the upstream got exactly the bodies the client sent.
    requests = [r for recording in stack.upstream.connections for r in recording.requests]
    assert [r.body for r in requests] == [streaming_body, streaming_body, b"\x0a\x01x", zipped]
    # ... and the client got exactly the bodies the upstream sent.
    assert answer.content == REPLY_OK and limited.content == REPLY_LIMITED


def test_a_truncated_stream_is_partial_and_the_client_gets_what_was_sent(tmp_path: Path,
                                                                         test_ca: trustme.CA) -> None:
    cut = encode_envelope(b"x" * 1000)

    async def handler(request: Request) -> Response:
        async def body() -> Any:
            yield encode_envelope(b"whole")
            yield cut[:400]
        return Response(headers=[("content-type", "application/grpc-web+proto")], body=body, abort_after_chunks=2)

    with running_stack(tmp_path, test_ca, handler=handler) as stack:
        with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), http2=False) as client, \
                pytest.raises(httpx.HTTPError):
            client.post("https://api.openai.com/x.Svc/Run", content=encode_envelope(b"q"),
                        headers={"content-type": "application/grpc-web+proto"})
        (done,) = [e for e in _calls(stack, 1) if e.event_type == "ai.response"]
    assert done.confidence.completeness == "partial" and done.data.success is False
    assert done.attrs["oisp.grpc.response_messages"] == 1
    assert any("stream ended inside a message" in reason for reason in done.confidence.limitations)


# --- the decoder fed by hand (sans-io), for what a live server rarely sends -----------------------------------
def _run(content_type: str, response: list[bytes], *, response_type: str | None = None, status: int = 200,
         body: bytes = b"", response_headers: tuple[tuple[str, str], ...] = (),
         trailers: list[tuple[str, str]] | None = None) -> list[Event]:
    """One call fed by hand as the proxy would: request, response head, body chunks, trailers, end."""
    import time

    from tests.providers.exchange_harness import claim, make_exchange

    from oisp.events.spec_gaps import conform
    from oisp.http.exchange import Headers, HttpResponse

    exchange = make_exchange("POST", f"https://{HOST}/aiserver.v1.AiService/Run", body,
                             headers=[("content-type", content_type)])
    plugin, decoder = claim(exchange)
    assert plugin == "oisp.providers.grpc"
    events = list(decoder.on_request(exchange))
    exchange.response = HttpResponse(status=status, reason="", http_version="2", headers=Headers(
        [("content-type", response_type or content_type), *response_headers]))
    exchange.timings.response_headers = time.monotonic_ns()
    for chunk in response:
        exchange.response.body += chunk
        exchange.response.wire_size += len(chunk)
        events += decoder.on_response_data(exchange, chunk)
    if trailers is not None:
        exchange.response.trailers = Headers(trailers)
    exchange.timings.response_end = time.monotonic_ns()
    events += decoder.on_end(exchange)
    return [conform(event) for event in events]


def _done(events: list[Event]) -> Event:
    (done,) = [e for e in events if e.event_type == "ai.response"]
    return done


def test_grpc_web_trailers_block_gives_the_status(oisp_schema: SchemaValidator) -> None:
    stream = encode_envelope(b"m1") + encode_envelope(b"grpc-status:14\r\ngrpc-message:try%20later\r\n", flags=0x80)
    events = _run("application/grpc-web+proto", [stream[:7], stream[7:]], body=encode_envelope(b"q"))
    for event in events:
        oisp_schema.validate(event.to_dict())
    done = _done(events)
    assert done.data.error.code == "UNAVAILABLE" and done.data.error.message == "try later"
    assert done.attrs["oisp.grpc.status_source"] == "trailers-block"
    assert done.attrs["oisp.grpc.response_messages"] == 1 and done.attrs["oisp.grpc.request_messages"] == 1


def test_grpc_web_text_bodies_are_base64() -> None:
    request = base64.b64encode(encode_envelope(b"question"))
    reply = base64.b64encode(encode_envelope(b"answer")) + base64.b64encode(
        encode_envelope(b"grpc-status: 0\r\n", flags=0x80))
    done = _done(_run("application/grpc-web-text", [reply[:5], reply[5:]], body=request))
    assert done.data.success and done.attrs["oisp.grpc.request_message_bytes"] == 8
    assert done.attrs["oisp.grpc.response_message_bytes"] == 6 and done.attrs["oisp.grpc.protocol"] == "grpc-web-text"


def test_trailers_only_response_and_h2_trailers() -> None:
    only = _done(_run("application/grpc", [], response_headers=(("grpc-status", "7"), ("grpc-message", "denied"))))
    assert only.data.error.code == "PERMISSION_DENIED" and only.attrs["oisp.grpc.status_source"] == "headers"
    ok = _done(_run("application/grpc", [encode_envelope(b"r")], trailers=[("grpc-status", "0")]))
    assert ok.data.success and ok.attrs["oisp.grpc.status_source"] == "trailers"


def test_a_call_without_status_or_with_an_html_error_is_partial_never_a_crash() -> None:
    missing = _done(_run("application/grpc", [encode_envelope(b"r")]))
    assert not missing.data.success and missing.confidence.completeness == "partial"
    assert "the call ended without a status" in missing.confidence.limitations
    html = _done(_run("application/grpc", [b"<html>bad gateway</html>"], status=502, response_type="text/html"))
    assert html.data.error.code == "502" and html.attrs["oisp.grpc.response_messages"] == 0
    garbage = _done(_run("application/grpc", [b"\xff" * 8], trailers=[("grpc-status", "0")]))
    assert garbage.confidence.completeness == "partial"
    assert any("not enveloped" in reason for reason in garbage.confidence.limitations)


def test_unsupported_message_encoding_is_counted_and_noted() -> None:
    snappy = struct.pack(">BI", 1, 3) + b"abc"
    done = _done(_run("application/grpc", [snappy], trailers=[("grpc-status", "0")],
                      response_headers=(("grpc-encoding", "snappy"),)))
    assert done.attrs["oisp.grpc.response_messages"] == 1 and done.attrs["oisp.grpc.response_encoding"] == "snappy"
    assert any("unsupported encoding 'snappy'" in reason for reason in done.confidence.limitations)


@pytest.mark.parametrize(("content_type", "headers", "claimed"), [
    ("application/json", (), False),  # a plain JSON API is not Connect
    ("application/json", (("connect-protocol-version", "1"),), True),
    ("application/grpc+json", (), True),
    ("application/grpcfoo", (), False),
    ("application/connect+proto", (), True),
    ("text/event-stream", (), False),
])
def test_which_requests_are_calls(content_type: str, headers: tuple[tuple[str, str], ...], claimed: bool) -> None:
    from tests.providers.exchange_harness import claim, make_exchange

    exchange = make_exchange("POST", f"https://{HOST}/a.B/C", b"", headers=[("content-type", content_type), *headers])
    assert (claim(exchange)[0] == "oisp.providers.grpc") is claimed
