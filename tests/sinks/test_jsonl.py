"""The jsonl sink: lossless lines, private files, rotation by size and time, safe compression, errors raised."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.events.samples import ALL

from oisp.errors import ConfigurationError, OispError
from oisp.events import AiRequest, Confidence, Event, Message, ModelInfo, ProviderInfo
from oisp.pipeline import Pipeline
from oisp.plugins import create_plugin_manager
from oisp.sinks.jsonl import JsonlSink

posix_modes = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
FULL = Confidence(level="high", completeness="full")
T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request(i: int, content: str = "What is the weather in Paris?") -> Event:
    return Event.create(
        AiRequest(request_id=f"req_{i:04d}", provider=ProviderInfo(name="openai"), model=ModelInfo(id="gpt-4o"),
                  request_type="chat", messages=[Message(role="user", content=f"{content} #{i}")],
                  messages_count=1),
        confidence=FULL,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    text = data.decode("utf-8")  # strict: every byte is UTF-8
    assert text == "" or text.endswith("\n")
    return text.splitlines()


def all_lines(sink: JsonlSink) -> list[str]:
    """Every line the sink has kept, oldest first: rotated files in order, then the live file."""
    return [line for path in [*sink.rotated_files(), sink.path] for line in read_lines(path)]


@pytest.fixture
def no_umask() -> Iterator[None]:
    """File modes must come from the sink, not from a friendly umask."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# lines ------------------------------------------------------------------------------------------
def test_every_line_reads_back_as_the_event_that_was_written(tmp_path: Path) -> None:
    tricky = [
        request(1, "Grüße, 東京, emoji 🤖, a quote \" and a backslash \\"),
        request(2, "line\nbreaks\r\nand\u2028separators\u2029and\x85NEL"),
        request(3, "undecodable byte kept as \udcff"),
    ]
    events = [factory() for factory in ALL.values()] + tricky
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.write(events[:5])
    sink.write(events[5:])
    sink.close()

    lines = read_lines(tmp_path / "events.jsonl")
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        assert Event.from_json(line).to_dict() == event.to_dict()
    assert lines[0] == events[0].to_json()


def test_each_batch_is_on_disk_when_write_returns(tmp_path: Path) -> None:
    events = [request(i) for i in range(3)]
    sink = JsonlSink(tmp_path / "events.jsonl", fsync=True)
    sink.write(events[:2])
    assert read_lines(sink.path) == [e.to_json() for e in events[:2]]  # read while the sink is open
    sink.write(events[2:])
    assert read_lines(sink.path) == [e.to_json() for e in events]
    sink.close()


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    first, second = request(1), request(2)
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.write([first])
    sink.close()
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.write([second])
    sink.close()
    assert [Event.from_json(line).event_id for line in read_lines(sink.path)] == [first.event_id, second.event_id]


def test_a_line_cut_short_by_an_earlier_crash_does_not_swallow_the_next_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(request(1).to_json() + "\n" + request(2).to_json()[:40], encoding="utf-8")
    event = request(3)
    with caplog.at_level(logging.WARNING, logger="oisp.sinks.jsonl"):
        sink = JsonlSink(path)
    sink.write([event])
    sink.close()
    assert "does not end with a newline" in caplog.text
    assert Event.from_json(read_lines(path)[-1]).to_dict() == event.to_dict()


# permissions ------------------------------------------------------------------------------------
@posix_modes
def test_new_files_are_0600_and_new_directories_0700(tmp_path: Path, no_umask: None) -> None:
    path = tmp_path / "a" / "b" / "events.jsonl"
    sink = JsonlSink(path)
    sink.write([request(1)])
    sink.close()
    assert mode(path) == 0o600
    assert mode(tmp_path / "a") == 0o700
    assert mode(tmp_path / "a" / "b") == 0o700


