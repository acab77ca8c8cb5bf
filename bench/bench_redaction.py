"""Cost of the content redaction prefilter on text that holds no secret (what nearly every string is).

Run: ``.venv/bin/python bench/bench_redaction.py [--repeat 5]``

Three corpora of clean strings go through :meth:`oisp.redaction.Redactor.redact_text` (the clean-string cache of
``Redactor.scan`` is bypassed, so every string is scanned): prose prompts, code with URLs, identifiers and
dashes, and short texts that mention tokens and passwords without holding one. The best of ``--repeat`` runs is
printed, in microseconds per string and MB/s (MB = 10**6 characters).
"""

from __future__ import annotations

import argparse
import random
import time

from oisp.redaction import Redactor

_SENTENCE = (
    "the of and to in is you that it was for on are as with they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who its now find long down day "
    "did get come made may part model answer "
)
_WORDS = _SENTENCE.split()


def _corpora() -> dict[str, list[str]]:
    rng = random.Random(1)
    prose = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 400))) for _ in range(2000)]
    code = [
        f"def handler_{i}(request_id: str) -> dict:\n"
        f"    url = 'https://api.example.com/v1/items/{i}?page=2'  # see https://docs.example.com/a-b\n"
        f"    return fetch(url, timeout=30, retries=3)  # non-blocking, thread-safe\n" * 4
        for i in range(500)
    ]
    mentions = [f"Please keep the token usage under {i} tokens and never print the password field"
                for i in range(500)]
    return {"prose": prose, "code": code, "mentions secrets": mentions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args, _ = parser.parse_known_args()
    redactor = Redactor()
    print(f"{'corpus':<18} {'us/string':>10} {'MB/s':>8}")
    for name, texts in _corpora().items():
        characters = sum(map(len, texts))
        best = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            for text in texts:
                redactor.redact_text(text)
            best = min(best, time.perf_counter() - started)
        print(f"{name:<18} {best * 1e6 / len(texts):>10.2f} {characters / best / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
