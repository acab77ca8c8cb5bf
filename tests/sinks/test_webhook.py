"""The webhook sink against a real HTTPS receiver on loopback: signed NDJSON batches, retries through outages
(503, 429 with Retry-After, connection refused), a durable spool that survives kill -9, a bounded spool whose
drops are counted; and its decisions (retry schedule, Retry-After, spool bound) on their own."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.sinks.helpers import make_event, make_events, wait_until
from tests.sinks.webhook_receiver import Receiver

from oisp.errors import ConfigurationError, PluginError
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks._delivery import (
    MAX_RETRY_AFTER,
    Outcome,
    RetryPolicy,
    SpoolEntry,
    SpoolIndex,
    classify_status,
    parse_retry_after,
    spool_name,
)
from oisp.sinks.webhook import SIGNATURE_HEADER, WebhookSink, sign

SECRET = "s3cr3t-for-tests"
FAST = {"retry_base": 0.01, "retry_max": 0.05, "timeout": 5.0, "close_timeout": 5.0}


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(tmp_path, secret=SECRET) as r:
        r.start()
        yield r


def make_sink(receiver: Receiver, spool: Path, **options: Any) -> WebhookSink:
    settings: dict[str, Any] = {"secret": SECRET, "ca_file": receiver.ca_file, **FAST, **options}
    return WebhookSink(receiver.url, spool_dir=spool, **settings)


def spooled_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if p.name.endswith(".ndjson"))


# decisions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.DELIVERED), (202, Outcome.DELIVERED), (204, Outcome.DELIVERED),
    (408, Outcome.RETRY), (425, Outcome.RETRY), (429, Outcome.RETRY), (500, Outcome.RETRY), (503, Outcome.RETRY),
    (301, Outcome.REJECTED), (400, Outcome.REJECTED), (401, Outcome.REJECTED), (413, Outcome.REJECTED),
])
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_parse_retry_after() -> None:
    now = 1_795_000_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("99999999", now) == MAX_RETRY_AFTER
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0  # a date past: at once
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after("1.5", now) is None  # delay-seconds is an integer


def test_retry_policy_is_exponential_with_jitter_and_capped() -> None:
    low = RetryPolicy(base=0.5, cap=10.0, random=lambda: 0.0)
    high = RetryPolicy(base=0.5, cap=10.0, random=lambda: 0.999999)
    assert [low.delay(n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert [round(high.delay(n), 3) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert low.delay(100) == 5.0 and round(high.delay(10_000), 3) == 10.0
    assert high.delay(3, retry_after=42.0) == 42.0  # the receiver's wish wins


def test_spool_index_drops_oldest_but_never_the_busy_or_newest() -> None:
    index = SpoolIndex(max_bytes=250)
    index.load([SpoolEntry(3, 1, 100), SpoolEntry(1, 1, 100), SpoolEntry(2, 1, 100)])
    assert [e.seq for e in index.entries] == [1, 2, 3] and index.next_seq == 4
    busy = index.oldest()
    assert index.over_bound(busy) == [SpoolEntry(2, 1, 100)]
    assert [e.seq for e in index.entries] == [1, 3] and index.total_bytes == 200
    index.add(SpoolEntry(index.allocate(), 5, 1000))  # one batch above the bound alone is kept
    assert [e.seq for e in index.over_bound(None)] == [1, 3]
    assert [e.seq for e in index.entries] == [4]
    assert SpoolEntry.parse(spool_name(12, 7), 10) == SpoolEntry(12, 7, 10)
    assert SpoolEntry.parse("00000000000000000012.tmp", 10) is None


# delivery -------------------------------------------------------------------------------------------
def test_delivers_signed_ndjson_batches_in_order(receiver: Receiver, tmp_path: Path) -> None:
    sink = make_sink(receiver, tmp_path / "spool", batch_size=3, headers={"Authorization": "Bearer t0ken"})
    events = make_events(0, 10)
    sink.write(events[:4])
    sink.write(events[4:])
    wait_until(lambda: len(receiver.events) == 10, what="10 events")
    sink.close()
    assert receiver.event_ids() == [e.event_id for e in events]
    assert receiver.events[0] == json.loads(events[0].to_json())
    assert [body.count(b"\n") for body in receiver.batches] == [3, 1, 3, 3]  # 4 -> 3+1, 6 -> 3+3
    assert receiver.bad_signatures == 0
    headers = receiver.request_headers[0]
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers[SIGNATURE_HEADER] == sign(SECRET.encode(), receiver.batches[0])
    stats = sink.stats()
    assert stats["spooled"] == stats["delivered"] == 10
    assert stats["pending"] == stats["dropped"] == stats["rejected"] == 0
    assert spooled_files(tmp_path / "spool") == []


def test_a_wrong_secret_is_rejected_by_the_receiver_and_counted(receiver: Receiver, tmp_path: Path) -> None:
    sink = make_sink(receiver, tmp_path / "spool", secret="not-the-secret")
    sink.write(make_events(0, 3))
    wait_until(lambda: sink.stats()["rejected"] == 3, what="the batch rejected")
    sink.close()
    assert receiver.events == [] and receiver.bad_signatures == 1
    assert "401" in (sink.last_error or "")


def test_certificates_are_verified(receiver: Receiver, tmp_path: Path) -> None:
    """Without the receiver's CA the sink does not trust it: nothing is sent, the batch waits in the spool."""
    sink = WebhookSink(receiver.url, spool_dir=tmp_path / "spool", **{**FAST, "close_timeout": 0.2})
    sink.write(make_events(0, 2))
    wait_until(lambda: sink.stats()["retries"] >= 2, what="failed attempts")
    sink.close()
    assert "CERTIFICATE_VERIFY_FAILED" in (sink.last_error or "")
    assert receiver.request_times == [] and sink.stats()["pending"] == 2


