"""The activity cores without the kernel: parsers fed bytes, event builders fed facts, sensitive paths, config."""

from __future__ import annotations

import struct
import sys

import pytest
from tests.oisp_schema import SchemaValidator

from oisp.activity import ActivitySettings
from oisp.activity.build import Clock, ProcessFacts, decode_exit_status, file_write_event, process_exec_event
from oisp.activity.runner import settings_from
from oisp.activity.settings import DEFAULT_SENSITIVE_PATHS, SensitivePaths
from oisp.config import parse_config
from oisp.errors import ConfigurationError

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the kernel record parsers are Linux modules")


def _cn_message(what: int, body: bytes, ts: int = 123_456_789) -> bytes:
    event = struct.pack("=IIQ", what, 0, ts) + body
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


@linux_only
def test_cn_proc_parser_reads_fork_exec_exit_and_skips_threads() -> None:
    from oisp.activity.cn_proc import ExecEvent, ExitEvent, ForkEvent, ProcEvent, parse_datagram

    out: list[ProcEvent] = []
    assert parse_datagram(_cn_message(1, struct.pack("=iiii", 10, 10, 11, 11)), out) == 0
    assert parse_datagram(_cn_message(1, struct.pack("=iiii", 10, 10, 12, 10)), out) == 0  # a thread
    assert parse_datagram(_cn_message(2, struct.pack("=ii", 11, 11)), out) == 0
    assert parse_datagram(_cn_message(0x80000000, struct.pack("=iiIIii", 11, 11, 9, 17, 10, 10)), out) == 0
    assert parse_datagram(_cn_message(0x80000000, struct.pack("=iiII", 13, 11, 0, 17)), out) == 0  # a thread
    assert parse_datagram(_cn_message(4, struct.pack("=iiII", 11, 11, 0, 0)), out) == 0  # uid: not used
    assert out == [ForkEvent(123_456_789, 10, 11), ExecEvent(123_456_789, 11), ExitEvent(123_456_789, 11, 9, 10)]


@linux_only
def test_cn_proc_parser_counts_bad_input_and_never_raises() -> None:
    from oisp.activity.cn_proc import ProcEvent, parse_datagram

    out: list[ProcEvent] = []
    good = _cn_message(2, struct.pack("=ii", 5, 5))
    assert parse_datagram(good[:-3], out) == 1  # truncated
    assert parse_datagram(b"\xff" * 7, out) == 0  # shorter than a header: nothing
    other = bytearray(good)
    other[16:20] = struct.pack("=I", 7)  # another connector
    assert parse_datagram(bytes(other), out) == 1
    assert parse_datagram(_cn_message(1, b"\x00" * 4), out) == 1  # a fork without its body
    assert out == []


def test_exit_status_is_decoded_like_wait() -> None:
    assert decode_exit_status(3 << 8) == (3, None, False)
    assert decode_exit_status(9) == (137, 9, False)
    assert decode_exit_status(11 | 0x80) == (139, 11, True)


def _fid_record(info_type: int, handle: bytes, name: str | None) -> bytes:
    body = struct.pack("=ii", 0x1234, 0x5678) + struct.pack("=Ii", len(handle), 1) + handle
    if name is not None:
        body += name.encode() + b"\0"
    body += b"\0" * (-(len(body) + 4) % 4)
    return struct.pack("=BBH", info_type, 0, 4 + len(body)) + body


def _fan_event(mask: int, pid: int, *records: bytes) -> bytes:
    rest = b"".join(records)
    return struct.pack("=IBBHQii", 24 + len(rest), 3, 0, 24, mask, -1, pid) + rest


