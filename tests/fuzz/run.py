"""The long fuzzing tier: ``python tests/fuzz/run.py [--seconds N] [target ...]`` (``nox -s fuzz`` runs it).

Coverage-guided with atheris (libFuzzer) when it is installed: each target runs in a process of its own for
``--seconds``, its working corpus in ``.fuzz/<target>/`` (started from the target's seeds and its kept
regression cases), each crash or hang written to ``tests/fuzz/corpus/<target>/`` (keep it once it is fixed:
the short tier in the test suite replays every file there). Without atheris, Hypothesis runs each target
with mutations of its seeds for the same time. Exits non-zero when any target failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
WORK = ROOT / ".fuzz"
#: Modules instrumented for coverage: oisp's parsers and the libraries they parse with.
INSTRUMENTED = ["oisp", "h11", "hpack", "hyperframe", "h2"]


def _child(target: str, seconds: int, timeout: int) -> None:
    """Run inside the fuzzing process: atheris takes the process over."""
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # decoders log what they refuse: millions of lines
    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz.targets import SEEDS, TARGETS
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(SEEDS[target]):
        (work / f"seed-{number}").write_bytes(seed)
    kept = CORPUS / target
    kept.mkdir(parents=True, exist_ok=True)
    function = TARGETS[target]
    atheris.Setup([sys.argv[0], str(work), str(kept), f"-max_total_time={seconds}", f"-timeout={timeout}",
                   "-rss_limit_mb=2048", "-max_len=65536", f"-artifact_prefix={kept}/",
                   "-print_final_stats=1"], function)
    atheris.Fuzz()


def _hypothesis(target: str, seconds: int) -> bool:
    sys.path.insert(0, str(ROOT))
    from hypothesis import HealthCheck, given, settings
    from tests.fuzz.strategies import inputs
    from tests.fuzz.targets import TARGETS

    deadline = time.monotonic() + seconds
    function = TARGETS[target]
    ok = True
    while time.monotonic() < deadline:
        @settings(max_examples=2000, deadline=5000, database=None, suppress_health_check=list(HealthCheck))
        @given(inputs(target))
        def run(data: bytes) -> None:
            function(data)

        try:
            run()
        except Exception as exc:  # the falsifying example is printed by Hypothesis
            print(f"{target}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
            break
    return ok


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # before anything imports oisp: it must be instrumented
        _child(sys.argv[2], int(sys.argv[4]), int(sys.argv[6]))
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=300, help="per target (default 300)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (a hang past it fails)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    failed = []
    for name in names:
        print(f"== {name}: {engine}, {args.seconds} s", flush=True)
        if engine == "atheris":
            code = subprocess.call([sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
                                    "--timeout", str(args.timeout)], env={**os.environ, "PYTHONPATH": str(ROOT)})
            ok = code == 0
        else:
            ok = _hypothesis(name, args.seconds)
        if not ok:
            failed.append(name)
    print(f"== {len(names) - len(failed)} of {len(names)} targets passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
