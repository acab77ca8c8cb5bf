from __future__ import annotations

import httpx
from tests.stack import Stack


def test_httpx_h1_through_explicit_proxy(stack: Stack) -> None:
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context()) as client:
        r = client.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
    assert r.status_code == 200
    assert r.json()["path"] == "/v1/chat/completions"
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    print([e.event_type for e in events])
    assert {e.event_type for e in events} >= {"network.connect", "ai.request", "ai.response"}


def test_httpx_h2_through_explicit_proxy(stack: Stack) -> None:
    with httpx.Client(proxy=stack.proxy_url, verify=stack.client_context(), http2=True) as client:
        r = client.post("https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
    assert r.status_code == 200
    assert r.http_version == "HTTP/2"
    events = stack.wait_for(lambda ev: any(e.event_type == "ai.response" for e in ev))
    assert {e.event_type for e in events} >= {"network.connect", "ai.request", "ai.response"}