@linux_only
def test_fanotify_parser_reads_names_and_filters_by_pid_first() -> None:
    from oisp.activity.fanotify import FAN_CLOSE_WRITE, FAN_RENAME, FanEvent, fsid_key, parse_events

    buf = (_fan_event(FAN_CLOSE_WRITE, 42, _fid_record(2, b"H" * 8, "a.txt"), _fid_record(1, b"F" * 8, None))
           + _fan_event(FAN_CLOSE_WRITE, 7, _fid_record(2, b"H" * 8, "not-mine"))
           + _fan_event(FAN_RENAME, 42, _fid_record(10, b"O" * 8, "old"), _fid_record(12, b"N" * 8, "new")))
    out: list[FanEvent] = []
    assert parse_events(buf, out, want_pid=lambda pid: pid == 42) == 0
    assert [e.pid for e in out] == [42, 42]
    first, rename = out
    assert first.dfid_name is not None and first.dfid_name.name == "a.txt"
    assert first.dfid_name.fsid == fsid_key(0x1234, 0x5678) == 0x5678_0000_1234
    assert first.dfid_name.handle == struct.pack("=Ii", 8, 1) + b"H" * 8  # as open_by_handle_at takes it
    assert rename.old is not None and rename.new is not None
    assert (rename.old.name, rename.new.name) == ("old", "new")


@linux_only
def test_fanotify_parser_keeps_effects_of_other_pids_undecoded_until_asked() -> None:
    # records of processes out of scope are kept for an agent learned late, but their identifiers are read only
    # if that happens (most never matter)
    from oisp.activity.fanotify import FAN_CLOSE_WRITE, FAN_OPEN, FanEvent, decoded, parse_events

    buf = (_fan_event(FAN_CLOSE_WRITE, 7, _fid_record(2, b"H" * 8, "theirs.txt"))
           + _fan_event(FAN_OPEN, 7, _fid_record(2, b"H" * 8, "opened.txt")))
    out: list[FanEvent] = []
    assert parse_events(buf, out, want_pid=lambda pid: pid == 42, also=FAN_CLOSE_WRITE) == 0
    [kept] = out  # the open is not an effect: skipped
    assert (kept.mask, kept.pid, kept.dfid_name) == (FAN_CLOSE_WRITE, 7, None) and kept.raw is not None
    full = decoded(kept)
    assert full.raw is None and full.dfid_name is not None and full.dfid_name.name == "theirs.txt"
    assert decoded(full) is full


@linux_only
def test_fanotify_parser_stops_at_bad_input() -> None:
    from oisp.activity.fanotify import FAN_CLOSE_WRITE, FanEvent, parse_events

    good = _fan_event(FAN_CLOSE_WRITE, 1, _fid_record(2, b"H" * 8, "x"))
    out: list[FanEvent] = []
    assert parse_events(good[:-5], out) == 1
    bad_version = bytearray(good)
    bad_version[4] = 9
    assert parse_events(bytes(bad_version), out) == 1
    broken_record = good[:24] + struct.pack("=BBH", 2, 0, 2) + good[28:]
    assert parse_events(broken_record, out) == 1 and out[-1].dfid_name is None


@linux_only
def test_the_executable_of_a_gone_process_comes_from_its_exec_opens() -> None:
    from oisp.activity.linux import _exe_of

    assert _exe_of(["/usr/bin/true", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]) == ("/usr/bin/true", None)
    assert _exe_of(["/work/run.sh", "/usr/bin/dash", "/lib64/ld-linux-x86-64.so.2"]) == (
        "/usr/bin/dash", "/work/run.sh")
    assert _exe_of(["/bin/static"]) == ("/bin/static", None)


def test_events_built_from_partial_facts_say_what_is_missing(oisp_schema: SchemaValidator) -> None:
    clock = Clock()
    facts = ProcessFacts(77, ppid=70, exe=None, missing=("exe", "args", "cwd"), agent=70)
    event = process_exec_event(facts, 1_000, clock)
    raw = event.to_dict()
    assert raw["data"]["exe"] == "[unknown]"
    assert raw["confidence"]["completeness"] == "partial"
    assert raw["confidence"]["missing"] == ["exe", "args", "cwd"]
    assert raw["attrs"] == {"oisp.agent_pid": 70, "oisp.unreadable": ["exe", "args", "cwd"]}
    assert raw["ts_mono"] == 1_000
    oisp_schema.assert_valid(raw)
    write = file_write_event(ProcessFacts(77, exe="/bin/sh"), "/tmp/x.py", 2_000, clock, created=True, stat=None)
    assert write.to_dict()["confidence"]["missing"] == ["file.size"]
    oisp_schema.assert_valid(write.to_dict())


