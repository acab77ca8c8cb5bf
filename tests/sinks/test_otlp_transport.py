"""The otlp sink's transport: what it retries (and how long), what it gives up on at once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tests.events import samples

from oisp.events import Host
from oisp.sinks.otlp import create_sink
from oisp.sinks.otlp.sink import OtlpSink

HOST = Host(hostname="dev-box", os="linux")


class Scripted:
    """An OTLP/HTTP endpoint that answers each path with the statuses it is given, in order (the last one
    again once they run out)."""

    def __init__(self, answers: dict[str, list[int]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, int]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                queue = scripted.answers.get(self.path, [200])
                status = queue.pop(0) if len(queue) > 1 else queue[0]
                scripted.seen.append((self.path, status))
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def statuses(self, path: str) -> list[int]:
        return [status for seen_path, status in self.seen if seen_path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted({"/v1/logs": [503, 503, 200], "/v1/traces": [400]})
    yield server
    server.close()


def test_a_503_is_retried_until_delivered_and_a_400_is_not_retried(scripted: Scripted) -> None:
    sink = create_sink({"endpoint": scripted.endpoint, "metrics": False, "timeout": 5})
    assert isinstance(sink, OtlpSink)
    request = samples.ai_request().with_context(host=HOST)
    response = samples.ai_response().with_context(host=HOST)
    sink.write([request, response])
    sink.close()
    assert scripted.statuses("/v1/logs") == [503, 503, 200]
    assert scripted.statuses("/v1/traces") == [400]
    assert sink.stats.sent == {"spans": 0, "logs": 2}
    assert sink.stats.failed == {"spans": 1, "logs": 0}


def test_retries_stop_at_the_timeout() -> None:
    server = Scripted({"/v1/logs": [502]})  # never recovers, and says nothing about when to retry
    try:
        sink = create_sink({"endpoint": server.endpoint, "metrics": False, "traces": False, "timeout": 1.5})
        assert isinstance(sink, OtlpSink)
        sink.write([samples.network_connect().with_context(host=HOST)])
        sink.close()
        attempts = server.statuses("/v1/logs")
        assert 2 <= len(attempts) <= 4  # backoff from 0.5 s, doubling, with jitter, within 1.5 s
        assert sink.stats.failed == {"spans": 0, "logs": 1}
    finally:
        server.close()


def test_without_grpcio_a_grpc_sink_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from oisp.errors import ConfigurationError

    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'oisp\[otlp\]'"):
        create_sink({"endpoint": "http://127.0.0.1:4317", "protocol": "grpc"})
