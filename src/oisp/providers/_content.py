"""Small readers shared by the Anthropic, Google and Cohere providers: untrusted JSON values, canonical JSON for
hashing, and images (which are counted and hashed, never kept)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import Message
from oisp.redaction import sha256_text

__all__ = ["as_int", "as_list", "as_mapping", "as_str", "base64_digest", "canonical_json", "field", "with_images"]


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one (bodies are untrusted input)."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str | None:
    """``value`` when it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def as_int(value: Any) -> int | None:
    """A token count or index: JSON integers, and floats with an integral value (Cohere sends ``12.0``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def field(mapping: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``mapping`` (Google's APIs accept camelCase and snake_case alike)."""
    for name in names:
        if name in mapping:
            return mapping[name]
    return None


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the text hashed to compare schemas and arguments across requests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def base64_digest(data: Any) -> str:
    """The ``sha256:`` hash of base64-encoded bytes (of the text itself when it is not valid base64)."""
    if not isinstance(data, str):
        return sha256_text(canonical_json(data))
    try:
        return sha256_text(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        return sha256_text(data)


def with_images(msg: Message, hashes: Iterable[str]) -> Message:
    """``msg`` with images counted and their hashes listed in ``extra["image_hashes"]``."""
    found = list(hashes)
    if not found:
        return msg
    known = list(msg.extra.get("image_hashes") or [])
    return attrs.evolve(msg, has_images=True, image_count=(msg.image_count or 0) + len(found),
                        extra={**msg.extra, "image_hashes": known + found})
