"""``oisp demo``, the embedded default main job, end to end: real proxy, local provider, real SDKs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.cli.conftest import OISP
from tests.oisp_schema import SchemaValidator

from oisp.events import Event


def test_demo_produces_linked_complete_events_for_openai_and_anthropic(tmp_path: Path,
                                                                       oisp_schema: SchemaValidator) -> None:
    out_file = tmp_path / "demo.jsonl"
    out = subprocess.run([*OISP, "demo", "--json", "--output", str(out_file)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    printed = [Event.from_json(line) for line in out.stdout.splitlines() if line.startswith("{")]
    written = [Event.from_json(line) for line in out_file.read_text().splitlines()]
    assert [e.event_id for e in printed] == [e.event_id for e in written]
    for event in written:
        oisp_schema.assert_valid(event.to_dict())
    by_type: dict[str, list[Event]] = {}
    for event in written:
        by_type.setdefault(event.event_type, []).append(event)
    assert {t: len(v) for t, v in by_type.items()} == {
        "network.connect": 2, "ai.request": 4, "ai.response": 4, "agent.tool_call": 2, "agent.tool_result": 2}
    providers = [e.to_dict()["data"]["provider"]["name"] for e in by_type["ai.request"]]
    assert providers == ["openai", "openai", "anthropic", "anthropic"]
    # each tool result the SDK sent back is linked to the tool call the model made
    calls = {e.data.call_id: e.event_id for e in by_type["agent.tool_call"]}  # type: ignore[attr-defined]
    for result in by_type["agent.tool_result"]:
        assert result.related_events and result.related_events[0].event_id == calls[result.data.call_id]  # type: ignore[attr-defined]
    # each response answers its request
    requests = {e.data.request_id: e.event_id for e in by_type["ai.request"]}  # type: ignore[attr-defined]
    for response in by_type["ai.response"]:
        assert response.related_events and response.related_events[0].event_id == requests[response.data.request_id]  # type: ignore[attr-defined]
        assert response.data.success is True and response.data.usage.prompt_tokens  # type: ignore[attr-defined]
    # the API keys the SDKs used never reach an event
    text = out_file.read_text()
    assert "DEMOdemoDEMO" not in text and "sk-proj-" in text
    summary = out.stderr.strip().splitlines()[-1]
    assert summary.startswith("oisp demo: 14 events") and "dropped 0" in summary
    assert json.loads(out.stdout.splitlines()[0])["event_type"] == "network.connect"
