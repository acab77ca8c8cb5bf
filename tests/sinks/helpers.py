"""Helpers of the network sinks' tests: events that differ, and waiting on a condition with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

from oisp.events import AiRequest, Confidence, Event, Host, Message, ModelInfo, ProcessInfo, ProviderInfo

FULL = Confidence(level="high", completeness="full")


def make_event(i: int, *, pid: int = 4242, hostname: str = "build-7") -> Event:
    """An ``ai.request`` event numbered ``i`` (in its request id and prompt), with host and process context."""
    return Event.create(
        AiRequest(request_id=f"req_{i:06d}", provider=ProviderInfo(name="openai"), model=ModelInfo(id="gpt-4o"),
                  request_type="chat", messages=[Message(role="user", content=f"What is {i} + {i}?")],
                  messages_count=1),
        confidence=FULL,
        host=Host(hostname=hostname),
        process=ProcessInfo(pid=pid, name="agent"),
    )


def make_events(start: int, count: int) -> list[Event]:
    return [make_event(i) for i in range(start, start + count)]


def wait_until(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
