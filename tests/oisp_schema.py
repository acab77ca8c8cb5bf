"""Validation of events against the official OISP v0.1 JSON Schemas in ``../shared/oisp-spec``.

Follows the spec folder's README: all schema files in one registry keyed by ``$id``; the envelope validated
with ``envelope.schema.json``; ``data`` validated against the ``$defs`` entry of its event type (the family
roots' ``oneOf`` is broken). Format checking is on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = Path(os.environ.get("OISP_SPEC_DIR", REPO.parent / "shared" / "oisp-spec"))
SCHEMA_DIR = SPEC_DIR / "schema" / "v0.1"
EXAMPLES_DIR = SPEC_DIR / "examples"
BUNDLE = SPEC_DIR / "spec" / "v0.1" / "bundle.json"

# event_type -> (family file, $defs entry)
DEFS = {
    "ai.request": ("ai", "request"),
    "ai.response": ("ai", "response"),
    "ai.streaming_chunk": ("ai", "streaming_chunk"),
    "ai.embedding": ("ai", "embedding"),
    "agent.tool_call": ("agent", "tool_call"),
    "agent.tool_result": ("agent", "tool_result"),
    "network.connect": ("network", "connect"),
    "network.dns": ("network", "dns"),
    "process.exec": ("process", "exec"),
    "process.exit": ("process", "exit"),
    "file.open": ("file", "open"),
    "file.write": ("file", "write"),
}

needs_spec = pytest.mark.skipif(
    not SCHEMA_DIR.is_dir(),
    reason=f"the official OISP schemas are not at {SCHEMA_DIR} (set OISP_SPEC_DIR); CI has them beside the repo",
)


class SchemaValidator:
    def __init__(self) -> None:
        import jsonschema
        from referencing import Registry, Resource

        resources = []
        self._schemas: dict[str, dict[str, Any]] = {}
        for path in sorted(SCHEMA_DIR.rglob("*.schema.json")):
            schema = json.loads(path.read_text())
            resources.append((schema["$id"], Resource.from_contents(schema)))
            self._schemas[path.name.removesuffix(".schema.json")] = schema
        self.registry = Registry().with_resources(resources)
        self._jsonschema = jsonschema
        self.format_checker = jsonschema.Draft202012Validator.FORMAT_CHECKER

    def _validator(self, schema: dict[str, Any]) -> Any:
        return self._jsonschema.Draft202012Validator(schema, registry=self.registry,
                                                     format_checker=self.format_checker)

    def errors(self, event: dict[str, Any]) -> list[str]:
        """Every schema violation of the event (envelope and data), as readable strings."""
        found = [f"envelope: {e.json_path}: {e.message}"
                 for e in self._validator(self._schemas["envelope"]).iter_errors(event)]
        entry = DEFS.get(event.get("event_type", ""))
        if entry is not None and "data" in event:
            family, name = entry
            base = self._schemas[family]["$id"]
            schema = {"$ref": f"{base}#/$defs/{name}"}
            found += [f"data: {e.json_path}: {e.message}"
                      for e in self._validator(schema).iter_errors(event["data"])]
        return found

    def assert_valid(self, event: dict[str, Any]) -> None:
        errors = self.errors(event)
        assert not errors, "event does not validate against OISP v0.1:\n" + "\n".join(errors)
