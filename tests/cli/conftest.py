from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio.from_thread
import pytest
import trustme
from tests.upstream import Upstream, json_ok, server_context

OISP = [sys.executable, "-m", "oisp.cli.main"]


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


class RunningUpstream:
    def __init__(self, upstream: Upstream, port: int, ca_file: Path) -> None:
        self.upstream, self.port, self.ca_file = upstream, port, ca_file


@pytest.fixture
def upstream(tmp_path: Path, test_ca: trustme.CA) -> Iterator[RunningUpstream]:
    ca_file = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(ca_file))
    server = Upstream(server_context(test_ca.issue_cert("api.openai.com", "api.anthropic.com")), json_ok)
    with anyio.from_thread.start_blocking_portal() as portal:
        future, port = portal.start_task(server.serve)
        yield RunningUpstream(server, port, ca_file)
        future.cancel()


class OispProcess:
    """``oisp run`` as a real subprocess; knows where it listens once it said so on stderr."""

    def __init__(self, args: list[str], **popen: object) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen([*OISP, *args], stderr=subprocess.PIPE, text=True, env=env, **popen)  # type: ignore[call-overload]
        self.stderr_lines: list[str] = []
        self.address = self._wait_for_address()

    def _wait_for_address(self) -> tuple[str, int]:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            match = re.search(r"listening on ([\d.]+):(\d+)", line)
            if match:
                return match.group(1), int(match.group(2))
        raise AssertionError("oisp exited before listening:\n" + "".join(self.stderr_lines))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = out or ""
        return self.proc.returncode, "".join(self.stderr_lines) + err