@posix_modes
def test_an_existing_file_readable_by_others_is_tightened_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(request(1).to_json() + "\n", encoding="utf-8")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="oisp.sinks.jsonl"):
        sink = JsonlSink(path)
    sink.close()
    assert mode(path) == 0o600
    assert "0644" in caplog.text and str(path) in caplog.text
    assert "What is the weather" not in caplog.text  # never event content in logs
    assert len(read_lines(path)) == 1


@posix_modes
def test_rotated_and_compressed_files_are_0600(tmp_path: Path, no_umask: None) -> None:
    for compress in (True, False):
        sink = JsonlSink(tmp_path / f"events-{compress}.jsonl", rotate_bytes=500, compress=compress)
        for i in range(10):
            sink.write([request(i)])
        sink.close()
        rotated = sink.rotated_files()
        assert len(rotated) >= 3
        assert all(p.name.endswith(".gz") == compress for p in rotated)
        assert [mode(p) for p in [*rotated, sink.path]] == [0o600] * (len(rotated) + 1)


# size rotation ----------------------------------------------------------------------------------
def test_size_rotation_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    limit = 2_000
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=limit, keep=1000, clock=FakeClock())
    events = [request(i) for i in range(120)]
    batches = [events[0:1], events[1:8], events[8:21], events[21:22], events[22:60], events[60:120]]
    for batch in batches:
        sink.write(batch)
    sink.close()

    rotated = sink.rotated_files()
    assert len(rotated) >= 10
    assert all(p.name.endswith(".gz") for p in rotated)
    leftovers = [p.name for p in tmp_path.iterdir() if p not in rotated and p != sink.path]
    assert leftovers == []
    assert all(len(gzip.decompress(p.read_bytes())) <= limit for p in rotated)
    lines = all_lines(sink)
    assert lines == [e.to_json() for e in events]


def test_a_line_longer_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=300, compress=False, clock=FakeClock())
    big = request(2, "x" * 1_000)
    sink.write([request(1), big, request(3)])
    sink.close()
    files = [*sink.rotated_files(), sink.path]
    assert [len(read_lines(p)) for p in files] == [1, 1, 1]
    assert read_lines(files[1]) == [big.to_json()]


def test_keep_limits_the_rotated_files_to_the_newest(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=400, keep=2, clock=FakeClock())
    events = [request(i) for i in range(30)]
    for event in events:
        sink.write([event])
    sink.close()
    assert len(sink.rotated_files()) == 2
    kept = all_lines(sink)
    assert kept == [e.to_json() for e in events][-len(kept):]
    assert len(kept) >= 3


def test_keep_zero_keeps_only_the_live_file(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=400, keep=0)
    for i in range(10):
        sink.write([request(i)])
    sink.close()
    assert sink.rotated_files() == []
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]


def test_rotated_names_carry_the_rotation_time_and_stay_in_order(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=400, compress=False, keep=100, clock=clock)
    events = [request(i) for i in range(12)]
    for event in events:
        sink.write([event])
        clock.now += 0.3  # several rotations within one second
    sink.close()
    names = [p.name for p in sink.rotated_files()]
    assert names[:3] == ["events.jsonl.20261118T110640Z", "events.jsonl.20261118T110640Z.1",
                         "events.jsonl.20261118T110640Z.2"]
    assert "events.jsonl.20261118T110641Z" in names
    assert all_lines(sink) == [e.to_json() for e in events]


# time rotation ----------------------------------------------------------------------------------
def test_time_rotation_starts_a_new_file_once_the_live_one_is_old_enough(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_seconds=60, clock=clock)
    first, second, third, fourth = (request(i) for i in range(4))
    sink.write([first])
    clock.now += 30
    sink.write([second])
    assert sink.rotated_files() == []
    clock.now += 31
    sink.write([third])
    clock.now += 59
    sink.write([fourth])
    sink.close()

    (rotated,) = sink.rotated_files()
    rotation_time = datetime.fromtimestamp(T0 + 61, UTC).strftime("%Y%m%dT%H%M%SZ")
    assert rotated.name == f"events.jsonl.{rotation_time}.gz"
    assert read_lines(rotated) == [first.to_json(), second.to_json()]
    assert read_lines(sink.path) == [third.to_json(), fourth.to_json()]