def test_a_script_run_by_an_interpreter_is_recognized() -> None:
    facts = ProcessFacts(5, exe="/usr/bin/python3.12", args=["python3", "tool.py", "--x"], cwd="/w")
    data = process_exec_event(facts, 1, Clock()).data
    assert (data.interpreter, data.script_path, data.is_script, data.is_shell) == (  # type: ignore[attr-defined]
        "/usr/bin/python3.12", "tool.py", True, False)
    shell = process_exec_event(ProcessFacts(6, exe="/usr/bin/bash", args=["bash", "-c", "ls"]), 1, Clock()).data
    assert (shell.is_shell, shell.script_path) == (True, None)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "sensitive"), [
    ("/root/.ssh/id_ed25519", True),
    ("/home/alice/.ssh/config", True),
    ("/home/alice/project/.env", True),
    ("/srv/app/.env.production", True),
    ("/etc/ssl/private/server.key", True),
    ("/home/bob/certs/ca.pem", True),
    ("/home/bob/.aws/credentials", True),
    ("/home/bob/.config/google-chrome/Default/Cookies", True),
    ("/home/bob/.mozilla/firefox/abc.default/cookies.sqlite", True),
    ("/home/bob/.kube/config", True),
    ("/home/bob/project/main.py", False),
    ("/home/bob/.environment", False),
    ("/tmp/.ssh/id_rsa.pub", False),
    ("/home/bob/keys.txt", False),
])
def test_sensitive_paths(path: str, sensitive: bool) -> None:
    assert SensitivePaths(DEFAULT_SENSITIVE_PATHS)(path) is sensitive


def test_no_sensitive_paths_means_none() -> None:
    assert not SensitivePaths(())("/root/.ssh/id_rsa")
    assert not SensitivePaths(()).may_match_name("id_rsa")


def test_a_name_that_cannot_be_sensitive_needs_no_directory() -> None:
    # the reader resolves an open's directory only when the name alone cannot rule the path out
    names_only = SensitivePaths((".env", "*.pem", "~/.aws/credentials"))
    assert names_only.may_match_name(".env") and names_only.may_match_name("ca.pem")
    assert names_only.may_match_name("credentials")
    assert not names_only.may_match_name("libc.so.6") and not names_only.may_match_name("env")
    # a wildcard in a pattern's last part can end in any name: every name may match
    assert SensitivePaths(DEFAULT_SENSITIVE_PATHS).may_match_name("libc.so.6")
    for path, sensitive in [("/srv/.env", True), ("/srv/a/ca.pem", True), ("/home/x/.aws/credentials", True),
                            ("/etc/credentials", False)]:
        name = path.rsplit("/", 1)[1]
        assert names_only(path) is sensitive and (not sensitive or names_only.may_match_name(name))


def test_the_activity_table_of_the_config_file() -> None:
    config = parse_config({"activity": {"enabled": True, "scope": "all", "include_exe": ["claude"],
                                        "exclude_exe": ["git"], "sensitive_paths": ["*.secret"],
                                        "hash_files": True, "rate_limit": 50}})
    assert config.activity_enabled
    settings = settings_from(config)
    assert settings == ActivitySettings(scope="all", include_exe=("claude",), exclude_exe=("git",),
                                        sensitive_paths=("*.secret",), hash_files=True, rate_limit=50)
    assert settings_from(parse_config({})).sensitive_paths == DEFAULT_SENSITIVE_PATHS


def test_activity_is_on_by_default_only_in_transparent_mode() -> None:
    assert not parse_config({}).activity_enabled
    assert parse_config({"proxy": {"mode": "transparent"}}).activity_enabled
    assert not parse_config({"proxy": {"mode": "transparent"}, "activity": {"enabled": False}}).activity_enabled


@pytest.mark.parametrize(("table", "message"), [
    ({"scope": "some"}, "activity.scope: 'some' is not allowed; allowed: agents, all"),
    ({"rate_limit": 0}, "activity.rate_limit: 0 must be a positive integer"),
    ({"include_exe": "claude"}, "activity.include_exe: 'claude' must be a list of strings"),
    ({"hashes": True}, "activity: unknown key(s) hashes"),
])
def test_bad_activity_config_is_a_clear_error(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"activity": table})