@pytest.mark.parametrize("failure", ["503", "429", "refused"])
def test_receiver_failing_for_a_while_then_recovering_gets_every_event(
        receiver: Receiver, tmp_path: Path, failure: str) -> None:
    if failure == "refused":
        receiver.stop()
    else:
        receiver.failure = (503, {}) if failure == "503" else (429, {"Retry-After": "0"})
    sink = make_sink(receiver, tmp_path / "spool", batch_size=7)
    events = make_events(0, 60)
    for start in range(0, 60, 20):
        sink.write(events[start:start + 20])
    wait_until(lambda: sink.stats()["retries"] >= 5, what="several failed attempts")
    assert receiver.events == [] and sink.stats()["pending"] == 60
    if failure == "refused":
        receiver.start()
    else:
        receiver.failure = None
    wait_until(lambda: len(set(receiver.event_ids())) == 60, what="every event")
    later = make_events(60, 5)
    sink.write(later)  # the sink goes on normally afterwards
    wait_until(lambda: len(set(receiver.event_ids())) == 65, what="the later events")
    sink.close()
    # At least once, in order: de-duplicated by event_id, the events arrived as they were written.
    assert list(dict.fromkeys(receiver.event_ids())) == [e.event_id for e in events + later]
    stats = sink.stats()
    assert stats["delivered"] == 65 and stats["pending"] == 0 and stats["dropped"] == 0


def test_a_kept_alive_connection_the_receiver_closed_is_replaced_without_a_retry(
        receiver: Receiver, tmp_path: Path) -> None:
    receiver.hang_up_after_each = True
    sink = make_sink(receiver, tmp_path / "spool", retry_base=5.0, retry_max=5.0)  # a retry would take 2.5 s+
    for i in range(3):
        sink.write([make_event(i)])
        wait_until(lambda i=i: len(receiver.events) == i + 1, timeout=2, what=f"event {i}")
    sink.close()
    assert sink.stats()["retries"] == 0 and sink.stats()["delivered"] == 3


def test_retry_after_is_honoured(receiver: Receiver, tmp_path: Path) -> None:
    receiver.failure = (429, {"Retry-After": "1"})
    sink = make_sink(receiver, tmp_path / "spool")
    sink.write([make_event(1)])
    wait_until(lambda: len(receiver.request_times) >= 1, what="the first attempt")
    receiver.failure = None
    wait_until(lambda: len(receiver.events) == 1, what="the event")
    sink.close()
    gap = receiver.request_times[1] - receiver.request_times[0]
    assert gap >= 0.9, f"retried after {gap:.3f} s despite Retry-After: 1"
    assert len(receiver.request_times) == 2  # not earlier, not more often


def test_an_http_date_retry_after_is_honoured(receiver: Receiver, tmp_path: Path) -> None:
    receiver.failure = (503, {"Retry-After": formatdate(time.time() + 2, usegmt=True)})
    sink = make_sink(receiver, tmp_path / "spool")
    sink.write([make_event(1)])
    wait_until(lambda: len(receiver.request_times) >= 1, what="the first attempt")
    receiver.failure = None
    wait_until(lambda: len(receiver.events) == 1, what="the event")
    sink.close()
    assert receiver.request_times[1] - receiver.request_times[0] >= 0.9  # the date has a resolution of 1 s


