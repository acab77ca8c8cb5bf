"""Payloads of the ``process.*`` events."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field

__all__ = ["ProcessExec", "ProcessExit", "ProcessFork"]


@attrs.frozen(kw_only=True)
class ProcessExec(Record):
    """``process.exec``: a process started (for example, a command an agent ran)."""

    exe: str
    args: list[str] | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    interpreter: str | None = None
    script_path: str | None = None
    is_shell: bool | None = None
    is_script: bool | None = None
    is_interactive: bool | None = None
    binary_hash: dict[str, str] | None = None
    code_signature: dict[str, Any] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ProcessExit(Record):
    """``process.exit``: a process ended."""

    exit_code: int
    signal: int | None = None
    signal_name: str | None = None
    runtime_ms: int | None = None
    cpu_user_ms: int | None = None
    cpu_system_ms: int | None = None
    max_rss_kb: int | None = None
    termination_type: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ProcessFork(Record):
    """``process.fork``: a process created a child (the envelope's ``process`` is the parent)."""

    child_pid: int
    clone_flags: int | None = None
    is_thread: bool | None = None
    extra: dict[str, Any] = extra_field()
