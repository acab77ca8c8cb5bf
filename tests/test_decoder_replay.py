"""oisp.Decoder: recorded exchanges and JSONL recordings replayed through the real provider plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.oisp_schema import SchemaValidator

import oisp
from oisp.errors import EventValidationError
from oisp.events.spec_gaps import conform

FIXTURES = Path(__file__).parent / "providers" / "fixtures" / "openai"
PLUGINS = oisp.create_plugin_manager(entrypoints=False)


def groq(chunks: list[str] | None = None, **response: Any) -> dict[str, Any]:
    case = json.loads((FIXTURES / "groq_chat_stream.json").read_text())
    body = (FIXTURES / "groq_chat_stream.sse").read_text()
    return {"request": case["request"] | {"method": "POST"},
            "response": {"status": 200, "headers": {"content-type": "text/event-stream"},
                         "chunks": chunks if chunks is not None else [body], **response}}


def types(events: list[oisp.Event]) -> list[str]:
    return [e.event_type for e in events]


def test_a_streamed_exchange_decodes_the_same_in_any_pieces(oisp_schema: SchemaValidator) -> None:
    body = (FIXTURES / "groq_chat_stream.sse").read_text()
    whole = oisp.Decoder(PLUGINS).decode(oisp.RecordedExchange.from_dict(groq()))
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    split = oisp.Decoder(PLUGINS).decode(oisp.RecordedExchange.from_dict(groq(pieces)))
    assert types(whole) == types(split) == ["ai.request", "ai.response"]
    for event in whole + split:
        oisp_schema.assert_valid(conform(event).to_dict())
    assert whole[1].data.provider.name == "groq"  # type: ignore[attr-defined]  # from the plugins' endpoints
    text = [e.data.choices[0].message.content for e in (whole[1], split[1])]  # type: ignore[attr-defined]
    assert text[0] and text[0] == text[1]
    assert "gsk_4Zp8Qw2Er6Ty0Ui3Op7As1Df5Gh9Jk2Lz" not in "".join(e.to_json() for e in whole)


def test_an_exchange_without_a_response_is_partial() -> None:
    recorded = groq()
    del recorded["response"]
    events = oisp.Decoder(PLUGINS).decode(oisp.RecordedExchange.from_dict(recorded))
    assert types(events) == ["ai.request", "ai.response"]
    assert events[1].confidence.completeness == "partial"
    assert events[1].data.success is False  # type: ignore[attr-defined]


def test_a_recording_mixes_exchanges_and_events_and_emits_each(tmp_path: Path) -> None:
    earlier = oisp.Decoder(PLUGINS).decode(oisp.RecordedExchange.from_dict(groq()))[0]
    path = tmp_path / "recording.jsonl"
    path.write_text(earlier.to_json() + "\n\n" + json.dumps(groq()) + "\n", encoding="utf-8")
    emitted: list[oisp.Event] = []
    replayed = list(oisp.Decoder(PLUGINS, emitted.append).replay(path))
    assert types(replayed) == ["ai.request", "ai.request", "ai.response"]
    assert replayed[0] == earlier  # an event passes as it is
    assert emitted == replayed


def test_a_line_that_is_neither_says_where(tmp_path: Path) -> None:
    path = tmp_path / "recording.jsonl"
    path.write_text(json.dumps(groq()) + "\n" + '{"request": {"method": "POST"}}\n', encoding="utf-8")
    replayed = oisp.Decoder(PLUGINS).replay(path)
    with pytest.raises(EventValidationError, match=r"recording.jsonl:2: neither an exchange nor an event"):
        list(replayed)
