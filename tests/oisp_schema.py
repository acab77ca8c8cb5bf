"""Where the official OISP v0.1 spec files are for the tests (``../shared/oisp-spec`` or ``OISP_SPEC_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from oisp.events.validation import SchemaValidator as _LibraryValidator

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = Path(os.environ.get("OISP_SPEC_DIR", REPO.parent / "shared" / "oisp-spec"))
SCHEMA_DIR = SPEC_DIR / "schema" / "v0.1"
EXAMPLES_DIR = SPEC_DIR / "examples"
BUNDLE = SPEC_DIR / "spec" / "v0.1" / "bundle.json"

needs_spec = pytest.mark.skipif(
    not SCHEMA_DIR.is_dir(),
    reason=f"the official OISP schemas are not at {SCHEMA_DIR} (set OISP_SPEC_DIR); CI has them beside the repo",
)


class SchemaValidator(_LibraryValidator):
    """The library's validator on the spec beside the repository, with an assertion helper for tests."""

    def __init__(self) -> None:
        super().__init__(SCHEMA_DIR)

    def assert_valid(self, event: dict[str, Any]) -> None:
        errors = self.errors(event)
        assert not errors, "event does not validate against OISP v0.1:\n" + "\n".join(errors)
