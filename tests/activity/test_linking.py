"""Transcript tests of the linker: events in (with kernel times), events out."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from tests.oisp_schema import SchemaValidator

from oisp.activity.linking import Linker
from oisp.events import PAYLOAD_TYPES, Event
from oisp.events._record import Record
from oisp.events.agent import AgentToolCall, AgentToolResult, ToolInfo
from oisp.events.ai import AiRequest, AiResponse, ToolCall, Usage
from oisp.events.context import Confidence, Host, ProcessInfo, RelatedEvent
from oisp.events.envelope import UnknownPayload
from oisp.events.file import FileWrite
from oisp.events.process import ProcessExec, ProcessExit

MS = 1_000_000
AGENT = 4000
OTHER = 5000
CONF = Confidence(level="high", completeness="full")


def payload(kind: str, data: dict[str, Any]) -> Record:
    """The payload of ``kind`` (typed where oisp has a class for it)."""
    return PAYLOAD_TYPES.get(kind, UnknownPayload).from_dict(data)


def proc(pid: int, ppid: int = 1, exe: str = "/usr/bin/python3") -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=ppid, exe=exe, name=exe.rsplit("/", 1)[-1])


class Transcript:
    """Feeds a linker events at given kernel times (ms) and collects what it emits."""

    def __init__(self, linker: Linker | None = None, *, auto_watermark: bool = True) -> None:
        self.linker = linker or Linker()
        self.out: list[Event] = []
        self.watermark = 0
        #: A kernel event moves the watermark to its time (one source, read in order) unless one is given.
        self.auto_watermark = auto_watermark

    def feed(self, event: Event, now_ms: float, watermark_ms: float | None = None) -> list[Event]:
        if watermark_ms is not None:
            self.watermark = int(watermark_ms * MS)
        elif self.auto_watermark and event.ts_mono is not None and event.event_type.split(".")[0] in (
                "process", "file"):
            self.watermark = max(self.watermark, event.ts_mono)
        emitted = self.linker.feed(event, int(now_ms * MS), self.watermark)
        self.out += emitted
        return emitted

    def poll(self, now_ms: float, watermark_ms: float | None = None) -> list[Event]:
        if watermark_ms is not None:
            self.watermark = int(watermark_ms * MS)
        emitted = self.linker.poll(int(now_ms * MS), self.watermark)
        self.out += emitted
        return emitted

    def of_type(self, kind: str) -> list[Event]:
        return [e for e in self.out if e.event_type == kind]

    def by_id(self, event_id: str) -> Event:
        return next(e for e in self.out if e.event_id == event_id)

    # event makers ---------------------------------------------------------------------------
    @staticmethod
    def request(at: float, pid: int = AGENT) -> Event:
        return Event.create(AiRequest(request_type="chat"), confidence=CONF, process=proc(pid),
                            ts_mono=int(at * MS), host=Host(hostname="h"))

    @staticmethod
    def response(request: Event, at: float, calls: list[tuple[str, str, dict[str, Any]]],
                 tokens: int = 0, cost: float | None = None) -> tuple[Event, list[Event]]:
        tool_calls = [ToolCall(id=cid, name=name, arguments=args) for cid, name, args in calls]
        response = Event.create(
            AiResponse(tool_calls=tool_calls or None,
                       usage=Usage(total_tokens=tokens, total_cost_usd=cost) if tokens else None),
            confidence=CONF, process=request.process, ts_mono=int(at * MS),
            related_events=[RelatedEvent(event_id=request.event_id, relationship="caused_by")])
        events = [Event.create(AgentToolCall(tool=ToolInfo(name=name), call_id=cid, arguments=args),
                               confidence=CONF, process=request.process, ts_mono=int(at * MS),
                               related_events=[RelatedEvent(event_id=response.event_id, relationship="caused_by")])
                  for cid, name, args in calls]
        return response, events

    @staticmethod
    def result(call: Event, at: float) -> Event:
        assert isinstance(call.data, AgentToolCall) and call.data.call_id
        return Event.create(AgentToolResult(call_id=call.data.call_id, result="ok"), confidence=CONF,
                            process=call.process, ts_mono=int(at * MS),
                            related_events=[RelatedEvent(event_id=call.event_id, relationship="parent")])

    @staticmethod
    def exec(pid: int, ppid: int, at: float, args: list[str]) -> Event:
        return Event.create(ProcessExec(exe="/bin/" + args[0], args=args), confidence=CONF,
                            process=proc(pid, ppid, "/bin/" + args[0]), ts_mono=int(at * MS))

    @staticmethod
    def fork(parent: int, child: int, at: float) -> Event:
        return Event(event_type="process.fork", data=payload("process.fork", {"child_pid": child}),
                     confidence=CONF, process=proc(parent), ts_mono=int(at * MS))

    @staticmethod
    def write(pid: int, at: float, path: str, created: bool = True) -> Event:
        return Event.create(FileWrite(path=path, created=created), confidence=CONF, process=proc(pid),
                            ts_mono=int(at * MS))

    @staticmethod
    def exit(pid: int, at: float) -> Event:
        return Event.create(ProcessExit(exit_code=0), confidence=CONF, process=proc(pid), ts_mono=int(at * MS))


def caused_by(event: Event) -> list[str]:
    return [r.event_id for r in event.related_events or () if r.relationship == "caused_by"]


def turn_with_calls(t: Transcript, calls: list[tuple[str, str, dict[str, Any]]],
                    at: float = 10) -> tuple[Event, list[Event]]:
    request = t.request(at)
    t.feed(request, at)
    response, tool_calls = t.response(request, at + 5, calls)
    t.feed(response, at + 5)
    for call in tool_calls:
        t.feed(call, at + 5)
    return request, tool_calls


SHELL = ("call_sh", "run_shell", {"command": "echo hi > out.txt"})
WRITE = ("call_wr", "write_file", {"path": "notes/plan.md", "content": "the plan"})


def test_effects_are_linked_to_the_right_call_among_several() -> None:
    t = Transcript()
    _, (shell, write) = turn_with_calls(t, [SHELL, WRITE])
    # The agent writes notes/plan.md itself; then runs sh -c, whose child writes out.txt.
    direct = t.write(AGENT, 16, "/work/proj/notes/plan.md")
    t.feed(direct, 16.5)
    t.feed(t.fork(AGENT, 4001, 17), 17.1)
    sh = t.exec(4001, AGENT, 17.2, ["sh", "-c", "echo hi > out.txt"])
    t.feed(sh, 17.3)
    redirected = t.write(4001, 17.4, "/work/proj/out.txt")
    t.feed(redirected, 17.5)
    t.feed(t.exit(4001, 17.6), 17.7)
    assert caused_by(t.by_id(direct.event_id)) == [write.event_id]
    assert caused_by(t.by_id(sh.event_id)) == [shell.event_id]
    assert caused_by(t.by_id(redirected.event_id)) == [shell.event_id]
    assert t.by_id(sh.event_id).attrs["oisp.link"] == "arguments"
    assert t.by_id(redirected.event_id).attrs["oisp.link"] == "lineage"
    assert t.by_id(direct.event_id).attrs["oisp.tool_call_id"] == "call_wr"

    # The next request carries both results; the watermark is past it: side effects per call.
    nxt = t.request(30)
    t.feed(nxt, 30)
    t.feed(t.result(shell, 30), 30.1)
    t.feed(t.result(write, 30), 30.1, watermark_ms=131)  # 100 ms past: late-stamped file events
    results = {e.data.call_id: e for e in t.of_type("agent.tool_result")}  # type: ignore[attr-defined]
    assert results["call_sh"].data.side_effects == [  # type: ignore[attr-defined]
        {"type": "process_spawned", "target": "sh -c echo hi > out.txt", "event_id": sh.event_id},
        {"type": "file_created", "target": "/work/proj/out.txt", "event_id": redirected.event_id}]
    assert results["call_wr"].data.side_effects == [  # type: ignore[attr-defined]
        {"type": "file_created", "target": "/work/proj/notes/plan.md", "event_id": direct.event_id}]


def test_several_calls_and_no_match_is_a_marker_not_a_guess() -> None:
    t = Transcript()
    _, (a, b) = turn_with_calls(t, [("c1", "run", {"command": "make build"}), ("c2", "run", {"command": "make test"})])
    stray = t.write(AGENT, 20, "/tmp/cache.bin")
    t.feed(stray, 20)
    out = t.by_id(stray.event_id)
    assert caused_by(out) == []
    assert {r.event_id for r in out.related_events or () if r.relationship == "related"} == {a.event_id, b.event_id}
    assert out.attrs["oisp.link"] == "ambiguous"
    assert t.linker.stats.ambiguous == 1


def test_equal_matches_are_ambiguous() -> None:
    t = Transcript()
    _, (a, b, _c) = turn_with_calls(t, [("c1", "sh", {"command": "sort data.txt"}),
                                         ("c2", "sh", {"command": "wc -l data.txt"}),
                                         ("c3", "sh", {"command": "ls"})])
    both = t.write(AGENT, 20, "/x/data.txt")  # the file's name is a word of two commands
    t.feed(both, 20)
    assert caused_by(t.by_id(both.event_id)) == []
    assert t.by_id(both.event_id).attrs["oisp.link"] == "ambiguous"
    related = {r.event_id for r in t.by_id(both.event_id).related_events or ()}
    assert related == {a.event_id, b.event_id}  # the two that match, not the third


def test_a_single_call_links_by_order_only_after_it() -> None:
    t = Transcript()
    _, (only,) = turn_with_calls(t, [("c1", "run_python", {"code": "open('x','w')"})])
    after = t.write(AGENT, 20, "/data/result.csv")
    t.feed(after, 20)
    assert caused_by(t.by_id(after.event_id)) == [only.event_id]
    assert t.by_id(after.event_id).attrs["oisp.link"] == "order"
    # The call arrived at 15: an unmatched write at 12 (during the response) is not linked to it.
    t2 = Transcript()
    request = t2.request(10)
    t2.feed(request, 10)
    early = t2.write(AGENT, 12, "/var/log/agent.log")
    assert t2.feed(early, 12) == []  # the turn's response is not there yet: held
    response, calls = t2.response(request, 15, [("c1", "run_python", {"code": "1"})])
    t2.feed(response, 15)
    released = t2.feed(calls[0], 15)
    assert early.event_id in [e.event_id for e in released]
    assert caused_by(t2.by_id(early.event_id)) == []


def test_a_tool_result_that_arrives_before_the_file_write_waits_for_it() -> None:
    t = Transcript()
    _, (write,) = turn_with_calls(t, [WRITE])
    nxt = t.request(30)
    t.feed(nxt, 30, watermark_ms=20)
    result = t.result(write, 30)
    assert t.feed(result, 30.1) == []  # held: the kernel events up to 30 are not all read yet
    late_write = t.write(AGENT, 25, "/work/proj/notes/plan.md", created=False)
    emitted = t.feed(late_write, 31, watermark_ms=26)
    assert [e.event_id for e in emitted] == [late_write.event_id]
    assert caused_by(emitted[0]) == [write.event_id]  # linked to the call of its window, not the new turn
    assert t.poll(32, watermark_ms=29) == []
    assert t.poll(33, watermark_ms=129) == []  # file events may be stamped up to 100 ms late
    (released,) = t.poll(34, watermark_ms=130.5)
    assert released.event_id == result.event_id
    assert released.data.side_effects == [  # type: ignore[attr-defined]
        {"type": "file_modified", "target": "/work/proj/notes/plan.md", "event_id": late_write.event_id}]


def test_the_hold_is_bounded_and_late_effects_are_counted() -> None:
    t = Transcript(Linker(max_hold_ns=100 * MS))
    _, (write,) = turn_with_calls(t, [WRITE])
    t.feed(t.request(30), 30)
    t.feed(t.result(write, 30), 30)
    assert t.linker.next_deadline() == 130 * MS
    assert t.poll(129) == []
    (released,) = t.poll(130)
    assert released.event_type == "agent.tool_result" and released.data.side_effects is None  # type: ignore[attr-defined]
    assert t.linker.stats.hold_expired == 1
    very_late = t.write(AGENT, 25, "/work/proj/notes/plan.md")
    t.feed(very_late, 140)
    assert caused_by(t.by_id(very_late.event_id)) == [write.event_id]
    assert t.linker.stats.late_effects == 1


def test_max_pending_releases_the_oldest() -> None:
    t = Transcript(Linker(max_pending=2))
    _, calls = turn_with_calls(t, [(f"c{i}", "write_file", {"path": f"f{i}"}) for i in range(3)])
    t.feed(t.request(30), 30)
    for call in calls:
        t.feed(t.result(call, 30), 30)
    assert t.linker.pending == 2
    assert t.linker.stats.forced == 1
    assert len(t.of_type("agent.tool_result")) == 1
    t.out += t.linker.flush(31 * MS)
    assert len(t.of_type("agent.tool_result")) == 3 and t.linker.pending == 0


def test_side_effects_per_result_are_capped() -> None:
    t = Transcript(Linker(max_side_effects=2))
    _, (write,) = turn_with_calls(t, [("c1", "gen", {"dir": "out"})])
    for i in range(5):
        t.feed(t.write(AGENT, 20 + i, f"/out/{i}.txt"), 20 + i)
    t.feed(t.request(30), 30)
    (result,) = t.feed(t.result(write, 30), 30, watermark_ms=131)
    assert len(result.data.side_effects) == 2  # type: ignore[attr-defined]
    assert result.attrs["oisp.side_effects_omitted"] == 3
    assert t.linker.stats.side_effects_omitted == 3


def test_effects_of_a_process_that_never_called_ai_are_not_linked() -> None:
    t = Transcript()
    turn_with_calls(t, [SHELL])
    stranger = t.write(OTHER, 17, "/work/proj/out.txt")
    assert t.feed(stranger, 17) == [stranger]
    # A child of the stranger is not in any agent's tree either.
    t.feed(t.fork(OTHER, 5001, 18), 18)
    child = t.exec(5001, OTHER, 18.5, ["sh", "-c", "echo hi > out.txt"])
    (out,) = t.feed(child, 18.5)
    assert out.related_events is None and out.attrs is None


def test_a_process_older_than_the_agent_is_not_in_its_tree() -> None:
    t = Transcript()
    t.feed(t.fork(AGENT, 4100, 1), 1)  # forked before the agent's first AI call (at 10)
    turn_with_calls(t, [SHELL])
    old_child_write = t.write(4100, 17, "/work/proj/out.txt")
    (out,) = t.feed(old_child_write, 17)
    assert out.related_events is None


def test_an_effect_after_the_next_request_is_not_linked_to_the_previous_call() -> None:
    t = Transcript(Linker(late_stamp_ns=0))  # file times taken as exact (see the late-stamp test)
    turn_with_calls(t, [WRITE])
    t.feed(t.request(30), 30)
    later = t.write(AGENT, 32, "/work/proj/notes/plan.md")  # in the new turn, whose response is not here yet
    assert t.feed(later, 32) == []
    (released,) = t.poll(32 + 250)
    assert caused_by(released) == []


def test_sessions_carry_stats_and_every_output_validates(oisp_schema: SchemaValidator) -> None:
    t = Transcript()
    request = t.request(10)
    t.feed(request, 10)
    response, calls = t.response(request, 15, [SHELL, WRITE], tokens=120, cost=0.0042)
    t.feed(response, 15)
    for call in calls:
        t.feed(call, 15)
    t.feed(t.write(AGENT, 16, "/work/proj/notes/plan.md"), 16)
    t.feed(t.fork(AGENT, 4001, 17), 17)
    t.feed(t.exec(4001, AGENT, 17.2, ["sh", "-c", "echo hi > out.txt"]), 17.2)
    t.feed(t.write(4001, 17.4, "/work/proj/out.txt"), 17.4)
    t.feed(Event(event_type="file.read", data=payload("file.read", {"path": "/home/u/.env"}), confidence=CONF,
                 process=proc(AGENT), ts_mono=18 * MS), 18)
    second = t.request(30)
    t.feed(second, 30)
    for call in calls:
        t.feed(t.result(call, 30), 30, watermark_ms=131)
    response2, _ = t.response(second, 35, [], tokens=30)
    t.feed(response2, 35)
    t.feed(t.exit(AGENT, 40), 40)
    sessions = t.of_type("agent.session")
    assert [s.data.extra["action"] for s in sessions] == ["start", "end"]  # type: ignore[attr-defined]
    assert sessions[0].ts_mono == request.ts_mono
    end = sessions[1].data.extra  # type: ignore[attr-defined]
    assert end["stats"] == {"llm_calls": 2, "tool_calls": 2, "files_read": 1, "files_written": 2,
                            "tokens_used": 150, "estimated_cost_usd": 0.0042}
    assert end["duration_ms"] == 30 and end["session_id"] == sessions[0].data.extra["session_id"]  # type: ignore[attr-defined]
    assert len(t.out) == 16
    for event in t.out:
        oisp_schema.assert_valid(event.to_dict())
    # A new AI call by the same pid (reused) starts a new session; flush ends it.
    t.feed(t.request(50), 50)
    flushed = t.linker.flush(60 * MS)
    assert [e.data.extra["action"] for e in flushed] == ["end"]  # type: ignore[attr-defined]
    assert t.linker.stats.sessions_started == 2 and t.linker.stats.sessions_ended == 2


def test_caps_bound_memory() -> None:
    linker = Linker(max_agents=3, max_processes=10, max_calls=5)
    t = Transcript(linker)
    for pid in range(100, 110):
        t.feed(t.request(pid, pid=pid), pid)
    assert len(linker._agents) == 3
    ends = [e for e in t.of_type("agent.session") if e.data.extra["action"] == "end"]  # type: ignore[attr-defined]
    assert len(ends) == 7
    for child in range(1000, 1050):
        t.feed(t.fork(109, child, 200), 200)
    assert len(linker._parents) == 10
    assert linker.stats.evicted >= 7 + 40


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Linker(max_pending=0)


def test_kernel_events_from_two_sources_are_taken_in_kernel_order() -> None:
    t = Transcript(auto_watermark=False)
    _, (shell, write) = turn_with_calls(t, [SHELL, WRITE])
    # The file source is read first: the child's write comes before its fork and exec (the process source).
    child_write = t.write(4001, 17.4, "/work/proj/generated.bin")  # a name no call mentions: lineage only
    assert t.feed(child_write, 18, watermark_ms=16) == []
    assert t.feed(t.fork(AGENT, 4001, 17), 18.1) == []
    sh = t.exec(4001, AGENT, 17.2, ["sh", "-c", "echo hi > out.txt"])
    assert t.feed(sh, 18.2) == []
    released = t.poll(18.3, watermark_ms=18)
    assert [e.event_type for e in released] == ["process.fork", "process.exec", "file.write"]
    assert caused_by(released[2]) == [shell.event_id] and released[2].attrs["oisp.link"] == "lineage"
    assert write.event_id not in caused_by(released[1])


def test_a_source_that_falls_behind_holds_kernel_events_at_most_max_hold() -> None:
    t = Transcript(Linker(max_hold_ns=100 * MS), auto_watermark=False)
    _, (write,) = turn_with_calls(t, [WRITE])
    effect = t.write(AGENT, 20, "/work/proj/notes/plan.md")
    assert t.feed(effect, 21, watermark_ms=0) == []
    assert t.linker.next_deadline() == 120 * MS
    assert t.poll(119) == []
    (released,) = t.poll(120)
    assert caused_by(released) == [write.event_id]
    assert t.linker.stats.hold_expired == 1


def test_an_exec_without_its_command_line_goes_to_the_one_call_that_runs_commands() -> None:
    t = Transcript()
    request = t.request(10)
    t.feed(request, 10)
    response, calls = t.response(request, 15, [SHELL, WRITE])
    calls = [c.with_context(data=attrs.evolve(c.data, tool=ToolInfo(name=c.data.tool.name,  # type: ignore[attr-defined]
                                                                  type=kind)))
             for c, kind in zip(calls, ("shell", "file_write"), strict=True)]
    t.feed(response, 15)
    for call in calls:
        t.feed(call, 15)
    t.feed(t.fork(AGENT, 4001, 17), 17)
    unread = Event.create(ProcessExec(exe="/usr/bin/dash", is_shell=True), confidence=CONF,
                          process=proc(4001, AGENT, "/usr/bin/dash"), ts_mono=int(17.2 * MS))
    t.feed(unread, 17.2)
    output = t.write(4001, 17.4, "/work/proj/result.bin")
    t.feed(output, 17.4)
    assert caused_by(t.by_id(unread.event_id)) == [calls[0].event_id]
    assert t.by_id(unread.event_id).attrs["oisp.link"] == "tool_type"
    assert caused_by(t.by_id(output.event_id)) == [calls[0].event_id]  # lineage from there
    # A command line that could be read and matches nothing is not given to the shell call by its type.
    other = t.exec(4002, AGENT, 18, ["git", "status"])
    t.feed(other, 18)
    assert caused_by(t.by_id(other.event_id)) == []


def test_a_file_event_stamped_late_links_to_the_call_of_the_turn_before() -> None:
    t = Transcript()
    _, (_shell, write) = turn_with_calls(t, [SHELL, WRITE])
    t.feed(t.request(30), 30)
    result = t.result(write, 30)
    t.feed(result, 30)
    # The write happened before the request, but the file source read it (and stamped it) 20 ms after.
    late = t.write(AGENT, 50, "/work/proj/notes/plan.md")
    emitted = t.feed(late, 51, watermark_ms=131)  # decided at once: the new turn's response is not even there
    by_id = {e.event_id: e for e in emitted}
    assert caused_by(by_id[late.event_id]) == [write.event_id]
    assert by_id[result.event_id].data.side_effects == [  # type: ignore[attr-defined]
        {"type": "file_created", "target": "/work/proj/notes/plan.md", "event_id": late.event_id}]
    assert t.linker.stats.late_stamps == 1
    # Past late_stamp_ns (100 ms) after the turn began, it is not: a write then belongs to the new turn.
    much_later = t.write(AGENT, 140, "/work/proj/notes/plan.md")
    t.feed(much_later, 141)
    (released,) = t.poll(141 + 250)
    assert caused_by(released) == [] and t.linker.stats.late_stamps == 1
    # A process event has the kernel's own time: never moved to the turn before.
    t2 = Transcript()
    turn_with_calls(t2, [SHELL])
    t2.feed(t2.request(30), 30)
    sh = t2.exec(AGENT, 1, 31, ["sh", "-c", "echo hi > out.txt"])
    assert t2.feed(sh, 31) == []
    assert caused_by(t2.poll(31 + 250)[0]) == []


def test_a_late_stamped_file_event_of_a_child_counts_as_a_side_effect_of_its_call() -> None:
    t = Transcript()
    _, (shell, _write) = turn_with_calls(t, [SHELL, WRITE])
    t.feed(t.fork(AGENT, 4001, 17), 17)
    t.feed(t.exec(4001, AGENT, 17.2, ["sh", "-c", "echo hi > out.txt"]), 17.2)
    t.feed(t.request(30), 30)
    result = t.result(shell, 30)
    t.feed(result, 30)
    late = t.write(4001, 45, "/work/proj/out.txt")  # written before the request, read 15 ms after it
    emitted = t.feed(late, 46, watermark_ms=131)
    by_id = {e.event_id: e for e in emitted}
    assert caused_by(by_id[late.event_id]) == [shell.event_id]
    assert {"type": "file_created", "target": "/work/proj/out.txt", "event_id": late.event_id} in \
        by_id[result.event_id].data.side_effects  # type: ignore[attr-defined]
