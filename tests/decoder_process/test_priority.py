"""The decoder process's CPU priority: idle while it keeps up, a normal task again while it falls behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import attrs
import pytest

from oisp.config import Config, load_config
from oisp.decoder_process import DecoderProcess
from oisp.decoder_process.priority import (
    BEHIND_BYTES,
    BEHIND_LAG_NS,
    CAUGHT_UP_BYTES,
    HOLD_SECONDS,
    PriorityPolicy,
    can_leave_idle,
)
from oisp.errors import ConfigurationError
from oisp.http.exchange import ConnectionInfo

# --- the decision ------------------------------------------------------------------------------------------------


def test_small_fresh_batches_keep_it_idle() -> None:
    policy = PriorityPolicy()
    for second in range(10):
        assert policy.batch(40_000, 20_000_000, float(second)) is True
    assert policy.batch(0, None, 11.0) is True  # a batch of reports and ends only


def test_a_big_batch_or_an_old_copy_makes_it_normal_and_it_stays_so_for_a_while() -> None:
    for size, lag in ((BEHIND_BYTES, 1_000_000), (1_000, BEHIND_LAG_NS)):
        policy = PriorityPolicy()
        assert policy.batch(size, lag, 100.0) is False
        assert policy.batch(1_000, 1_000_000, 100.0 + HOLD_SECONDS / 2) is False  # caught up, but not for long
        assert policy.batch(CAUGHT_UP_BYTES, 1_000_000, 100.0 + HOLD_SECONDS) is False  # not small enough
        assert policy.batch(1_000, 1_000_000, 100.0 + HOLD_SECONDS) is True


def test_falling_behind_again_restarts_the_hold() -> None:
    policy = PriorityPolicy()
    assert policy.behind(5.0) is False
    assert policy.batch(BEHIND_BYTES * 2, None, 5.9) is False
    assert policy.batch(1_000, None, 6.5) is False  # 0.6 s after the last time it was behind
    assert policy.batch(1_000, None, 5.9 + HOLD_SECONDS) is True


def test_the_setting_is_checked() -> None:
    assert Config().decoder_priority == "idle"
    with pytest.raises(ConfigurationError, match="decoder_priority"):
        _load('[capture]\ndecoder_priority = "low"\n')
    assert _load('[capture]\ndecoder_priority = "normal"\n').decoder_priority == "normal"


def _load(text: str) -> Config:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "oisp.toml"
        path.write_text(text)
        return load_config(path, required=True)


# --- a real decoder process --------------------------------------------------------------------------------------

needs_linux = pytest.mark.skipif(sys.platform != "linux" or not can_leave_idle(),
                                 reason="SCHED_IDLE and coming back from it need Linux (and CAP_SYS_NICE or "
                                        "RLIMIT_NICE 20)")


def _info() -> ConnectionInfo:
    return ConnectionInfo(connection_id="c-priority.1", client_addr=("127.0.0.1", 40001),
                          server_addr=("api.openai.com", 443), mode="explicit", tls=True, provider="openai")


async def _policy_becomes(pid: int, policy: int, what: str) -> None:
    with anyio.fail_after(30, shield=True):
        while os.sched_getscheduler(pid) != policy:  # the decoding thread is the process's main thread
            await anyio.sleep(0.01)
    assert os.sched_getscheduler(pid) == policy, what


@needs_linux
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_decoder_process_is_idle_until_it_falls_behind_and_idle_again_once_caught_up(
        tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = Config(sinks=({"kind": "jsonl", "path": str(out)},))
    async with DecoderProcess(config) as decoder:
        assert decoder.pid is not None
        await _policy_becomes(decoder.pid, os.SCHED_IDLE, "idle once it is ready")
        feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
        assert feed is not None
        size = 4 * BEHIND_BYTES
        feed.push("client", b"POST /v1/files HTTP/1.1\r\nhost: api.openai.com\r\ncontent-length: %d\r\n\r\n" % size,
                  time.monotonic_ns())
        feed.push("client", b"x" * size, time.monotonic_ns())  # one big copy: a batch of at least BEHIND_BYTES
        await _policy_becomes(decoder.pid, os.SCHED_OTHER, "a normal task while a big batch is decoded")
        started = time.monotonic()
        while time.monotonic() - started < HOLD_SECONDS + 0.5:  # small copies keep coming: caught up again
            feed.push("client", b"y" * 100, time.monotonic_ns())
            await anyio.sleep(0.05)
        await _policy_becomes(decoder.pid, os.SCHED_IDLE, "idle again once it kept up")
        feed.finish()
    assert decoder.stats.exit_code == 0


@needs_linux
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_decoder_priority_normal_leaves_it_a_normal_task(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = attrs.evolve(Config(sinks=({"kind": "jsonl", "path": str(out)},)), decoder_priority="normal")
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    async with DecoderProcess(config) as decoder:
        assert decoder.pid is not None
        feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
        assert feed is not None
        feed.push("client", b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n"
                            b"content-length: %d\r\n\r\n" % len(body) + body, time.monotonic_ns())
        with anyio.fail_after(30):  # the decoding loop has taken batches: it would have changed its policy by now
            while not out.exists() or not out.read_text():
                await anyio.sleep(0.01)
        assert os.sched_getscheduler(decoder.pid) == os.SCHED_OTHER
        feed.finish()
