"""Validate events against the official OISP v0.1 JSON Schemas.

The schemas are not shipped with oisp (they belong to the OISP spec); point :class:`SchemaValidator` at a copy
of the spec's ``schema/v0.1`` folder. Needs the ``jsonschema`` package (``pip install 'oisp[validate]'``).

Following the spec's own notes, every schema file is loaded into one registry keyed by ``$id``, the envelope is
validated with ``envelope.schema.json``, and ``data`` against the ``$defs`` entry of its event type (the family
files' root ``oneOf`` is not usable). Formats (date-time, email, uri) are checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from oisp.errors import ConfigurationError, EventValidationError
from oisp.events.envelope import Event

__all__ = ["PAYLOAD_DEFS", "SchemaValidator"]

#: event type -> (family schema file stem, ``$defs`` entry)
PAYLOAD_DEFS: dict[str, tuple[str, str]] = {
    "ai.request": ("ai", "request"),
    "ai.response": ("ai", "response"),
    "ai.streaming_chunk": ("ai", "streaming_chunk"),
    "ai.embedding": ("ai", "embedding"),
    "agent.tool_call": ("agent", "tool_call"),
    "agent.tool_result": ("agent", "tool_result"),
    "agent.plan_step": ("agent", "plan_step"),
    "agent.rag_retrieve": ("agent", "rag_retrieve"),
    "agent.session": ("agent", "session"),
    "network.connect": ("network", "connect"),
    "network.accept": ("network", "accept"),
    "network.flow": ("network", "flow"),
    "network.dns": ("network", "dns"),
    "process.exec": ("process", "exec"),
    "process.exit": ("process", "exit"),
    "process.fork": ("process", "fork"),
    "file.open": ("file", "open"),
    "file.read": ("file", "read"),
    "file.write": ("file", "write"),
    "file.delete": ("file", "delete"),
    "file.rename": ("file", "rename"),
}


class SchemaValidator:
    """Validates events (objects or JSON-shaped dicts) against the schemas in ``schema_dir``."""

    def __init__(self, schema_dir: Path | str) -> None:
        try:
            import jsonschema
            from referencing import Registry, Resource
        except ImportError:
            raise ConfigurationError("validation needs jsonschema: pip install 'oisp[validate]'") from None
        directory = Path(schema_dir)
        envelope = directory / "envelope.schema.json"
        if not envelope.is_file():
            raise ConfigurationError(f"schema_dir: {str(directory)!r} has no envelope.schema.json; point it at "
                                     "the spec's schema/v0.1 folder")
        resources = []
        self._schemas: dict[str, dict[str, Any]] = {}
        for path in sorted(directory.rglob("*.schema.json")):
            schema = json.loads(path.read_text(encoding="utf-8"))
            resources.append((schema["$id"], Resource.from_contents(schema)))
            self._schemas[path.name.removesuffix(".schema.json")] = schema
        self._registry = Registry().with_resources(resources)
        self._validator_class = jsonschema.Draft202012Validator
        self._format_checker = jsonschema.Draft202012Validator.FORMAT_CHECKER

    def _validator(self, schema: dict[str, Any]) -> Any:
        return self._validator_class(schema, registry=self._registry, format_checker=self._format_checker)

    def errors(self, event: Event | dict[str, Any]) -> list[str]:
        """Every violation, as ``"envelope: $.path: message"`` / ``"data: $.path: message"`` strings."""
        raw = event.to_dict() if isinstance(event, Event) else event
        found = [f"envelope: {e.json_path}: {e.message}"
                 for e in self._validator(self._schemas["envelope"]).iter_errors(raw)]
        entry = PAYLOAD_DEFS.get(str(raw.get("event_type", "")))
        if entry is not None and "data" in raw:
            family, name = entry
            schema = {"$ref": f"{self._schemas[family]['$id']}#/$defs/{name}"}
            found += [f"data: {e.json_path}: {e.message}" for e in self._validator(schema).iter_errors(raw["data"])]
        return found

    def validate(self, event: Event | dict[str, Any]) -> None:
        """Raise :class:`~oisp.errors.EventValidationError` listing every violation, if there is any."""
        errors = self.errors(event)
        if errors:
            raise EventValidationError("event does not validate against OISP v0.1:\n" + "\n".join(errors))
