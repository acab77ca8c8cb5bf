"""Processes by polling (Windows, macOS, Linux without root): real processes, no privileges needed."""

from __future__ import annotations

import pytest
from tests.activity.helpers import AgentProcess
from tests.oisp_schema import SchemaValidator

from oisp.activity import ActivitySettings, ActivityStats, AgentScope
from oisp.activity.build import Clock
from oisp.activity.polling import PollingProcessSource
from oisp.events import Event

pytestmark = pytest.mark.anyio


async def test_polling_reports_children_of_agents_as_sampled(agent: AgentProcess,
                                                             oisp_schema: SchemaValidator) -> None:
    scope = AgentScope()
    stats = ActivityStats()
    source = PollingProcessSource(scope, ActivitySettings(), stats, Clock(), lambda *_: True, lambda _: True)
    source.prime()
    scope.add_agent(agent.pid)
    await agent.run("import subprocess; p = subprocess.Popen(['sleep', '30'])")
    events: list[Event] = []
    source.poll(events)
    [started] = [e for e in events if e.event_type == "process.exec"]
    assert started.process is not None and started.process.ppid == agent.pid
    assert started.data.args == ["sleep", "30"]  # type: ignore[attr-defined]
    assert started.confidence.completeness == "sampled"
    assert started.confidence.limitations == ["processes_polled"]
    await agent.run("p.kill(); p.wait()")
    events.clear()
    source.poll(events)
    [ended] = [e for e in events if e.event_type == "process.exit"]
    assert ended.process is not None and ended.process.pid == started.process.pid
    assert ended.data.exit_code == -1 and ended.data.termination_type == "unknown"  # type: ignore[attr-defined]
    assert "exit_code" in (ended.confidence.missing or [])
    for event in (started, ended):
        oisp_schema.assert_valid(event.to_dict())


async def test_polling_does_not_report_processes_outside_the_scope(agent: AgentProcess) -> None:
    scope = AgentScope()
    source = PollingProcessSource(scope, ActivitySettings(), ActivityStats(), Clock(), lambda *_: True,
                                  lambda _: True)
    source.prime()
    await agent.run("import subprocess; p = subprocess.Popen(['sleep', '30'])")
    events: list[Event] = []
    source.poll(events)
    await agent.run("p.kill(); p.wait()")
    source.poll(events)
    assert events == []
