"""The Linux sources, for real: agent processes run commands and write files; the kernel's events come out as
OISP events (as root; skipped elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from tests.activity.helpers import AgentProcess, Collector, caught_up, needs_root_linux
from tests.oisp_schema import SchemaValidator

from oisp.activity import Activity, ActivitySettings
from oisp.events import AiRequest, Confidence, Event, ProcessInfo
from oisp.pipeline import Pipeline

pytestmark = [pytest.mark.anyio, pytest.mark.root, needs_root_linux]


def _validate_all(events: list[Event], oisp_schema: SchemaValidator) -> None:
    assert events
    for event in events:
        oisp_schema.assert_valid(event.to_dict())


async def test_a_shell_command_and_a_direct_write_of_an_agent_come_out_attributed(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path,
        oisp_schema: SchemaValidator) -> None:
    activity, seen = observed
    activity.add_agent(agent.pid)
    done = await agent.run(
        f"import subprocess; subprocess.run(['sh', '-c', 'echo x > {tmp_path}/by-shell.txt'], check=True)\n"
        f"open('{tmp_path}/direct.txt', 'w').write('hello')")
    await caught_up(activity, done)  # no further waiting: what happened before is emitted by now

    shell_exec = seen.of("process.exec", process__ppid=agent.pid)
    assert len(shell_exec) == 1
    sh = shell_exec[0]
    assert sh.process is not None and sh.process.pid is not None
    assert sh.data.exe == os.path.realpath("/bin/sh")  # type: ignore[attr-defined]
    # a process this short may be gone before /proc is read: then what is missing is said, never guessed
    if "args" in (sh.confidence.missing or []):
        assert sh.data.args is None and sh.confidence.completeness == "partial"  # type: ignore[attr-defined]
        assert (sh.attrs or {}).get("oisp.exe_source") == "open_exec"
    else:
        assert sh.data.args == ["sh", "-c", f"echo x > {tmp_path}/by-shell.txt"]  # type: ignore[attr-defined]
        assert sh.data.is_shell is True  # type: ignore[attr-defined]
        assert sh.data.cwd == str(tmp_path)  # type: ignore[attr-defined]
    assert (sh.attrs or {}).get("oisp.agent_pid") == agent.pid
    assert sh.actor is not None and sh.actor.uid == 0 and sh.actor.user == "root"  # inherited from the fork

    by_shell = seen.of("file.write", data__path=f"{tmp_path}/by-shell.txt")
    assert len(by_shell) == 1
    assert by_shell[0].process is not None
    assert (by_shell[0].process.pid, by_shell[0].process.ppid) == (sh.process.pid, agent.pid)
    assert by_shell[0].data.created is True  # type: ignore[attr-defined]
    assert by_shell[0].data.file.size == 2  # type: ignore[attr-defined]

    direct = seen.of("file.write", data__path=f"{tmp_path}/direct.txt")
    assert len(direct) == 1
    assert direct[0].process is not None and direct[0].process.pid == agent.pid
    assert direct[0].data.file.size == 5  # type: ignore[attr-defined]
    assert direct[0].data.content_hash is None  # type: ignore[attr-defined]  # nothing of the content by default

    exits = seen.of("process.exit", process__pid=sh.process.pid)
    assert len(exits) == 1 and exits[0].data.exit_code == 0  # type: ignore[attr-defined]
    assert exits[0].data.runtime_ms is not None  # type: ignore[attr-defined]
    assert exits[0].process is not None and exits[0].process.exe == sh.data.exe  # type: ignore[attr-defined]
    # kernel timestamps: the exec, the write and the exit in the order they happened
    assert sh.ts_mono is not None and exits[0].ts_mono is not None and sh.ts_mono < exits[0].ts_mono <= done
    assert abs((sh.ts.timestamp() * 1e9) - (sh.ts_mono + time.time_ns() - time.monotonic_ns())) < 50e6
    _validate_all(seen.events, oisp_schema)


async def test_a_process_that_never_called_ai_is_not_reported(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path) -> None:
    activity, seen = observed
    activity.add_agent(agent.pid)
    other = AgentProcess(tmp_path)  # the same program, but it made no AI call
    try:
        await other.run(f"import subprocess; subprocess.run(['sh', '-c', 'echo y > {tmp_path}/other-shell.txt'])\n"
                        f"open('{tmp_path}/other.txt', 'w').write('no')")
        done = await agent.run(f"open('{tmp_path}/mine.txt', 'w').write('yes')")
        await caught_up(activity, done)
    finally:
        other.close()
    assert seen.of("file.write", data__path=f"{tmp_path}/mine.txt")
    reported = {e.process.pid for e in seen.events if e.process is not None}
    assert other.pid not in reported
    paths = {getattr(e.data, "path", None) for e in seen.events}
    assert not paths & {f"{tmp_path}/other.txt", f"{tmp_path}/other-shell.txt"}
    assert all(e.process is not None and (e.attrs or {}).get("oisp.agent_pid") == agent.pid for e in seen.events)


async def test_sensitive_files_opened_by_an_agent_are_reported_and_others_are_not(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path,
        oisp_schema: SchemaValidator) -> None:
    activity, seen = observed
    for name in (".env", "server.key", "notes.txt"):
        (tmp_path / name).write_text("SECRET=1\n")
    activity.add_agent(agent.pid)
    done = await agent.run(f"[open('{tmp_path}/' + n).read() for n in ('.env', 'server.key', 'notes.txt')]")
    await caught_up(activity, done)
    opened = {e.data.path for e in seen.of("file.open", process__pid=agent.pid)}  # type: ignore[attr-defined]
    assert opened == {f"{tmp_path}/.env", f"{tmp_path}/server.key"}
    for event in seen.of("file.open"):
        assert (event.attrs or {}).get("oisp.sensitive") is True
        assert "SECRET" not in event.to_json()
    _validate_all(seen.of("file.open"), oisp_schema)


async def test_a_killed_process_exits_with_its_signal(
        observed: tuple[Activity, Collector], agent: AgentProcess, oisp_schema: SchemaValidator) -> None:
    activity, seen = observed
    activity.add_agent(agent.pid)
    done = await agent.run("import subprocess\np = subprocess.Popen(['sleep', '30'])\np.kill()\np.wait()\n"
                           "print(p.pid, file=open('/dev/null', 'w'))")
    await caught_up(activity, done)
    sleeps = [e for e in seen.of("process.exec", process__ppid=agent.pid) if e.data.args == ["sleep", "30"]]  # type: ignore[attr-defined]
    if not sleeps:  # killed before it could exec: its exit is still reported
        exits = [e for e in seen.of("process.exit") if e.process and e.process.ppid == agent.pid]
    else:
        assert sleeps[0].process is not None
        exits = seen.of("process.exit", process__pid=sleeps[0].process.pid)
    assert len(exits) == 1
    data = exits[0].data
    assert (data.exit_code, data.signal, data.signal_name, data.termination_type) == (  # type: ignore[attr-defined]
        137, 9, "SIGKILL", "signaled")
    _validate_all(exits, oisp_schema)


async def test_deletes_and_renames_are_reported(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path) -> None:
    activity, seen = observed
    (tmp_path / "old.txt").write_text("x")
    (tmp_path / "gone.txt").write_text("x")
    activity.add_agent(agent.pid)
    done = await agent.run(f"import os; os.rename('{tmp_path}/old.txt', '{tmp_path}/new.txt'); "
                           f"os.unlink('{tmp_path}/gone.txt')")
    await caught_up(activity, done)
    renames = seen.of("file.rename", process__pid=agent.pid)
    assert [(e.data.old_path, e.data.new_path) for e in renames] == [  # type: ignore[attr-defined]
        (f"{tmp_path}/old.txt", f"{tmp_path}/new.txt")]
    assert [e.data.path for e in seen.of("file.delete", process__pid=agent.pid)] == [  # type: ignore[attr-defined]
        f"{tmp_path}/gone.txt"]


async def test_a_child_that_forks_writes_and_exits_at_once_is_still_in_scope(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path) -> None:
    # the fork, the write and the exit all land in one pass of the reader: the scope must know the child when
    # its write is decoded, and still know it (its exit is applied after)
    activity, seen = observed
    activity.add_agent(agent.pid)
    done = await agent.run("import os\nfor i in range(20):\n    pid = os.fork()\n    if pid == 0:\n"
                           f"        open('{tmp_path}/fork%d' % i, 'w').write('x'); os._exit(3)\n"
                           "    os.waitpid(pid, 0)")
    await caught_up(activity, done)
    written = {e.data.path for e in seen.of("file.write")}  # type: ignore[attr-defined]
    assert written == {f"{tmp_path}/fork{i}" for i in range(20)}
    forks = seen.of("process.fork", process__pid=agent.pid)
    assert len(forks) == 20
    children = {e.data.child_pid for e in forks}  # type: ignore[attr-defined]
    exits = [e for e in seen.of("process.exit") if e.process and e.process.pid in children]
    assert len(exits) == 20 and {e.data.exit_code for e in exits} == {3}  # type: ignore[attr-defined]


async def test_the_scope_learns_agents_from_the_pipelines_ai_events(
        agent: AgentProcess, tmp_path: Path, oisp_schema: SchemaValidator) -> None:
    processed = Collector()
    pipeline = Pipeline({})
    pipeline.add_listener(processed)
    async with pipeline:
        activity = Activity(emit=pipeline.emit)
        activity.watch_pipeline(pipeline)
        other = AgentProcess(tmp_path)  # another agent (idle): the files are watched (only while agents exist)
        async with activity:
            activity.add_agent(other.pid)
            before = await agent.run(f"open('{tmp_path}/before.txt', 'w').write('1')")
            await caught_up(activity, before)
            pipeline.emit(Event.create(AiRequest(request_id="r1"), confidence=Confidence(level="high",
                                       completeness="full"), process=ProcessInfo(pid=agent.pid)))
            await processed.wait_for(lambda events: any(e.event_type == "ai.request" for e in events))
            assert activity.scope.agent_of(agent.pid) == agent.pid
            done = await agent.run(f"import subprocess; subprocess.run(['touch', '{tmp_path}/after.txt'])")
            await caught_up(activity, done)
            await processed.wait_for(lambda events: any(
                e.event_type == "file.write" and getattr(e.data, "path", "").endswith("after.txt") for e in events))
        other.close()
    # the AI event is made after the call was decoded: effects up to LEARN_MARGIN_NS before it count as the
    # agent's (here a write just before the call, while the files were watched for the other agent)
    assert processed.of("file.write", data__path=f"{tmp_path}/before.txt")
    touch = [e for e in processed.of("process.exec") if e.process and e.process.ppid == agent.pid]
    assert len(touch) == 1 and touch[0].host is not None  # it went through the pipeline's stages
    _validate_all(processed.events, oisp_schema)


async def test_hashes_when_asked(agent: AgentProcess, tmp_path: Path) -> None:
    seen = Collector()
    async with Activity(emit=seen, config=ActivitySettings(hash_files=True)) as activity:
        activity.add_agent(agent.pid)
        done = await agent.run(f"open('{tmp_path}/h.txt', 'w').write('abc')")
        await caught_up(activity, done)
    [write] = seen.of("file.write", data__path=f"{tmp_path}/h.txt")
    assert write.data.content_hash == (  # type: ignore[attr-defined]
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


async def test_scope_all_observes_every_process_within_the_rate_limit(tmp_path: Path) -> None:
    seen = Collector()
    settings = ActivitySettings(scope="all", rate_limit=5, files=False)
    async with Activity(emit=seen, config=settings) as activity:
        script = "for i in $(seq 40); do /bin/true; done"
        proc = await anyio.run_process(["sh", "-c", script])
        assert proc.returncode == 0
        await caught_up(activity, time.monotonic_ns())
    # a token bucket of 5 a second: about 5 events pass in a burst, the rest are counted
    assert 1 <= len(seen.events) <= 20
    assert activity.stats.rate_limited >= 100 - 20


async def test_bursts_of_processes_and_files_lose_nothing_silently(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path) -> None:
    activity, seen = observed
    activity.add_agent(agent.pid)
    files, processes = 20_000, 2_000
    done = await agent.run(
        f"for i in range({files}):\n    with open('{tmp_path}/b%d' % i, 'w') as f: f.write('x')\n"
        f"import subprocess; subprocess.run(['sh', '-c', 'i=0; while [ $i -lt {processes} ]; do /bin/true; "
        "i=$((i+1)); done'], check=True)")
    await caught_up(activity, done, timeout=120)
    writes = len(seen.of("file.write"))
    shell = os.path.realpath("/bin/sh")
    execs = [e for e in seen.of("process.exec") if e.data.exe != shell and e.process  # type: ignore[attr-defined]
             and e.process.pid != agent.pid]
    exits = [e for e in seen.of("process.exit") if e.data.exit_code == 0]  # type: ignore[attr-defined]
    stats = activity.stats
    if stats.file_overflows == 0:
        assert writes == files
    if stats.process_overruns == 0:
        assert len(execs) == processes and len(exits) >= processes
    if stats.process_overruns == 0 and stats.file_overflows == 0:
        # short-lived execs take their executable from FAN_OPEN_EXEC (lost only with a fanotify overflow)
        known = sum(1 for e in execs if e.data.exe == "/usr/bin/true")  # type: ignore[attr-defined]
        assert known >= processes * 0.99, f"only {known} of {processes} execs have their executable"
    print(f"burst: {writes} of {files} writes, {len(execs)} of {processes} execs; kernel overruns: "
          f"processes {stats.process_overruns}, files {stats.file_overflows}")
    assert writes + len(execs) > 0
    # memory: nothing of the burst's processes stays tracked
    assert len(activity.scope) <= 3
    assert activity._table is not None and len(activity._table) <= 3


def test_the_kernel_connector_reports_threads_not_as_processes() -> None:
    # a sanity check of the parser against the running kernel: a thread start is no fork event
    from oisp.activity.cn_proc import ForkEvent, ProcConnector

    connector = ProcConnector()
    try:
        code = "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()"
        child = subprocess.run([sys.executable, "-c", code], check=True)
        assert child.returncode == 0
        records: list[object] = []
        import select

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            select.select([connector], [], [], 0.05)
            if not connector.read(records) and any(isinstance(r, ForkEvent) for r in records):
                break
        forks = [r for r in records if isinstance(r, ForkEvent)]
        assert forks and all(r.child != r.parent for r in forks)
    finally:
        connector.close()


async def test_an_agent_learned_late_gets_its_effects_since_the_call(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path,
        oisp_schema: SchemaValidator) -> None:
    # the AI event that makes a process an agent can be processed after the kernel's records of what the agent
    # did with the answer were read: those records are kept a while and replayed from the call's time on. The
    # files are watched only while some agent exists: here another agent runs meanwhile (with no agent at all,
    # the process records are replayed and file effects are seen from the moment the agent is learned)
    activity, seen = observed
    other = AgentProcess(tmp_path)
    activity.add_agent(other.pid)
    try:
        await _learned_late(activity, seen, agent, tmp_path, oisp_schema, other.pid)
    finally:
        other.close()


async def _learned_late(activity: Activity, seen: Collector, agent: AgentProcess, tmp_path: Path,
                        oisp_schema: SchemaValidator, other: int) -> None:
    def ours() -> list[Event]:  # the other agent's own exec may be reported
        return [e for e in seen.events if (e.attrs or {}).get("oisp.agent_pid") != other]

    earlier = await agent.run(f"open('{tmp_path}/before-the-call.txt', 'w').write('0')")
    await caught_up(activity, earlier)
    call = time.monotonic_ns()
    done = await agent.run(
        f"import subprocess; subprocess.run(['sh', '-c', 'echo x > {tmp_path}/late-shell.txt'])\n"
        f"open('{tmp_path}/late.txt', 'w').write('1')")
    await caught_up(activity, done)
    assert ours() == []  # not an agent yet
    activity.add_agent(agent.pid, since_ns=call)
    await seen.wait_for(lambda events: len([e for e in events if e.event_type == "file.write"]) == 2)
    await caught_up(activity, time.monotonic_ns())
    written = {e.data.path: e for e in seen.of("file.write")}  # type: ignore[attr-defined]
    assert set(written) == {f"{tmp_path}/late-shell.txt", f"{tmp_path}/late.txt"}
    shell = seen.of("process.exec", process__ppid=agent.pid)
    assert len(shell) == 1 and shell[0].data.exe == os.path.realpath("/bin/sh")  # type: ignore[attr-defined]
    assert shell[0].ts_mono is not None and call < shell[0].ts_mono < done
    assert len([e for e in seen.of("process.exit") if e.process and e.process.ppid == agent.pid]) == 1
    assert all((e.attrs or {}).get("oisp.agent_pid") == agent.pid for e in ours())
    _validate_all(ours(), oisp_schema)


def _filesystem_marks(fd: int) -> int:
    """How many filesystem marks the kernel holds for the fanotify group ``fd`` of this process."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return sum(1 for line in f if line.startswith("fanotify sdev:"))


