"""Started as root, the decoder process gives up root: its user ids, capabilities, no_new_privs and the CA key
out of its reach, checked from outside in /proc; and decoding still works end to end."""

from __future__ import annotations

import os
import pwd
import tempfile
import time
from pathlib import Path

import pytest
from tests.decoder_process.test_decoder_process import REQUEST, RESPONSE, _events, _info

from oisp.config import Config
from oisp.decoder_process import DecoderProcess
from oisp.decoder_process.privileges import Account, PrivilegeError, process_status, target_account

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def _assert_unprivileged(pid: int, uid: int) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():  # every thread: the sink threads too
        status = process_status(task / "status")
        assert {int(v) for v in status["Uid"].split()} == {uid}, status["Uid"]
        assert {int(v) for v in status["Gid"].split()} == {_nobody().pw_gid}, status["Gid"]
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[key], 16) == 0, (key, status[key])
        assert status["NoNewPrivs"] == "1"
        assert status["Groups"] == ""


def _secret_key(tmp_path: Path) -> Path:
    private = tmp_path / "conf"
    private.mkdir(mode=0o700)
    key = private / "oisp-ca-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    return key


def test_who_the_decoder_process_becomes() -> None:
    if os.geteuid() != 0:
        assert target_account(None) is None  # not privileged: nothing to drop
        return
    assert target_account(None, {"SUDO_UID": "1234", "SUDO_GID": "99", "SUDO_USER": "alice"}) == Account(
        "alice", 1234, 99)
    nobody = _nobody()
    assert target_account(None, {}) == Account("nobody", nobody.pw_uid, nobody.pw_gid)
    assert target_account(str(nobody.pw_uid), {}) == Account("nobody", nobody.pw_uid, nobody.pw_gid)
    assert target_account("root", {}) is None
    with pytest.raises(PrivilegeError, match="no such user"):
        target_account("no-such-user-oisp", {})
    with pytest.raises(PrivilegeError, match="is root"):
        target_account("0", {})


@root_only
@pytest.mark.anyio
async def test_as_root_the_decoder_process_drops_to_nobody_and_still_decodes(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    key = _secret_key(tmp_path)
    config = Config(sinks=({"kind": "jsonl", "path": str(out)},), decoder_user="nobody")
    async with DecoderProcess(config, protected_paths=(key,)) as decoder:
        assert decoder.pid is not None
        _assert_unprivileged(decoder.pid, _nobody().pw_uid)
        feed = decoder.open_feed(_info(), "http/1.1", body_cap=1 << 20)
        assert feed is not None
        feed.push("client", REQUEST, time.monotonic_ns())
        feed.push("server", RESPONSE, time.monotonic_ns())
        feed.finish()
    assert decoder.stats.exit_code == 0
    types = [e.event_type for e in _events(out)]
    assert types.count("ai.request") == 1 and types.count("ai.response") == 1
    assert os.stat(out).st_uid == _nobody().pw_uid  # created by root, handed to nobody before the drop


@root_only
@pytest.mark.anyio
async def test_a_decoder_process_that_could_read_the_ca_key_does_not_start(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory() as shared:  # /tmp/pytest-of-root is private: a directory others can enter
        os.chmod(shared, 0o755)  # noqa: S103 - others must be able to enter it
        key = Path(shared) / "readable-key.pem"
        key.write_text("-----BEGIN PRIVATE KEY-----\n")
        key.chmod(0o644)
        config = Config(sinks=({"kind": "jsonl", "path": str(tmp_path / "e.jsonl")},), decoder_user="nobody")
        with pytest.raises(PrivilegeError, match="can read .*readable-key.pem"):
            async with DecoderProcess(config, protected_paths=(key,)):
                pass


@root_only
@pytest.mark.anyio
async def test_a_sink_thread_started_before_the_drop_is_unprivileged_too(tmp_path: Path) -> None:
    """The webhook sink starts its delivery thread when it is built, before the drop: no_new_privs and the
    capability bounding set are per thread, so they must already be in place then."""
    with tempfile.TemporaryDirectory() as reachable:
        os.chmod(reachable, 0o755)  # noqa: S103 - the decoder process's user must be able to enter it
        spool = Path(reachable) / "spool"
        config = Config(sinks=({"kind": "webhook", "url": "https://127.0.0.1:9/", "spool_dir": str(spool)},),
                        decoder_user="nobody")
        async with DecoderProcess(config) as decoder:
            assert decoder.pid is not None
            assert len(list(Path(f"/proc/{decoder.pid}/task").iterdir())) > 1  # the delivery thread is there
            _assert_unprivileged(decoder.pid, _nobody().pw_uid)
        assert spool.stat().st_uid == _nobody().pw_uid


@root_only
@pytest.mark.anyio
async def test_a_spool_the_user_cannot_reach_fails_the_start_clearly(tmp_path: Path) -> None:
    config = Config(sinks=({"kind": "webhook", "url": "https://127.0.0.1:9/", "spool_dir": str(tmp_path / "s")},),
                    decoder_user="nobody")  # tmp_path is under pytest's private (0700) directory
    with pytest.raises(PrivilegeError, match="out of reach of the decoder process's user nobody"):
        async with DecoderProcess(config):
            pass
