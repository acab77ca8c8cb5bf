"""The live view's totals and the one-line output, fed events directly: what a first-time user misread."""

from __future__ import annotations

from rich.console import Console

from oisp.cli.live import LiveView
from oisp.events import AiRequest, AiResponse, Confidence, Event, ModelInfo, ProviderInfo, Usage
from oisp.events.network import Endpoint, NetworkConnect
from oisp.events.spec_gaps import PROVIDER_KEY, conform, provider_name
from oisp.sinks.stdout import format_line

CONFIDENCE = Confidence(level="high", completeness="full")


def _screen(view: LiveView) -> str:
    console = Console(width=200, record=True)
    console.print(view.render())
    return console.export_text()


def _call(provider: str, *, cost: float | None) -> list[Event]:
    request = Event.create(AiRequest(request_id="r1", provider=ProviderInfo(name=provider),
                                     model=ModelInfo(id="m-1")), confidence=CONFIDENCE)
    response = Event.create(AiResponse(request_id="r1", success=True,
                                       usage=Usage(prompt_tokens=3, completion_tokens=4, total_cost_usd=cost)),
                            confidence=CONFIDENCE)
    return [conform(request), conform(response)]


def test_no_cost_is_shown_without_pricing_and_failed_connections_are_counted() -> None:
    view = LiveView()
    for event in _call("openai", cost=None):
        view(event)
    failed = Event.create(NetworkConnect(dest=Endpoint(domain="api.openai.com", port=443), success=False,
                                         error="upstream certificate verification failed"), confidence=CONFIDENCE)
    view(failed)
    view(failed)
    screen = _screen(view)
    assert "calls 1 (openai 1)" in screen and "failed connections 2" in screen
    assert "cost" not in screen.split("calls 1", 1)[1] and "0.00000" not in screen
    for event in _call("openai", cost=0.00042):
        view(event)
    assert "cost $0.00042" in _screen(view)


def test_a_plugins_own_provider_name_stays_visible() -> None:
    request, _ = _call("example-llm", cost=None)
    assert request.data.provider.name == "other"  # type: ignore[attr-defined]  # the schema's enum
    assert request.attrs is not None and request.attrs[PROVIDER_KEY] == "example-llm"
    assert provider_name(request) == "example-llm"
    assert "example-llm" in format_line(request)
    view = LiveView()
    view(request)
    assert "calls 1 (example-llm 1)" in _screen(view)
    known, _ = _call("anthropic", cost=None)
    assert provider_name(known) == "anthropic" and PROVIDER_KEY not in (known.attrs or {})
