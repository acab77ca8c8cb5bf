from __future__ import annotations

import pytest
from tests.oisp_schema import SCHEMA_DIR, SchemaValidator


@pytest.fixture(scope="session")
def oisp_schema() -> SchemaValidator:
    """Validates events against the official schemas; skips the test when they are not available."""
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"official OISP schemas not found at {SCHEMA_DIR}; CI has them beside the repository")
    return SchemaValidator()
