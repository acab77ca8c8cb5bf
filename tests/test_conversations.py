"""oisp.conversations: a JSONL stream read back as calls and conversations, on the demo's real traffic (the real
openai and anthropic SDKs through the real proxy, a tool round trip each)."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

import oisp
from oisp.errors import EventValidationError


@pytest.fixture(scope="module")
def demo_events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "events.jsonl"
    out = subprocess.run([sys.executable, "-m", "oisp.cli.main", "demo", "--output", str(path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return path


def test_the_demos_events_group_into_two_conversations_of_two_calls(demo_events: Path) -> None:
    found = oisp.conversations(oisp.read_events(demo_events))
    assert [c.calls[0].provider for c in found] == ["openai", "anthropic"]
    for conversation in found:
        first, second = conversation.calls
        assert first.request is not None and first.response is not None
        assert len(first.tool_calls) == 1 and first.tool_names
        assert second.tool_results and second.tool_results[0].data.call_id == (  # type: ignore[attr-defined]
            first.tool_calls[0].data.call_id)  # type: ignore[attr-defined]
        assert not second.tool_calls and second.response is not None
        assert conversation.total_tokens == sum(c.total_tokens or 0 for c in conversation.calls) > 0
        assert conversation.cost_usd is not None and conversation.cost_usd > 0  # the shipped prices
    calls = oisp.calls(oisp.read_events(demo_events))
    assert len(calls) == 4 and all(c.model for c in calls)


def test_an_unrelated_stream_stays_apart_and_order_does_not_matter(demo_events: Path) -> None:
    events = list(oisp.read_events(demo_events))
    forward = oisp.conversations(events)
    backward = oisp.conversations(reversed(events))
    assert [[c.request_id for c in conv.calls] for conv in forward] == [
        [c.request_id for c in conv.calls] for conv in backward]
    first_connection = (events[0].attrs or {})["oisp.connection_id"]
    only_openai = [e for e in events if (e.attrs or {}).get("oisp.connection_id") == first_connection]
    assert len(oisp.conversations(only_openai)) == 1


def test_reading_gzip_and_a_bad_line(tmp_path: Path, demo_events: Path) -> None:
    packed = tmp_path / "events.jsonl.gz"
    packed.write_bytes(gzip.compress(demo_events.read_bytes()))
    assert len(list(oisp.read_events(packed))) == len(demo_events.read_text().splitlines())
    broken = tmp_path / "broken.jsonl"
    broken.write_text(demo_events.read_text().splitlines()[0] + "\n\n{not json\n")
    with pytest.raises(EventValidationError, match=r"broken.jsonl:3"):
        list(oisp.read_events(broken))