def test_an_empty_live_file_is_not_rotated_by_time(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_seconds=60, clock=clock)
    clock.now += 3_600
    sink.write([request(1)])
    sink.close()
    assert sink.rotated_files() == []


def test_size_and_time_rotation_together(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=1_000, rotate_seconds=10, keep=100, clock=clock)
    events = [request(i) for i in range(40)]
    for i in range(0, 40, 4):
        sink.write(events[i:i + 4])
        clock.now += 3
    sink.close()
    assert len(sink.rotated_files()) >= 10
    assert all_lines(sink) == [e.to_json() for e in events]


# compression safety -----------------------------------------------------------------------------
def test_interrupted_compressions_are_finished_on_the_next_start(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path, rotate_bytes=400, compress=False, keep=100, clock=clock)
    events = [request(i) for i in range(8)]
    for event in events:
        sink.write([event])
    sink.close()
    first, second, *_ = sink.rotated_files()
    # Killed while writing the compressed copy of `first` ...
    first.with_name(first.name + ".gz.tmp").write_bytes(gzip.compress(first.read_bytes())[:20])
    # ... and after renaming the copy of `second` but before deleting the original.
    second.with_name(second.name + ".gz").write_bytes(gzip.compress(second.read_bytes()))

    sink = JsonlSink(path, rotate_bytes=400, compress=True, keep=100, clock=clock)
    sink.close()
    assert all(p.name.endswith(".gz") for p in sink.rotated_files())
    assert not list(tmp_path.glob("*.tmp"))
    assert all_lines(sink) == [e.to_json() for e in events]


def test_a_failed_compression_keeps_the_rotated_file_and_retries_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=400, keep=100, clock=FakeClock())
    events = [request(i) for i in range(6)]
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="oisp.sinks.jsonl"):
        patch.setattr(shutil, "copyfileobj", disk_full)
        sink.write(events[:3])  # rotates, compression fails: the write itself succeeds
    assert "could not compress" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name.endswith(".gz") for p in sink.rotated_files()] == [False, False]
    sink.write(events[3:])
    sink.close()
    assert all(p.name.endswith(".gz") for p in sink.rotated_files())
    assert all_lines(sink) == [e.to_json() for e in events]


def test_a_failed_rename_keeps_writing_to_the_live_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def denied(*args: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    sink = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=400, clock=FakeClock())
    events = [request(i) for i in range(4)]
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="oisp.sinks.jsonl"):
        patch.setattr(os, "rename", denied)
        sink.write(events)
    sink.close()
    assert "could not rotate" in caplog.text
    assert sink.rotated_files() == []
    assert read_lines(sink.path) == [e.to_json() for e in events]


# errors -----------------------------------------------------------------------------------------
def test_a_write_error_is_raised_and_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, third, fourth = (request(i) for i in range(4))
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.write([first])
    real_write = os.write

    def fills_the_disk(fd: int, data: Any) -> int:
        if len(data) > 100:
            return real_write(fd, bytes(data[:100]))  # the disk takes part of it, then is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", fills_the_disk)
        with pytest.raises(OSError, match="No space left") as raised:
            sink.write([second, third])
    assert raised.value.errno == errno.ENOSPC
    sink.write([fourth])
    sink.close()
    assert read_lines(sink.path) == [first.to_json(), fourth.to_json()]


def test_write_failures_are_counted_by_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    sink = create_plugin_manager(entrypoints=False).create_sink("jsonl", {"path": str(tmp_path / "e.jsonl")})
    monkeypatch.setattr(os, "write", disk_full)

    async def main() -> Pipeline:
        async with Pipeline({"file": sink}) as pipeline:
            pipeline.emit_many([request(i) for i in range(3)])
        return pipeline

    pipeline = anyio.run(main)
    stats = pipeline.stats.sinks["file"]
    assert (stats.delivered, stats.failed) == (0, 3)
    assert stats.last_error is not None and "No space left" in stats.last_error


