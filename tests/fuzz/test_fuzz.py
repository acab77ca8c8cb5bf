"""The short fuzzing tier: every network parser fed a few hundred mutated and arbitrary inputs (Hypothesis), and
every input kept in ``tests/fuzz/corpus/<target>/`` replayed (what once crashed or hung, and a few inputs of
the coverage-guided runs that reached deep paths of each parser). The long tier, coverage
guided, is ``nox -s fuzz`` (``tests/fuzz/run.py``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from tests.fuzz.strategies import inputs
from tests.fuzz.targets import SEEDS, TARGETS

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # the decoders log every input they refuse
    yield
    logging.disable(logging.NOTSET)


def _kept() -> list[tuple[str, Path]]:
    return [(target, path) for target in TARGETS for path in sorted((CORPUS / target).glob("*"))
            if path.is_file()]


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_target_has_seeds_that_pass(target: str) -> None:
    for seed in SEEDS[target]:
        TARGETS[target](seed)


@pytest.mark.parametrize(("target", "path"), _kept(), ids=[f"{t}/{p.name}" for t, p in _kept()])
def test_kept_inputs_no_longer_fail(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_mutated_inputs(target: str) -> None:
    @settings(max_examples=150, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(inputs(target))
    def run(data: bytes) -> None:
        TARGETS[target](data)

    run()
