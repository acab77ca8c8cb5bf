"""Linking what agents do to the tool calls that caused it (sans-io: fed events, returns the events to emit).

:class:`Linker` is fed the processed event stream, AI events (``ai.request``, ``ai.response``,
``agent.tool_call``, ``agent.tool_result``) and activity events (``process.*``, ``file.*``, ``network.connect``)
alike, each with the time it is fed at (its own clock, monotonic nanoseconds) and the *activity watermark* (the
kernel time up to which every activity event has been fed). It returns the events to emit now; :meth:`Linker.poll`
returns those whose wait ended, :meth:`Linker.flush` everything still held. It does no I/O and never waits.

**Agents and their trees.** A process that made an AI call (its ``ai.request`` carries its pid) is an agent. A
process forked by an agent or by one of its descendants *after* the agent's first AI call belongs to that agent
(the nearest AI-calling ancestor). Lineage comes from ``process.fork`` (``data.child_pid``) and from the ``ppid``
of ``process.exec``.

**Turns.** Each ``ai.request`` of an agent opens a turn that lasts until its next ``ai.request``. The tool calls of
the turn's response are its candidates. An *effect* of the agent's tree (``process.exec``, ``process.exit``,
``file.*``, a non-AI ``network.connect``) whose kernel time falls in the turn is linked, ``related_events:
[{event_id: <tool call>, relationship: "caused_by"}]``, to:

1. the call its process (or an ancestor of it) was started for (an ``exec`` linked to a call makes the process
   and everything it starts belong to that call: *lineage*);
2. else the one call whose arguments match the effect best (a command string equal to or containing the exec's
   command line; a path equal to, or a relative path ending, the file's path; the file's name as a word of a
   command; a host in a URL);
3. else, for an ``exec`` whose command line could not be read (a process gone before ``/proc`` was read), the
   one call of a tool that runs commands (``tool.type`` ``shell``, ``terminal`` or ``code_execution``:
   *tool_type*);
4. else, the turn having exactly one call and the effect coming after it, that call (*order*).

Several calls that match equally well, or several calls and no match, give no ``caused_by``: the effect gets a
``related`` entry per candidate instead (a marker, never a guess). ``attrs["oisp.link"]`` says which rule decided
(``lineage``, ``arguments``, ``tool_type``, ``order``, ``ambiguous``).

**Side effects.** The ``agent.tool_result`` that returns a call (emitted when the next request carries it) gets
``side_effects`` (``file_created``, ``file_modified``, ``file_deleted``, ``process_spawned``,
``network_request``, ``other`` for a rename; each with its ``target`` and the effect's ``event_id``) of the
effects linked to the call before that request.

**Races.** The next request can reach the proxy before the kernel event of the file the tool just wrote has been
read: a tool result is held until the activity watermark passes its request's time, at most ``max_hold_ns``.
An effect that happens while its turn's response has not yet been fed (a streaming client acting on a tool call
before the stream ended) is held until the response and its tool calls are fed, at most ``max_hold_ns`` too.
Kernel events are taken in the order of their kernel times once the watermark (or ``max_hold_ns``) passed them.
File events are stamped when read, so up to ``late_stamp_ns`` after the write: one stamped that soon after its
turn began that no call of the turn explains is linked to the call of the turn before whose arguments match it,
and a tool result waits until the watermark is ``late_stamp_ns`` past its request.
Everything else passes at once. Held events are released in the order they were fed; when ``max_pending`` events
are held, the oldest is released at once (decided on what is known, counted in :attr:`LinkerStats.forced`).

**Sessions.** The first AI call of an agent emits ``agent.session`` ``start``; the agent's ``process.exit`` (or
:meth:`Linker.flush`) emits ``end`` with ``stats`` (``llm_calls``, ``tool_calls``, ``files_read``,
``files_written``, ``tokens_used``, ``estimated_cost_usd`` when pricing gave a cost).

Memory is bounded by the caps of :class:`Linker` (agents, processes, calls, turns per agent, held events, side
effects per call); what is dropped is counted in :class:`LinkerStats`.
"""

from __future__ import annotations

import heapq
import os
import re
import shlex
from collections import OrderedDict, deque
from typing import Any

import attrs

