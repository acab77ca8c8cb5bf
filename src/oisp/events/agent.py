"""Payloads of the ``agent.*`` events: the tools an agent calls and what they return."""

from __future__ import annotations

from typing import Any

import attrs

from oisp.events._record import Record, extra_field
from oisp.events.ai import Redacted

__all__ = ["AgentInfo", "AgentToolCall", "AgentToolResult", "ToolError", "ToolInfo"]


@attrs.frozen(kw_only=True)
class AgentInfo(Record):
    """The agent behind a tool call, where known."""

    name: str | None = None
    type: str | None = None
    version: str | None = None
    framework: str | None = None
    session_id: str | None = None
    task_id: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ToolInfo(Record):
    """A tool, by name and category."""

    name: str | None = None
    type: str | None = None
    provider: str | None = None
    server: str | None = None
    description: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AgentToolCall(Record):
    """``agent.tool_call``: the model asked the agent to run a tool."""

    tool: ToolInfo
    agent: AgentInfo | None = None
    call_id: str | None = None
    triggered_by: str | None = None
    arguments: dict[str, Any] | None = None
    arguments_hash: str | None = None
    requires_approval: bool | None = None
    approved: bool | None = None
    approver: str | None = None
    risk_level: str | None = None
    risk_reasons: list[str] | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class ToolError(Record):
    """Why a tool failed."""

    type: str | None = None
    message: str | None = None
    extra: dict[str, Any] = extra_field()


@attrs.frozen(kw_only=True)
class AgentToolResult(Record):
    """``agent.tool_result``: what a tool returned, as the agent sent it back to the model."""

    call_id: str
    agent: AgentInfo | None = None
    tool: ToolInfo | None = None
    success: bool | None = None
    error: ToolError | None = None
    result: str | dict[str, Any] | list[Any] | Redacted | None = None
    result_hash: str | None = None
    result_size_bytes: int | None = None
    duration_ms: int | None = None
    side_effects: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = extra_field()
