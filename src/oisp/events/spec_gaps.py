"""The one place where oisp's data is mapped onto what the OISP v0.1 schemas allow.

Reality has values the v0.1 schemas do not: providers outside the provider enum (deepseek, xai, perplexity,
openrouter, ...), the ``developer`` role, content given as an array of parts, finish reasons and tool types
outside their enums, and ``$redacted`` markers where a ``oneOf`` also admits any object (tool-call arguments,
tool results), which makes a marker match two branches. :func:`conform` maps each such value to the closest
allowed one, so that every event oisp emits validates, and keeps the original under
``attrs["oisp.original"]``, keyed by the value's path (``data.provider.name``). The pipeline applies it to
every event before any sink sees it. ``docs/spec-gaps.md`` lists the mappings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from oisp.events.envelope import Event

__all__ = ["INTERCEPTION_KEY", "NOT_INTERCEPTED", "ORIGINAL_KEY", "PROVIDER_KEY", "conform", "map_values",
           "provider_name"]

ORIGINAL_KEY = "oisp.original"
#: ``attrs`` key with the provider's own name when the schema's enum has no place for it (``data.provider.name``
#: is then ``"other"``): a plugin's ``example-llm``, ``deepseek``, ``openrouter``.
PROVIDER_KEY = "oisp.provider"
#: ``attrs`` key saying what the proxy did with a connection (``network.connect`` has no field for it):
#: ``intercepted``, ``passthrough``, ... for the proxy's own events (:class:`oisp.proxy.report.Decision`), and
#: :data:`NOT_INTERCEPTED` for a connection oisp observed without intercepting it (an agent process's other
#: connections, :mod:`oisp.activity.connections`).
INTERCEPTION_KEY = "oisp.interception"
NOT_INTERCEPTED = "not_intercepted"

PROVIDER_NAMES = frozenset({
    "openai", "anthropic", "google", "azure_openai", "aws_bedrock", "cohere", "mistral", "groq", "together",
    "fireworks", "replicate", "huggingface", "ollama", "lmstudio", "vllm", "other",
})
ROLES = frozenset({"system", "user", "assistant", "tool", "function"})
ROLE_MAP = {"developer": "system", "model": "assistant", "chatbot": "assistant", "ipython": "tool",
            "tool_result": "tool", "human": "user", "ai": "assistant"}
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "error", "other"})
REQUEST_TYPES = frozenset({"chat", "completion", "embedding", "image", "audio", "moderation", "other"})
TOOL_DEFINITION_TYPES = frozenset({"function", "code_interpreter", "file_search", "computer_use", "other"})
AGENT_TOOL_TYPES = frozenset({
    "file_read", "file_write", "file_edit", "terminal", "shell", "browser", "http", "database",
    "code_execution", "search", "retrieval", "api_call", "computer_use", "other",
})
AUTH_TYPES = frozenset({"api_key", "oauth", "service_account", "session", "none", "unknown"})
DNS_TYPES = frozenset({"A", "AAAA", "CNAME", "MX", "TXT", "NS", "PTR", "SRV", "other"})
DNS_RCODES = frozenset({"NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "other"})


class _Mapper:
    def __init__(self) -> None:
        self.original: dict[str, Any] = {}
        #: Set when a value was changed in place without an original to keep (a marker's preview shortened).
        self.touched = False

    def enum(self, node: dict[str, Any], key: str, allowed: frozenset[str], path: str,
             mapping: dict[str, str] | None = None, fallback: str = "other") -> None:
        value = node.get(key)
        if value is None or value in allowed:
            return
        if isinstance(value, str) and mapping and value.lower() in mapping:
            new = mapping[value.lower()]
        elif isinstance(value, str) and value.lower() in allowed:
            new = value.lower()
        else:
            new = fallback
        self.original[path] = value
        node[key] = new

    def marker_to_text(self, node: dict[str, Any], key: str, path: str) -> None:
        value = node.get(key)
        if isinstance(value, dict) and "$redacted" in value:
            self.original[path] = value
            body = value["$redacted"] if isinstance(value["$redacted"], dict) else {}
            digest = str(body.get("hash", ""))[7:19]
            node[key] = f"[REDACTED:{body.get('reason', 'redacted')}:{digest}]"

    def content_to_text(self, node: dict[str, Any], key: str, path: str) -> None:
        value = node.get(key)
        if value is None or isinstance(value, str) or (isinstance(value, dict) and "$redacted" in value):
            return
        self.original[path] = value
        node[key] = _parts_text(value)


def _parts_text(value: Any) -> str:
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return str(value["text"])
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _each(node: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    items = node.get(key) if isinstance(node, dict) else None
    if not isinstance(items, list):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, dict)]


def _message(m: _Mapper, msg: dict[str, Any], path: str) -> None:
    m.enum(msg, "role", ROLES, f"{path}.role", ROLE_MAP, fallback="user")
    m.content_to_text(msg, "content", f"{path}.content")
    marker = msg.get("content")
    if isinstance(marker, dict):
        preview = marker.get("$redacted", {}).get("preview") if isinstance(marker.get("$redacted"), dict) else None
        if isinstance(preview, str) and len(preview) > 100:
            marker["$redacted"]["preview"] = preview[:100]
            m.touched = True


def _tool_calls(m: _Mapper, node: dict[str, Any], key: str, path: str) -> None:
    for i, call in _each(node, key):
        m.marker_to_text(call, "arguments", f"{path}.{key}[{i}].arguments")


def _ai(m: _Mapper, data: dict[str, Any]) -> None:
    provider = data.get("provider")
    if isinstance(provider, dict):
        m.enum(provider, "name", PROVIDER_NAMES, "data.provider.name")
    auth = data.get("auth")
    if isinstance(auth, dict):
        m.enum(auth, "type", AUTH_TYPES, "data.auth.type", fallback="unknown")
        prefix = auth.get("key_prefix")
        if isinstance(prefix, str) and len(prefix) > 8:
            auth["key_prefix"] = prefix[:8]
    m.enum(data, "request_type", REQUEST_TYPES, "data.request_type")
    m.enum(data, "finish_reason", FINISH_REASONS, "data.finish_reason")
    for i, msg in _each(data, "messages"):
        _message(m, msg, f"data.messages[{i}]")
    for i, tool in _each(data, "tools"):
        m.enum(tool, "type", TOOL_DEFINITION_TYPES, f"data.tools[{i}].type")
        m.marker_to_text(tool, "description", f"data.tools[{i}].description")
    for i, choice in _each(data, "choices"):
        m.enum(choice, "finish_reason", FINISH_REASONS, f"data.choices[{i}].finish_reason")
        if isinstance(choice.get("message"), dict):
            _message(m, choice["message"], f"data.choices[{i}].message")
    _tool_calls(m, data, "tool_calls", "data")
    delta = data.get("delta")
    if isinstance(delta, dict):
        m.marker_to_text(delta, "content", "data.delta.content")
        _tool_calls(m, delta, "tool_calls", "data.delta")
    tool_choice = data.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, str):
        m.original["data.tool_choice"] = tool_choice
        data["tool_choice"] = "specific"


def _agent(m: _Mapper, data: dict[str, Any]) -> None:
    tool = data.get("tool")
    if isinstance(tool, dict):
        m.enum(tool, "type", AGENT_TOOL_TYPES, "data.tool.type")
    m.marker_to_text(data, "result", "data.result")
    m.marker_to_text(data, "query", "data.query")  # agent.rag_retrieve: a string in the schema
    for i, result in _each(data, "results"):
        m.marker_to_text(result, "source", f"data.results[{i}].source")


def _network(m: _Mapper, data: dict[str, Any]) -> None:
    m.enum(data, "query_type", DNS_TYPES, "data.query_type")
    m.enum(data, "response_code", DNS_RCODES, "data.response_code")


_FAMILIES: dict[str, Callable[[_Mapper, dict[str, Any]], None]] = {
    "ai": _ai,
    "agent": _agent,
    "network": _network,
}


def conform(event: Event) -> Event:
    """The event with every value outside the OISP v0.1 schemas mapped; originals kept in ``attrs``."""
    if _FAMILIES.get(event.event_type.split(".", 1)[0]) is None:
        return event
    raw = event.to_dict()
    original, _ = map_values(raw)
    if not original:
        return event
    return Event.from_dict(raw)


def map_values(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """Map, in place, the values outside the OISP v0.1 schemas in an event's dict form (``Event.to_dict()``;
    only its ``data`` and ``attrs`` are touched, ``attrs`` replaced rather than changed).

    Returns the originals by path, also added to ``attrs`` (None when nothing was mapped), and whether ``data``
    was changed anyway (a redaction marker's over-long preview shortened, which keeps no original; the event
    itself then stays as it was, and :func:`conform` drops the change).
    """
    event_type = raw.get("event_type")
    family = _FAMILIES.get(event_type.split(".", 1)[0]) if isinstance(event_type, str) else None
    data = raw.get("data")
    if family is None or not isinstance(data, dict):
        return None, False
    mapper = _Mapper()
    family(mapper, data)
    if not mapper.original:
        return None, mapper.touched
    attrs_ = dict(raw.get("attrs") or {})
    previous = attrs_.get(ORIGINAL_KEY)
    attrs_[ORIGINAL_KEY] = {**(previous if isinstance(previous, dict) else {}), **mapper.original}
    if "data.provider.name" in mapper.original:
        attrs_[PROVIDER_KEY] = mapper.original["data.provider.name"]
    raw["attrs"] = attrs_
    return mapper.original, mapper.touched


def provider_name(event: Event) -> str | None:
    """The provider's own name for an event: ``attrs["oisp.provider"]`` where the schema's enum had no place for it,
    else ``data.provider.name`` (None for events without a provider)."""
    own = (event.attrs or {}).get(PROVIDER_KEY)
    if isinstance(own, str):
        return own
    provider = getattr(event.data, "provider", None)
    name = getattr(provider, "name", None)
    return name if isinstance(name, str) else None
