"""The live view of ``oisp run`` in a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import ssl
import struct
import termios
import time
from pathlib import Path

import attrs
import httpx
import pytest
from tests.cli.conftest import OispProcess, RunningUpstream

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def _read_until(fd: int, predicate: object, timeout: float = 15) -> str:
    text = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate(ANSI.sub("", text)):  # type: ignore[operator]
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                text += os.read(fd, 65536).decode("utf-8", "replace")
            except OSError:
                break
    return ANSI.sub("", text)


def test_live_view_shows_each_call_and_totals_in_a_terminal(tmp_path: Path, upstream: RunningUpstream) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a 200-column terminal
    os.environ.setdefault("TERM", "xterm")
    oisp = OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--upstream-ca",
                        str(upstream.ca_file), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream.port}"],
                       stdout=slave, stdin=slave)
    os.close(slave)
    try:
        verify = ssl.create_default_context(cafile=str(tmp_path / "conf" / "oisp-ca.pem"))
        with httpx.Client(proxy=f"http://{oisp.address[0]}:{oisp.address[1]}", verify=verify) as client:
            r = client.post("https://api.openai.com/v1/chat/completions",
                            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        screen = _read_until(master, lambda text: "gpt-4o-mini" in text and "calls 1" in text)
        assert "AI calls" in screen
        assert "openai" in screen and "gpt-4o-mini" in screen
        assert "calls 1 (openai 1)" in screen
        assert f"[{os.getpid()}]" in screen, screen  # the process column names the client
        code, stderr = oisp.stop(signal.SIGINT)
        assert code == 0, stderr
    finally:
        if oisp.proc.poll() is None:
            oisp.proc.kill()
        os.close(master)


def test_live_view_and_exit_summary_show_pinned_hosts_and_decoding_off(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from oisp.cli.live import LiveView
    from oisp.cli.main import _print_summary
    from oisp.event_decoder import network_connect_event
    from oisp.events.context import ProcessInfo
    from oisp.proxy.report import ConnectionReport, Decision

    view = LiveView(Console(width=200, record=True))
    report = ConnectionReport(connection_id="c1", mode="explicit", client_addr=("127.0.0.1", 5),
                              target_host="api.openai.com", target_port=443, decision=Decision.PINNED_PASSTHROUGH,
                              success=True,
                              process=ProcessInfo(pid=42, name="node", exe="/usr/bin/node"))
    view(network_connect_event(report))
    view(network_connect_event(attrs.evolve(report, decision=Decision.INTERCEPTED)))
    view.console.print(view.render())
    assert "pinned, passed through UNINSPECTED: api.openai.com by node[42] (1)" in view.console.export_text()
    _print_summary({"pipeline": {}, "proxy": {"connections": 2, "decisions": {},
                                              "pinned": ["api.openai.com by node[42]"]}})
    assert "pinned (passed through uninspected): api.openai.com by node[42]" in capsys.readouterr().err
    view.set_status("DECODING IS OFF: the decoder process ended")
    view.console.print(view.render())
    assert "DECODING IS OFF: the decoder process ended" in view.console.export_text()
    _print_summary({"pipeline": {"processed": 1}, "proxy": {"connections": 0, "decisions": {}},
                    "decoder_process": {"overflowed_connections": 0, "lost_connections": 1, "exit_code": -9,
                                        "gave_up": "no restarts are left (5 of 5 used)"}})
    assert "DECODING WAS OFF from some point on: no restarts are left (5 of 5 used)" in capsys.readouterr().err
