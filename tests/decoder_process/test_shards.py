"""Several decoder processes sharing the connections (``[capture] decoder_processes``): each connection is decoded
whole and in order by one of them; the first writes every shard's events to the sinks; a burst on one connection
costs no other connection an event; a killed shard is replaced while the others go on; linking still links an
agent's effects to the tool call another shard decoded."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.decoder_process.test_decoder_process import RESPONSE, SECRET, _events

from oisp.config import Config
from oisp.decoder_process import DecoderProcess
from oisp.decoder_process.placement import decoder_process_count
from oisp.events import Event, ProcessInfo
from oisp.events.context import Confidence
from oisp.events.file import FileWrite
from oisp.http.exchange import ConnectionInfo

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(path: Path, **values: Any) -> Config:
    return Config(sinks=({"kind": "jsonl", "path": str(path)},), **values)


def _info(connection_id: str) -> ConnectionInfo:
    return ConnectionInfo(connection_id=connection_id, client_addr=("127.0.0.1", 40000),
                          server_addr=("api.openai.com", 443), mode="explicit", tls=True, provider="openai",
                          process=ProcessInfo(pid=os.getpid(), name="pytest"))


def _request(text: str) -> bytes:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + SECRET.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


def _tool_response(call_id: str, name: str, arguments: dict[str, str]) -> bytes:
    body = json.dumps({
        "id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


def _ids_on(decoder: DecoderProcess, shard: int, count: int, prefix: str = "c-shard") -> list[str]:
    """``count`` connection ids that hash to ``shard``."""
    found: list[str] = []
    number = 0
    while len(found) < count:
        number += 1
        candidate = f"{prefix}.{number}"
        if decoder.shard_of(candidate) == shard:
            found.append(candidate)
    return found


def _texts(events: list[Event], connection_id: str) -> list[str]:
    """The user messages of a connection's requests, in the order they were written."""
    return [e.data.messages[0].content for e in events  # type: ignore[attr-defined]
            if e.event_type == "ai.request" and f"{connection_id} " in e.data.messages[0].content]  # type: ignore[attr-defined]


def test_auto_is_one_per_cpu_beyond_the_relays_and_a_count_is_taken_as_it_is() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert decoder_process_count(None) == max(1, cpus - 1)
    assert decoder_process_count(3) == 3


@pytest.mark.parametrize("shards", [2, 3])
async def test_every_connection_is_decoded_whole_and_in_order_by_one_shard(tmp_path: Path, shards: int,
                                                                           oisp_schema: Any) -> None:
    out = tmp_path / "events.jsonl"
    seen: list[Event] = []
    exchanges = 4
    async with DecoderProcess(_config(out, decoder_processes=shards), on_event=seen.append) as decoder:
        assert len(set(decoder.pids)) == shards and os.getpid() not in decoder.pids
        ids = [i for shard in range(shards) for i in _ids_on(decoder, shard, 3)]
        feeds = [decoder.open_feed(_info(i), "http/1.1", body_cap=1 << 20) for i in ids]
        assert {feed.shard for feed in feeds if feed is not None} == set(range(shards))
        for n in range(exchanges):  # interleaved, as the relay's copies of many connections are
            for i, feed in zip(ids, feeds, strict=True):
                assert feed is not None
                request = _request(f"{i} message {n}")
                feed.push("client", request[:50], time.monotonic_ns())
                feed.push("client", request[50:], time.monotonic_ns())
                feed.push("server", RESPONSE, time.monotonic_ns())
        for feed in feeds:
            assert feed is not None
            feed.finish()
    assert decoder.stats.exit_code == 0 and decoder.stats.overflowed_connections == 0
    assert decoder.stats.dropped_events == 0 and decoder.stats.connections == len(ids)
    assert [s.exit_code for s in decoder.shard_stats()] == [0] * shards
    summary = decoder.pipeline_summary
    assert summary is not None and summary["processed"] == 2 * exchanges * len(ids), summary
    events = _events(out)
    assert len(events) == 2 * exchanges * len(ids)
    for i in ids:
        assert _texts(events, i) == [f"{i} message {n}" for n in range(exchanges)]
    for event in events:
        oisp_schema.validate(event.to_dict())
    assert SECRET not in out.read_text()  # the shards redact what they forward
    assert sorted(e.event_id for e in seen) == sorted(e.event_id for e in events)
    assert decoder.summary()["processes"] == shards and len(decoder.summary()["shards"]) == shards


