"""Which processes are agent processes (sans-io: fed process lifecycle facts, holds no I/O).

An *agent* is a process that made an AI call (the pipeline tells :meth:`AgentScope.add_agent`); every process it
forks from then on is in the same agent's tree, and so are their children. A process that never called an AI
endpoint and was not started by one is out of scope. Executables named in ``include_exe`` become agents when they
exec; ones in ``exclude_exe`` leave scope when they exec (with their later children).

Memory is bounded: at most ``max_tracked`` pids are tracked; past that, new children are not added (counted in
:attr:`AgentScope.overflowed`) rather than evicting an older member, so a fork bomb cannot push an agent out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["AgentScope"]


def _exe_keys(exe: str) -> tuple[str, str]:
    """The forms an executable is matched by: its full path and its base name (``/usr/bin/python3``, ``python3``)."""
    return exe, os.path.basename(exe.rstrip("/\\")) or exe


class AgentScope:
    """Which processes are agent processes: those that made an AI call, and their descendants started since."""

    def __init__(
        self,
        *,
        include_exe: Iterable[str] = (),
        exclude_exe: Iterable[str] = (),
        all_processes: bool = False,
        max_tracked: int = 65536,
    ) -> None:
        if max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self._include = frozenset(include_exe)
        self._exclude = frozenset(exclude_exe)
        self.all_processes = all_processes
        self.max_tracked = max_tracked
        #: pid -> the root agent pid of its tree (an agent maps to itself).
        self._agent_of: dict[int, int] = {}
        #: pids excluded by ``exclude_exe`` (matters with ``all_processes``); bounded like the members.
        self._excluded: set[int] = set()
        #: children not tracked because ``max_tracked`` was reached.
        self.overflowed = 0

    def _matches(self, names: frozenset[str], exe: str | None) -> bool:
        if not exe or not names:
            return False
        full, base = _exe_keys(exe)
        return full in names or base in names

    def add_agent(self, pid: int, *, exe: str | None = None) -> None:
        """``pid`` made an AI call: it becomes an agent (a root of its own tree) unless already in one (idempotent)."""
        if pid <= 0 or self._matches(self._exclude, exe):
            return
        if pid in self._agent_of:
            return
        if len(self._agent_of) >= self.max_tracked:
            self.overflowed += 1
            return
        self._agent_of[pid] = pid

    def on_fork(self, parent_pid: int, child_pid: int) -> None:
        """``child_pid`` was forked by ``parent_pid``: it joins the parent's agent, if the parent has one.

        A tracked descendant with this pid is forgotten first (the pid was reused; its exit was missed). An agent
        root is kept: the fork is read after the agent's AI call was reported (the kernel's record came late).
        """
        if self._agent_of.get(child_pid) == child_pid:
            return
        self._agent_of.pop(child_pid, None)  # a reused pid starts fresh
        self._excluded.discard(child_pid)
        if parent_pid in self._excluded:
            if len(self._excluded) < self.max_tracked:
                self._excluded.add(child_pid)
            return
        agent = self._agent_of.get(parent_pid)
        if agent is None:
            return
        if len(self._agent_of) >= self.max_tracked:
            self.overflowed += 1
            return
        self._agent_of[child_pid] = agent

    def on_exec(self, pid: int, exe: str) -> None:
        """``pid`` now runs ``exe``: ``include_exe`` makes it an agent, ``exclude_exe`` takes it out of scope."""
        if self._matches(self._exclude, exe):
            self._agent_of.pop(pid, None)
            if len(self._excluded) < self.max_tracked:
                self._excluded.add(pid)
            return
        if pid not in self._agent_of and self._matches(self._include, exe):
            self.add_agent(pid)

    def on_exit(self, pid: int) -> None:
        """``pid`` exited: forget it (its pid may be reused by an unrelated process). Its children keep their agent."""
        self._agent_of.pop(pid, None)
        self._excluded.discard(pid)

    def agent_of(self, pid: int) -> int | None:
        """The root agent pid whose tree ``pid`` is in, or None when ``pid`` is not an agent process."""
        return self._agent_of.get(pid)

    def members(self) -> list[int]:
        """The pids tracked as agent processes now (a copy)."""
        return list(self._agent_of)

    def in_scope(self, pid: int) -> bool:
        """Whether events of ``pid`` are to be observed (an agent process, or any process unless excluded with all)."""
        if self.all_processes:
            return pid not in self._excluded
        return pid in self._agent_of

    def __len__(self) -> int:
        """How many pids are tracked as agent processes."""
        return len(self._agent_of)

    def __repr__(self) -> str:
        mode = "all" if self.all_processes else "agents"
        return f"AgentScope(scope={mode!r}, tracked={len(self._agent_of)}, overflowed={self.overflowed})"