async def test_files_are_watched_only_while_an_agent_exists(
        observed: tuple[Activity, Collector], agent: AgentProcess, tmp_path: Path) -> None:
    # a machine without agents pays only for the process connector: no filesystem is marked, so the kernel
    # queues no file event at all; the first agent arms the marks at once, and they go when no agent is left
    activity, seen = observed
    [source] = [s for s in activity._sources if getattr(s, "files", None) is not None]
    files = source.files  # type: ignore[attr-defined]
    assert _filesystem_marks(files.fileno()) == 0 and not files.armed
    await caught_up(activity, time.monotonic_ns())  # (what was queued while the filesystems were tried at start)
    records = activity.stats.file_records
    bystander = await agent.run(f"open('{tmp_path}/nobody.txt', 'w').write('0')")
    await caught_up(activity, bystander)
    assert activity.stats.file_records == records  # nothing was queued: nothing marked

    agent_process = AgentProcess(tmp_path)
    try:
        activity.add_agent(agent_process.pid)
        assert _filesystem_marks(files.fileno()) >= 1 and files.armed
        done = await agent_process.run(f"open('{tmp_path}/mine.txt', 'w').write('yes')")
        await caught_up(activity, done)
        [write] = seen.of("file.write", data__path=f"{tmp_path}/mine.txt")
        assert write.process is not None and write.process.pid == agent_process.pid
    finally:
        agent_process.close()
    # the agent exited: the scope is empty, and the marks are removed (after DISARM_AFTER)
    with anyio.fail_after(10):
        while _filesystem_marks(files.fileno()) != 0:
            await anyio.sleep(0.05)  # polls the kernel's state (a condition), not a stand-in for one
    assert len(activity.scope) == 0 and not files.armed
    records = activity.stats.file_records
    later = await agent.run(f"open('{tmp_path}/nobody-again.txt', 'w').write('0')")
    await caught_up(activity, later)
    assert not seen.of("file.write", data__path=f"{tmp_path}/nobody-again.txt")
    assert activity.stats.file_records == records