from oisp._version import __version__
from oisp.events import Event
from oisp.events.agent import AgentToolResult
from oisp.events.context import Confidence, ProcessInfo, RelatedEvent, Source
from oisp.events.envelope import UnknownPayload

__all__ = ["DEFAULT_LATE_STAMP_NS", "DEFAULT_MAX_HOLD_NS", "Linker", "LinkerStats"]

#: How long an event may be held by default: 250 ms.
DEFAULT_MAX_HOLD_NS = 250_000_000
#: How much later than the write itself a file event's time may be by default: 100 ms (fanotify events carry no
#: time; they are stamped when read).
DEFAULT_LATE_STAMP_NS = 100_000_000

_EFFECT_TYPES = frozenset({
    "process.exec", "process.exit", "file.write", "file.delete", "file.rename", "file.open", "file.read",
    "network.connect",
})
_FILE_READS = frozenset({"file.open", "file.read"})
#: Tool types (``tool.type``) whose calls start processes.
_SPAWNING_TOOLS = frozenset({"shell", "terminal", "code_execution"})
_TOKEN_SPLIT = re.compile(r"[\s<>|;&()'\"`=,]+")
#: Strings shorter than this never match by containment (``ls``, ``-l``).
_MIN_CONTAINED = 4
_MAX_STRINGS = 64
_MAX_DEPTH = 64


@attrs.define
class LinkerStats:
    """Counters of a :class:`Linker`."""

    #: Effects linked to a call (``caused_by``), by the rule that decided.
    linked_lineage: int = 0
    linked_arguments: int = 0
    linked_tool_type: int = 0
    linked_order: int = 0
    #: Effects in a turn with several candidate calls and no way to tell which (``related`` markers only).
    ambiguous: int = 0
    #: Effects of an agent's tree outside any turn with tool calls.
    unlinked: int = 0
    #: Events released because ``max_hold_ns`` passed before what they waited for came.
    hold_expired: int = 0
    #: Events released early because ``max_pending`` events were held.
    forced: int = 0
    #: Effects linked to a call whose tool result had already been emitted (not in its ``side_effects``).
    late_effects: int = 0
    #: Side effects left out of a tool result because it had ``max_side_effects`` already.
    side_effects_omitted: int = 0
    #: File events linked to a call of the turn before the one their time falls in (stamped late, when read).
    late_stamps: int = 0
    #: Entries forgotten because a cap was reached (agents, processes, calls).
    evicted: int = 0
    sessions_started: int = 0
    sessions_ended: int = 0


@attrs.define(eq=False)
class _Call:
    event_id: str
    call_id: str | None
    ts: int
    strings: list[str]
    turn: _Turn | None
    #: The tool's category (``tool.type``: shell, file_write, ...).
    tool_type: str | None = None
    #: (type, target, effect event id, effect time) of the effects linked to this call.
    effects: list[tuple[str, str, str, int]] = attrs.field(factory=list)
    omitted: int = 0
    reported: bool = False


@attrs.define(eq=False)
class _Turn:
    agent: int
    request_id: str
    start: int
    end: int | None = None
    expected_calls: int | None = None  # set when the response is fed
    calls: list[_Call] = attrs.field(factory=list)

    def complete(self) -> bool:
        """Whether the response and all its tool calls have been fed."""
        return self.expected_calls is not None and len(self.calls) >= self.expected_calls


@attrs.define(eq=False)
class _Agent:
    pid: int
    start: int
    process: ProcessInfo | None
    session_id: str
    turns: deque[_Turn] = attrs.field(factory=lambda: deque(maxlen=16))
    llm_calls: int = 0
    tool_calls: int = 0
    files_read: int = 0
    files_written: int = 0
    tokens: int = 0
    cost: float | None = None
    ended: bool = False


@attrs.define(eq=False)
class _Held:
    event: Event
    since: int
    #: For a tool result: the time its request was sent (released when the watermark passes it).
    until: int | None = None
    call: _Call | None = None
    #: For an effect: the turn whose response it waits for.
    turn: _Turn | None = None
    agent: _Agent | None = None


def _ts(event: Event, now: int) -> int:
    return event.ts_mono if event.ts_mono is not None else now


def _pid(event: Event) -> int | None:
    process = event.process
    return process.pid if process is not None and process.pid is not None and process.pid > 0 else None


def _related(event: Event, relationship: str) -> str | None:
    for link in event.related_events or ():
        if link.relationship == relationship:
            return link.event_id
    return None


