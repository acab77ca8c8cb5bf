"""The decoder process: copies in over the socket pair, events out of its sinks; failures never reach the relay."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from oisp.config import Config
from oisp.decoder_process import DecoderProcess
from oisp.errors import OispError
from oisp.events import Event, ProcessInfo
from oisp.http.exchange import ConnectionInfo

pytestmark = pytest.mark.anyio

SECRET = "sk-proj-" + "q" * 40
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}]}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
           b"authorization: Bearer " + SECRET.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY)
ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)
            + ANSWER)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _info(number: int = 1) -> ConnectionInfo:
    return ConnectionInfo(connection_id=f"c-test.{number}", client_addr=("127.0.0.1", 40000 + number),
                          server_addr=("api.openai.com", 443), mode="explicit", tls=True, provider="openai",
                          process=ProcessInfo(pid=os.getpid(), name="pytest"))


def _config(path: Path) -> Config:
    return Config(sinks=({"kind": "jsonl", "path": str(path)},))


def _events(path: Path) -> list[Event]:
    return [Event.from_json(line) for line in path.read_text().splitlines()]


def _now() -> int:
    return time.monotonic_ns()


async def test_exchanges_sent_as_copies_become_events_in_the_decoder_process(tmp_path: Path,
                                                                              oisp_schema: Any) -> None:
    out = tmp_path / "events.jsonl"
    seen: list[Event] = []
    async with DecoderProcess(_config(out), on_event=seen.append) as decoder:
        assert decoder.pid is not None and decoder.pid != os.getpid()
        feeds = [decoder.open_feed(_info(n), "http/1.1", body_cap=1 << 20) for n in (1, 2)]
        for feed in feeds:  # interleaved, as the relay's copies of two connections are
            assert feed is not None
            feed.push("client", REQUEST[:40], _now())
        for feed in feeds:
            assert feed is not None
            feed.push("client", REQUEST[40:], _now())
            feed.push("server", RESPONSE, _now())
            feed.push("client", None, _now())
            feed.push("server", None, _now())
            feed.finish()
    assert decoder.stats.exit_code == 0
    assert decoder.stats.connections == 2 and decoder.stats.overflowed_connections == 0
    assert decoder.pipeline_summary is not None and decoder.pipeline_summary["processed"] == 4
    events = _events(out)
    assert sorted(e.event_type for e in events) == ["ai.request", "ai.request", "ai.response", "ai.response"]
    for event in events:
        oisp_schema.validate(event.to_dict())
        assert event.process is not None and event.process.pid == os.getpid()
    request = next(e for e in events if e.event_type == "ai.request")
    assert request.data.messages[0].content == "Say hello"  # type: ignore[attr-defined]
    response = next(e for e in events if e.event_type == "ai.response")
    assert response.data.choices[0].message.content == "Hello!"  # type: ignore[attr-defined]
    assert SECRET not in out.read_text()
    # on_event listeners in the proxy's process get the same, already redacted events
    assert sorted(e.event_id for e in seen) == sorted(e.event_id for e in events)


async def test_a_decoder_process_too_far_behind_stops_decoding_that_connection_not_the_relay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "events.jsonl"
    big = b"x" * 65536
    pushes = 1024  # 64 MiB: more than the kernel's socket buffer (a few MiB at most) and ours together
    head = (b"POST /v1/files HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % (len(big) * pushes))
    with caplog.at_level(logging.WARNING, logger="oisp.decoder_process"):
        async with DecoderProcess(_config(out), buffer_limit=256 * 1024) as decoder:
            feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
            assert feed is not None and decoder.pid is not None
            os.kill(decoder.pid, signal.SIGSTOP)  # a decoder process that cannot keep up at all
            try:
                feed.push("client", head, _now())
                for _ in range(pushes):
                    feed.push("client", big, _now())  # never blocks
                    if feed.failure is not None:
                        break
                    await anyio.sleep(0)  # the writer fills the kernel's socket buffer first, then ours
                assert 0 < decoder.channel.buffered <= 256 * 1024
            finally:
                os.kill(decoder.pid, signal.SIGCONT)
            assert feed.failure is not None and "fell more than 262144 bytes behind" in feed.failure
            feed.push("client", big, _now())  # ignored from now on
            feed.finish()
            other = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
            assert other is not None  # later connections are decoded again once the backlog is gone
            other.push("client", REQUEST, _now())
            other.push("server", RESPONSE, _now())
            other.finish()
    assert decoder.stats.overflowed_connections == 1 and decoder.stats.exit_code == 0
    assert "fell more than" in caplog.text
    events = _events(out)
    upload = [e for e in events if e.event_type == "ai.request" and e.confidence.completeness == "partial"]
    assert len(upload) == 1
    assert "behind" in " ".join(upload[0].confidence.limitations or [])
    chat = [e for e in events if e.event_type == "ai.response" and e.confidence.completeness != "partial"]
    assert len(chat) == 1


async def test_a_sink_that_cannot_start_fails_the_start_with_its_own_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    config = Config(sinks=({"kind": "jsonl", "path": str(blocked / "events.jsonl")},))
    with pytest.raises(OispError) as raised:
        async with DecoderProcess(config):
            pass
    assert "events.jsonl" in str(raised.value)


async def test_an_unknown_sink_kind_is_reported_as_the_same_error_as_inline(tmp_path: Path) -> None:
    from oisp.errors import PluginError

    with pytest.raises(PluginError, match="unknown sink kind 'nosuchsink'; available: jsonl"):
        async with DecoderProcess(Config(sinks=({"kind": "nosuchsink"},))):
            pass


async def test_a_decoder_process_that_dies_is_replaced_and_the_relay_never_notices(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "events.jsonl"
    with caplog.at_level(logging.ERROR, logger="oisp.decoder_process"):
        async with DecoderProcess(_config(out)) as decoder:
            feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
            first = decoder.pid
            assert feed is not None and first is not None
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(30):
                await decoder.wait_ended()
                assert await decoder.wait_ready()
            assert decoder.pid != first
            feed.push("client", REQUEST, _now())  # the dead one's connection: never raises, never blocks
            assert feed.failure is not None and "gone" in feed.failure
            feed.finish()
            second = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
            assert second is not None
            second.push("client", REQUEST, _now())
            second.push("server", RESPONSE, _now())
            second.finish()
    assert decoder.stats.restarts == 1 and decoder.stats.exit_code == 0
    assert decoder.stats.lost_connections == 1
    assert "ended unexpectedly (exit code -9); starting another" in caplog.text
    assert sorted(e.event_type for e in _events(out)) == ["ai.request", "ai.response"]


async def test_without_restarts_left_the_proxy_goes_on_without_decoding(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="oisp.decoder_process"):
        async with DecoderProcess(_config(tmp_path / "events.jsonl"), max_restarts=0) as decoder:
            assert decoder.pid is not None
            os.kill(decoder.pid, signal.SIGKILL)
            with anyio.fail_after(30):
                await decoder.wait_ended()
            assert not await decoder.wait_ready()
            assert decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20) is None
    assert decoder.stats.exit_code == -signal.SIGKILL and decoder.stats.lost_connections == 1
    assert "the proxy goes on relaying without decoding" in caplog.text


async def test_one_big_transfer_cannot_take_the_whole_buffer(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    big = b"x" * 65536
    head = (b"POST /v1/files HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % (len(big) * 64))
    async with DecoderProcess(_config(out), buffer_limit=1 << 30, connection_limit=512 * 1024) as decoder:
        upload = decoder.open_feed(_info(1), "http/1.1", body_cap=1 << 20)
        chat = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
        assert upload is not None and chat is not None and decoder.pid is not None
        os.kill(decoder.pid, signal.SIGSTOP)
        try:
            upload.push("client", head, _now())
            for _ in range(64):  # 4 MiB, all of it waiting in the proxy's buffer (nothing is sent meanwhile)
                upload.push("client", big, _now())
            chat.push("client", REQUEST, _now())
            chat.push("server", RESPONSE, _now())
        finally:
            os.kill(decoder.pid, signal.SIGCONT)
        assert upload.failure is not None and "524288 bytes behind the relay on this connection" in upload.failure
        assert chat.failure is None
        assert decoder.channel.buffered <= 600 * 1024
        upload.finish()
        chat.finish()
    events = _events(out)
    # the chat completion on the other connection is whole; the upload's exchange says it was cut short
    assert sorted(e.confidence.completeness for e in events if e.event_type == "ai.response") == ["full", "partial"]
    partial = [e for e in events if e.event_type == "ai.request" and e.confidence.completeness == "partial"]
    assert len(partial) == 1 and "on this connection" in " ".join(partial[0].confidence.limitations or [])


async def test_the_buffer_limit_applies_to_all_connections_together(tmp_path: Path) -> None:
    chunk = b"y" * 65536
    async with DecoderProcess(_config(tmp_path / "events.jsonl"), buffer_limit=256 * 1024) as decoder:
        first = decoder.open_feed(_info(1), "http/1.1", body_cap=1 << 20)
        second = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
        assert first is not None and second is not None
        for _ in range(3):  # 192 KiB queued (nothing is written before this task yields)
            first.push("client", chunk, _now())
        second.push("client", chunk, _now())  # fits its own share, not the whole buffer
        assert first.failure is None
        assert second.failure is not None and "262144 bytes behind the relay;" in second.failure
        first.finish()
        second.finish()
    assert decoder.stats.overflowed_connections == 1


async def test_leaving_never_hangs_on_a_decoder_process_that_stopped_reading(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    chunk = b"z" * 65536
    with caplog.at_level(logging.ERROR, logger="oisp.decoder_process"):
        with anyio.fail_after(30):
            async with DecoderProcess(_config(tmp_path / "events.jsonl"), finish_timeout=0.5) as decoder:
                feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
                assert feed is not None and decoder.pid is not None
                os.kill(decoder.pid, signal.SIGSTOP)  # never reads again; never resumed
                while decoder.channel.buffered == 0 and feed.failure is None:  # until the kernel's buffer is full
                    feed.push("client", chunk, _now())
                    await anyio.sleep(0)
    assert decoder.stats.exit_code == -signal.SIGKILL
    assert "did not finish within 0.5 s" in caplog.text


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="CPU placement needs Linux and at least two CPUs")
async def test_the_decoder_process_runs_on_a_cpu_of_its_own_as_a_batch_task(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    # decoder_priority "normal": the decoding thread stays the task it was placed as (idle: test_priority.py)
    config = attrs.evolve(_config(tmp_path / "events.jsonl"), decoder_priority="normal")
    async with DecoderProcess(config, cpu="last") as decoder:
        assert decoder.pid is not None
        assert os.sched_getaffinity(decoder.pid) == {allowed[-1]}
        assert os.sched_getscheduler(decoder.pid) == os.SCHED_BATCH
    assert os.sched_getaffinity(0) == set(allowed)  # the proxy itself is left where it was
    async with DecoderProcess(config) as decoder:  # the default
        assert decoder.pid is not None
        assert os.sched_getaffinity(decoder.pid) == set(allowed)
        assert os.sched_getscheduler(decoder.pid) == os.SCHED_OTHER
    with pytest.raises(OispError, match="cpu must be one of last, any"):
        DecoderProcess(_config(tmp_path / "events.jsonl"), cpu="first")


async def _kill_the_replacement_while_it_starts(decoder: DecoderProcess, previous: int) -> int:
    """Wait (polling, with a deadline) for a replacement of ``previous`` to be spawned, and kill it before it is
    ready; returns its pid."""
    with anyio.fail_after(30):
        while decoder.pid == previous or decoder._worker is None or decoder._worker.ready.is_set():
            await anyio.sleep(0.001)
    replacement = decoder.pid
    assert replacement is not None
    os.kill(replacement, signal.SIGKILL)
    return replacement


async def test_a_replacement_killed_while_it_starts_is_replaced_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "events.jsonl"
    with caplog.at_level(logging.ERROR, logger="oisp.decoder_process"):
        async with DecoderProcess(_config(out), restart_backoff=0.05) as decoder:
            first = decoder.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            second = await _kill_the_replacement_while_it_starts(decoder, first)
            with anyio.fail_after(60):
                assert await decoder.wait_ready()  # a third one, not a give-up
            assert decoder.pid not in (first, second) and decoder.stats.gave_up is None
            feed = decoder.open_feed(_info(2), "http/1.1", body_cap=1 << 20)
            assert feed is not None
            feed.push("client", REQUEST, _now())
            feed.push("server", RESPONSE, _now())
            feed.finish()
    assert decoder.stats.restarts == 2
    assert "restart 2 of at most 5" in caplog.text and "DECODING IS OFF" not in caplog.text
    assert sorted(e.event_type for e in _events(out)) == ["ai.request", "ai.response"]


async def test_a_permanent_give_up_is_loud(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    statuses: list[str] = []
    with caplog.at_level(logging.WARNING, logger="oisp.decoder_process"):
        async with DecoderProcess(_config(tmp_path / "events.jsonl"), max_restarts=2, restart_backoff=0.05,
                                  give_up_warning_interval=0.1, on_status=statuses.append) as decoder:
            pid = decoder.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            for _ in range(2):
                pid = await _kill_the_replacement_while_it_starts(decoder, pid)
            with anyio.fail_after(30):
                assert not await decoder.wait_ready()
                while caplog.text.count("DECODING IS OFF since") < 2:  # reminded every interval
                    await anyio.sleep(0.02)
    assert decoder.stats.restarts == 2
    assert decoder.stats.gave_up is not None and "no restarts are left (2 of 2 used)" in decoder.stats.gave_up
    assert statuses and statuses[0].startswith("DECODING IS OFF")
    assert decoder.summary()["gave_up"] == decoder.stats.gave_up


async def test_batch_timing_and_yielding_change_when_work_happens_not_what_comes_out(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = attrs.evolve(_config(out), decoder_batch_ms=0.0, decoder_yield_ms=0.001)  # yields on every frame
    async with DecoderProcess(config) as decoder:
        assert decoder.channel.coalesce == 0.0
        for number in range(1, 6):
            feed = decoder.open_feed(_info(number), "http/1.1", body_cap=1 << 20)
            assert feed is not None
            feed.push("client", REQUEST, _now())
            feed.push("server", RESPONSE, _now())
            feed.finish()
    assert sorted(e.event_type for e in _events(out)) == ["ai.request"] * 5 + ["ai.response"] * 5


async def test_websocket_messages_are_decoded_in_the_decoder_process(tmp_path: Path, oisp_schema: Any) -> None:
    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import (
        ClientPerMessageDeflateFactory,
        ServerPerMessageDeflateFactory,
    )
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri

    client = ClientProtocol(parse_uri("wss://api.openai.com/v1/responses"),
                            extensions=[ClientPerMessageDeflateFactory()])
    server = ServerProtocol(extensions=[ServerPerMessageDeflateFactory()])
    out = tmp_path / "events.jsonl"
    async with DecoderProcess(_config(out)) as decoder:
        feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
        assert feed is not None

        def flush() -> None:
            for data in client.data_to_send():
                if data:
                    feed.push("client", data, _now())
                    server.receive_data(data)
            for data in server.data_to_send():
                if data:
                    feed.push("server", data, _now())
                    client.receive_data(data)

        client.send_request(client.connect())
        flush()
        (request,) = server.events_received()
        server.send_response(server.accept(request))
        flush()
        client.send_text(json.dumps({"type": "response.create", "model": "gpt-4.1", "input": "Say hello"}).encode())
        for event in ({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4.1"}},
                      {"type": "response.output_text.delta", "output_index": 0, "delta": "Hello!"},
                      {"type": "response.completed", "response": {
                          "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1",
                          "output": [{"type": "message", "role": "assistant", "content": [
                              {"type": "output_text", "text": "Hello!"}]}],
                          "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}}):
            server.send_text(json.dumps(event).encode())
        flush()
        feed.push("client", None, _now())
        feed.push("server", None, _now())
        feed.finish()
    events = _events(out)
    assert [e.event_type for e in events] == ["ai.request", "ai.response"]
    for event in events:
        oisp_schema.validate(event.to_dict())
    assert events[1].data.choices[0].message.content == "Hello!"  # type: ignore[attr-defined]
    assert events[1].data.usage.total_tokens == 5  # type: ignore[attr-defined]


async def test_body_bytes_past_the_cap_are_not_sent_and_the_events_are_the_same(tmp_path: Path) -> None:
    from oisp.proxy.body_skip import skipping

    prompt = "y" * (4 * 1024 * 1024)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}).encode()
    upload = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    out = tmp_path / "events.jsonl"
    async with DecoderProcess(_config(out)) as decoder:
        sent = []
        for number, skip in ((1, False), (2, True)):
            feed = decoder.open_feed(_info(number), "http/1.1", body_cap=1 << 20)
            assert feed is not None
            wrapped = skipping(feed, "http/1.1", 1 << 20) if skip else feed
            assert wrapped is not None
            before = decoder.channel.bytes_sent
            for at in range(0, len(upload), 256 * 1024):  # as the relay reads it
                wrapped.push("client", upload[at:at + 256 * 1024], _now())
                await anyio.sleep(0)
            wrapped.push("server", RESPONSE, _now())
            sent.append(decoder.channel.bytes_sent - before)
            wrapped.finish()
    assert sent[1] < (1 << 20) + 300 * 1024 < 4 * (1 << 20) < sent[0]  # only the capped part was sent
    events = _events(out)
    requests = [e for e in events if e.event_type == "ai.request"]
    assert len(requests) == 2

    def comparable(event: Event) -> str:  # without what differs between any two events (ids, times, ports)
        raw = event.to_dict()
        for key in ("event_id", "ts", "ts_mono", "related_events", "trace_context"):
            raw.pop(key, None)
        text = json.dumps(raw, sort_keys=True, default=str)
        return re.sub(r"c-test\.\d(_\d+)?", "c-test", text).replace("40002", "40001")

    assert comparable(requests[0]) == comparable(requests[1])
    assert "request body truncated at cap" in " ".join(requests[1].confidence.limitations or [])
