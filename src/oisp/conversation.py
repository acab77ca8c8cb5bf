"""Events grouped the way people think of them: calls (a request, its answer, the tools it asked for and what
came back) and conversations (the calls one agent strung together with tool results).

Works on any OISP event stream, oisp's own or read back from a JSONL file::

    for conversation in oisp.conversations(oisp.read_events("events.jsonl")):
        for call in conversation.calls:
            print(call.model, call.tool_names, call.total_tokens)

The links are the ones oisp's events carry (``docs/events.md``, "How events link"): ``request_id`` between a
request and its response, ``related_events`` from a tool call to the response that asked for it and from a tool
result to its call, ``attrs["oisp.request_id"]`` from a tool result to the request that carried it back. A
conversation is every call joined to another by a tool round trip, by the same ``conversation_id``, or by the
same W3C trace (``trace_context.trace_id``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from oisp.events import Event

__all__ = ["Call", "Conversation", "calls", "conversations", "read_events"]


@attrs.define(eq=False)
class Call:
    """One AI call: its request and response (either may be missing from a partial stream), the tool calls its
    response asked for, and the tool results its request carried back (answers to earlier calls)."""

    request_id: str
    request: Event | None = None
    response: Event | None = None
    chunks: list[Event] = attrs.field(factory=list)
    tool_calls: list[Event] = attrs.field(factory=list)
    tool_results: list[Event] = attrs.field(factory=list)

    @property
    def events(self) -> list[Event]:
        """Every event of the call, in time order."""
        found = [e for e in (self.request, self.response) if e is not None]
        return sorted([*found, *self.chunks, *self.tool_calls, *self.tool_results], key=lambda e: e.ts)

    @property
    def model(self) -> str | None:
        """The model that answered, else the model asked for."""
        for event in (self.response, self.request):
            model = getattr(getattr(event, "data", None), "model", None)
            if model is not None and (model.id or model.name):
                return str(model.id or model.name)
        return None

    @property
    def provider(self) -> str | None:
        """The provider's own name (``attrs["oisp.provider"]`` where the schema's enum had no place for it)."""
        from oisp.events.spec_gaps import provider_name

        for event in (self.request, self.response):
            if event is not None and (name := provider_name(event)):
                return name
        return None

    @property
    def tool_names(self) -> list[str]:
        """The names of the tools the response asked for, in order."""
        return [str(t.data.tool.name) for t in self.tool_calls  # type: ignore[attr-defined]
                if getattr(t.data, "tool", None) is not None and t.data.tool.name]  # type: ignore[attr-defined]

    def _usage(self, name: str) -> Any:
        usage = getattr(getattr(self.response, "data", None), "usage", None)
        return getattr(usage, name, None) if usage is not None else None

    @property
    def input_tokens(self) -> int | None:
        """Prompt tokens the provider reported."""
        value = self._usage("prompt_tokens")
        return int(value) if value is not None else None

    @property
    def output_tokens(self) -> int | None:
        """Completion tokens the provider reported."""
        value = self._usage("completion_tokens")
        return int(value) if value is not None else None

    @property
    def total_tokens(self) -> int | None:
        """Total tokens the provider reported (or input plus output)."""
        value = self._usage("total_tokens")
        if value is None and (self.input_tokens is not None or self.output_tokens is not None):
            return (self.input_tokens or 0) + (self.output_tokens or 0)
        return int(value) if value is not None else None

    @property
    def cost_usd(self) -> float | None:
        """What the call cost, where oisp could price it."""
        value = self._usage("total_cost_usd")
        return float(value) if value is not None else None


@attrs.define(eq=False)
class Conversation:
    """Calls one agent strung together, in time order; ``key`` says what joined them (a conversation id, a
    trace id, or the first call's request id)."""

    key: str
    calls: list[Call] = attrs.field(factory=list)

    @property
    def total_tokens(self) -> int:
        """Tokens over every call that reported them."""
        return sum(c.total_tokens or 0 for c in self.calls)

    @property
    def cost_usd(self) -> float | None:
        """Cost over every call oisp could price (None when none could be)."""
        costs = [c.cost_usd for c in self.calls if c.cost_usd is not None]
        return sum(costs) if costs else None


def _request_id(event: Event) -> str | None:
    value = getattr(event.data, "request_id", None) or (event.attrs or {}).get("oisp.request_id")
    return str(value) if value else None


def _related(event: Event, relationship: str) -> str | None:
    for link in event.related_events or ():
        if link.relationship == relationship:
            return str(link.event_id)
    return None


def calls(events: Iterable[Event]) -> list[Call]:
    """The AI calls in ``events`` (any order), in the order their first event happened."""
    by_request: dict[str, Call] = {}
    by_event: dict[str, Call] = {}  # response event id -> its call (for tool calls)
    tool_calls: list[Event] = []
    tool_results: list[Event] = []
    for event in events:
        kind = event.event_type
        if kind == "agent.tool_call":
            tool_calls.append(event)
            continue
        if kind == "agent.tool_result":
            tool_results.append(event)
            continue
        if not kind.startswith("ai."):
            continue
        request_id = _request_id(event) or event.event_id
        call = by_request.setdefault(request_id, Call(request_id))
        if kind == "ai.request":
            call.request = event
        elif kind in ("ai.response", "ai.embedding"):
            call.response = event
            by_event[event.event_id] = call
        else:
            call.chunks.append(event)
    for event in tool_calls:
        caused_by = _related(event, "caused_by")
        owner = by_event.get(caused_by) if caused_by else None
        if owner is not None:
            owner.tool_calls.append(event)
    for event in tool_results:
        carrier = (event.attrs or {}).get("oisp.request_id")
        owner = by_request.get(str(carrier)) if carrier else None
        if owner is not None:
            owner.tool_results.append(event)
    return sorted(by_request.values(), key=lambda c: min(e.ts for e in c.events))


def conversations(events: Iterable[Event]) -> list[Conversation]:
    """The conversations in ``events``: calls joined by tool round trips (a result carried by one call answers a
    tool call of another), by ``conversation_id``, or by trace id; in the order they began."""
    found = calls(events)
    parent: dict[int, int] = {i: i for i in range(len(found))}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        parent[root(a)] = root(b)

    call_of_tool_call: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for i, call in enumerate(found):
        for tool_call in call.tool_calls:
            call_of_tool_call[tool_call.event_id] = i
        for event in (call.request, call.response):
            if event is None:
                continue
            conversation_id = getattr(event.data, "conversation_id", None)
            trace_id = event.trace_context.trace_id if event.trace_context is not None else None
            for key in (f"conversation:{conversation_id}" if conversation_id else None,
                        f"trace:{trace_id}" if trace_id else None):
                if key is not None:
                    if key in by_key:
                        join(i, by_key[key])
                    else:
                        by_key[key] = i
    for i, call in enumerate(found):
        for tool_result in call.tool_results:
            answered = _related(tool_result, "parent")
            if answered is not None and answered in call_of_tool_call:
                join(i, call_of_tool_call[answered])
    groups: dict[int, list[Call]] = {}
    for i, call in enumerate(found):
        groups.setdefault(root(i), []).append(call)
    grouped: list[Conversation] = []
    for members in groups.values():
        key = next((k for k, i in by_key.items() if found[i] in members), members[0].request_id)
        grouped.append(Conversation(key.split(":", 1)[-1] if ":" in key else key, members))
    return grouped


def read_events(path: str | Path) -> Iterator[Event]:
    """The events of a JSONL file (as the ``jsonl`` sink writes it, gzip or not), one per line; blank lines are
    skipped, a line that is not an OISP event raises :class:`oisp.EventValidationError` naming the line."""
    import gzip

    from oisp.errors import EventValidationError

    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield Event.from_json(line)
            except (EventValidationError, json.JSONDecodeError, ValueError) as exc:
                raise EventValidationError(f"{path}:{number}: {exc}") from exc
