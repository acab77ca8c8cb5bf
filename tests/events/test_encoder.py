"""EventEncoder: the same text as Event.to_json, shared context records encoded once."""

from __future__ import annotations

import json

import pytest
from tests.events.samples import ALL

from oisp.events import SHARED_CONTEXT, Event, EventEncoder


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_encoder_says_what_to_json_says(name: str) -> None:
    event = ALL[name]()
    encoder = EventEncoder()
    assert encoder.to_json(event) == event.to_json()
    assert encoder.to_json(event) == event.to_json()  # from the cache: the same
    assert encoder.form(event).fields == event.to_dict() == json.loads(event.to_json())


def test_a_shared_record_is_formed_and_checked_once_per_record() -> None:
    first = ALL["ai.request"]()
    assert first.process is not None
    checked: list[str] = []
    encoder = EventEncoder(check=lambda key, value: checked.append(key) or True)
    events = [first.with_context(event_id=f"01JT{i:022d}") for i in range(5)]
    texts = [encoder.to_json(event) for event in events]
    shared = [key for key in ("host", "actor", "process", "app", "source") if key in first.to_dict()]
    assert sorted(checked) == sorted(shared)  # once each, not once per event
    assert texts == [event.to_json() for event in events]
    assert set(shared) <= SHARED_CONTEXT


def test_a_record_that_fails_the_check_marks_the_form() -> None:
    event = ALL["ai.request"]()
    encoder = EventEncoder(check=lambda key, value: key != "process")
    assert encoder.form(event).clean is (event.process is None)
    assert EventEncoder().form(event).clean


def test_a_full_cache_starts_over() -> None:
    encoder = EventEncoder(cache_size=2)
    events = [ALL[name]() for name in sorted(ALL)]
    assert [encoder.to_json(e) for e in events] == [e.to_json() for e in events]
    assert isinstance(events[0], Event)