def test_full_spool_drops_the_oldest_batches_and_counts_them(receiver: Receiver, tmp_path: Path) -> None:
    receiver.stop()
    spool = tmp_path / "spool"
    batch = make_events(0, 5)
    size = sum(len(e.to_json()) + 1 for e in batch)
    sink = make_sink(receiver, spool, batch_size=5, spool_max_bytes=int(size * 3.5))
    written = [make_events(i * 5, 5) for i in range(10)]
    for events in written:
        sink.write(events)
    stats = sink.stats()
    assert stats["spooled"] == 50
    assert stats["dropped"] >= 30 and stats["dropped"] % 5 == 0
    assert stats["pending"] + stats["dropped"] == 50
    assert stats["spool_bytes"] <= size * 3.5 + size  # the batch being sent may be kept beyond the bound
    assert len(spooled_files(spool)) == stats["pending"] // 5
    receiver.start()
    wait_until(lambda: sink.stats()["pending"] == 0, what="the spool delivered")
    sink.close()
    final = sink.stats()
    assert final["delivered"] + final["dropped"] == 50
    ids = list(dict.fromkeys(receiver.event_ids()))
    expected = [e.event_id for events in written for e in events]
    # What arrives is the newest batches (and possibly the oldest one, being sent when the spool filled), in order.
    assert ids == [i for i in expected if i in set(ids)]
    assert set(ids) >= {e.event_id for e in written[-1]}


def test_close_leaves_the_spool_for_the_next_start(receiver: Receiver, tmp_path: Path) -> None:
    receiver.failure = (503, {})
    spool = tmp_path / "spool"
    sink = make_sink(receiver, spool, close_timeout=0.2)
    events = make_events(0, 8)
    sink.write(events[:4])
    sink.write(events[4:])
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 5
    assert sink.stats()["pending"] == 8 and len(spooled_files(spool)) == 2
    if os.name == "posix":  # events hold prompts: the spool is private
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in spool.iterdir()} == {0o600}
    with pytest.raises(Exception, match="closed"):
        sink.write(events)
    receiver.failure = None
    again = make_sink(receiver, spool)
    later = make_events(8, 2)
    again.write(later)
    wait_until(lambda: len(set(receiver.event_ids())) == 10, what="all events")
    again.close()
    assert list(dict.fromkeys(receiver.event_ids())) == [e.event_id for e in events + later]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_the_spool_is_private(receiver: Receiver, tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    make_sink(receiver, open_dir).close()
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o700
    nested = tmp_path / "a" / "b" / "spool"
    make_sink(receiver, nested).close()
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", nested.parent, nested)} == {0o700}


def test_a_spool_dir_is_used_by_one_sink_at_a_time(receiver: Receiver, tmp_path: Path) -> None:
    first = make_sink(receiver, tmp_path / "spool")
    try:
        with pytest.raises(ConfigurationError, match=r"sinks\.webhook\.spool_dir: .* in use"):
            make_sink(receiver, tmp_path / "spool")
    finally:
        first.close()
    make_sink(receiver, tmp_path / "spool").close()  # free again once closed


_CHILD = textwrap.dedent("""
    import json, sys, time
    from tests.sinks.helpers import make_events
    from oisp.sinks.webhook import WebhookSink

    url, spool, ca = sys.argv[1:4]
    sink = WebhookSink(url, spool_dir=spool, ca_file=ca, secret="SECRET", batch_size=4, retry_base=0.01,
                       retry_max=0.05, timeout=5.0)
    i = 0
    while True:
        events = make_events(i, 10)
        sink.write(events)  # returned: these events are acknowledged
        print(json.dumps([e.event_id for e in events]), flush=True)
        i += 10
        time.sleep(0.002)
""").replace("SECRET", SECRET)


def test_every_acknowledged_event_arrives_after_kill_9_and_restart(receiver: Receiver, tmp_path: Path) -> None:
    receiver.failure = (503, {})
    spool = tmp_path / "spool"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, receiver.url, str(spool), str(receiver.ca_file)],
                             stdout=subprocess.PIPE, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert child.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 300:
            line = child.stdout.readline()
            assert line, "the child process ended early"
            acknowledged.extend(json.loads(line))
        wait_until(lambda: len(receiver.request_times) >= 3, what="the child's failed attempts")
    finally:
        child.send_signal(signal.SIGKILL)  # while it writes: possibly in the middle of spooling a batch
        rest, _ = child.communicate(timeout=10)
    for line in rest.decode().splitlines():
        if line.endswith("]"):
            acknowledged.extend(json.loads(line))
    assert child.returncode == -signal.SIGKILL
    assert receiver.events == []

    restarted = make_sink(receiver, spool)  # the receiver is still down
    assert not [p for p in spool.iterdir() if p.name.endswith(".tmp")]  # interrupted writes are cleaned up
    wait_until(lambda: len(receiver.request_times) >= 10, what="the restarted sink's failed attempts")
    receiver.failure = None
    wait_until(lambda: set(receiver.event_ids()) >= set(acknowledged), timeout=30, what="every acknowledged event")
    restarted.close()
    arrived = list(dict.fromkeys(receiver.event_ids()))
    assert arrived[:len(acknowledged)] == acknowledged  # in order, de-duplicated by event_id
    assert receiver.bad_signatures == 0


