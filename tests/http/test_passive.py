"""make_decoder's choice of decoder, the preface sniffing without ALPN, and listener isolation."""

from __future__ import annotations

import pytest
from tests.http.test_h1 import req, resp
from tests.http.transcript import H2Pair, Recorder, connection, run

from oisp.http import Http1Decoder, Http2Decoder, HttpExchange, make_decoder
from oisp.http.passive import PassiveDecoder


@pytest.mark.parametrize(("alpn", "kind"), [("h2", Http2Decoder), ("http/1.1", Http1Decoder),
                                            ("http/1.0", Http1Decoder)])
def test_alpn_selects_the_decoder(alpn: str, kind: type) -> None:
    decoder: PassiveDecoder = make_decoder(alpn, connection(alpn=alpn), Recorder())
    assert isinstance(decoder, kind)


@pytest.mark.parametrize("alpn", [None, "spdy/3.1"])
def test_without_alpn_http1_is_detected_from_the_first_bytes(alpn: str | None) -> None:
    wire = [("client", b"G"), ("client", b"ET / HTTP/1.1\r\nHost: localhost\r\n\r\n"), ("server", resp(200, b"{}"))]
    recorder, decoder = run(wire, alpn=alpn, tls=False)
    assert decoder.error is None
    (exchange,) = recorder.exchanges
    assert exchange.request.http_version == "1.1"
    assert exchange.request.url == "http://localhost/"


def test_sniffing_replays_closes_and_timestamps_in_order() -> None:
    recorder = Recorder()
    decoder = make_decoder(None, connection(tls=False), recorder)
    decoder.feed_client(b"GET / HTTP/1.1\r\nHo", 5)
    decoder.feed_client(b"st: h\r\n\r\n", 6)
    (exchange,) = recorder.exchanges
    assert exchange.timings.request_start == 5
    assert exchange.timings.request_end == 6


def test_server_speaking_first_settles_on_http1() -> None:
    recorder, decoder = run([("server", b"HTTP/1.1 408 Request Timeout\r\n\r\n")], alpn=None, close=["server"])
    assert recorder.calls == []
    assert decoder.error is None


def test_abort_before_any_byte_is_harmless() -> None:
    decoder = make_decoder(None, connection(), Recorder())
    decoder.abort("reset")
    assert decoder.error is None


class AlwaysFailing(Recorder):
    def request(self, exchange: HttpExchange) -> None:
        super().request(exchange)
        raise ValueError("request hook bug")

    def response_start(self, exchange: HttpExchange) -> None:
        super().response_start(exchange)
        raise ValueError("response_start hook bug")

    def end(self, exchange: HttpExchange) -> None:
        super().end(exchange)
        raise ValueError("end hook bug")


def test_failing_listener_never_stops_h2_decoding(caplog: pytest.LogCaptureFixture) -> None:
    pair = H2Pair()
    streams = [pair.request(f"/{i}", method="GET") for i in range(3)]
    pair.flush()
    for stream in streams:
        pair.respond(stream, body=b"ok")
    pair.flush()
    recorder = AlwaysFailing()
    decoder = make_decoder("h2", connection(alpn="h2"), recorder)
    for direction, data in pair.wire:
        (decoder.feed_client if direction == "client" else decoder.feed_server)(data)
    assert decoder.error is None
    assert len(recorder.exchanges) == 3
    recorder.assert_contract()
    assert caplog.text.count("exchange listener failed") == 9


def test_failing_listener_never_stops_h1_decoding() -> None:
    failing = AlwaysFailing()
    decoder = make_decoder("http/1.1", connection(), failing)
    decoder.feed_client(req("GET", "/a") + req("GET", "/b"))
    decoder.feed_server(resp(200, b"a") + resp(200, b"b"))
    assert decoder.error is None
    assert [bytes(e.response.body) for e in failing.exchanges if e.response] == [b"a", b"b"]
    failing.assert_contract()
