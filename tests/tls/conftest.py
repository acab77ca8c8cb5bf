from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from oisp.tls import CertificateAuthority

MakeCa = Callable[..., CertificateAuthority]

#: Domains the name-constrained CA in these tests may issue for.
PERMITTED = ("openai.com", "anthropic.com")


class FakeClock:
    """A clock the tests move by hand instead of sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    return tmp_path / "conf"


@pytest.fixture
def ca(confdir: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(confdir)


@pytest.fixture
def constrained_ca(confdir: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(confdir, permitted_domains=PERMITTED)


@pytest.fixture
def make_ca(confdir: Path, clock: FakeClock) -> MakeCa:
    """Build a CA on the fake clock; keyword arguments go to load_or_create."""

    def make(**kwargs: object) -> CertificateAuthority:
        return CertificateAuthority.load_or_create(confdir, clock=clock, **kwargs)  # type: ignore[arg-type]

    return make
