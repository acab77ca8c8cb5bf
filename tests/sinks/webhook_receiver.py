"""A real HTTPS webhook receiver on loopback for the webhook sink's tests and benchmark: it checks signatures,
records every accepted event with its arrival time, and can fail on demand (an HTTP status, with headers, or
by not listening at all: connection refused)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

from oisp.sinks.webhook import SIGNATURE_HEADER, sign


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    receiver: Receiver

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.receiver.context is not None:
            try:  # the handshake in the connection's own thread, not the accepting one
                request = self.receiver.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-request is part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, headers = receiver.answer(self.headers.get(SIGNATURE_HEADER), body, dict(self.headers))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if receiver.hang_up_after_each:
            self.close_connection = True  # without saying so (no Connection: close), as idle timeouts do

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Receiver:
    """Answers POSTs with ``failure`` while it is set (``(status, headers)``), else 200 and records the events.

    ``tls`` (default) serves HTTPS with a certificate from a trustme CA written to :attr:`ca_file`.
    """

    def __init__(self, directory: Path, *, secret: str | None = None, tls: bool = True) -> None:
        self.secret = secret.encode() if secret is not None else None
        self.context: ssl.SSLContext | None = None
        self.ca_file = directory / "receiver-ca.pem"
        if tls:
            ca = trustme.CA()
            ca.cert_pem.write_to_path(str(self.ca_file))
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.context)
        self.failure: tuple[int, dict[str, str]] | None = None
        #: Close every connection after its answer, unannounced: the client finds out on its next request.
        self.hang_up_after_each = False
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() of each event's arrival
        self.batches: list[bytes] = []
        self.request_times: list[float] = []
        self.request_headers: list[dict[str, str]] = []
        self.bad_signatures = 0
        self.on_batch: Callable[[list[dict[str, Any]], float], None] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}/ingest"

    def start(self) -> Receiver:
        """Listen (again, on the same port once one was chosen)."""
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.receiver = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reserve_port(self) -> None:
        """Pick a free port without listening on it (a receiver that is down from the start)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def answer(self, signature: str | None, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        now = time.monotonic()
        with self.lock:
            self.request_times.append(now)
            self.request_headers.append(headers)
            if self.failure is not None:
                return self.failure
            if self.secret is not None and signature != sign(self.secret, body):
                self.bad_signatures += 1
                return 401, {}
            events = [json.loads(line) for line in body.decode("utf-8").split("\n") if line]
            self.batches.append(body)
            self.events.extend(events)
            self.arrivals.extend([now] * len(events))
            callback = self.on_batch
        if callback is not None:
            callback(events, now)
        return 200, {}

    def event_ids(self) -> list[str]:
        with self.lock:
            return [e["event_id"] for e in self.events]

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
