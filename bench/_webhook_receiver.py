"""The receiver of ``bench_export.py``'s webhook column: an HTTPS webhook endpoint on loopback, in its own process
(so it never takes the GIL from the sink it measures).

``python _webhook_receiver.py CERT KEY``: prints its port, then, for every batch it accepts (answered 200), one
line ``<time.monotonic()> <event_id> <event_id> ...`` (the monotonic clock is system-wide, so the parent can
compare it with its own). Ends when its standard input closes.
"""

from __future__ import annotations

import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_EVENT_ID = re.compile(rb'"event_id":"([^"]+)"')
_OUT = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        now = time.monotonic()
        ids = b" ".join(_EVENT_ID.findall(body)).decode()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with _OUT:
            sys.stdout.write(f"{now} {ids}\n")
            sys.stdout.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    cert, key = sys.argv[1:3]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main()
