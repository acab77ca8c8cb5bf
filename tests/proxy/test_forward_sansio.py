"""The sans-io parts of plain-HTTP forwarding: origin-form rewriting (RFC 9112 §3.2, RFC 9110 §7.6.1), message
framing over arbitrary splits, and knowing when every response has been delivered."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oisp.errors import ProtocolError
from oisp.proxy.forward import ForwardedRequest, ForwardRewriter, Origin, to_origin_form
from oisp.proxy.h1_framing import MAX_HEAD, Body, Framing, MessageFramer, ResponseTracker
from oisp.proxy.reverse import RequestRewriter


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_absolute_form_becomes_origin_form_with_host_from_the_target() -> None:
    head, request, framing = to_origin_form(_head(
        "POST http://LocalHost:11434/api/chat?x=1&y=%20 HTTP/1.1", "X-First: 1", "HOST: wrong.example",
        "content-type: application/json", "Content-Length: 2"))
    assert head == _head("POST /api/chat?x=1&y=%20 HTTP/1.1", "X-First: 1", "HOST: LocalHost:11434",
                         "content-type: application/json", "Content-Length: 2")
    assert request == ForwardedRequest(b"POST", Origin("localhost", 11434))
    assert framing == Framing(Body.LENGTH, 2)


def test_a_missing_host_is_generated_and_userinfo_never_reaches_it() -> None:
    head, request, _ = to_origin_form(_head("GET http://user:secret@[::1]:1234 HTTP/1.1", "Accept: */*"))
    assert head == _head("GET / HTTP/1.1", "Host: [::1]:1234", "Accept: */*")
    assert request.origin == Origin("::1", 1234)
    head, _, _ = to_origin_form(_head("OPTIONS http://example.com HTTP/1.1", "Host: example.com"))
    assert head.startswith(b"OPTIONS * HTTP/1.1\r\n")
    head, request, _ = to_origin_form(_head("GET http://example.com?q=1 HTTP/1.1", "Host: example.com"))
    assert head.startswith(b"GET /?q=1 HTTP/1.1\r\n") and request.origin == Origin("example.com", 80)


def test_proxy_hop_headers_and_what_connection_names_are_dropped() -> None:
    head, _, _ = to_origin_form(_head(
        "GET http://h:80/p HTTP/1.1", "Host: h", "Proxy-Connection: keep-alive", "Connection: keep-alive, X-Hop, TE",
        "X-Hop: 1", "TE: trailers", "Keep-Alive: timeout=5", "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "x-kept: yes"))
    assert head == _head("GET /p HTTP/1.1", "Host: h:80", "Connection: keep-alive", "x-kept: yes")
    # unchanged Connection headers stay exactly as sent; close and upgrade are the message's own options
    head, _, _ = to_origin_form(_head("GET http://h/ HTTP/1.1", "Host: h", "connection: Upgrade",
                                      "Upgrade: websocket", "Sec-WebSocket-Key: k"))
    assert head == _head("GET / HTTP/1.1", "Host: h", "connection: Upgrade", "Upgrade: websocket",
                         "Sec-WebSocket-Key: k")
    head, _, _ = to_origin_form(_head("GET http://h/ HTTP/1.1", "Host: h", "Connection: X-Only", "X-Only: 1"))
    assert head == _head("GET / HTTP/1.1", "Host: h")


def test_origin_form_requests_keep_their_target_and_host() -> None:
    head = _head("GET /again HTTP/1.1", "Host: h:1")
    out, request, _ = to_origin_form(head)
    assert out == head and request.origin is None


@pytest.mark.parametrize("line", [
    "GET https://h/ HTTP/1.1", "CONNECT h:443 HTTP/1.1", "GET http:// HTTP/1.1", "GET http://h:99999/ HTTP/1.1",
    "GET http://h/ HTTP/2.0", "GET  http://h/ HTTP/1.1",
])
def test_requests_that_cannot_be_forwarded_are_protocol_errors(line: str) -> None:
    with pytest.raises(ProtocolError):
        to_origin_form(_head(line, "Host: h"))


STREAM = (
    b"POST http://a:11434/api/chat HTTP/1.1\r\nHost: a:11434\r\nContent-Length: 11\r\n\r\n{\"x\": \"\r\n\"}"
    b"\r\n"  # a stray CRLF between messages
    b"POST http://a:11434/api/generate HTTP/1.1\r\nHost: a:11434\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"GET http://b/models HTTP/1.1\r\nHost: b\r\n\r\n"
)
EXPECTED = (
    b"POST /api/chat HTTP/1.1\r\nHost: a:11434\r\nContent-Length: 11\r\n\r\n{\"x\": \"\r\n\"}"
    b"\r\n"
    b"POST /api/generate HTTP/1.1\r\nHost: a:11434\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"GET /models HTTP/1.1\r\nHost: b\r\n\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
def test_forwarding_is_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    rewriter = ForwardRewriter()
    bounds = [0, *sorted(cuts), len(STREAM)]
    out: list[bytes | ForwardedRequest] = []
    for start, end in itertools.pairwise(bounds):
        out += rewriter.feed(STREAM[start:end])
    assert b"".join(x for x in out if isinstance(x, bytes)) == EXPECTED
    assert [x for x in out if isinstance(x, ForwardedRequest)] == [
        ForwardedRequest(b"POST", Origin("a", 11434)), ForwardedRequest(b"POST", Origin("a", 11434)),
        ForwardedRequest(b"GET", Origin("b", 80))]


def test_body_bytes_are_passed_on_without_copies_or_holding() -> None:
    rewriter = ForwardRewriter()
    rewriter.feed(b"PUT http://a/f HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
    chunk = b"\r\n\r\n" * 16384  # looks like heads, is body
    assert rewriter.feed(chunk)[0] is chunk


def test_after_an_upgrade_everything_passes_untouched() -> None:
    rewriter = ForwardRewriter()
    out = rewriter.feed(b"GET http://a/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                        b"GET http://not-a-request/ HTTP/1.1\r\n\r\n")
    assert out[-1] == b"GET http://not-a-request/ HTTP/1.1\r\n\r\n"


def test_malformed_framing_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="chunk size"):
        ForwardRewriter().feed(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(ProtocolError, match="Content-Length"):
        ForwardRewriter().feed(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    rewriter = ForwardRewriter()
    for _ in range(MAX_HEAD // 4096):
        rewriter.feed(b"X" * 4096)
    with pytest.raises(ProtocolError, match="longer than"):
        rewriter.feed(b"X" * 4096)


def test_reverse_mode_rewriter_follows_the_same_framing() -> None:
    rewriter = RequestRewriter("api.openai.com", "/base")
    stream = (b"POST /v1/x HTTP/1.1\r\nHost: localhost:8080\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n0\r\n\r\nGET /v1/y HTTP/1.1\r\nhost: localhost\r\n\r\n")
    out = b"".join(rewriter.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    assert out == (b"POST /base/v1/x HTTP/1.1\r\nHost: api.openai.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\n\r\nGET /base/v1/y HTTP/1.1\r\nhost: api.openai.com\r\n\r\n")


RESPONSES = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"      # POST
    b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"         # HEAD: no body whatever the length says
    b"HTTP/1.1 204 No Content\r\n\r\n"                        # GET
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n"  # GET
)


@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES)), max_size=6))
def test_the_tracker_knows_when_every_response_is_complete(cuts: list[int]) -> None:
    tracker = ResponseTracker()
    for method in (b"POST", b"HEAD", b"GET", b"GET"):
        tracker.request_sent(method)
    bounds = [0, *sorted(cuts), len(RESPONSES)]
    for start, end in itertools.pairwise(bounds):
        if start < end:
            assert not tracker.idle
        tracker.feed(RESPONSES[start:end])
    assert tracker.idle


def test_the_tracker_is_not_idle_mid_response_or_with_close_delimited_bodies() -> None:
    tracker = ResponseTracker()
    assert tracker.idle
    tracker.request_sent(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert not tracker.idle
    tracker.feed(b"cd")
    assert tracker.idle
    tracker.request_sent(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil the server closes")
    assert not tracker.idle and tracker.until_close
    bad = ResponseTracker()
    bad.request_sent(b"GET")
    with pytest.raises(ProtocolError):
        bad.feed(b"HTTP/1.1 abc\r\n\r\n")


def test_framer_demands_a_framing_decision() -> None:
    framer = MessageFramer()
    with pytest.raises(RuntimeError):
        list(framer.feed(b"GET / HTTP/1.1\r\n\r\n"))
