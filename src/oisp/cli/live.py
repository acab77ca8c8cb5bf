"""The live terminal view of ``oisp run``: each AI call as it happens, and running totals (rich)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from oisp.events import Event
from oisp.events.spec_gaps import provider_name

__all__ = ["CallRow", "LiveView", "Totals"]


@attrs.define
class CallRow:
    """One AI call, filled from its request and response events."""

    time: str
    process: str
    provider: str
    model: str
    request_type: str = ""
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_ms: int | None = None
    cost_usd: float | None = None
    tools: list[str] = attrs.field(factory=list)
    status: str = "…"


@attrs.define
class Totals:
    """Running totals over every call seen."""

    calls: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    #: Total cost of the calls that had one; None until a call had one (no pricing loaded: no cost shown).
    cost_usd: float | None = None
    tool_calls: int = 0
    by_provider: dict[str, int] = attrs.field(factory=dict)
    #: Connections that failed (upstream unreachable, its certificate not verified, ...): no call came of them.
    failed_connections: int = 0


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


class LiveView:
    """A pipeline listener that renders calls and totals; ``max_rows`` most recent calls are shown."""

    def __init__(self, console: Console | None = None, *, max_rows: int = 15) -> None:
        self.console = console or Console()
        self.rows: deque[CallRow] = deque(maxlen=max_rows)
        self.totals = Totals()
        self._by_request: dict[str, CallRow] = {}
        #: A warning shown above everything (decoding given up for good), None when all is well.
        self.status: str | None = None
        #: Hosts passed through uninspected because a process pinned them: "host by process" -> connections.
        self.pinned: dict[str, int] = {}
        #: Events dropped (a queue was full) and connections not decoded to the end (the decoder process was too
        #: far behind, or gone): never silent.
        self.dropped_events = 0
        self.undecoded_connections = 0
        #: (events dropped, connections not decoded to the end) of each decoder process, when there are several.
        self.shard_losses: list[tuple[int, int]] = []
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(None, None, None)
            self._live = None

    def set_status(self, text: str) -> None:
        """Show ``text`` as a warning line (the decoder process's give-up)."""
        self.status = text
        if self._live is not None:
            self._live.update(self.render())

    def set_losses(self, dropped_events: int, undecoded_connections: int, *,
                   shards: Sequence[tuple[int, int]] = ()) -> None:
        """Show what was lost so far: events dropped, connections not decoded to the end (and, with several
        decoder processes, ``shards``: each one's)."""
        self.dropped_events = dropped_events
        self.undecoded_connections = undecoded_connections
        self.shard_losses = list(shards)
        if self._live is not None:
            self._live.update(self.render())

    def __call__(self, event: Event) -> None:
        """Take one processed event (register with ``Pipeline.add_listener``)."""
        data = event.data
        if event.event_type == "network.connect":
            failed = getattr(data, "success", None) is False
            pinned = (event.attrs or {}).get("oisp.interception") == "pinned_passthrough"
            if not (failed or pinned):
                return
            self.totals.failed_connections += failed
            if pinned:
                process = event.process
                who = f"{process.name or '?'}[{process.pid}]" if process is not None and process.pid else "?"
                host = _get(data, "dest", "domain") or _get(data, "dest", "ip") or "?"
                key = f"{host} by {who}"
                self.pinned[key] = self.pinned.get(key, 0) + 1
        elif event.event_type == "ai.request":
            process = event.process
            who = f"{process.name or '?'}[{process.pid}]" if process is not None and process.pid else "?"
            row = CallRow(time=event.ts.astimezone().strftime("%H:%M:%S"), process=who,
                          provider=provider_name(event) or "?",
                          model=str(_get(data, "model", "id") or "?"),
                          request_type=str(getattr(data, "request_type", "") or ""))
            request_id = getattr(data, "request_id", None)
            if request_id:
                self._by_request[request_id] = row
            self.rows.append(row)
            self.totals.calls += 1
            self.totals.by_provider[row.provider] = self.totals.by_provider.get(row.provider, 0) + 1
        elif event.event_type in ("ai.response", "ai.embedding"):
            request_id = getattr(data, "request_id", None) or (event.attrs or {}).get("oisp.request_id")
            found = self._by_request.pop(str(request_id), None) if request_id else None
            if found is None:
                return
            row = found
            usage = getattr(data, "usage", None)
            row.tokens_in = _get(usage, "prompt_tokens")
            row.tokens_out = _get(usage, "completion_tokens")
            row.cost_usd = _get(usage, "total_cost_usd")
            row.latency_ms = getattr(data, "latency_ms", None)
            model = _get(data, "model", "id")
            if model:
                row.model = str(model)
            success = getattr(data, "success", None)
            row.status = "ok" if success else "error" if success is False else "?"
            row.tools = [str(c.name) for c in (getattr(data, "tool_calls", None) or []) if c.name]
            self.totals.errors += success is False
            self.totals.tokens_in += row.tokens_in or 0
            self.totals.tokens_out += row.tokens_out or 0
            if row.cost_usd is not None:
                self.totals.cost_usd = (self.totals.cost_usd or 0.0) + row.cost_usd
            self.totals.tool_calls += len(row.tools)
        else:
            return
        if self._live is not None:
            self._live.update(self.render())

    def render(self) -> Group:
        """The table of recent calls and the totals line."""
        table = Table(title="AI calls", expand=True, header_style="bold")
        for column in ("time", "process", "provider", "model", "in", "out", "ms", "cost $", "tools", "status"):
            table.add_column(column, no_wrap=column not in ("tools", "model"),
                             justify="right" if column in ("in", "out", "ms", "cost $") else "left")
        for row in self.rows:
            table.add_row(
                row.time, row.process, row.provider, row.model, _num(row.tokens_in), _num(row.tokens_out),
                _num(row.latency_ms), f"{row.cost_usd:.5f}" if row.cost_usd is not None else "",
                ", ".join(row.tools), Text(row.status, style="green" if row.status == "ok" else "red"
                                           if row.status == "error" else "yellow"),
            )
        t = self.totals
        providers = ", ".join(f"{name} {count}" for name, count in sorted(t.by_provider.items()))
        footer = (f"calls {t.calls} ({providers or 'none yet'})  errors {t.errors}  tokens in {t.tokens_in} "
                  f"out {t.tokens_out}  tool calls {t.tool_calls}")
        if t.cost_usd is not None:
            footer += f"  cost ${t.cost_usd:.5f}"
        if t.failed_connections:
            footer += f"  failed connections {t.failed_connections}"
        parts: list[Table | Text] = [table, Text(footer, style="red" if t.failed_connections and not t.calls else "")]
        if self.pinned:
            parts.append(Text("pinned, passed through UNINSPECTED: " + ", ".join(
                f"{key} ({count})" for key, count in sorted(self.pinned.items())), style="bold yellow"))
        if self.dropped_events or self.undecoded_connections:
            per_shard = ""
            if len(self.shard_losses) > 1:
                per_shard = "; per decoder process: " + ", ".join(
                    f"{index}: {dropped}/{undecoded}" for index, (dropped, undecoded) in enumerate(self.shard_losses))
            parts.append(Text(f"LOST: {self.dropped_events} events dropped, {self.undecoded_connections} connections "
                              f"not decoded to the end{per_shard} (see the log)", style="bold red"))
        if self.status:
            parts.insert(0, Text(self.status, style="bold red"))
        return Group(*parts)


def _num(value: int | None) -> str:
    return "" if value is None else str(value)
