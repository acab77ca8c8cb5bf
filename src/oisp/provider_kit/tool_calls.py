"""Tool-call linking: which ``agent.tool_call`` a tool result answers, and each result reported once.

Clients resend the whole conversation with every request, so the same tool result arrives many times; a
:class:`ToolCallRegistry` (one per run, in the :class:`~oisp.provider_kit.DecoderContext`) remembers the calls
and the results already reported. APIs whose tool calls carry no id (Gemini, Ollama) get a stable synthesized
one (:func:`synthesized_call_id`), and their results are matched to the open calls by name
(:class:`PendingCalls`).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import attrs

from oisp.provider_kit.content import canonical_json

__all__ = [
    "CallRecord",
    "FirstReports",
    "Outcome",
    "PendingCalls",
    "ToolCallRegistry",
    "synthesized_call_id",
    "tool_type_for",
]

_TOOL_TYPES = (
    (re.compile(r"(read|cat|open|view|get)_?(file|document)|file_read"), "file_read"),
    (re.compile(r"(write|create|save)_?file|file_write"), "file_write"),
    (re.compile(r"(edit|patch|replace|apply)_?(file|diff|patch)?|str_replace"), "file_edit"),
    (re.compile(r"bash|shell|exec|run_?command|terminal|subprocess"), "shell"),
    (re.compile(r"search|google|bing|lookup"), "search"),
    (re.compile(r"computer_?use"), "computer_use"),
    (re.compile(r"browse|navigate|click|screenshot|computer"), "browser"),
    (re.compile(r"sql|query_?db|database"), "database"),
    (re.compile(r"python|code_?interpreter|execute_?code|run_?code"), "code_execution"),
    (re.compile(r"fetch|http|request|curl|url"), "http"),
    (re.compile(r"retriev|rag|knowledge"), "retrieval"),
)


def tool_type_for(name: str | None) -> str:
    """A best guess of the OISP tool category from a tool's name (``other`` when nothing fits)."""
    if not name:
        return "other"
    lowered = name.lower()
    for pattern, kind in _TOOL_TYPES:
        if pattern.search(lowered):
            return kind
    return "other"


class Outcome(Protocol):
    """A record of :class:`FirstReports`: whether its outcome was reported, and whether it is known (False for
    the stand-in kept for an outcome seen before what caused it)."""

    reported: bool

    @property
    def known(self) -> bool: ...


R = TypeVar("R", bound=Outcome)


class FirstReports(Generic[R]):
    """Things whose outcome is reported once, whichever exchange brings it first (a tool call's result, a
    Replicate prediction's output), by key. Bounded (oldest forgotten first); thread-safe: the proxy decodes
    connections concurrently. ``stand_in`` makes the record kept for an outcome whose cause was not seen."""

    def __init__(self, stand_in: Callable[[], R], max_entries: int) -> None:
        self._records: OrderedDict[str, R] = OrderedDict()
        self._lock = threading.Lock()
        self._stand_in = stand_in
        self.max_entries = max_entries

    def put(self, key: str, record: R) -> None:
        """Remember ``record`` (the cause: a call made, a prediction created) under ``key``."""
        with self._lock:
            self._records[key] = record
            self._records.move_to_end(key)
            self._trim()

    def get(self, key: str) -> R | None:
        """The known record of ``key``, without claiming its outcome."""
        with self._lock:
            record = self._records.get(key)
            return record if record is not None and record.known else None

    def claim(self, key: str) -> tuple[bool, R | None]:
        """(report it?, the known record it answers): an outcome is reported the first time it is seen."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                self._records[key] = self._stand_in()
                self._trim()
                return True, None
            if record.reported:
                return False, record
            record.reported = True
            return True, record if record.known else None

    def _trim(self) -> None:
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)


@attrs.define
class CallRecord:
    """A tool call the registry knows: its ``agent.tool_call`` event id ("" when only its result was seen)."""

    event_id: str
    name: str | None
    #: Whether its result was reported.
    reported: bool = False

    @property
    def known(self) -> bool:
        return bool(self.event_id)


class ToolCallRegistry:
    """Remembers the tool calls models made (call id -> the ``agent.tool_call`` event) so the tool results a
    client sends back later are linked to them, and each result is reported once even though clients resend
    the whole conversation with every request. Bounded (oldest forgotten first); thread-safe."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._calls = FirstReports(lambda: CallRecord("", None, reported=True), max_entries)

    def record_call(self, call_id: str, event_id: str, name: str | None) -> None:
        """A model made the call ``call_id``, reported as the event ``event_id``."""
        self._calls.put(call_id, CallRecord(event_id, name))

    def claim_result(self, call_id: str) -> tuple[bool, CallRecord | None]:
        """(report it?, the call it answers). A result is reported the first time it is seen."""
        return self._calls.claim(call_id)


def synthesized_call_id(prefix: str, *parts: Any) -> str:
    """A stable id for a tool call its API sent without one: ``<prefix>_`` and 16 hex digits of a hash of
    ``parts`` (say, a digest of the conversation before the call, its position and name), so the request that
    sends its result back names the same id."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()
    return f"{prefix}_{digest[:16]}"


@attrs.define
class _Pending:
    id: str
    name: str | None
    answered: bool = False


class PendingCalls:
    """The calls of the last assistant turn, waiting for their results: a result without an id is matched to
    the first unanswered call of its name, else to the first unanswered call."""

    def __init__(self) -> None:
        self._calls: list[_Pending] = []

    def reset(self) -> None:
        """A new assistant turn: forget the calls of the previous one."""
        self._calls = []

    def add(self, call_id: str, name: str | None) -> None:
        self._calls.append(_Pending(call_id, name))

    def answer(self, name: str | None) -> tuple[str, str | None] | None:
        """(call id, call name) of the call a result named ``name`` answers; None when every call is answered."""
        for candidate in [c for c in self._calls if name and c.name == name] + self._calls:
            if not candidate.answered:
                candidate.answered = True
                return candidate.id, candidate.name
        return None
