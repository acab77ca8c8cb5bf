"""An app's own W3C trace context (``traceparent``) reaches its AI events, so they join the app's traces."""

from __future__ import annotations

import httpx
import pytest
from tests.stack import Stack

from oisp.event_decoder import trace_context_of
from oisp.events import TraceContext

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_requests_traceparent_is_on_every_event_of_its_exchange(stack: Stack) -> None:
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
        r = client.post("https://api.openai.com/v1/chat/completions", headers={"traceparent": TRACEPARENT},
                        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        r = client.post("https://api.openai.com/v1/chat/completions",
                        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "no trace"}]})
    events = stack.wait_for(lambda ev: len([e for e in ev if e.event_type == "ai.response"]) >= 2)
    traced = [e for e in events if e.trace_context is not None]
    assert {e.event_type for e in traced} == {"ai.request", "ai.response"}
    assert all(e.trace_context == TraceContext(trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                                               span_id="00f067aa0ba902b7", trace_flags=1) for e in traced)
    untraced = [e for e in events if e.event_type == "ai.request" and e.trace_context is None]
    assert [e.data.model.id for e in untraced] == ["gpt-4o"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("header", [
    None, "", "garbage", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
    "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
])
def test_malformed_traceparents_are_ignored(header: str | None) -> None:
    assert trace_context_of(header) is None


def test_a_later_version_with_more_fields_is_read() -> None:
    context = trace_context_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later")
    assert context == TraceContext(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
                                   trace_flags=0)
