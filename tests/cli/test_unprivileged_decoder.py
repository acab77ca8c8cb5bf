"""``oisp run`` as root: decoding happens in a decoder process that runs as ``nobody``, without capabilities."""

from __future__ import annotations

import os
import signal
import ssl
from typing import Any

import httpx
import psutil
import pytest
from tests.cli.conftest import OispProcess, RunningUpstream
from tests.decoder_process.test_privileges import _assert_unprivileged, _nobody

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")


@root_only
def test_oisp_run_as_root_decodes_in_an_unprivileged_process(tmp_path: Any, upstream: RunningUpstream,
                                                            monkeypatch: Any) -> None:
    for name in ("SUDO_UID", "SUDO_GID", "SUDO_USER"):
        monkeypatch.delenv(name, raising=False)
    events_file = tmp_path / "events.jsonl"
    oisp = OispProcess(["run", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"), "--upstream-ca",
                        str(upstream.ca_file), "--resolve", f"api.openai.com:443:127.0.0.1:{upstream.port}",
                        "--stdout", "none", "--output", str(events_file), "--decoder", "process"])
    try:
        (child,) = psutil.Process(oisp.proc.pid).children()
        _assert_unprivileged(child.pid, _nobody().pw_uid)
        assert psutil.Process(oisp.proc.pid).uids().effective == 0  # the proxy keeps what interception needs
        with httpx.Client(proxy=f"http://{oisp.address[0]}:{oisp.address[1]}",
                          verify=ssl.create_default_context(cafile=str(tmp_path / "conf" / "oisp-ca.pem"))) as c:
            r = c.post("https://api.openai.com/v1/chat/completions",
                       json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    finally:
        code, stderr = oisp.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    types = [line for line in events_file.read_text().splitlines()]
    assert sum('"ai.request"' in t for t in types) == 1 and sum('"ai.response"' in t for t in types) == 1
