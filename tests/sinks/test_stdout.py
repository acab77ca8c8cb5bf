"""The stdout sink: one safe summary line (or JSON) per event, flushed per batch, surviving a closed reader."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.events import samples

from oisp.errors import ConfigurationError, OispError
from oisp.events import (
    AgentToolCall,
    AiRequest,
    AiResponse,
    Choice,
    Confidence,
    Endpoint,
    Event,
    Message,
    ModelInfo,
    NetworkConnect,
    ProcessExec,
    ProcessInfo,
    ProviderInfo,
    ToolDefinition,
    ToolInfo,
    Usage,
)
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks.stdout import StdoutSink, format_line

REPO = Path(__file__).resolve().parents[2]
FULL = Confidence(level="high", completeness="full")
TS = datetime(2026, 11, 24, 8, 15, 7, 123456, tzinfo=UTC)
CLOCK = TS.astimezone().strftime("%H:%M:%S.123")  # lines show local time, to the millisecond
PROCESS = ProcessInfo(pid=1234, name="python3", exe="/usr/bin/python3.11")


def at_ts(event: Event) -> Event:
    return event.with_context(ts=TS)


def line(event: Event) -> str:
    text = format_line(at_ts(event))
    assert text.startswith(CLOCK + " ")
    return text.removeprefix(CLOCK + " ")


# line format ------------------------------------------------------------------------------------
def test_the_lines_of_the_design_examples() -> None:
    request = Event.create(
        AiRequest(provider=ProviderInfo(name="openai"), model=ModelInfo(id="gpt-4o"), request_type="chat",
                  streaming=True, messages=[Message(role="system", content="Be brief."),
                                            Message(role="user", content="top secret prompt"),
                                            Message(role="user", content="and more")],
                  tools=[ToolDefinition(name="get_weather"), ToolDefinition(name="search")]),
        confidence=FULL, process=PROCESS,
    )
    response = Event.create(
        AiResponse(provider=ProviderInfo(name="openai"), model=ModelInfo(id="gpt-4o"), status_code=200,
                   success=True, usage=Usage(prompt_tokens=123, completion_tokens=45), latency_ms=1234,
                   choices=[Choice(index=0, message=Message(role="assistant", content="It is sunny."),
                                   finish_reason="stop")]),
        confidence=FULL,
    )
    tool_call = Event.create(AgentToolCall(tool=ToolInfo(name="get_weather"), call_id="call_abc"), confidence=FULL)
    connect = Event.create(NetworkConnect(dest=Endpoint(domain="api.openai.com", ip="104.18.7.192", port=443)),
                           confidence=FULL, attrs={"oisp.interception": "intercepted"})

    assert line(request) == "ai.request openai gpt-4o chat stream pid=1234 python3 msgs=3 tools=2"
    assert line(response) == "ai.response openai gpt-4o 200 ok in=123 out=45 1234ms finish=stop"
    assert line(tool_call) == "agent.tool_call get_weather call_abc"
    assert line(connect) == "network.connect api.openai.com:443 intercepted"
    assert "secret" not in line(request) and "sunny" not in line(response)


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("ai.request", "ai.request openai gpt-4o-mini chat stream pid=4242 python3 msgs=3 tools=1"),
        ("ai.response", "ai.response openai gpt-4o-mini-2024-07-18 200 ok in=120 out=18 812ms ttft=230ms "
                        "finish=tool_calls tools=1 $0.00003 pid=4242 python3"),
        ("ai.streaming_chunk", "ai.streaming_chunk req_01 #3 +3ch tools=1"),
        ("ai.embedding", "ai.embedding openai text-embedding-3-small inputs=4 tokens=37 dims=1536 95ms"),
        ("agent.tool_call", "agent.tool_call get_weather call_1 pid=4242 python3"),
        ("agent.tool_result", "agent.tool_result get_weather call_1 ok 14B pid=4242 python3"),
        ("network.connect", "network.connect api.openai.com:443 intercepted TLSv1.3 h2 23ms pid=4242 python3"),
        ("network.dns", "network.dns api.openai.com A NOERROR 104.18.7.192 4ms"),
        ("process.exec", "process.exec /usr/bin/git commit -m fix pid=4242 python3"),
        ("process.exit", "process.exit code=0 1250ms normal pid=4242 python3"),
        ("file.open", "file.open /home/dev/agent/main.py write,truncate pid=4242 python3"),
        ("file.write", "file.write /home/dev/agent/main.py 2048B source_code pid=4242 python3"),
        ("process.fork", "process.fork child=4243 pid=4242 python3"),
        ("file.read", "file.read /home/dev/.ssh/id_ed25519 pid=4242 python3"),
        ("file.delete", "file.delete /home/dev/agent/old.py pid=4242 python3"),
        ("file.rename", "file.rename /home/dev/agent/a.py -> /home/dev/agent/b.py pid=4242 python3"),
    ],
)
def test_each_event_family_has_a_compact_summary(event_type: str, expected: str) -> None:
    assert line(samples.ALL[event_type]()) == expected


def test_every_sample_type_is_summarized() -> None:
    assert set(samples.ALL) == {
        "ai.request", "ai.response", "ai.streaming_chunk", "ai.embedding", "agent.tool_call", "agent.tool_result",
        "network.connect", "network.dns", "process.exec", "process.exit", "file.open", "file.write",
        "process.fork", "file.read", "file.delete", "file.rename",
    }


def test_an_error_response_names_the_error() -> None:
    assert line(samples.ai_response_error()) == "ai.response 429 error rate_limit_error"


def test_an_unknown_event_type_shows_its_type_and_id() -> None:
    event = Event(event_type="vendor.custom_thing", confidence=FULL)
    assert line(event) == f"vendor.custom_thing {event.event_id}"


def test_a_partial_event_is_marked() -> None:
    event = Event.create(AiResponse(status_code=200, success=True, finish_reason="length"),
                         confidence=Confidence(level="high", completeness="partial", limitations=["truncated"]))
    assert line(event) == "ai.response 200 ok finish=length partial"


def test_values_from_the_network_cannot_break_the_line_or_drive_the_terminal() -> None:
    event = Event.create(
        AiRequest(provider=ProviderInfo(name="evil\r\nai.request fake"), model=ModelInfo(id="gpt\x1b[2J\u202egnp")),
        confidence=FULL,
    )
    text = line(event)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u202e" not in text
    assert text == "ai.request evil\\x0d\\x0aai.request fake gpt\\x1b[2J\\u202egnp"


def test_a_long_command_line_is_shortened() -> None:
    event = Event.create(ProcessExec(exe="/bin/sh", args=["sh", "-c", "x" * 500]), confidence=FULL)
    text = line(event)
    assert len(text) < 120 and text.endswith("…")


# writing ----------------------------------------------------------------------------------------
class RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_line_format_writes_one_line_per_event_and_flushes_each_batch() -> None:
    stream = RecordingStream()
    sink = StdoutSink(stream=stream)
    events = [at_ts(factory()) for factory in samples.ALL.values()]
    sink.write(events[:4])
    assert stream.flushes == 1
    sink.write(events[4:])
    assert stream.flushes == 2
    sink.close()
    assert stream.getvalue().splitlines() == [format_line(e) for e in events]


def test_json_format_reads_back_as_the_events_written() -> None:
    stream = io.StringIO()
    sink = StdoutSink(format="json", stream=stream)
    events = [factory() for factory in samples.ALL.values()]
    sink.write(events)
    sink.close()
    lines = stream.getvalue().splitlines()
    assert [Event.from_json(text).to_dict() for text in lines] == [e.to_dict() for e in events]


def test_a_console_that_cannot_show_a_character_still_gets_every_event() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    event = Event.create(AiRequest(model=ModelInfo(id="modèle-été"), messages=[Message(role="user", content="東京")]),
                         confidence=FULL)
    StdoutSink(format="json", stream=stream).write([event])
    StdoutSink(format="line", stream=stream).write([at_ts(event)])
    json_line, summary = raw.getvalue().decode("ascii").splitlines()
    assert Event.from_json(json_line).to_dict() == event.to_dict()
    assert summary.endswith("ai.request mod\\xe8le-\\xe9t\\xe9 msgs=1")


def test_sys_stdout_is_looked_up_at_write_time(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = StdoutSink(format="json")
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stdout", captured)
    event = samples.ai_request()
    sink.write([event])
    assert Event.from_json(captured.getvalue()).to_dict() == event.to_dict()


def test_writes_to_the_real_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    event = at_ts(samples.network_connect())
    sink = StdoutSink()
    sink.write([event])
    sink.close()
    assert capsys.readouterr().out == format_line(event) + "\n"


def test_write_after_close_raises() -> None:
    sink = StdoutSink(stream=io.StringIO())
    sink.close()
    sink.close()
    with pytest.raises(OispError, match="after close"):
        sink.write([samples.ai_request()])


# a closed or broken output ----------------------------------------------------------------------
class BrokenStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_pipe_raises_a_clear_oserror_once_and_then_without_trying() -> None:
    stream = BrokenStream()
    sink = StdoutSink(stream=stream)
    with pytest.raises(BrokenPipeError, match=r"reader of the output went away \(broken pipe\); 2 event"):
        sink.write([samples.ai_request(), samples.ai_response()])
    with pytest.raises(BrokenPipeError, match="went away earlier; 1 event"):
        sink.write([samples.ai_request()])
    assert stream.attempts == 1
    sink.close()


def test_a_real_pipe_whose_reader_is_gone() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the failure
    try:
        with pytest.raises(OSError, match="broken pipe"):
            StdoutSink(stream=stream).write([samples.ai_request()])
    finally:
        with contextlib.suppress(BrokenPipeError):  # what the failed write left in the buffer can go nowhere
            stream.close()


def test_a_closed_stream_raises_oserror() -> None:
    stream = io.StringIO()
    stream.close()
    with pytest.raises(OSError, match="output stream is closed"):
        StdoutSink(stream=stream).write([samples.ai_request()])


def test_no_stdout_at_all_raises_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(OSError, match="no standard output"):
        StdoutSink().write([samples.ai_request()])


def test_the_pipeline_counts_the_events_a_broken_output_did_not_take() -> None:
    sink = StdoutSink(stream=BrokenStream())

    async def main() -> Pipeline:
        async with Pipeline({"console": sink}) as pipeline:
            pipeline.emit_many([samples.ai_request(), samples.ai_response()])
        return pipeline

    stats = anyio.run(main).stats.sinks["console"]
    assert (stats.delivered, stats.failed) == (0, 2)
    assert stats.last_error is not None and stats.last_error.startswith("BrokenPipeError")


def test_a_process_piped_into_a_reader_that_quits_exits_cleanly() -> None:
    """`oisp ... | head -1`: the sink fails, the process goes on and exits without a traceback."""
    child = textwrap.dedent("""
        import sys
        from tests.events.samples import ALL
        from oisp.sinks.stdout import StdoutSink

        sink = StdoutSink()
        events = [factory() for factory in ALL.values()]
        sys.stdin.readline()  # the parent has closed its end of our stdout by now
        for _ in range(2):
            try:
                sink.write(events)
            except OSError as exc:
                print(type(exc).__name__, exc, file=sys.stderr)
        print("the program goes on")
        sink.close()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdout.close()
    _, stderr = proc.communicate(b"go\n", timeout=60)
    errors = stderr.decode()
    assert proc.returncode == 0, errors
    assert errors.splitlines() == [
        "BrokenPipeError [Errno 32] sinks.stdout: the reader of the output went away (broken pipe); "
        f"{len(samples.ALL)} event(s) not written",
        "BrokenPipeError [Errno 32] sinks.stdout: the reader of the output went away earlier; "
        f"{len(samples.ALL)} event(s) not written",
    ]


# configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["line", "json"])
def test_created_through_the_plugin_manager(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    sink = create_plugin_manager(entrypoints=False).create_sink("stdout", {"format": fmt})
    assert isinstance(sink, StdoutSink) and sink.format == fmt
    event = at_ts(samples.ai_request())
    sink.write([event])
    sink.close()
    out = capsys.readouterr().out
    expected = format_line(event) if fmt == "line" else event.to_json()
    assert out == expected + "\n"


def test_line_is_the_default_format() -> None:
    assert StdoutSink.from_options({}).format == "line"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "yaml"}, r"sinks\.stdout\.format: 'yaml' must be one of line, json"),
        ({"format": 1}, r"sinks\.stdout\.format: 1 must be one of line, json"),
        ({"colour": True}, r"sinks\.stdout: unknown option\(s\) \['colour'\]; allowed: \['format'\]"),
    ],
)
def test_invalid_options_are_rejected_naming_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StdoutSink.from_options(options)
    with pytest.raises(ConfigurationError, match=message):  # passed through the plugin manager unchanged
        create_plugin_manager(entrypoints=False).create_sink("stdout", options)
