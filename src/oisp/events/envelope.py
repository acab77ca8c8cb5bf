"""The OISP v0.1 event envelope, :class:`Event`, and the registry of typed payloads."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Self

from attrs import evolve, field, frozen
from attrs import fields as attrs_fields

from oisp._version import __version__
from oisp.errors import EventValidationError
from oisp.events._record import _SCALARS, Record, extra_field, unstructure
from oisp.events.agent import AgentToolCall, AgentToolResult
from oisp.events.ai import AiEmbedding, AiRequest, AiResponse, AiStreamingChunk
from oisp.events.context import (
    Actor,
    App,
    Confidence,
    Host,
    ProcessInfo,
    RelatedEvent,
    Source,
    TraceContext,
    WebContext,
)
from oisp.events.file import FileDelete, FileOpen, FileRead, FileRename, FileWrite
from oisp.events.network import NetworkConnect, NetworkDns
from oisp.events.process import ProcessExec, ProcessExit, ProcessFork

__all__ = ["OISP_VERSION", "PAYLOAD_TYPES", "Event", "UnknownPayload", "format_ts", "new_event_id", "parse_ts"]

OISP_VERSION = "0.1"
COLLECTOR = "oisp"

_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9]*(?:\.[a-z][a-z0-9_]*)*$")


@frozen(kw_only=True)
class UnknownPayload(Record):
    """The ``data`` of an event type oisp has no typed payload for; every key is kept in ``extra``."""

    extra: dict[str, Any] = extra_field()


#: event type -> payload class. The one place that says which payload belongs to which event type.
PAYLOAD_TYPES: Mapping[str, type[Record]] = {
    "ai.request": AiRequest,
    "ai.response": AiResponse,
    "ai.streaming_chunk": AiStreamingChunk,
    "ai.embedding": AiEmbedding,
    "agent.tool_call": AgentToolCall,
    "agent.tool_result": AgentToolResult,
    "network.connect": NetworkConnect,
    "network.dns": NetworkDns,
    "process.exec": ProcessExec,
    "process.exit": ProcessExit,
    "process.fork": ProcessFork,
    "file.open": FileOpen,
    "file.read": FileRead,
    "file.write": FileWrite,
    "file.delete": FileDelete,
    "file.rename": FileRename,
}
_EVENT_TYPE_OF = {payload: name for name, payload in PAYLOAD_TYPES.items()}


#: ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``, without building the encoder on every call.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


# RFC 4648 base32 letters -> Crockford's, which ULIDs use.
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
_RANDOM_LIMIT = 1 << 80


class _UlidClock:
    """ULIDs as python-ulid's default generator makes them (48 bits of Unix milliseconds, 80 random bits; within
    the same millisecond the previous randomness plus one, so the IDs of one process sort in creation order),
    without its object layers: an event is cheap to create, and the ID is a good part of that."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = -1
        self._random = 0

    def new(self) -> str:
        ms = time.time_ns() // 1_000_000
        with self._lock:
            if ms == self._ms:
                random = self._random + 1
                if random >= _RANDOM_LIMIT:
                    raise ValueError("Randomness within same millisecond exhausted")
            else:
                random = int.from_bytes(os.urandom(10))
            self._ms, self._random = ms, random
        # 26 characters of 5 bits are 130 bits: the 128-bit value with 2 zero bits in front, the first 26 of
        # base32 of 160 bits.
        value = ((ms << 80) | random) << 30
        return base64.b32encode(value.to_bytes(20)).translate(_CROCKFORD)[:26].decode("ascii")


_ULIDS = _UlidClock()


def new_event_id() -> str:
    """A new ULID (time-ordered, 26 characters of Crockford base32)."""
    return _ULIDS.new()


