"""Pairs OISP events into spans: an ``ai.request`` with its ``ai.response`` (or ``ai.embedding``), an
``agent.tool_call`` with its ``agent.tool_result``. No OpenTelemetry import: it yields :class:`SpanSpec` records.

Events arrive in order, a batch at a time. A request waits for its response, bounded in time
(``pending_timeout``, counted from when the sink received it) and in number (``max_pending``, the oldest
leaves first): one that leaves without its response becomes a span marked ``oisp.incomplete`` with
``error.type`` ``oisp.no_response``, ending at the latest event time seen. Memory is therefore bounded.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

from oisp.events import AgentToolCall, AgentToolResult, AiEmbedding, AiRequest, AiResponse, Event
from oisp.sinks.otlp import mapping
from oisp.sinks.otlp.mapping import Attributes

__all__ = ["SpanBuilder", "SpanSpec"]

CLIENT = "client"
INTERNAL = "internal"


@attrs.frozen
class SpanSpec:
    """One span to export: ids, name, kind, real start and end times, attributes, error, and the event whose
    host and process make its resource. ``operation``: an AI call that completed (its metrics are recorded)."""

    name: str
    kind: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    end_ns: int
    attributes: Attributes
    resource_event: Event
    error_type: str | None = None
    error_description: str | None = None
    links: tuple[tuple[int, int], ...] = ()
    operation: bool = False


@attrs.define
class _Open:
    event: Event
    received: float
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    attributes: Attributes
    links: tuple[tuple[int, int], ...] = ()


@attrs.frozen
class LogContext:
    """The span an event's log record belongs to."""

    trace_id: int
    span_id: int


