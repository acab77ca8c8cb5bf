"""The receiver of ``bench_export.py``'s OTLP columns: the tests' OTLP receiver (opentelemetry-proto + grpcio, or
OTLP/HTTP on ``http.server``) on loopback, in its own process (so it never takes the GIL from the sink it
measures).

``python _otlp_receiver.py grpc|http/protobuf``: prints its port, then, for every logs request it accepts (log
records are the signal that carries every event), one line ``<time.monotonic()> <event_id> <event_id> ...``
(the monotonic clock is system-wide, so the parent can compare it with its own). Ends when its standard input
closes.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the receiver lives with the tests

from tests.sinks.otlp_receiver import Receiver

_OUT = threading.Lock()


def main() -> None:
    receiver = Receiver(sys.argv[1], keep=False)

    def on_logs(request: Any) -> None:
        now = time.monotonic()
        # The sink gives every record one attribute, oisp.event_id.
        ids = " ".join(record.attributes[0].value.string_value for rl in request.resource_logs
                       for sl in rl.scope_logs for record in sl.log_records)
        with _OUT:
            sys.stdout.write(f"{now} {ids}\n")
            sys.stdout.flush()

    receiver.on_logs = on_logs
    print(receiver.port, flush=True)
    sys.stdin.read()
    receiver.close()


if __name__ == "__main__":
    main()
