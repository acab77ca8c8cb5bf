"""Fixtures of the activity tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.activity.helpers import AgentProcess, Collector
from tests.cli.conftest import test_ca, upstream  # noqa: F401 - the stand-in provider's fixtures

from oisp.activity import Activity


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path)
    yield process
    process.close()


@pytest.fixture
async def observed() -> AsyncIterator[tuple[Activity, Collector]]:
    collector = Collector()
    async with Activity(emit=collector) as activity:
        yield activity, collector