# configuration and integration ----------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    ({"url": "https://x.test/"}, r"sinks\.webhook\.spool_dir: required"),
    ({"spool_dir": "s"}, r"sinks\.webhook\.url: required"),
    ({"url": "ftp://x.test/", "spool_dir": "s"}, r"sinks\.webhook\.url: .* https://"),
    ({"url": "https://x.test/", "spool_dir": "s", "batchsize": 3}, r"unknown option\(s\) \['batchsize'\]"),
    ({"url": "https://x.test/", "spool_dir": "s", "batch_size": "3"}, r"sinks\.webhook\.batch_size: '3'"),
    ({"url": "https://x.test/", "spool_dir": "s", "batch_size": 0}, r"sinks\.webhook\.batch_size: 0"),
    ({"url": "https://x.test/", "spool_dir": "s", "spool_max_bytes": True}, r"sinks\.webhook\.spool_max_bytes"),
    ({"url": "https://x.test/", "spool_dir": "s", "retry_base": -1}, r"sinks\.webhook\.retry_base"),
    ({"url": "https://x.test/", "spool_dir": "s", "headers": ["a"]}, r"sinks\.webhook\.headers: .* table"),
    ({"url": "https://x.test/", "spool_dir": "s", "headers": {"X-A": 1}}, r"sinks\.webhook\.headers\.X-A: 1"),
    ({"url": "https://x.test/", "spool_dir": "s", "headers": {"Content-Type": "a"}},
     r"sinks\.webhook\.headers\.Content-Type: set by the sink"),
    ({"url": "https://x.test/", "spool_dir": "s", "secret": 5}, r"sinks\.webhook\.secret: 5"),
    ({"url": "https://x.test/", "spool_dir": "s", "fsync": "yes"}, r"sinks\.webhook\.fsync"),
    ({"url": "https://x.test/", "spool_dir": "s", "ca_file": "/nonexistent/ca.pem"}, r"sinks\.webhook\.ca_file"),
])
def test_configuration_is_validated_strictly(tmp_path: Path, options: dict[str, Any], message: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        create_plugin_manager(entrypoints=False).create_sink("webhook", options)


def test_an_unusable_spool_dir_is_an_error_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises((ConfigurationError, PluginError), match=r"sinks\.webhook\.spool_dir: cannot use"):
        WebhookSink("https://x.test/", spool_dir=blocker / "spool")


def test_pipeline_reports_the_sinks_own_counters(receiver: Receiver, tmp_path: Path) -> None:
    sink = create_plugin_manager(entrypoints=False).create_sink("webhook", {
        "url": receiver.url, "spool_dir": str(tmp_path / "spool"), "secret": SECRET,
        "ca_file": str(receiver.ca_file), "retry_base": 0.01, "batch_size": 50})

    async def main() -> dict[str, Any]:
        async with Pipeline({"hook": sink}) as pipeline:
            for i in range(120):
                pipeline.emit(make_event(i))
        return pipeline.summary()

    summary = anyio.run(main)
    reported = summary["sinks"]["hook"]["reported"]
    assert reported["spooled"] == 120 and reported["delivered"] == 120 and reported["pending"] == 0
    assert len(set(receiver.event_ids())) == 120


def test_a_write_that_fails_spools_nothing(receiver: Receiver, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing: the pipeline counts a failed write as failed, so none of its batches may be sent later."""
    receiver.stop()
    spool = tmp_path / "spool"
    sink = make_sink(receiver, spool, batch_size=2, close_timeout=0)
    real = os.replace
    calls = []

    def failing_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        sink.write(make_events(0, 5))
    monkeypatch.setattr(os, "replace", real)
    assert list(spool.iterdir()) == [spool / ".lock"]
    sink.write(make_events(5, 1))
    assert sink.stats()["spooled"] == 1 and sink.stats()["pending"] == 1
    sink.close()


def test_the_webhook_urls_secret_path_and_query_never_reach_the_log(
        receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Webhook URLs often are the credential (``/services/T0/B0/SECRET``): logs show scheme, host and port only."""
    caplog.set_level(logging.DEBUG, logger="oisp")
    url = receiver.url.rstrip("/") + "/services/T000/B000/SECRETPATH?token=SECRETQUERY"
    sink = WebhookSink(url, spool_dir=tmp_path / "spool", **{**FAST, "close_timeout": 0.2})  # untrusted: fails
    sink.write(make_events(0, 2))
    wait_until(lambda: sink.stats()["retries"] >= 2, what="failed attempts")
    sink.close()
    assert "SECRET" not in caplog.text and "SECRET" not in (sink.last_error or "")
    assert "sinks.webhook: delivery to https://127.0.0.1:" in caplog.text
