"""``stdout`` sink: one readable summary line (or one JSON document) per event on standard output.

``format = "line"`` (the default) is for watching a machine's AI traffic in a terminal::

    08:15:07.123 ai.request openai gpt-4o chat stream pid=1234 python3 msgs=3 tools=2
    08:15:08.357 ai.response openai gpt-4o 200 ok in=123 out=45 1234ms ttft=230ms finish=stop
    08:15:08.360 agent.tool_call get_weather call_abc pid=1234 python3
    08:15:08.402 network.connect api.openai.com:443 intercepted TLSv1.3 h2 pid=1234 python3

Times are local. A line never carries message content, and every value that came off the network is
escaped so that control characters cannot break the line or drive the terminal. ``format = "json"`` writes
``Event.to_json()``, one event per line, for piping into ``jq``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from oisp.errors import ConfigurationError, OispError
from oisp.events import (
    AgentToolCall,
    AgentToolResult,
    AiEmbedding,
    AiRequest,
    AiResponse,
    AiStreamingChunk,
    Event,
    FileDelete,
    FileOpen,
    FileRead,
    FileRename,
    FileWrite,
    ModelInfo,
    NetworkConnect,
    NetworkDns,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    Record,
)
from oisp.events.spec_gaps import provider_name

__all__ = ["StdoutSink", "format_line"]

logger = logging.getLogger(__name__)

_FORMATS = ("line", "json")
_OPTIONS = ("format",)
_COMMAND_WIDTH = 80
# Control characters (C0, DEL, C1), line separators and bidirectional overrides: from a remote server they
# could end the line early or rewrite what the terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class StdoutSink:
    """Writes each batch to ``stream`` (by default ``sys.stdout``, looked up at every write) and flushes it.

    When the reader of the output goes away (``BrokenPipeError``) the batch and every later one fail with
    ``BrokenPipeError`` for the pipeline to count; the process goes on. If the stream was the process's own
    standard output, its file descriptor is then pointed at the null device, as the Python documentation
    advises, so that the interpreter's final flush of ``sys.stdout`` does not fail at exit either.
    """

    def __init__(self, format: str = "line", stream: TextIO | None = None) -> None:
        if format not in _FORMATS:
            raise ConfigurationError(f"sinks.stdout.format: {format!r} must be one of {', '.join(_FORMATS)}")
        self.format = format
        self._stream = stream
        self._render: Callable[[Event, str], str] = _render_json if format == "json" else _render_line
        self._broken: TextIO | None = None
        self._closed = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StdoutSink:
        """Build from configuration: ``format`` (``"line"`` or ``"json"``, default ``"line"``) is the only option."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"sinks.stdout: unknown option(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS)}"
            )
        return cls(format=options.get("format", "line"))

    def write(self, events: Sequence[Event]) -> None:
        """Write one line per event and flush; a closed or broken output raises ``OSError``."""
        if self._closed:
            raise OispError("sinks.stdout: write() was called after close()")
        stream = self._stream if self._stream is not None else sys.stdout
        if stream is None:
            raise OSError(errno.EBADF, f"sinks.stdout: this process has no standard output (sys.stdout is None); "
                                       f"{len(events)} event(s) not written")
        if stream is self._broken:
            raise BrokenPipeError(errno.EPIPE, f"sinks.stdout: the reader of the output went away earlier; "
                                               f"{len(events)} event(s) not written")
        encoding = getattr(stream, "encoding", None) or "utf-8"
        text = "".join(self._render(event, encoding) for event in events)
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError as exc:
            self._broken = stream
            if self._stream is None:
                _detach_broken_stdout(stream)
            raise BrokenPipeError(errno.EPIPE, f"sinks.stdout: the reader of the output went away (broken pipe); "
                                               f"{len(events)} event(s) not written") from exc
        except UnicodeError:
            raise
        except ValueError as exc:  # "I/O operation on closed file"
            raise OSError(errno.EBADF, f"sinks.stdout: the output stream is closed ({exc}); "
                                       f"{len(events)} event(s) not written") from exc

    def close(self) -> None:
        """Flush the stream (it is not closed: it belongs to the process or to whoever passed it in)."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream if self._stream is not None else sys.stdout
        if stream is None or stream is self._broken:
            return
        try:
            stream.flush()
        except (OSError, ValueError) as exc:
            logger.warning("sinks.stdout: could not flush the output at close: %s", exc)


def _detach_broken_stdout(stream: TextIO) -> None:
    try:
        fileno = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        return  # a stream without a descriptor (captured output): nothing is flushed to a pipe at exit
    try:
        os.dup2(devnull, fileno)
    except OSError as exc:
        logger.debug("could not point the broken standard output at %s: %s", os.devnull, exc)
    finally:
        os.close(devnull)


def _render_json(event: Event, encoding: str) -> str:
    text = event.to_json() + "\n"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        # A console that cannot show every character (or lone surrogates): escaped JSON reads back the same.
        return json.dumps(event.to_dict(), separators=(",", ":")) + "\n"
    return text


def _render_line(event: Event, encoding: str) -> str:
    return format_line(event).encode(encoding, "backslashreplace").decode(encoding) + "\n"


def format_line(event: Event) -> str:
    """The one-line summary of ``event`` the ``line`` format prints (without the newline).

    Known event types get a compact summary of their payload, others ``<event_type> <event_id>``; a
    ``partial`` at the end marks an event the collector saw only in part.
    """
    time_of_day = event.ts.astimezone().strftime("%H:%M:%S.%f")[:-3]
    summarize = _SUMMARIES.get(type(event.data))
    details: _Parts
    try:
        details = summarize(event) if summarize is not None else [event.event_id]
    except Exception:  # a summary must never cost the event its line
        logger.debug("could not summarize event %s", event.event_id, exc_info=True)
        details = [event.event_id]
    if event.confidence.completeness == "partial":
        details.append("partial")
    return " ".join(_clean(part) for part in (time_of_day, event.event_type, *details) if part)


def _clean(value: object) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}" if ord(m[0]) > 0xFF else f"\\x{ord(m[0]):02x}", str(value))


# summaries per payload type -----------------------------------------------------------------------
_Parts = list[str | None]


def _process(event: Event) -> _Parts:
    process = event.process
    if process is None:
        return []
    name = process.name or (os.path.basename(process.exe) if process.exe else None)
    return [f"pid={process.pid}" if process.pid is not None else None, name]


def _model(model: ModelInfo | None) -> str | None:
    return (model.id or model.name) if model is not None else None


def _count(label: str, count: int | None, items: Sequence[Any] | None) -> str | None:
    if count is None and items is not None:
        count = len(items)
    return f"{label}={count}" if count is not None else None


def _ms(value: float | None, label: str = "") -> str | None:
    return f"{label}{round(value)}ms" if value is not None else None


def _usd(value: float | None) -> str | None:
    return "$" + f"{value:.6f}".rstrip("0").rstrip(".") if value is not None else None


def _ai_request(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AiRequest)
    return [provider_name(event), _model(data.model), data.request_type, "stream" if data.streaming else None,
            *_process(event), _count("msgs", data.messages_count, data.messages),
            _count("tools", data.tools_count, data.tools)]


def _ai_response(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AiResponse)
    success = data.success
    if success is None and data.status_code is not None:
        success = 200 <= data.status_code < 400
    outcome = None if success is None else "ok" if success else "error"
    error = (data.error.type or data.error.code) if data.error is not None else None
    finish = data.finish_reason or next((c.finish_reason for c in data.choices or [] if c.finish_reason), None)
    usage = data.usage
    cost = usage.total_cost_usd if usage is not None else None
    return [provider_name(event), _model(data.model),
            str(data.status_code) if data.status_code is not None else None, outcome, error,
            f"in={usage.prompt_tokens}" if usage is not None and usage.prompt_tokens is not None else None,
            f"out={usage.completion_tokens}" if usage is not None and usage.completion_tokens is not None else None,
            _ms(data.latency_ms), _ms(data.time_to_first_token_ms, "ttft="),
            f"finish={finish}" if finish else None,
            _count("tools", data.tool_calls_count, data.tool_calls) if data.tool_calls or data.tool_calls_count
            else None,
            _usd(cost), *_process(event)]


def _ai_streaming_chunk(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AiStreamingChunk)
    delta = data.delta
    return [data.request_id, f"#{data.chunk_index}" if data.chunk_index is not None else None,
            f"+{len(delta.content)}ch" if delta is not None and delta.content else None,
            _count("tools", None, delta.tool_calls) if delta is not None and delta.tool_calls else None,
            f"finish={data.finish_reason}" if data.finish_reason else None, *_process(event)]


def _ai_embedding(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AiEmbedding)
    return [provider_name(event), _model(data.model),
            f"inputs={data.input_count}" if data.input_count is not None else None,
            f"tokens={data.total_tokens}" if data.total_tokens is not None else None,
            f"dims={data.dimensions}" if data.dimensions is not None else None,
            _ms(data.latency_ms), *_process(event)]


def _agent_tool_call(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AgentToolCall)
    approval = None
    if data.approved is not None:
        approval = "approved" if data.approved else "denied"
    elif data.requires_approval:
        approval = "needs-approval"
    return [data.tool.name or "?", data.call_id, f"risk={data.risk_level}" if data.risk_level else None, approval,
            *_process(event)]


def _agent_tool_result(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, AgentToolResult)
    outcome = None if data.success is None else "ok" if data.success else "error"
    error = data.error.type if data.error is not None else None
    return [data.tool.name if data.tool is not None else None, data.call_id, outcome, error,
            f"{data.result_size_bytes}B" if data.result_size_bytes is not None else None, _ms(data.duration_ms),
            *_process(event)]


def _network_connect(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, NetworkConnect)
    host = data.dest.domain or data.dest.ip or "?"
    if ":" in host:
        host = f"[{host}]"
    where = f"{host}:{data.dest.port}" if data.dest.port is not None else host
    interception = (event.attrs or {}).get("oisp.interception")
    tls = data.tls
    return [where, interception if isinstance(interception, str) else None,
            "failed" if data.success is False else None, data.error if data.success is False else None,
            tls.version if tls is not None else None, tls.alpn if tls is not None else None,
            _ms(data.latency_ms), *_process(event)]


def _network_dns(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, NetworkDns)
    answers = data.answers or []
    first = answers[0].value if answers else None
    return [data.query_name, data.query_type, data.response_code, first,
            f"+{len(answers) - 1}" if len(answers) > 1 else None, _ms(data.latency_ms), *_process(event)]


def _process_exec(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, ProcessExec)
    arguments = " ".join(data.args[1:]) if data.args else ""
    if len(arguments) > _COMMAND_WIDTH:
        arguments = arguments[:_COMMAND_WIDTH - 1] + "…"
    return [data.exe, arguments, *_process(event)]


def _process_exit(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, ProcessExit)
    signal = data.signal_name or (str(data.signal) if data.signal is not None else None)
    return [f"code={data.exit_code}", f"signal={signal}" if signal else None, _ms(data.runtime_ms),
            data.termination_type, *_process(event)]


def _file_open(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, FileOpen)
    return [data.path, ",".join(data.flags) or None, *_process(event)]


def _file_write(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, FileWrite)
    return [data.path, f"{data.bytes_written}B" if data.bytes_written is not None else None,
            "created" if data.created else None, data.detected_type, *_process(event)]


def _process_fork(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, ProcessFork)
    return [f"child={data.child_pid}", *_process(event)]


def _file_read(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, FileRead)
    return [data.path, f"{data.bytes_read}B" if data.bytes_read is not None else None, *_process(event)]


def _file_delete(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, FileDelete)
    return [data.path, *_process(event)]


def _file_rename(event: Event) -> _Parts:
    data = event.data
    assert isinstance(data, FileRename)
    return [f"{data.old_path} -> {data.new_path}", *_process(event)]


_SUMMARIES: Mapping[type[Record], Callable[[Event], _Parts]] = {
    AiRequest: _ai_request,
    AiResponse: _ai_response,
    AiStreamingChunk: _ai_streaming_chunk,
    AiEmbedding: _ai_embedding,
    AgentToolCall: _agent_tool_call,
    AgentToolResult: _agent_tool_result,
    NetworkConnect: _network_connect,
    NetworkDns: _network_dns,
    ProcessExec: _process_exec,
    ProcessExit: _process_exit,
    FileOpen: _file_open,
    FileWrite: _file_write,
    ProcessFork: _process_fork,
    FileRead: _file_read,
    FileDelete: _file_delete,
    FileRename: _file_rename,
}
