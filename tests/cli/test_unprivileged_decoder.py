"""``oisp run`` as root: decoding happens in a decoder process that runs as ``nobody``, without capabilities."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tests.cli.conftest import OispProcess, RunningUpstream
from tests.decoder_process.test_privileges import _assert_unprivileged, _nobody

import oisp as oisp_package

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")


@root_only
@pytest.mark.parametrize("installation", ["as installed", "private"])
def test_oisp_run_as_root_decodes_in_an_unprivileged_process(tmp_path: Any, upstream: RunningUpstream,
                                                            monkeypatch: Any, installation: str) -> None:
    for name in ("SUDO_UID", "SUDO_GID", "SUDO_USER"):
        monkeypatch.delenv(name, raising=False)
    if installation == "private":
        # oisp installed where the decoder process's user cannot read it once it has dropped its privileges
        # (a virtual environment under /root, a checkout in a 0700 directory): what it needs later must be
        # read before the drop
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        shutil.copytree(Path(oisp_package.__file__).parent, private / "oisp")
        monkeypatch.setenv("PYTHONPATH", str(private))
        found = subprocess.run([sys.executable, "-c", "import oisp; print(oisp.__file__)"], capture_output=True,
                               text=True, check=True).stdout.strip()
        assert found == str(private / "oisp" / "__init__.py")  # the copy is what oisp's processes import
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
