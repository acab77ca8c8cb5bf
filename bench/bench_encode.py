"""CPU cost of turning an event into its JSON text: the plain way, the fast encoder, the pipeline's processing.

Run: ``.venv/bin/python bench/bench_encode.py [--exchanges 300] [--repeat 5] [--against DIR]``

The events are those of ``--exchanges`` ordinary chat completions decoded as the proxy decodes them (the
exchanges, connection and process of ``bench_decode.py``: every event of the connection shares its process,
user, app and source records). Columns, in µs per event (best of ``--repeat``):

* ``to_dict``: :meth:`Event.to_dict`;
* ``to_json``: :meth:`Event.to_json` of an event that has no text yet (the dict, then the compact JSON);
* ``encoder``: :meth:`EventEncoder.to_json <oisp.events.EventEncoder.to_json>` (shared records encoded once);
* ``process``: :meth:`Pipeline.process <oisp.pipeline.Pipeline.process>` (host, redaction scan, conformance,
  the JSON text), the pipeline's cost per event.

``--against DIR``: also measure another checkout (``DIR/src``, ``DIR/bench``, say a ``git archive`` of the
commit before a change), in alternating subprocesses, each tree's best shown in the same table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _events(exchanges: int) -> list[Any]:
    from bench_decode import bench_connection, exchange_traffic

    import oisp
    from oisp.http import make_decoder
    from oisp.plugins import create_plugin_manager

    EventDecoder = oisp.EventDecoder

    events: list[Any] = []
    connection = bench_connection()
    observer = EventDecoder(create_plugin_manager(entrypoints=False), events.append)
    decoder = make_decoder("http/1.1", connection, observer.exchange_listener(connection))
    for client, server in exchange_traffic("http/1.1", exchanges):
        decoder.feed_client(client)
        decoder.feed_server(server)
    return events


def _best(repeat: int, events: list[Any], step: Callable[[Any], object]) -> float:
    """Best µs per event of ``step`` over ``events``."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            for event in events:
                step(event)
            best = min(best, time.process_time() - start)
        finally:
            gc.enable()
    return best / len(events) * 1e6


def measure(exchanges: int, repeat: int) -> dict[str, float]:
    """This tree's columns."""
    from bench_decode import _HOST

    import oisp.events
    from oisp.pipeline import Pipeline

    events = _events(exchanges)
    pipeline = Pipeline({}, host=_HOST)
    out = {"to_dict": _best(repeat, events, lambda e: e.to_dict()),
           "to_json": _best(repeat, events, lambda e: e.with_context().to_json())}
    out["to_json"] -= _best(repeat, events, lambda e: e.with_context())  # the copy that drops a remembered text
    encoder_type = getattr(oisp.events, "EventEncoder", None)
    if encoder_type is not None:
        encoder = encoder_type()
        out["encoder"] = _best(repeat, events, encoder.to_json)
    out["process"] = _best(repeat, events, pipeline.process)
    return out


def _run_tree(tree: Path, exchanges: int, repeat: int) -> dict[str, float]:
    # the tree's own oisp and bench_decode first; this script's folder last (for this module alone)
    path = [str(tree / "src"), str(tree / "bench"), str(Path(__file__).resolve().parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    code = f"import json, bench_encode; print(json.dumps(bench_encode.measure({exchanges}, {repeat})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=tree)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=300, help="chat completions decoded (default 300)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per column; the best counts (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: alternating runs per tree")
    parser.add_argument("--against", type=Path, help="another checkout to measure in the same run")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    trees = {"this tree": here} | ({f"against {args.against}": args.against.resolve()} if args.against else {})
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds if args.against else 1):
        for name, tree in trees.items():
            result = _run_tree(tree, args.exchanges, args.repeat)
            best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in result.items()}
    columns = ("to_dict", "to_json", "encoder", "process")
    print(f"events of {args.exchanges} chat completions (one connection), best of {args.repeat}; CPU µs per event")
    print(f"{'tree':<40}" + "".join(f"{c:>10}" for c in columns))
    for name, values in best.items():
        print(f"{name:<40}" + "".join(f"{values[c]:>10.1f}" if c in values else f"{'-':>10}" for c in columns))


if __name__ == "__main__":
    main()
