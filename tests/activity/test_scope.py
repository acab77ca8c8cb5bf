"""AgentScope: which processes are agent processes, fed lifecycle facts (no I/O)."""

from __future__ import annotations

import pytest

from oisp.activity import AgentScope


def test_a_process_that_never_called_ai_is_out_of_scope() -> None:
    scope = AgentScope()
    scope.on_fork(1, 100)
    scope.on_exec(100, "/bin/sh")
    assert not scope.in_scope(100)
    assert scope.agent_of(100) is None


def test_descendants_forked_after_the_ai_call_join_the_agent() -> None:
    scope = AgentScope()
    scope.on_fork(1, 10)  # forked before the AI call: the sibling stays out
    scope.add_agent(10, exe="/usr/bin/python3")
    scope.add_agent(10)  # idempotent
    scope.on_fork(10, 11)
    scope.on_exec(11, "/bin/sh")
    scope.on_fork(11, 12)
    scope.on_fork(1, 13)
    assert scope.agent_of(10) == 10
    assert scope.agent_of(11) == 10
    assert scope.agent_of(12) == 10
    assert scope.in_scope(12)
    assert not scope.in_scope(13)
    assert len(scope) == 3


def test_a_child_keeps_its_agent_when_the_parent_exits() -> None:
    scope = AgentScope()
    scope.add_agent(10)
    scope.on_fork(10, 11)
    scope.on_exit(10)
    assert scope.agent_of(11) == 10
    assert not scope.in_scope(10)


def test_exit_removes_so_a_reused_pid_is_not_in_scope() -> None:
    scope = AgentScope()
    scope.add_agent(10)
    scope.on_fork(10, 11)
    scope.on_exit(11)
    assert not scope.in_scope(11)
    scope.on_fork(1, 11)  # pid 11 reused by an unrelated process
    assert not scope.in_scope(11)


def test_a_reused_pid_forked_by_a_non_agent_is_dropped_even_without_an_exit() -> None:
    scope = AgentScope()
    scope.add_agent(10)
    scope.on_fork(10, 11)
    scope.on_fork(1, 11)  # the exit was missed (dropped), the fork tells us the pid is new
    assert not scope.in_scope(11)


def test_an_agent_inside_another_agents_tree_stays_in_that_tree() -> None:
    scope = AgentScope()
    scope.add_agent(10)
    scope.on_fork(10, 11)
    scope.add_agent(11)
    assert scope.agent_of(11) == 10


def test_include_exe_makes_an_agent_on_exec_by_path_or_base_name() -> None:
    scope = AgentScope(include_exe=["claude", "/opt/bin/aider"])
    scope.on_fork(1, 20)
    scope.on_exec(20, "/usr/local/bin/claude")
    scope.on_fork(1, 21)
    scope.on_exec(21, "/opt/bin/aider")
    scope.on_fork(1, 22)
    scope.on_exec(22, "/usr/bin/claudette")
    assert scope.agent_of(20) == 20
    assert scope.agent_of(21) == 21
    assert not scope.in_scope(22)


def test_exclude_exe_drops_the_process_and_its_later_children() -> None:
    scope = AgentScope(exclude_exe=["git"])
    scope.add_agent(10)
    scope.on_fork(10, 11)
    scope.on_exec(11, "/usr/bin/git")
    scope.on_fork(11, 12)
    assert not scope.in_scope(11)
    assert not scope.in_scope(12)
    scope.add_agent(30, exe="/usr/bin/git")
    assert not scope.in_scope(30)


def test_all_processes_observes_everything_but_excluded_trees() -> None:
    scope = AgentScope(all_processes=True, exclude_exe=["/usr/sbin/cron"])
    assert scope.in_scope(4242)
    assert scope.agent_of(4242) is None  # in scope, but not an agent process
    scope.on_exec(50, "/usr/sbin/cron")
    scope.on_fork(50, 51)
    assert not scope.in_scope(50)
    assert not scope.in_scope(51)
    scope.on_exit(51)
    scope.on_fork(1, 51)
    assert scope.in_scope(51)


def test_memory_is_bounded_and_overflow_counted_without_evicting_agents() -> None:
    scope = AgentScope(max_tracked=4)
    scope.add_agent(10)
    for child in range(11, 20):
        scope.on_fork(10, child)
    assert len(scope) == 4
    assert scope.overflowed == 6
    assert scope.in_scope(10)
    scope.add_agent(99)
    assert not scope.in_scope(99)
    assert scope.overflowed == 7


def test_max_tracked_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tracked"):
        AgentScope(max_tracked=0)


def test_a_late_fork_record_does_not_undo_an_agent_reported_before_it() -> None:
    scope = AgentScope()
    scope.add_agent(40)  # the AI call was reported before the kernel's fork record of pid 40 was read
    scope.on_fork(1, 40)
    assert scope.agent_of(40) == 40
    scope.on_fork(40, 41)
    assert scope.agent_of(41) == 40