def format_ts(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``, as OISP asks: ``2025-12-22T14:30:16.345678Z``."""
    if ts.tzinfo is UTC and ts.year >= 1000:  # every event's own timestamp: the same text, in half the time
        return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset; any fraction) into an aware UTC datetime."""
    if not isinstance(text, str):
        raise EventValidationError(f"ts: expected an RFC 3339 string, got {type(text).__name__}")
    candidate = text.strip().replace("z", "Z")
    if candidate.endswith("Z"):
        candidate = candidate[:-1] + "+00:00"
    # datetime.fromisoformat takes at most 6 fraction digits: trim nanoseconds.
    candidate = re.sub(r"(\.\d{6})\d+", r"\1", candidate)
    try:
        parsed = datetime.fromisoformat(candidate)
    except ValueError:
        raise EventValidationError(f"ts: {text!r} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise EventValidationError(f"ts: {text!r} has no time zone; OISP timestamps are UTC (end with 'Z')")
    return parsed.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


_DEFAULT_SOURCE: Source | None = None


def _default_source() -> Source:
    # One (immutable) instance: cheaper to create events with, and recognized by the pipeline's cache of shared
    # records.
    global _DEFAULT_SOURCE
    if _DEFAULT_SOURCE is None:
        _DEFAULT_SOURCE = Source(collector=COLLECTOR, collector_version=__version__, capture_method="mitm_proxy")
    return _DEFAULT_SOURCE


@frozen(kw_only=True)
class Event(Record):
    """One OISP v0.1 event: the envelope every event shares, with a typed ``data`` payload.

    Build new events with :meth:`create`, which derives ``event_type`` from the payload; read any OISP event
    (also ones other collectors produced) with :meth:`from_dict` or :meth:`from_json`.
    """

    oisp_version: str = OISP_VERSION
    event_id: str = field(factory=new_event_id)
    event_type: str
    ts: datetime = field(factory=_now)
    ts_mono: int | None = field(factory=time.monotonic_ns)
    host: Host | None = None
    actor: Actor | None = None
    process: ProcessInfo | None = None
    app: App | None = None
    web_context: WebContext | None = None
    source: Source = field(factory=_default_source)
    confidence: Confidence
    data: Record = field(factory=UnknownPayload)
    attrs: dict[str, Any] | None = None
    ext: dict[str, Any] | None = None
    related_events: list[RelatedEvent] | None = None
    trace_context: TraceContext | None = None
    extra: dict[str, Any] = extra_field()
    #: The compact JSON text of this event, once the pipeline has made it (:meth:`to_json` then returns it
    #: instead of encoding the event again); not part of the event, its equality or its copies.
    _json: str | None = field(default=None, init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        if not _EVENT_TYPE_RE.match(self.event_type):
            raise EventValidationError(
                f"event_type {self.event_type!r} is not a dotted lower-case name such as 'ai.request'"
            )
        expected = PAYLOAD_TYPES.get(self.event_type)
        if expected is not None and not isinstance(self.data, expected):
            raise EventValidationError(
                f"event_type {self.event_type!r} takes a {expected.__name__} payload, "
                f"got {type(self.data).__name__}"
            )

    @classmethod
    def create(cls, data: Record, *, confidence: Confidence, **fields: Any) -> Self:
        """A new event for a typed payload; ``event_type`` comes from the payload's class."""
        event_type = fields.pop("event_type", None) or _EVENT_TYPE_OF.get(type(data))
        if event_type is None:
            raise EventValidationError(
                f"{type(data).__name__} is not a registered payload: pass event_type= explicitly"
            )
        return cls(event_type=event_type, data=data, confidence=confidence, **fields)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> Self:
        """Read an OISP event from its JSON object form (``data`` becomes the typed payload of its type)."""
        if not isinstance(mapping, Mapping):
            raise EventValidationError(f"an event is a JSON object, got {type(mapping).__name__}")
        missing = [k for k in ("oisp_version", "event_id", "event_type", "ts", "source", "confidence")
                   if k not in mapping]
        if missing:
            raise EventValidationError(f"event is missing required field(s): {', '.join(missing)}")
        event_type = mapping["event_type"]
        if not isinstance(event_type, str):
            raise EventValidationError(f"event_type must be a string, got {type(event_type).__name__}")
        payload_type = PAYLOAD_TYPES.get(event_type, UnknownPayload)
        structured = {
            "data": payload_type.from_dict(mapping.get("data", {})),
            "ts": parse_ts(mapping["ts"]),
            "ts_mono": mapping.get("ts_mono"),
        }
        return cls._from_mapping(mapping, structured)

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-shaped dict; unset fields are omitted."""
        return event_fields(self)

    def to_json(self, *, indent: int | None = None) -> str:
        """The event as JSON text (UTF-8 safe, no ASCII escaping, keys in model order)."""
        if indent is None:
            cached = self._json
            return cached if cached is not None else _COMPACT.encode(self.to_dict())
        separators = None if indent else (",", ":")
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, separators=separators)

    @property
    def remembered_json(self) -> str | None:
        """The JSON text :meth:`remember_json` kept (a pipeline's processed event), None for an event not processed
        yet (or changed since: copies do not keep it)."""
        return self._json

    def remember_json(self, text: str) -> None:
        """Keep ``text``, which must be ``self.to_json()`` (computed by the caller from ``self.to_dict()``), for
        later :meth:`to_json` calls: the pipeline encodes each event once, for every sink and listener."""
        object.__setattr__(self, "_json", text)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Read an event from JSON text (one line of a JSONL file, for example)."""
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EventValidationError(f"not valid JSON: {exc}") from None
        return cls.from_dict(value)

    def with_context(self, **fields: Any) -> Self:
        """A copy with envelope fields replaced (``host=``, ``process=``, ``related_events=``, ...)."""
        if type(self) is not Event or not fields.keys() <= _CONTEXT_FIELDS:
            return evolve(self, **fields)  # event_type, data (checked together), or a name to complain about
        # The envelope context cannot make an event invalid: copy the fields without running the checks again.
        copy = object.__new__(type(self))
        for name in _INIT_FIELDS:
            object.__setattr__(copy, name, fields[name] if name in fields else getattr(self, name))
        object.__setattr__(copy, "_json", None)
        return copy


_INIT_FIELDS = tuple(a.name for a in attrs_fields(Event) if a.init)
#: Fields :meth:`Event.with_context` may set without validating the event again.
_CONTEXT_FIELDS = frozenset(_INIT_FIELDS) - {"event_type", "data"}


_EVENT_PLAN = Event._structure_plan()

#: Envelope fields whose value is usually one context record many events share (a connection's process, the
#: machine's host): :class:`~oisp.events.EventEncoder` turns each such record into JSON once.
SHARED_CONTEXT = frozenset({"host", "actor", "process", "app", "source"})

#: Forms a shared context record for :func:`event_fields`: (JSON key, record) -> its JSON-shaped dict.
ContextForm = Callable[[str, Any], Any]


def event_fields(event: Event, context_form: ContextForm | None = None) -> dict[str, Any]:
    """The JSON-shaped dict of ``event`` (what :meth:`Event.to_dict` returns: the one walk over an event's
    fields); ``context_form``, when given, makes the values of the :data:`SHARED_CONTEXT` fields (the encoder's
    cache)."""
    out: dict[str, Any] = {}
    plan = _EVENT_PLAN if type(event) is Event else type(event)._structure_plan()
    for name, key, _ in plan:
        value = getattr(event, name)
        if value is None:
            continue
        if name == "ts":
            out[key] = format_ts(value)
        elif context_form is not None and name in SHARED_CONTEXT:
            out[key] = context_form(key, value)
        else:
            out[key] = value if type(value) in _SCALARS else unstructure(value)
    extra = event.extra
    if extra:
        for key, value in extra.items():
            if key not in out:
                out[key] = unstructure(value)
    return out
