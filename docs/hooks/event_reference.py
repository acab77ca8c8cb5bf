"""mkdocs hook: renders the event reference from oisp's event model, so the docs never drift from the code."""

from __future__ import annotations

import typing
from typing import Any

import attrs

MARKER = "<!-- oisp:event-reference -->"


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, str) else annotation
    return text.replace("typing.", "").replace(" | None", "").replace("NoneType", "").strip()


def _record_table(cls: type, seen: set[type], out: list[str], level: int) -> None:
    from oisp.events import Record

    if cls in seen:
        return
    seen.add(cls)
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    out.append(f"{'#' * level} `{cls.__name__}`\n\n{doc}\n\n| field | type | required |\n|---|---|---|")
    nested: list[type] = []
    for field in attrs.fields(cls):
        if field.name == "extra":
            continue
        key = field.metadata.get("oisp_json_key", field.name)
        required = "yes" if field.default is attrs.NOTHING else ""
        out.append(f"| `{key}` | `{_type_name(field.type)}` | {required} |")
        module = __import__(cls.__module__, fromlist=["_"])
        resolved = eval(field.type, vars(module)) if isinstance(field.type, str) else field.type  # noqa: S307
        for arg in _walk(resolved):
            if isinstance(arg, type) and issubclass(arg, Record) and attrs.has(arg) and arg not in seen:
                nested.append(arg)
    out.append("")
    for cls_ in nested:
        _record_table(cls_, seen, out, min(level + 1, 4))


def _walk(annotation: Any) -> list[Any]:
    found = [annotation]
    for arg in typing.get_args(annotation):
        found += _walk(arg)
    return found


def render() -> str:
    from oisp.events import PAYLOAD_TYPES, Event

    out: list[str] = []
    seen: set[type] = set()
    out.append("## Envelope\n")
    _record_table(Event, seen, out, 3)
    out.append("## Payloads by event type\n")
    for event_type, payload in PAYLOAD_TYPES.items():
        out.append(f"### `{event_type}`\n")
        _record_table(payload, seen, out, 4)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
