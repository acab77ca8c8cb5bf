from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tests.stack import Stack, running_stack

from oisp.attribution import Attributor


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    """The CA of the test upstream servers (given to the proxy as its extra upstream CA)."""
    return trustme.CA()


@pytest.fixture
def stack(tmp_path: Path, test_ca: trustme.CA) -> Iterator[Stack]:
    with running_stack(tmp_path, test_ca, attributor=Attributor()) as running:
        yield running
