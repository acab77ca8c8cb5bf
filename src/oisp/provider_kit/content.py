"""Reading message content: untrusted JSON values, canonical JSON for hashing, images (counted and hashed, never
kept), and one walker result every provider fills, :class:`MessageParts`.

Providers differ in how a content block looks (Anthropic's ``{"type": "tool_use"}``, Bedrock's ``{"toolUse": ...}``,
Gemini's ``{"functionCall": ...}``) but not in what becomes of it: texts joined, images hashed, the tool calls
and results a message carries listed, other blocks counted. A provider's walker recognizes its blocks and puts
what it finds in a :class:`MessageParts`; :meth:`MessageParts.message` makes the OISP
:class:`~oisp.events.Message` the same way for all.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from oisp.events import Message, RequestParameters
from oisp.redaction import sha256_text

__all__ = [
    "ContentFacts",
    "MessageParts",
    "as_int",
    "as_list",
    "as_mapping",
    "as_number",
    "as_str",
    "base64_digest",
    "canonical_json",
    "content_facts",
    "field",
    "message",
    "parameters_or_none",
    "with_images",
]


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


def as_number(value: Any) -> int | float | None:
    """``value`` when it is a JSON number (not a boolean), else None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def parameters_or_none(values: Mapping[str, Any], extra: dict[str, Any]) -> RequestParameters | None:
    """The request's :class:`~oisp.events.RequestParameters` from OISP-named ``values`` (None values dropped) and
    the provider's ``extra`` ones; None when there are none."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given and not extra:
        return None
    return RequestParameters(**given, extra=extra)


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


@attrs.frozen
class ContentFacts:
    """Text and image counts of a message's content (string, list of parts, or None)."""

    text: str | None
    image_count: int
    image_hashes: tuple[str, ...]


def content_facts(content: Any) -> ContentFacts:
    """Join the text parts of an OpenAI-style content value; count and hash images (never keep their bytes)."""
    if content is None:
        return ContentFacts(None, 0, ())
    if isinstance(content, str):
        return ContentFacts(content, 0, ())
    parts = content if isinstance(content, list) else [content]
    texts: list[str] = []
    hashes: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = str(part.get("type", ""))
        if isinstance(part.get("text"), str) and kind in ("", "text", "input_text", "output_text"):
            texts.append(part["text"])
        elif "image" in kind or "inlineData" in part or "inline_data" in part:
            hashes.append(_image_hash(part))
        elif kind in ("tool_result", "function_call_output") and part.get("content") is not None:
            inner = content_facts(part.get("content"))
            if inner.text:
                texts.append(inner.text)
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    return ContentFacts("\n".join(texts) if texts else None, len(hashes), tuple(hashes))


def _image_hash(part: Mapping[str, Any]) -> str:
    """Hash of an image part's data (decoded base64 when inline, else its URL)."""
    for value in _walk_strings(part):
        if value.startswith("data:") and ";base64," in value:
            try:
                return sha256_text(base64.b64decode(value.split(";base64,", 1)[1], validate=False))
            except (ValueError, TypeError):
                return sha256_text(value)
    return sha256_text(json.dumps(part, sort_keys=True, default=str))


def _walk_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v)


def message(role: str, content: Any, *, tool_call_id: str | None = None, name: str | None = None,
            **extra: Any) -> Message:
    """An OISP message from a provider's role and content (text joined, images counted and hashed); ``extra``
    keys with a value go to the message's ``extra``."""
    facts = content_facts(content)
    extras = {k: v for k, v in extra.items() if v is not None}
    if facts.image_hashes:
        extras["image_hashes"] = list(facts.image_hashes)
    return Message(
        role=role, content=facts.text, content_length=len(facts.text) if facts.text is not None else None,
        content_hash=sha256_text(facts.text) if facts.text else None,
        has_images=bool(facts.image_count) or None, image_count=facts.image_count or None,
        tool_call_id=tool_call_id, name=name, extra=extras,
    )


@attrs.define
class MessageParts:
    """What a walk over one message's content blocks found (see the module docstring).

    ``texts`` are joined with newlines; ``image_hashes`` counted (:func:`base64_digest` of the bytes);
    ``tool_calls`` (``{"id", "name"}``) and ``tool_results`` (call ids) listed in the message's ``extra``, a
    single result also as its ``tool_call_id``; ``thinking`` joined into ``extra["thinking"]``; :meth:`count`
    of a kind becomes ``extra["<kind>_count"]``; ``extra`` is added as it is.
    """

    texts: list[str] = attrs.field(factory=list)
    image_hashes: list[str] = attrs.field(factory=list)
    tool_calls: list[dict[str, Any]] = attrs.field(factory=list)
    tool_results: list[str] = attrs.field(factory=list)
    thinking: list[str] = attrs.field(factory=list)
    counts: dict[str, int] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)

    def add_text(self, text: Any) -> None:
        """Add ``text`` when it is a non-empty string."""
        if isinstance(text, str) and text:
            self.texts.append(text)

    def add_call(self, call_id: str | None, name: str | None) -> None:
        """A tool call the message carries (an assistant turn sent back with the conversation)."""
        self.tool_calls.append({"id": call_id, "name": name})

    def count(self, kind: str) -> None:
        """One more block of ``kind`` (``document``, ``video``...) that is not read."""
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def message(self, role: str, *, name: str | None = None) -> Message:
        """The OISP message of these parts."""
        extra: dict[str, Any] = {}
        if self.tool_calls:
            extra["tool_calls"] = self.tool_calls
        if self.tool_results:
            extra["tool_results"] = list(self.tool_results)
        if self.thinking:
            extra["thinking"] = "\n".join(self.thinking)
        for kind, number in self.counts.items():
            extra[f"{kind}_count"] = number
        extra.update(self.extra)
        single = self.tool_results[0] if len(self.tool_results) == 1 else None
        msg = message(role, "\n".join(self.texts) if self.texts else None, tool_call_id=single, name=name, **extra)
        return with_images(msg, self.image_hashes)
