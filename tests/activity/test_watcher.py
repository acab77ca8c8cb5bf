"""File events from watching the agents' working directories (the Windows and macOS path; here forced on, with
inotify under watchdog): real processes and files, no privileges needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.activity.helpers import AgentProcess, Collector
from tests.oisp_schema import SchemaValidator

from oisp.activity import Activity, ActivitySettings
from oisp.activity.build import Clock, ProcessFacts
from oisp.activity.watcher import LIMITATION, WatchCore
from oisp.events import Event

pytest.importorskip("watchdog", reason="the directory watcher needs watchdog (the 'watch' extra)")
pytestmark = pytest.mark.anyio

WATCH_ONLY = ActivitySettings(processes=False, files=False, connections=False, watch_directories=True,
                              poll_interval=0.05)


def _path(event: Event) -> str | None:
    return getattr(event.data, "path", None)


async def test_changes_in_an_agents_directory_are_attributed_to_it(tmp_path: Path, agent: AgentProcess,
                                                                   oisp_schema: SchemaValidator) -> None:
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    collector = Collector()
    async with Activity(emit=collector, config=WATCH_ONLY) as activity:
        assert "watched" in activity.running["files"]
        activity.add_agent(agent.pid)
        # the directory is watched once the watcher has seen the new agent (its next refresh): a first write is
        # repeated until it is reported, then the real checks start
        target = tmp_path / "notes.txt"
        for _ in range(200):
            await agent.run(f"open({str(target)!r}, 'w').write('x' * 10)")
            try:
                await collector.wait_for(lambda evs: any(_path(e) == str(target) for e in evs), timeout=0.2)
                break
            except TimeoutError:
                continue
        await agent.run(f"import os; os.rename({str(target)!r}, {str(tmp_path / 'renamed.txt')!r})")
        await agent.run(f"os.remove({str(tmp_path / 'renamed.txt')!r})")
        await agent.run(f"open({str(elsewhere / 'outside.txt')!r}, 'w').write('y')")
        # a process that is not an agent writes in the agent's directory: reported as the agent's (the gap)
        subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'bystander.txt')!r}, 'w').write('z')"],
                       check=True)
        await collector.wait_for(lambda evs: any(e.event_type == "file.delete" for e in evs)
                                 and any(_path(e) == str(tmp_path / "bystander.txt") for e in evs))
    events = collector.events
    writes = [e for e in events if e.event_type == "file.write" and _path(e) == str(target)]
    assert writes and writes[0].data.file.size == 10  # type: ignore[attr-defined]
    (rename,) = [e for e in events if e.event_type == "file.rename"]
    assert (rename.data.old_path, rename.data.new_path) == (str(target), str(tmp_path / "renamed.txt"))  # type: ignore[attr-defined]
    (delete,) = [e for e in events if e.event_type == "file.delete"]
    assert _path(delete) == str(tmp_path / "renamed.txt")
    assert not [e for e in events if str(elsewhere) in e.to_json()]
    for event in events:
        oisp_schema.assert_valid(event.to_dict())
        assert event.process is not None and event.process.pid == agent.pid
        assert (event.attrs or {})["oisp.attribution"] == "working_directory"
        assert event.confidence.level == "low" and event.confidence.process_attribution == "heuristic"
        assert LIMITATION in (event.confidence.limitations or [])
    assert activity.stats.watch_records >= len(events)


def test_a_files_modifications_coalesce_into_one_write_and_the_nearest_directory_wins(tmp_path: Path) -> None:
    facts = {1: ProcessFacts(1, exe="/bin/outer", cwd=str(tmp_path)),
             2: ProcessFacts(2, exe="/bin/inner", cwd=str(tmp_path / "sub"))}
    core = WatchCore(Clock(), facts.__getitem__, quiet_ns=100)
    core.watched = {str(tmp_path): {1}, str(tmp_path / "sub"): {2}}
    path = str(tmp_path / "sub" / "f.txt")
    assert core.change("created", path, 10) == []
    assert core.change("modified", path, 20) == []
    assert core.due(50) == [] and core.oldest_pending() == 10  # not quiet yet: held
    (write,) = core.due(120)
    assert write.event_type == "file.write" and write.data.created  # type: ignore[attr-defined]
    assert write.process is not None and write.process.pid == 2
    assert (write.attrs or {})["oisp.candidate_agents"] == [2, 1]
    assert write.ts_mono == 20 and core.oldest_pending() is None
    # a close reports at once (Linux's inotify has it); a change outside every watched directory is not reported
    core.change("modified", str(tmp_path / "g.txt"), 200)
    (closed,) = core.change("closed", str(tmp_path / "g.txt"), 210)
    assert closed.process is not None and closed.process.pid == 1
    assert core.change("deleted", os.path.join(os.sep, "elsewhere", "h.txt"), 300) == []
    assert core.unattributed == 1
