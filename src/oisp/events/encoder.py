"""Events to compact JSON, fast, for a stream of events that share their context: :class:`EventEncoder`.

Most of an event's text is its context: the process (with its parent and ancestors), the host, the actor, the
app, the capture source. Every event of a connection carries the same (frozen) records, so the encoder turns
each record into its dict and its JSON text once, keeps them by identity in a bounded cache, and splices the
cached text into each event's JSON. The dict form is exactly :meth:`Event.to_dict` (the same walk,
:func:`~oisp.events.envelope.event_fields`), the text exactly :meth:`Event.to_json`.

The :class:`~oisp.pipeline.Pipeline` encodes every event with one; a sink or a script that writes many events
may use one too::

    encoder = EventEncoder()
    lines = [encoder.to_json(event) for event in events]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from oisp.events._record import Record, unstructure
from oisp.events.envelope import _COMPACT, SHARED_CONTEXT, Event, event_fields

__all__ = ["EncodedEvent", "EventEncoder"]

#: Stands in for a shared record in the dict that is encoded, its cached text put in its place after: a string
#: no event holds (a NUL, then 128 random bits), encoded as a JSON string.
_NONCE = os.urandom(16).hex()
_PLACEHOLDERS = {key: f"\x00oisp-{_NONCE}-{key}" for name, key, _ in Event._structure_plan() if name in SHARED_CONTEXT}
_PLACEHOLDER_TEXTS = {key: _COMPACT.encode(value) for key, value in _PLACEHOLDERS.items()}


class _Block:
    """A shared context record's dict form (only read, never changed or handed out), whether it passed the
    encoder's ``check``, and its JSON text once made."""

    __slots__ = ("clean", "plain", "record", "text")

    def __init__(self, record: Record, plain: dict[str, Any], clean: bool) -> None:
        self.record = record
        self.plain = plain
        self.clean = clean
        self.text: str | None = None


class EncodedEvent:
    """An event's dict form on its way to JSON: :attr:`fields` is ``event.to_dict()`` (its shared context
    records are cached dicts: read them, never change them); :attr:`clean` says whether every shared record
    passed the encoder's ``check``. :meth:`EventEncoder.encode` makes its text (once: it spends the form)."""

    __slots__ = ("blocks", "clean", "fields")

    def __init__(self, fields: dict[str, Any], clean: bool, blocks: list[tuple[str, _Block]]) -> None:
        self.fields = fields
        self.clean = clean
        self.blocks = blocks


class EventEncoder:
    """Encodes events to compact JSON with the shared context records' text made once (see the module).

    ``check(key, value)``: asked once per shared record (and for every shared value that is not a record), it
    says whether the value is fine as it is (the pipeline's redactor scan); :attr:`EncodedEvent.clean` is False
    when one is not. ``cache_size``: how many records are remembered (the cache starts over when full).
    Not thread-safe: one encoder per thread.
    """

    def __init__(self, *, check: Callable[[str, Any], bool] | None = None, cache_size: int = 1024) -> None:
        self.check = check
        self.cache_size = cache_size
        #: id(record) -> its block; the record is kept, so its id cannot be reused while the entry lives.
        self._blocks: dict[int, _Block] = {}
        #: Of the form being made: the blocks it uses, and whether they all passed the check.
        self._used: list[tuple[str, _Block]] = []
        self._clean = True

    def form(self, event: Event) -> EncodedEvent:
        """The event's dict form, shared context records from (or put in) the cache."""
        used: list[tuple[str, _Block]] = []
        self._used = used
        self._clean = True
        fields = event_fields(event, self._context_form)
        return EncodedEvent(fields, self._clean, used)

    def _context_form(self, key: str, value: Any) -> Any:
        """A shared context value's dict form for :meth:`form` (the one in progress: see ``_used``)."""
        if not isinstance(value, Record):  # not a record (so not cached): checked here
            plain = unstructure(value)
            if self.check is not None and not self.check(key, plain):
                self._clean = False
            return plain
        cache = self._blocks
        block = cache.get(id(value))
        if block is None or block.record is not value:
            plain = value.to_dict()
            if len(cache) >= self.cache_size:
                cache.clear()
            block = cache[id(value)] = _Block(value, plain, self.check is None or self.check(key, plain))
        if not block.clean:
            self._clean = False
        self._used.append((key, block))
        return block.plain

    def encode(self, form: EncodedEvent) -> str:
        """The compact JSON text of a form (``_COMPACT.encode(form.fields)``, the shared records' text made once
        per record). The form is spent: its fields are changed on the way."""
        raw = form.fields
        if not form.blocks:
            return _COMPACT.encode(raw)
        for key, block in form.blocks:
            if raw.get(key) is block.plain:
                raw[key] = _PLACEHOLDERS[key]
        text = _COMPACT.encode(raw)
        for key, block in form.blocks:
            if raw.get(key) is _PLACEHOLDERS[key]:
                if block.text is None:
                    block.text = _COMPACT.encode(block.plain)
                text = text.replace(_PLACEHOLDER_TEXTS[key], block.text, 1)
        return text

    def to_json(self, event: Event) -> str:
        """``event.to_json()``, faster for events that share context records."""
        return self.encode(self.form(event))