def _field(event: Event, name: str) -> Any:
    data = event.data
    value = getattr(data, name, None)
    if value is None:
        value = data.extra.get(name)
    return value


def _strings(value: Any, out: list[str], depth: int = 0) -> None:
    """The string values in a tool call's arguments (nested), at most ``_MAX_STRINGS``."""
    if len(out) >= _MAX_STRINGS or depth > 8:
        return
    if isinstance(value, str):
        if value.strip():
            out.append(value.strip())
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, out, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _strings(item, out, depth + 1)


def _words(text: str) -> set[str]:
    return {word for word in _TOKEN_SPLIT.split(text) if word}


def _command_line(event: Event) -> tuple[str | None, list[str]]:
    """The exec's command line and, for ``sh -c <command>``, the command too."""
    args = _field(event, "args")
    commands: list[str] = []
    if isinstance(args, list) and args:
        words = [str(a) for a in args]
        for flag in ("-c", "-lc", "/c", "-Command"):
            if flag in words[1:-1]:
                commands.append(words[words.index(flag) + 1].strip())
        return " ".join(words), commands
    exe = _field(event, "exe")
    return (str(exe) if exe else None), commands


def _match_exec(event: Event, strings: list[str]) -> int:
    line, commands = _command_line(event)
    if not line:
        return 0
    best = 0
    for text in strings:
        if text == line or text in commands:
            return 3
        contained = len(text) >= _MIN_CONTAINED and (text in line or any(text in c for c in commands))
        if contained or (len(line) >= _MIN_CONTAINED and line in text):
            best = max(best, 2)
        else:
            try:
                joined = " ".join(shlex.split(text))
            except ValueError:
                joined = text
            if joined == line:
                best = max(best, 3)
    return best


def _match_path(path: str, strings: list[str]) -> int:
    if not path:
        return 0
    name = os.path.basename(path.rstrip("/"))
    best = 0
    for text in strings:
        if text == path or (not any(c.isspace() for c in text) and len(text) >= 2
                            and path.endswith("/" + text.lstrip("./"))):
            return 3
        if (name and len(name) >= 2 and name in _words(text)) or (len(text) >= _MIN_CONTAINED and path in text):
            best = max(best, 2)
    return best


def _effect_paths(event: Event) -> list[str]:
    kind = event.event_type
    if kind == "file.rename":
        return [str(p) for p in (_field(event, "new_path"), _field(event, "old_path")) if p]
    path = _field(event, "path")
    return [str(path)] if path else []


def _connect_target(event: Event) -> str | None:
    dest = getattr(event.data, "dest", None)
    if dest is None:
        return None
    host = dest.domain or dest.ip
    if not host:
        return None
    return f"{host}:{dest.port}" if dest.port is not None else str(host)


def _match(event: Event, strings: list[str]) -> int:
    """How well a call's argument strings match an effect: 3 exactly, 2 by containment or a word, 0 not."""
    kind = event.event_type
    if not strings:
        return 0
    if kind == "process.exec":
        return _match_exec(event, strings)
    if kind.startswith("file."):
        return max((_match_path(path, strings) for path in _effect_paths(event)), default=0)
    if kind == "network.connect":
        target = _connect_target(event)
        if target:
            host = target.rsplit(":", 1)[0]
            if any(host in text for text in strings):
                return 2
    return 0


def _score(event: Event, call: _Call) -> int:
    """How well a call explains an effect: its arguments (3, 2), else, for a process started while its command
    line could not be read, a call of a tool that runs commands (1); 0: not at all."""
    score = _match(event, call.strings)
    if score == 0 and event.event_type == "process.exec" and not _field(event, "args") \
            and call.tool_type in _SPAWNING_TOOLS:
        return 1
    return score


def _side_effect(event: Event) -> tuple[str, str] | None:
    """The ``side_effects`` entry (type, target) of an effect, or None for ones that are not (exit, reads)."""
    kind = event.event_type
    if kind == "file.write":
        path = _field(event, "path")
        return ("file_created" if _field(event, "created") else "file_modified", str(path)) if path else None
    if kind == "file.delete":
        path = _field(event, "path")
        return ("file_deleted", str(path)) if path else None
    if kind == "file.rename":
        old, new = _field(event, "old_path"), _field(event, "new_path")
        return ("other", f"rename {old} -> {new}") if old and new else None
    if kind == "process.exec":
        line, _ = _command_line(event)
        return ("process_spawned", line) if line else None
    if kind == "network.connect":
        target = _connect_target(event)
        return ("network_request", target) if target else None
    return None