class SpanBuilder:
    """Turns events, in order, into :class:`SpanSpec` records; see the module for the pairing rules."""

    def __init__(self, *, content: bool = False, pending_timeout: float = 600.0, max_pending: int = 10_000,
                 clock: Callable[[], float] = time.monotonic,
                 random_bits: Callable[[int], int] = random.getrandbits) -> None:
        self.content = content
        self.pending_timeout = pending_timeout
        self.max_pending = max_pending
        self._clock = clock
        self._bits = random_bits
        # Connection ids restart with oisp: a run id keeps one run's connection traces apart from the next's.
        self._run = f"{random_bits(64):016x}"
        self._requests: OrderedDict[tuple[str, str], _Open] = OrderedDict()
        self._request_keys: dict[str, tuple[str, str]] = {}  # request event id -> key
        self._tools: OrderedDict[tuple[str, str], _Open] = OrderedDict()
        self._responses: OrderedDict[str, tuple[int, int]] = OrderedDict()  # response event id -> its span
        self._watermark_ns = 0
        #: Spans that ended without their second event, by reason (for tests and stats).
        self.incomplete = 0

    @property
    def pending(self) -> int:
        """Requests and tool calls waiting for their second event."""
        return len(self._requests) + len(self._tools)

    # ids ----------------------------------------------------------------------------------------
    def _span_id(self) -> int:
        return self._bits(64) or 1

    def _trace_id(self, event: Event, conversation_id: str | None = None) -> int:
        return mapping.trace_id_for(event, conversation_id, run=self._run) or self._bits(128) or 1

    # feeding ------------------------------------------------------------------------------------
    def feed(self, event: Event) -> tuple[list[SpanSpec], LogContext | None]:
        """The spans ``event`` completes, and the span its log record belongs to (None for events no span
        covers)."""
        now_ns = mapping.ts_ns(event.ts)
        if now_ns > self._watermark_ns:
            self._watermark_ns = now_ns
        data = event.data
        if isinstance(data, AiRequest):
            return self._on_request(event, data, now_ns)
        if isinstance(data, AiResponse):
            return self._on_response(event, data, now_ns)
        if isinstance(data, AiEmbedding):
            return self._on_embedding(event, data, now_ns)
        if isinstance(data, AgentToolCall):
            return self._on_tool_call(event, data, now_ns)
        if isinstance(data, AgentToolResult):
            return self._on_tool_result(event, data, now_ns)
        return [], None

    def expire(self) -> list[SpanSpec]:
        """End, as incomplete, every request and tool call that waited longer than ``pending_timeout``."""
        limit = self._clock() - self.pending_timeout
        out: list[SpanSpec] = []
        while self._requests:
            key, entry = next(iter(self._requests.items()))
            if entry.received > limit:
                break
            self._pop_request(key)
            out.append(self._incomplete(entry, "oisp.no_response", f"no response within {self.pending_timeout:g} s"))
        while self._tools:
            key, entry = next(iter(self._tools.items()))
            if entry.received > limit:
                break
            del self._tools[key]
            out.append(self._incomplete(entry, "oisp.no_result", f"no result within {self.pending_timeout:g} s"))
        return out

    def drain(self, reason: str = "the sink closed first") -> list[SpanSpec]:
        """End every waiting request and tool call as incomplete (at close)."""
        out = [self._incomplete(e, "oisp.no_response", reason) for e in self._requests.values()]
        out += [self._incomplete(e, "oisp.no_result", reason) for e in self._tools.values()]
        self._requests.clear()
        self._request_keys.clear()
        self._tools.clear()
        return out

    # ai.* ---------------------------------------------------------------------------------------
    def _on_request(self, event: Event, data: AiRequest, now_ns: int) -> tuple[list[SpanSpec], LogContext]:
        out: list[SpanSpec] = []
        key = (_host(event), data.request_id or event.event_id)
        if key in self._requests:  # the same request id again: the first one will not be answered now
            out.append(self._incomplete(self._pop_request(key), "oisp.no_response", "request id reused"))
        entry = _Open(event=event, received=self._clock(), trace_id=self._trace_id(event, data.conversation_id),
                      span_id=self._span_id(), parent_span_id=mapping.parent_span_id(event), start_ns=now_ns,
                      attributes=mapping.request_attributes(data, content=self.content))
        entry.attributes["oisp.request.event_id"] = event.event_id
        self._requests[key] = entry
        self._request_keys[event.event_id] = key
        while len(self._requests) > self.max_pending:
            oldest = next(iter(self._requests))
            out.append(self._incomplete(self._pop_request(oldest), "oisp.no_response",
                                        f"more than {self.max_pending} requests waited for their response"))
        return out, LogContext(entry.trace_id, entry.span_id)

    def _pop_request(self, key: tuple[str, str]) -> _Open:
        entry = self._requests.pop(key)
        self._request_keys.pop(entry.event.event_id, None)
        return entry

    def _find_request(self, event: Event, request_id: str | None) -> _Open | None:
        for related in event.related_events or ():
            if related.relationship == "caused_by" and related.event_id in self._request_keys:
                return self._pop_request(self._request_keys[related.event_id])
        if request_id:
            key = (_host(event), request_id)
            if key in self._requests:
                return self._pop_request(key)
        return None

    def _on_response(self, event: Event, data: AiResponse, now_ns: int) -> tuple[list[SpanSpec], LogContext]:
        request = self._find_request(event, data.request_id)
        response_attrs, error_type, description = mapping.response_attributes(data, content=self.content)
        if request is not None:
            attributes = {**request.attributes, **response_attrs}
            trace_id, span_id, parent, start_ns = request.trace_id, request.span_id, request.parent_span_id, \
                request.start_ns
        else:  # its request was not seen (or left): the response alone, timed by its latency
            attributes = {"gen_ai.operation.name": "chat"}
            provider = mapping.provider_name(data.provider)
            if provider:
                attributes["gen_ai.provider.name"] = provider
            attributes.update(mapping.server_attributes(data.provider))
            attributes.update(response_attrs)
            attributes["oisp.incomplete"] = "the request was not seen"
            trace_id, span_id, parent = self._trace_id(event, data.conversation_id), self._span_id(), \
                mapping.parent_span_id(event)
            start_ns = now_ns - (data.latency_ms or 0) * 1_000_000
        attributes["oisp.response.event_id"] = event.event_id
        _mark_partial(event, attributes)
        model = attributes.get("gen_ai.request.model") or attributes.get("gen_ai.response.model")
        span = SpanSpec(
            name=mapping.span_name(str(attributes["gen_ai.operation.name"]), str(model) if model else None),
            kind=CLIENT, trace_id=trace_id, span_id=span_id, parent_span_id=parent, start_ns=start_ns,
            end_ns=max(now_ns, start_ns), attributes=attributes,
            resource_event=request.event if request is not None else event,
            error_type=error_type, error_description=description, operation=True,
        )
        self._remember_response(event.event_id, trace_id, span_id)
        return [span], LogContext(trace_id, span_id)

    def _on_embedding(self, event: Event, data: AiEmbedding, now_ns: int) -> tuple[list[SpanSpec], LogContext]:
        attrs_ = event.attrs or {}
        request_id = attrs_.get("oisp.request_id")
        request = self._find_request(event, request_id if isinstance(request_id, str) else None)
        attributes = mapping.embedding_attributes(data)
        if request is not None:
            attributes = {**request.attributes, **attributes}
            trace_id, span_id, parent, start_ns = request.trace_id, request.span_id, request.parent_span_id, \
                request.start_ns
        else:
            trace_id, span_id, parent = self._trace_id(event), self._span_id(), mapping.parent_span_id(event)
            start_ns = now_ns - (data.latency_ms or 0) * 1_000_000
        attributes["oisp.response.event_id"] = event.event_id
        _mark_partial(event, attributes)
        model = attributes.get("gen_ai.request.model")
        span = SpanSpec(
            name=mapping.span_name("embeddings", str(model) if model else None), kind=CLIENT, trace_id=trace_id,
            span_id=span_id, parent_span_id=parent, start_ns=start_ns, end_ns=max(now_ns, start_ns),
            attributes=attributes, resource_event=request.event if request is not None else event, operation=True,
        )
        return [span], LogContext(trace_id, span_id)

    def _remember_response(self, event_id: str, trace_id: int, span_id: int) -> None:
        self._responses[event_id] = (trace_id, span_id)
        while len(self._responses) > self.max_pending:
            self._responses.popitem(last=False)

    # agent.* ------------------------------------------------------------------------------------
    def _on_tool_call(self, event: Event, data: AgentToolCall, now_ns: int) -> tuple[list[SpanSpec], LogContext]:
        out: list[SpanSpec] = []
        links: tuple[tuple[int, int], ...] = ()
        trace_id: int | None = None
        for related in event.related_events or ():
            if related.relationship == "caused_by" and related.event_id in self._responses:
                chat = self._responses[related.event_id]
                trace_id, links = chat[0], (chat,)
                break
        entry = _Open(event=event, received=self._clock(), trace_id=trace_id or self._trace_id(event),
                      span_id=self._span_id(), parent_span_id=mapping.parent_span_id(event), start_ns=now_ns,
                      attributes=mapping.tool_call_attributes(data, content=self.content), links=links)
        entry.attributes["oisp.tool_call.event_id"] = event.event_id
        key = (_host(event), data.call_id or event.event_id)
        if key in self._tools:
            out.append(self._incomplete(self._tools.pop(key), "oisp.no_result", "tool call id reused"))
        self._tools[key] = entry
        while len(self._tools) > self.max_pending:
            _, oldest = self._tools.popitem(last=False)
            out.append(self._incomplete(oldest, "oisp.no_result",
                                        f"more than {self.max_pending} tool calls waited for their result"))
        return out, LogContext(entry.trace_id, entry.span_id)

    def _on_tool_result(self, event: Event, data: AgentToolResult,
                        now_ns: int) -> tuple[list[SpanSpec], LogContext | None]:
        call = self._tools.pop((_host(event), data.call_id), None)
        result_attrs, error_type = mapping.tool_result_attributes(data, content=self.content)
        if call is None:
            if data.duration_ms is None:
                return [], None  # neither its start nor its call is known: the log record has it
            attributes: Attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.id": data.call_id,
                                      **result_attrs, "oisp.incomplete": "the tool call was not seen"}
            call = _Open(event=event, received=0.0, trace_id=self._trace_id(event), span_id=self._span_id(),
                         parent_span_id=mapping.parent_span_id(event),
                         start_ns=now_ns - data.duration_ms * 1_000_000, attributes=attributes)
        attributes = {**call.attributes, **result_attrs}
        attributes["oisp.tool_result.event_id"] = event.event_id
        name = attributes.get("gen_ai.tool.name")
        span = SpanSpec(
            name=f"execute_tool {name}" if name else "execute_tool", kind=INTERNAL, trace_id=call.trace_id,
            span_id=call.span_id, parent_span_id=call.parent_span_id, start_ns=call.start_ns,
            end_ns=max(now_ns, call.start_ns), attributes=attributes, resource_event=call.event,
            error_type=error_type, links=call.links,
        )
        return [span], LogContext(call.trace_id, call.span_id)

    # incomplete ---------------------------------------------------------------------------------
    def _incomplete(self, entry: _Open, error_type: str, reason: str) -> SpanSpec:
        self.incomplete += 1
        attributes: Attributes = {**entry.attributes, "error.type": error_type, "oisp.incomplete": reason}
        if isinstance(entry.event.data, AgentToolCall):
            name = attributes.get("gen_ai.tool.name")
            span_name, kind = (f"execute_tool {name}" if name else "execute_tool"), INTERNAL
        else:
            model = attributes.get("gen_ai.request.model")
            span_name = mapping.span_name(str(attributes.get("gen_ai.operation.name", "chat")),
                                          str(model) if model else None)
            kind = CLIENT
        return SpanSpec(
            name=span_name, kind=kind, trace_id=entry.trace_id, span_id=entry.span_id,
            parent_span_id=entry.parent_span_id, start_ns=entry.start_ns,
            end_ns=max(entry.start_ns, self._watermark_ns), attributes=attributes, resource_event=entry.event,
            error_type=error_type, error_description=reason, links=entry.links,
        )


def _host(event: Event) -> str:
    return event.host.hostname or "" if event.host is not None else ""


def _mark_partial(event: Event, attributes: dict[str, Any]) -> None:
    if event.confidence.completeness == "partial":
        attributes["oisp.partial"] = True
        limitations = [x for x in event.confidence.limitations or () if isinstance(x, str)]
        if limitations:
            attributes["oisp.limitations"] = limitations