def test_write_after_close_raises(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events.jsonl")
    sink.close()
    sink.close()
    with pytest.raises(OispError, match="after close"):
        sink.write([request(1)])


# configuration ----------------------------------------------------------------------------------
def test_created_through_the_plugin_manager_from_options(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    options = {"path": str(path), "fsync": True, "rotate_bytes": 10_000_000, "rotate_seconds": 3600,
               "keep": 3, "compress": False}
    sink = create_plugin_manager(entrypoints=False).create_sink("jsonl", options)
    assert isinstance(sink, JsonlSink)
    assert (sink.fsync, sink.rotate_bytes, sink.rotate_seconds, sink.keep, sink.compress) == (
        True, 10_000_000, 3600.0, 3, False)
    events = [factory() for factory in ALL.values()]
    sink.write(events)
    sink.close()
    assert [Event.from_json(line).to_dict() for line in read_lines(path)] == [e.to_dict() for e in events]


def test_defaults(tmp_path: Path) -> None:
    sink = JsonlSink.from_options({"path": str(tmp_path / "events.jsonl")})
    assert (sink.fsync, sink.rotate_bytes, sink.rotate_seconds, sink.keep, sink.compress) == (
        False, None, None, 5, True)
    sink.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rotate": 10}, r"sinks\.jsonl: unknown option\(s\) \['rotate'\]; allowed: \['compress', "),
        ({}, r"sinks\.jsonl\.path: required"),
        ({"path": ""}, r"sinks\.jsonl\.path: '' must be a non-empty string"),
        ({"path": 42}, r"sinks\.jsonl\.path: 42 must be a non-empty string"),
        ({"fsync": "yes"}, r"sinks\.jsonl\.fsync: 'yes' must be true or false"),
        ({"fsync": 1}, r"sinks\.jsonl\.fsync: 1 must be true or false"),
        ({"compress": "false"}, r"sinks\.jsonl\.compress: 'false' must be true or false"),
        ({"rotate_bytes": -1}, r"sinks\.jsonl\.rotate_bytes: -1 must be a positive integer"),
        ({"rotate_bytes": 0}, r"sinks\.jsonl\.rotate_bytes: 0 must be a positive integer"),
        ({"rotate_bytes": "10MB"}, r"sinks\.jsonl\.rotate_bytes: '10MB' must be a positive integer"),
        ({"rotate_bytes": 1.5}, r"sinks\.jsonl\.rotate_bytes: 1\.5 must be a positive integer"),
        ({"rotate_bytes": True}, r"sinks\.jsonl\.rotate_bytes: True must be a positive integer"),
        ({"rotate_seconds": -5}, r"sinks\.jsonl\.rotate_seconds: -5 must be a positive number of seconds"),
        ({"rotate_seconds": float("nan")}, r"sinks\.jsonl\.rotate_seconds: nan must be a positive number"),
        ({"rotate_seconds": "1h"}, r"sinks\.jsonl\.rotate_seconds: '1h' must be a positive number"),
        ({"keep": -1}, r"sinks\.jsonl\.keep: -1 must be an integer >= 0"),
        ({"keep": 2.5}, r"sinks\.jsonl\.keep: 2\.5 must be an integer >= 0"),
    ],
)
def test_invalid_options_are_rejected_naming_the_key(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    if "path" not in options and options:
        options = {"path": str(tmp_path / "events.jsonl"), **options}
    with pytest.raises(ConfigurationError, match=message):
        JsonlSink.from_options(options)
    with pytest.raises(ConfigurationError, match=message):  # passed through the plugin manager unchanged
        create_plugin_manager(entrypoints=False).create_sink("jsonl", options)
    assert not (tmp_path / "events.jsonl").exists()


def test_a_directory_as_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"sinks\.jsonl\.path: .* is a directory"):
        JsonlSink.from_options({"path": str(tmp_path)})
