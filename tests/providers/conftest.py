"""Every provider test decodes in a run of its own: no tool call or prediction leaks from one test to another."""

from __future__ import annotations

import pytest
from tests.providers import exchange_harness

from oisp.provider_kit import DecoderContext


@pytest.fixture(autouse=True)
def decoder_run() -> DecoderContext:
    """The context of this test's decoding run (the one ``run_exchange`` and ``claim`` use)."""
    return exchange_harness.new_run()