@pytest.mark.timeout(400)
@pytest.mark.parametrize("shards", [2, 3])
async def test_a_burst_on_one_shard_costs_a_bystander_on_any_shard_nothing(tmp_path: Path, shards: int) -> None:
    count = 3000
    out = tmp_path / "events.jsonl"
    request = _request("flood")
    async with DecoderProcess(_config(out, decoder_processes=shards)) as decoder:
        flood_id = _ids_on(decoder, 1, 1, "c-flood")[0]
        bystander_ids = [_ids_on(decoder, shard, 1, "c-bystander")[0] for shard in range(shards)]
        flood = decoder.open_feed(_info(flood_id), "http/1.1", body_cap=1 << 20)
        bystanders = [decoder.open_feed(_info(i), "http/1.1", body_cap=1 << 20) for i in bystander_ids]
        assert flood is not None and all(b is not None for b in bystanders)
        # all pushed before the event loop runs: one burst
        flood.push("client", request * count, time.monotonic_ns())
        for i, bystander in zip(bystander_ids, bystanders, strict=True):
            assert bystander is not None
            bystander.push("client", _request(f"{i} message 0"), time.monotonic_ns())
        flood.push("server", RESPONSE * count, time.monotonic_ns())
        for bystander in bystanders:
            assert bystander is not None
            bystander.push("server", RESPONSE, time.monotonic_ns())
            bystander.finish()
        flood.finish()
    assert decoder.stats.overflowed_connections == 0 and decoder.stats.dropped_events == 0
    summary = decoder.pipeline_summary
    assert summary is not None and summary["dropped_total"] == 0, summary
    events = _events(out)
    for i in bystander_ids:
        assert _texts(events, i) == [f"{i} message 0"]
    assert sum(e.event_type == "ai.request" for e in events) == count + shards
    assert sum(e.event_type == "ai.response" for e in events) == count + shards


@pytest.mark.parametrize(("shards", "killed"), [(2, 1), (3, 2), (2, 0)])
async def test_a_killed_shard_is_replaced_and_the_others_lose_nothing(tmp_path: Path, shards: int,
                                                                      killed: int) -> None:
    out = tmp_path / "events.jsonl"
    async with DecoderProcess(_config(out, decoder_processes=shards), restart_backoff=0.05) as decoder:
        survivor_shard = (killed + 1) % shards
        victim_id = _ids_on(decoder, killed, 1, "c-victim")[0]
        survivor_id = _ids_on(decoder, survivor_shard, 1, "c-survivor")[0]
        victim = decoder.open_feed(_info(victim_id), "http/1.1", body_cap=1 << 20)
        survivor = decoder.open_feed(_info(survivor_id), "http/1.1", body_cap=1 << 20)
        assert victim is not None and survivor is not None
        survivor.push("client", _request(f"{survivor_id} message 0"), time.monotonic_ns())
        pid = decoder.shard_pid(killed)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(60):
            await decoder.wait_ended(killed)
            assert await decoder.wait_ready()
        assert decoder.shard_pid(killed) not in (None, pid)
        victim.push("client", _request("lost"), time.monotonic_ns())
        assert victim.failure is not None and "gone" in victim.failure
        victim.finish()
        if killed == 0:  # events written before the first died are gone with it; the connection goes on
            survivor.push("client", _request(f"{survivor_id} message 1"), time.monotonic_ns())
        survivor.push("server", RESPONSE, time.monotonic_ns())
        survivor.finish()
        again = decoder.open_feed(_info(_ids_on(decoder, killed, 2, "c-victim")[1]), "http/1.1", body_cap=1 << 20)
        assert again is not None and again.shard == killed
        again.push("client", _request("again message 0"), time.monotonic_ns())
        again.push("server", RESPONSE, time.monotonic_ns())
        again.finish()
    stats = decoder.shard_stats()
    assert stats[killed].restarts == 1 and stats[killed].lost_connections == 1
    assert decoder.stats.restarts == 1 and decoder.stats.gave_up is None and decoder.stats.exit_code == 0
    events = _events(out)
    texts = _texts(events, survivor_id)
    if killed == 0:  # what it sent after the first's replacement was ready is written
        assert f"{survivor_id} message 1" in texts
    else:  # the first and the survivor never stopped: nothing of it is lost
        assert texts == [f"{survivor_id} message 0"]
    assert "again message 0" in [e.data.messages[0].content for e in events  # type: ignore[attr-defined]
                                 if e.event_type == "ai.request"]
    assert not any(e.event_type == "ai.request" and e.data.messages[0].content == "lost"  # type: ignore[attr-defined]
                   for e in events)


