"""Helpers for the activity tests: a collector of emitted events that can be waited on, and an agent process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from oisp.activity import Activity
from oisp.events import Event

needs_root_linux = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="the kernel's process events (CN_PROC) and fanotify need Linux and root; CI runs these as root",
)

AGENT_CODE = """
import json, sys
for line in sys.stdin:
    exec(json.loads(line))
    print("done", flush=True)
"""


class Collector:
    """Records emitted events; :meth:`wait_for` waits (on each emit, not on a timer) for a condition."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = anyio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, condition: Callable[[list[Event]], bool], timeout: float = 20) -> None:
        with anyio.fail_after(timeout):
            while not condition(self.events):
                self._changed = anyio.Event()
                await self._changed.wait()

    def of(self, kind: str, **where: object) -> list[Event]:
        """Events of ``kind`` whose dict form has ``where`` at the dotted paths given (``process__pid=1``)."""
        found = []
        for event in self.events:
            if event.event_type != kind:
                continue
            raw = event.to_dict()
            if all(_at(raw, key.split("__")) == value for key, value in where.items()):
                found.append(event)
        return found


def _at(raw: object, path: list[str]) -> object:
    for part in path:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(part)
    return raw


class AgentProcess:
    """A Python process that runs the code it is sent, one line of JSON at a time, and says ``done``."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=cwd, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def run(self, code: str) -> int:
        """Run ``code`` in the agent; returns the monotonic time (ns) after it finished."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        line = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        assert line.strip() == "done", f"the agent failed running {code!r}"
        return time.monotonic_ns()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


async def caught_up(activity: Activity, after: int, timeout: float = 20) -> None:
    """Wait until every kernel event before ``after`` (monotonic ns) has been read and emitted."""
    with anyio.fail_after(timeout):
        while activity.watermark_ns() < after:
            await anyio.sleep(0.005)  # polls the watermark (a condition), it does not stand in for one