def _is_ai_connection(event: Event) -> bool:
    attributes = event.attrs or {}
    return bool(attributes.get("oisp.provider")) or event.confidence.ai_detection_method is not None


class Linker:
    """Links the effects of agent processes to the tool calls that caused them (see the module's documentation).

    ``max_hold_ns`` bounds how long any event is held; ``max_pending`` how many are held at once; the other caps
    bound what is remembered (agents, processes, calls, side effects per tool result).
    """

    def __init__(
        self,
        *,
        max_hold_ns: int = DEFAULT_MAX_HOLD_NS,
        max_pending: int = 10_000,
        max_agents: int = 4096,
        max_processes: int = 65_536,
        max_calls: int = 16_384,
        max_side_effects: int = 256,
        late_stamp_ns: int = DEFAULT_LATE_STAMP_NS,
    ) -> None:
        if late_stamp_ns < 0:
            raise ValueError("Linker: late_stamp_ns must be >= 0")
        self.late_stamp_ns = late_stamp_ns
        if max_hold_ns < 0 or max_pending < 1 or max_agents < 1 or max_processes < 1 or max_calls < 1 \
                or max_side_effects < 0:
            raise ValueError("Linker: max_hold_ns must be >= 0, the other caps >= 1 (max_side_effects >= 0)")
        self.max_hold_ns = max_hold_ns
        self.max_pending = max_pending
        self.max_agents = max_agents
        self.max_processes = max_processes
        self.max_calls = max_calls
        self.max_side_effects = max_side_effects
        self.stats = LinkerStats()
        self._agents: OrderedDict[int, _Agent] = OrderedDict()
        #: pid -> (parent pid, time it joined its parent's tree).
        self._parents: OrderedDict[int, tuple[int, int]] = OrderedDict()
        #: pid -> the call it was started for (its exec was linked to it).
        self._process_call: OrderedDict[int, _Call] = OrderedDict()
        #: tool call event id / call id -> the call.
        self._calls: OrderedDict[str, _Call] = OrderedDict()
        self._call_ids: OrderedDict[str, _Call] = OrderedDict()
        #: ai.request / ai.response event id -> its turn.
        self._turns: OrderedDict[str, _Turn] = OrderedDict()
        self._held: deque[_Held] = deque()
        #: Kernel events not yet taken, by kernel time: (time, sequence, event).
        self._reorder: list[tuple[int, int, Event]] = []
        self._sequence = 0
        self._watermark = 0

    # --- the public face -------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """How many events are held."""
        return len(self._held) + len(self._reorder)

    def next_deadline(self) -> int | None:
        """The clock time (ns) at which :meth:`poll` next releases an event held for too long, or None."""
        deadlines = []
        if self._held:
            deadlines.append(self._held[0].since + self.max_hold_ns)
        if self._reorder:
            deadlines.append(self._reorder[0][0] + self.max_hold_ns)
        return min(deadlines) if deadlines else None

    def feed(self, event: Event, now: int, watermark: int | None = None) -> list[Event]:
        """Take one event (``now``: the clock; ``watermark``: the activity watermark, kernel time, if known);
        return the events to emit now, in order."""
        if watermark is not None and watermark > self._watermark:
            self._watermark = watermark
        out: list[Event] = []
        kind = event.event_type
        if kind == "ai.request":
            out += self._on_request(event, now)
        elif kind == "ai.response":
            self._on_response(event)
            out.append(event)
        elif kind == "agent.tool_call":
            self._on_tool_call(event, now)
            out.append(event)
        elif kind == "agent.tool_result":
            out += self._on_tool_result(event, now)
        elif kind == "process.fork" or (kind in _EFFECT_TYPES and not (kind == "network.connect"
                                                                      and _is_ai_connection(event))):
            # Kernel events come from several sources, each in order but not with one another: they are taken
            # in the order of their kernel times once the watermark (or max_hold) has passed them.
            self._sequence += 1
            heapq.heappush(self._reorder, (_ts(event, now), self._sequence, event))
        else:
            out.append(event)
        out += self._release(now, force=False)
        return out

    def poll(self, now: int, watermark: int | None = None) -> list[Event]:
        """The held events whose wait is over (what they waited for came, or ``max_hold_ns`` passed)."""
        if watermark is not None and watermark > self._watermark:
            self._watermark = watermark
        return self._release(now, force=False)

    def flush(self, now: int) -> list[Event]:
        """Every held event, then the ``end`` of every open session (at shutdown: nothing is lost)."""
        out = self._release(now, force=True)
        for agent in list(self._agents.values()):
            if not agent.ended:
                out.append(self._session_end(agent, now, reason="collector_stopped"))
        return out

    # --- AI side ---------------------------------------------------------------------------------
    def _agent(self, pid: int, event: Event, now: int) -> tuple[_Agent, list[Event]]:
        agent = self._agents.get(pid)
        if agent is not None and not agent.ended:
            self._agents.move_to_end(pid)
            return agent, []
        start = _ts(event, now)
        agent = _Agent(pid=pid, start=start, process=event.process,
                       session_id=f"oisp-agent-{pid}-{start}")
        self._agents[pid] = agent
        self._agents.move_to_end(pid)
        out = [self._session_event(agent, event, "start")]
        self.stats.sessions_started += 1
        while len(self._agents) > self.max_agents:
            _, old = self._agents.popitem(last=False)
            self.stats.evicted += 1
            if not old.ended:
                out.append(self._session_end(old, now, reason="evicted"))
        return agent, out

    def _on_request(self, event: Event, now: int) -> list[Event]:
        pid = _pid(event)
        if pid is None:
            return [event]
        agent, out = self._agent(pid, event, now)
        agent.llm_calls += 1
        ts = _ts(event, now)
        if agent.turns and agent.turns[-1].end is None:
            agent.turns[-1].end = ts
        turn = _Turn(agent=pid, request_id=event.event_id, start=ts)
        agent.turns.append(turn)
        self._remember(self._turns, event.event_id, turn)
        out.append(event)
        return out

    def _on_response(self, event: Event) -> None:
        request_id = _related(event, "caused_by")
        turn = self._turns.get(request_id) if request_id else None
        if turn is None:
            return
        calls = getattr(event.data, "tool_calls", None)
        turn.expected_calls = len(calls) if calls else 0
        self._remember(self._turns, event.event_id, turn)
        agent = self._agents.get(turn.agent)
        if agent is not None:
            usage = getattr(event.data, "usage", None)
            if usage is not None:
                total = usage.total_tokens
                if total is None and (usage.prompt_tokens is not None or usage.completion_tokens is not None):
                    total = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
                agent.tokens += total or 0
                if usage.total_cost_usd is not None:
                    agent.cost = (agent.cost or 0.0) + float(usage.total_cost_usd)

    def _on_tool_call(self, event: Event, now: int) -> None:
        response_id = _related(event, "caused_by")
        turn = self._turns.get(response_id) if response_id else None
        pid = _pid(event)
        if turn is None and pid is not None:
            agent = self._agents.get(pid)
            turn = agent.turns[-1] if agent is not None and agent.turns else None
        strings: list[str] = []
        _strings(getattr(event.data, "arguments", None), strings)
        call_id = getattr(event.data, "call_id", None)
        tool = getattr(event.data, "tool", None)
        call = _Call(event_id=event.event_id, call_id=call_id, ts=_ts(event, now), strings=strings, turn=turn,
                     tool_type=getattr(tool, "type", None))
        if turn is not None:
            turn.calls.append(call)
            agent = self._agents.get(turn.agent)
            if agent is not None:
                agent.tool_calls += 1
        self._remember(self._calls, event.event_id, call)
        if call_id:
            self._remember(self._call_ids, call_id, call)

    def _on_tool_result(self, event: Event, now: int) -> list[Event]:
        parent = _related(event, "parent")
        call = self._calls.get(parent) if parent else None
        if call is None:
            call = self._call_ids.get(str(getattr(event.data, "call_id", "")))
        if call is None or call.reported:
            return [event]
        # Effects up to the request that carries this result belong to the call.
        until = call.turn.end if call.turn is not None and call.turn.end is not None else _ts(event, now)
        self._held.append(_Held(event=event, since=now, until=until, call=call))
        return []

    def _finish_result(self, held: _Held) -> Event:
        call = held.call
        assert call is not None
        call.reported = True
        until = held.until if held.until is not None else 0
        entries: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for kind, target, event_id, ts in sorted(call.effects, key=lambda e: e[3]):
            if ts >= until or (kind, target) in seen:
                continue
            seen.add((kind, target))
            entries.append({"type": kind, "target": target, "event_id": event_id})
        event = held.event
        if (not entries and not call.omitted) or not isinstance(event.data, AgentToolResult):
            return event
        data = attrs.evolve(event.data, side_effects=[*(event.data.side_effects or []),
                                                      *entries] or None)
        extra: dict[str, Any] = {}
        if call.omitted:
            extra["oisp.side_effects_omitted"] = call.omitted
        return attrs.evolve(event, data=data, attrs={**(event.attrs or {}), **extra} if extra else event.attrs)

    # --- activity side ---------------------------------------------------------------------------
    def _on_fork(self, event: Event, now: int) -> None:
        parent = _pid(event)
        child = _field(event, "child_pid")
        if parent is None or not isinstance(child, int) or child <= 0 or _field(event, "is_thread"):
            return
        self._process_call.pop(child, None)
        self._remember(self._parents, child, (parent, _ts(event, now)), cap=self.max_processes)

    def _learn_exec(self, event: Event, pid: int, now: int) -> None:
        process = event.process
        ppid = process.ppid if process is not None else None
        if ppid is not None and ppid > 0 and pid not in self._parents and pid not in self._agents:
            self._remember(self._parents, pid, (ppid, _ts(event, now)), cap=self.max_processes)

    def _agent_of(self, pid: int) -> tuple[_Agent | None, list[int]]:
        """The agent whose tree ``pid`` is in, and the pids from ``pid`` up to it (the agent excluded)."""
        chain: list[int] = []
        joined: int | None = None
        current = pid
        for _ in range(_MAX_DEPTH):
            agent = self._agents.get(current)
            if agent is not None and not agent.ended and (joined is None or joined >= agent.start):
                return agent, chain
            link = self._parents.get(current)
            if link is None:
                return None, chain
            chain.append(current)
            current, joined = link
        return None, chain

    def _on_activity(self, event: Event, now: int) -> list[Event]:
        if event.event_type == "process.fork":
            self._on_fork(event, now)
            return [event]
        return self._on_effect(event, now)

    def _on_effect(self, event: Event, now: int) -> list[Event]:
        pid = _pid(event)
        if pid is None:
            return [event]
        if event.event_type == "process.exec":
            self._learn_exec(event, pid, now)
        agent, chain = self._agent_of(pid)
        out: list[Event] = []
        if agent is None:
            out.append(event)
        else:
            kind = event.event_type
            if kind == "file.write":
                agent.files_written += 1
            elif kind in _FILE_READS:
                agent.files_read += 1
            ts = _ts(event, now)
            turn = self._turn_at(agent, ts)
            if turn is not None and not turn.complete() and self._lineage(chain) is None \
                    and not self._late_candidate(event, agent, turn, ts):
                self._held.append(_Held(event=event, since=now, turn=turn, agent=agent))
            else:
                out.append(self._link(event, agent, chain, turn, now))
        if event.event_type == "process.exit" and pid in self._agents and not self._agents[pid].ended:
            out.append(self._session_end(self._agents[pid], now, exit_event=event))
        return out

    @staticmethod
    def _turn_at(agent: _Agent, ts: int) -> _Turn | None:
        for turn in reversed(agent.turns):
            if turn.start <= ts and (turn.end is None or ts < turn.end):
                return turn
            if turn.start <= ts:
                return None
        return None

    def _late_candidate(self, event: Event, agent: _Agent, turn: _Turn, ts: int) -> bool:
        """Whether a file event just after its turn began matches a call of the turn before: then it is decided
        at once (its turn's response, not there yet, cannot have asked for it), not held for the response."""
        return (event.event_type.startswith("file.") and ts - turn.start < self.late_stamp_ns
                and self._late_stamp(event, agent, turn, ts)[0] is not None)

    def _late_stamp(self, event: Event, agent: _Agent, turn: _Turn, ts: int) -> tuple[_Call | None, int]:
        """The one call of the turn before ``turn`` whose arguments match ``event`` (and the time to file the effect
        under, within that turn), or None."""
        turns = list(agent.turns)
        index = next((i for i, t in enumerate(turns) if t is turn), 0)
        if index == 0:
            return None, ts
        previous = turns[index - 1]
        scores = [(_match(event, c.strings), c) for c in previous.calls]
        best = max((score for score, _ in scores), default=0)
        winners = [c for score, c in scores if score == best]
        if best < 2 or len(winners) != 1:
            return None, ts
        return winners[0], turn.start - 1

    def _lineage(self, chain: list[int]) -> _Call | None:
        for pid in chain:
            call = self._process_call.get(pid)
            if call is not None:
                return call
        return None

    def _link(self, event: Event, agent: _Agent, chain: list[int], turn: _Turn | None, now: int) -> Event:
        ts = _ts(event, now)
        call = self._lineage(chain)
        rule = "lineage" if call is not None else None
        # An exit says nothing about which call it served: only its process's lineage links it.
        candidates = turn.calls if turn is not None and event.event_type != "process.exit" else []
        if call is None and candidates:
            scores = [(_score(event, c), c) for c in candidates]
            best = max(score for score, _ in scores)
            winners = [c for score, c in scores if score == best]
            if best >= 2 and len(winners) == 1:
                call, rule = winners[0], "arguments"
        if call is None and turn is not None and event.event_type.startswith("file.") \
                and ts - turn.start < self.late_stamp_ns:
            # A file event is stamped when read, so it may be a little later than the write: one that no call of
            # its turn explains, stamped just after the turn began, may be a late stamp of the turn before.
            call, ts = self._late_stamp(event, agent, turn, ts)
            if call is not None:
                rule = "arguments"
                self.stats.late_stamps += 1
        if call is None and candidates:
            if best > 0 and len(winners) == 1:
                call, rule = winners[0], "arguments" if best >= 2 else "tool_type"
            elif best == 0 and len(candidates) == 1 and ts >= candidates[0].ts:
                call, rule = candidates[0], "order"
            elif len(candidates) > 1:
                self.stats.ambiguous += 1
                markers = [RelatedEvent(event_id=c.event_id, relationship="related")
                           for c in (winners if best > 0 else candidates)]
                return event.with_context(related_events=[*(event.related_events or []), *markers],
                                          attrs={"oisp.agent_pid": agent.pid, **(event.attrs or {}),
                                                 "oisp.link": "ambiguous"})
        if call is None:
            self.stats.unlinked += 1
            return event
        if rule == "lineage":
            self.stats.linked_lineage += 1
        elif rule == "arguments":
            self.stats.linked_arguments += 1
        elif rule == "tool_type":
            self.stats.linked_tool_type += 1
        else:
            self.stats.linked_order += 1
        pid = _pid(event)
        if event.event_type == "process.exec" and pid is not None:
            self._remember(self._process_call, pid, call, cap=self.max_processes)
        turn_end = call.turn.end if call.turn is not None else None
        if event.event_type.startswith("file.") and turn_end is not None \
                and turn_end <= ts < turn_end + self.late_stamp_ns:
            ts = turn_end - 1  # stamped when read, just after the next request: a late stamp of the call's turn
        effect = _side_effect(event)
        if effect is not None:
            if call.reported:
                self.stats.late_effects += 1
            elif len(call.effects) >= self.max_side_effects:
                call.omitted += 1
                self.stats.side_effects_omitted += 1
            else:
                call.effects.append((*effect, event.event_id, ts))
        attributes = {"oisp.agent_pid": agent.pid, **(event.attrs or {}), "oisp.link": rule}
        if call.call_id:
            attributes["oisp.tool_call_id"] = call.call_id
        return event.with_context(
            related_events=[*(event.related_events or []), RelatedEvent(event_id=call.event_id,
                                                                        relationship="caused_by")],
            attrs=attributes)

    # --- holding ---------------------------------------------------------------------------------
    def _ready(self, held: _Held, now: int, force: bool) -> bool:
        if held.call is not None:
            # File events are stamped when read, up to late_stamp_ns after the write: wait for those too.
            done = held.until is not None and self._watermark >= held.until + self.late_stamp_ns
        else:
            done = held.turn is None or held.turn.complete()
        if done:
            return True
        if force:
            return True
        if now - held.since >= self.max_hold_ns:
            self.stats.hold_expired += 1
            return True
        return False

    def _release(self, now: int, *, force: bool) -> list[Event]:
        out: list[Event] = []
        reorder = self._reorder
        if reorder:
            # Past the watermark, or older than max_hold (ts_mono and the clock are the same monotonic clock).
            horizon = max(self._watermark, now - self.max_hold_ns)
            while reorder and (force or reorder[0][0] <= horizon or len(reorder) + len(self._held) > self.max_pending):
                ts, _, event = heapq.heappop(reorder)
                if not force and ts > horizon:
                    self.stats.forced += 1
                elif not force and ts > self._watermark:
                    self.stats.hold_expired += 1
                out += self._on_activity(event, now)
        if not self._held:
            return out
        while len(self._held) > self.max_pending:
            self.stats.forced += 1
            out.append(self._finish(self._held.popleft(), now))
        keep: deque[_Held] = deque()
        # Effects first, then tool results, so that a result sees the effects released with it.
        ready = [h for h in self._held if self._ready(h, now, force)]
        if not ready:
            return out
        ready_ids = {id(h) for h in ready}
        for held in self._held:
            if id(held) not in ready_ids:
                keep.append(held)
        self._held = keep
        effects = [h for h in ready if h.call is None]
        results = [h for h in ready if h.call is not None]
        out += [self._finish(h, now) for h in effects]
        out += [self._finish(h, now) for h in results]
        return out

    def _finish(self, held: _Held, now: int) -> Event:
        if held.call is not None:
            return self._finish_result(held)
        assert held.agent is not None
        pid = _pid(held.event)
        _, chain = self._agent_of(pid) if pid is not None else (None, [])
        return self._link(held.event, held.agent, chain, held.turn, now)

    # --- sessions --------------------------------------------------------------------------------
    def _session_event(self, agent: _Agent, cause: Event, action: str, *, ts_mono: int | None = None,
                       extra: dict[str, Any] | None = None, reason: str | None = None) -> Event:
        process = agent.process
        name = None
        if process is not None:
            name = process.name or (os.path.basename(process.exe) if process.exe else None)
        data: dict[str, Any] = {"action": action, "session_id": agent.session_id}
        if name:
            data["agent"] = {"name": name}
        data.update(extra or {})
        attributes: dict[str, Any] = {"oisp.agent_pid": agent.pid}
        if reason:
            attributes["oisp.session_end_reason"] = reason
        return Event(
            event_type="agent.session", data=UnknownPayload(extra=data), process=process,
            actor=cause.actor, app=cause.app, host=cause.host, ts_mono=ts_mono if ts_mono is not None else
            cause.ts_mono, ts=cause.ts,
            source=Source(collector="oisp", collector_version=__version__, capture_method="other",
                          capture_point="agent_linking"),
            confidence=Confidence(level="high", completeness="full", reasons=["ai_calls_observed"],
                                  process_attribution="direct"),
            attrs=attributes,
        )

    def _session_end(self, agent: _Agent, now: int, *, exit_event: Event | None = None,
                     reason: str = "process_exit") -> Event:
        agent.ended = True
        self.stats.sessions_ended += 1
        end = _ts(exit_event, now) if exit_event is not None else now
        stats: dict[str, Any] = {"llm_calls": agent.llm_calls, "tool_calls": agent.tool_calls,
                                 "files_read": agent.files_read, "files_written": agent.files_written,
                                 "tokens_used": agent.tokens}
        if agent.cost is not None:
            stats["estimated_cost_usd"] = round(agent.cost, 8)
        cause = exit_event or Event(event_type="agent.session", confidence=Confidence(level="high",
                                                                                      completeness="full"))
        return self._session_event(agent, cause, "end", ts_mono=end, reason=reason,
                                   extra={"duration_ms": max(0, (end - agent.start) // 1_000_000), "stats": stats})

    # --- bounded memory --------------------------------------------------------------------------
    def _remember(self, table: OrderedDict[Any, Any], key: Any, value: Any, *, cap: int | None = None) -> None:
        table[key] = value
        table.move_to_end(key)
        limit = cap if cap is not None else self.max_calls
        while len(table) > limit:
            table.popitem(last=False)
            self.stats.evicted += 1