async def test_a_shard_given_up_hands_its_connections_to_the_others(tmp_path: Path) -> None:
    statuses: list[str] = []
    out = tmp_path / "events.jsonl"
    async with DecoderProcess(_config(out, decoder_processes=2), max_restarts=0,
                              on_status=statuses.append) as decoder:
        pid = decoder.shard_pid(1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):
            await decoder.wait_ended(1)
            while not statuses:
                await anyio.sleep(0.01)
            assert await decoder.wait_ready()  # the first still runs: decoding is on
        moved = _ids_on(decoder, 0, 1, "c-moved")[0]
        assert decoder.shard_of(moved) == 0
        feed = decoder.open_feed(_info(moved), "http/1.1", body_cap=1 << 20)
        assert feed is not None and feed.shard == 0
        feed.push("client", _request(f"{moved} message 0"), time.monotonic_ns())
        feed.push("server", RESPONSE, time.monotonic_ns())
        feed.finish()
    assert statuses[0].startswith("DECODER PROCESS 1 OF 2 IS OFF")
    assert decoder.stats.gave_up is None and decoder.shard_stats()[1].gave_up is not None
    assert _texts(_events(out), moved) == [f"{moved} message 0"]


@pytest.mark.parametrize("shards", [1, 2, 3])
async def test_an_effect_is_linked_to_the_tool_call_another_shard_decoded(tmp_path: Path, shards: int) -> None:
    """One agent, two connections on different shards: the effect reaches the first decoder process (activity)
    before the second shard's turn does; the watermark of every shard keeps it until that turn is in."""
    out = tmp_path / "events.jsonl"
    seen: list[Event] = []
    config = _config(out, decoder_processes=shards, activity=True, activity_link_hold_ms=5000)
    async with DecoderProcess(config, on_event=seen.append) as decoder:
        first_id = _ids_on(decoder, 0, 1, "c-agent")[0]
        second_id = _ids_on(decoder, shards - 1, 2, "c-agent")[-1]
        first = decoder.open_feed(_info(first_id), "http/1.1", body_cap=1 << 20)
        assert first is not None
        first.push("client", _request("list the folder"), time.monotonic_ns())
        first.push("server", _tool_response("call_list", "list_dir", {"path": "/srv/elsewhere"}),
                   time.monotonic_ns())
        first.finish()
        decoder.activity_watermark(time.monotonic_ns())
        with anyio.fail_after(30):  # the first turn is in
            while not any(e.event_type == "agent.tool_call" for e in seen):
                await anyio.sleep(0.01)
        second = decoder.open_feed(_info(second_id), "http/1.1", body_cap=1 << 20)
        assert second is not None
        second.push("client", _request("write the report"), time.monotonic_ns())
        second.push("server", _tool_response("call_write", "write_file", {"path": "/srv/work/report.txt"}),
                    time.monotonic_ns())
        second.finish()
        # the effect, stamped after the second turn's decoding, sent at once (before that turn can be in)
        at = time.monotonic_ns() + 2_000_000_000
        effect = Event.create(FileWrite(path="/srv/work/report.txt", created=True), ts_mono=at,
                              process=ProcessInfo(pid=os.getpid(), ppid=1, name="pytest"),
                              confidence=Confidence(level="high", completeness="metadata_only"))
        decoder.activity_event(effect)
        decoder.activity_watermark(at + 1)
        with anyio.fail_after(30):
            while not any(e.event_id == effect.event_id for e in seen):
                await anyio.sleep(0.01)
    calls = {e.data.call_id: e for e in _events(out) if e.event_type == "agent.tool_call"}  # type: ignore[attr-defined]
    assert set(calls) == {"call_list", "call_write"}
    (written,) = [e for e in _events(out) if e.event_id == effect.event_id]
    caused = [r.event_id for r in written.related_events or [] if r.relationship == "caused_by"]
    assert caused == [calls["call_write"].event_id], written.to_json()


