"""The event model: construction, JSON round trips, reading foreign events, errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from tests.events.samples import ALL
from tests.oisp_schema import EXAMPLES_DIR, needs_spec

import oisp
from oisp.events import (
    PAYLOAD_TYPES,
    AiRequest,
    Confidence,
    Event,
    Message,
    Redacted,
    RedactionMarker,
    ToolCall,
    UnknownPayload,
    format_ts,
    parse_ts,
)

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
CONF = Confidence(level="high", completeness="full")


def test_public_envelope_type_is_exported_at_package_root() -> None:
    assert oisp.Event is Event


def test_every_defined_event_type_has_a_sample() -> None:
    assert set(ALL) == set(PAYLOAD_TYPES)


def test_new_event_gets_ulid_rfc3339_microsecond_utc_ts_and_monotonic_ns() -> None:
    event = Event.create(AiRequest(request_id="r"), confidence=CONF)
    out = event.to_dict()
    assert ULID.match(out["event_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", out["ts"])
    assert isinstance(out["ts_mono"], int) and out["ts_mono"] > 0
    assert out["oisp_version"] == "0.1"
    assert out["event_type"] == "ai.request"
    assert out["source"]["collector"] == "oisp"


def test_event_ids_are_unique_and_time_ordered() -> None:
    ids = [Event.create(AiRequest(), confidence=CONF).event_id for _ in range(200)]
    assert len(set(ids)) == 200
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)


def test_unset_fields_are_omitted() -> None:
    out = Event.create(AiRequest(request_id="r1"), confidence=CONF).to_dict()
    assert out["data"] == {"request_id": "r1"}
    for absent in ("host", "actor", "process", "app", "attrs", "ext", "related_events", "trace_context"):
        assert absent not in out


@pytest.mark.parametrize("event_type", sorted(ALL))
def test_every_event_type_round_trips_through_json(event_type: str) -> None:
    event = ALL[event_type]()
    text = event.to_json()
    back = Event.from_json(text)
    assert back == event
    assert back.to_dict() == json.loads(text)
    assert type(back.data) is PAYLOAD_TYPES[event_type]


@needs_spec
@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.json")) if EXAMPLES_DIR.is_dir() else [],
                         ids=lambda p: p.name)
def test_official_examples_load_and_serialize_back_equal(path) -> None:  # type: ignore[no-untyped-def]
    original = json.loads(path.read_text())
    event = Event.from_dict(original)
    assert type(event.data) is PAYLOAD_TYPES[original["event_type"]]
    assert event.to_dict() == original
    assert json.loads(event.to_json()) == original


@needs_spec
def test_there_are_nine_official_examples() -> None:
    assert len(list(EXAMPLES_DIR.glob("*.json"))) == 9


def test_foreign_event_with_unknown_type_and_keys_round_trips() -> None:
    foreign = {
        "oisp_version": "0.1", "event_id": "x1", "event_type": "agent.plan_step",
        "ts": "2025-12-22T14:30:18.789012Z", "source": {"collector": "other", "vendor_field": 1},
        "confidence": {"level": "low", "completeness": "partial", "custom": [1, 2]},
        "data": {"step_index": 2, "planned_actions": [{"action": "read"}]},
        "process": {"pid": 1, "container_id": "abc"},
    }
    event = Event.from_dict(foreign)
    assert isinstance(event.data, UnknownPayload)
    assert event.source.extra == {"vendor_field": 1}
    assert event.to_dict() == foreign


def test_redacted_marker_is_typed_and_serialized_with_dollar_key() -> None:
    msg = Message(role="user", content=Redacted(marker=RedactionMarker(reason="policy", original_length=5)))
    out = msg.to_dict()
    assert out == {"role": "user", "content": {"$redacted": {"reason": "policy", "original_length": 5}}}
    assert Message.from_dict(out) == msg


def test_union_field_keeps_plain_objects_that_are_not_markers() -> None:
    call = ToolCall.from_dict({"id": "c", "arguments": {"city": "Paris"}})
    assert call.arguments == {"city": "Paris"}


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"event_type": "ai.request"}, "missing required field"),
        ([], "JSON object"),
        ({"oisp_version": "0.1", "event_id": "1", "event_type": "ai.request", "ts": "yesterday",
          "source": {"collector": "c"}, "confidence": {"level": "high", "completeness": "full"}},
         "not an RFC 3339"),
        ({"oisp_version": "0.1", "event_id": "1", "event_type": "ai.request", "ts": "2025-01-01T00:00:00Z",
          "source": {}, "confidence": {"level": "high", "completeness": "full"}}, "Source"),
        ({"oisp_version": "0.1", "event_id": "1", "event_type": "ai.request", "ts": "2025-01-01T00:00:00Z",
          "source": {"collector": "c"}, "confidence": {"level": "high", "completeness": "full"},
          "data": {"messages": "not a list"}}, "JSON array"),
        ({"oisp_version": "0.1", "event_id": "1", "event_type": "Bad Type", "ts": "2025-01-01T00:00:00Z",
          "source": {"collector": "c"}, "confidence": {"level": "high", "completeness": "full"}}, "event_type"),
    ],
)
def test_invalid_input_raises_event_validation_error_with_a_clear_message(mapping, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(oisp.EventValidationError, match=message):
        Event.from_dict(mapping)


def test_from_json_rejects_invalid_json_clearly() -> None:
    with pytest.raises(oisp.EventValidationError, match="not valid JSON"):
        Event.from_json("{not json")


def test_payload_must_match_event_type() -> None:
    with pytest.raises(oisp.EventValidationError, match="AiRequest"):
        Event(event_type="ai.request", data=UnknownPayload(), confidence=CONF)


def test_timestamps_parse_offsets_and_nanoseconds_and_format_as_utc_z() -> None:
    assert format_ts(parse_ts("2025-12-22T15:30:16.123456789+01:00")) == "2025-12-22T14:30:16.123456Z"
    assert format_ts(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2025-01-02T03:04:05.000000Z"
    with pytest.raises(oisp.EventValidationError, match="time zone"):
        parse_ts("2025-12-22T15:30:16")