def test_in_a_network_namespace_processes_are_polled_and_files_still_watched(tmp_path: Path) -> None:
    # the kernel's process connector answers only in the initial network namespace (oisp run can be started in
    # another one, as the transparent-mode tests do): processes fall back to polling, and the reason is given
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    code = ("import anyio\nfrom oisp.activity import Activity\n"
            "async def main():\n    async with Activity(emit=lambda e: None) as a:\n"
            "        print(sorted(a.running.items())); print(a.stats.limitations)\nanyio.run(main)")
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    running, limitations = out.stdout.splitlines()
    assert "('processes', 'psutil polling')" in running and "('files', 'fanotify" in running
    assert "only in the initial network namespace" in limitations


async def test_include_exe_takes_a_process_in_scope_when_it_execs(tmp_path: Path) -> None:
    # out-of-scope execs are decided from the executable's link alone; a configured executable becomes an agent
    seen = Collector()
    sleep = os.path.realpath("/bin/sleep")
    async with Activity(emit=seen, config=ActivitySettings(include_exe=(os.path.basename(sleep),))) as activity:
        proc = await anyio.run_process(["sh", "-c", "sleep 0.3; true"])
        assert proc.returncode == 0
        await caught_up(activity, time.monotonic_ns())
    execs = seen.of("process.exec")
    assert [e.data.exe for e in execs] == [sleep]  # type: ignore[attr-defined]  # not the shell, not true
    assert execs[0].process is not None and (execs[0].attrs or {}).get("oisp.agent_pid") == execs[0].process.pid
    assert execs[0].data.args == ["sleep", "0.3"]  # type: ignore[attr-defined]