async def test_the_live_view_and_the_exit_summary_count_losses_per_shard(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from oisp.cli.live import LiveView
    from oisp.cli.main import _print_summary

    out = tmp_path / "events.jsonl"
    live = LiveView()
    async with DecoderProcess(_config(out, decoder_processes=2), connection_limit=64 * 1024,
                              on_losses=live.set_losses) as decoder:
        flood = decoder.open_feed(_info(_ids_on(decoder, 1, 1, "c-flood")[0]), "http/1.1", body_cap=1 << 20)
        bystander_id = _ids_on(decoder, 1, 1, "c-bystander")[0]  # on the flood's shard
        bystander = decoder.open_feed(_info(bystander_id), "http/1.1", body_cap=1 << 20)
        assert flood is not None and bystander is not None
        for _ in range(40):  # 40 copies of 16 KiB before the event loop runs: past the 64 KiB budget
            flood.push("client", _request("flood") * 40, time.monotonic_ns())
        bystander.push("client", _request(f"{bystander_id} message 0"), time.monotonic_ns())
        bystander.push("server", RESPONSE, time.monotonic_ns())
        flood.finish()
        bystander.finish()
    assert flood.failure is not None and bystander.failure is None
    assert live.shard_losses == [(0, 0), (0, 1)] and (live.dropped_events, live.undecoded_connections) == (0, 1)
    assert "per decoder process: 0: 0/0, 1: 0/1" in str(live.render().renderables[-1])
    assert _texts(_events(out), bystander_id) == [f"{bystander_id} message 0"]
    summary = {"pipeline": decoder.pipeline_summary, "proxy": {"connections": 2, "decisions": {}},
               "decoder_process": decoder.summary()}
    _print_summary(summary)
    assert "per decoder process (events dropped / connections not decoded to the end): 0: 0/0, 1: 0/1" \
        in capsys.readouterr().err


def test_decoder_processes_is_auto_or_a_count(tmp_path: Path) -> None:
    from oisp.config import load_config
    from oisp.errors import ConfigurationError

    path = tmp_path / "oisp.toml"
    for text, expected in (("", None), ('decoder_processes = "auto"', None), ("decoder_processes = 3", 3)):
        path.write_text(f"[capture]\n{text}\n")
        assert load_config(path).decoder_processes == expected
    for bad in ("0", "65", '"many"', "true", "1.5"):
        path.write_text(f"[capture]\ndecoder_processes = {bad}\n")
        with pytest.raises(ConfigurationError, match="decoder_processes"):
            load_config(path)
