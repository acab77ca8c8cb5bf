"""Cost in USD from the OISP spec bundle's model prices: lookup rules, arithmetic, the pipeline enricher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.oisp_schema import BUNDLE, SchemaValidator
from tests.providers.fixtures.openai.replay import load, one, replay

from oisp.errors import ConfigurationError
from oisp.events import AiResponse, Confidence, Event, ModelInfo, ProviderInfo, Usage
from oisp.pipeline import Pipeline
from oisp.pricing import PriceBook, PricingEnricher

needs_bundle = pytest.mark.skipif(
    not BUNDLE.is_file(),
    reason=f"the OISP spec bundle is not at {BUNDLE} (set OISP_SPEC_DIR); CI has it beside the repo")


@pytest.fixture(scope="module")
def book() -> PriceBook:
    if not BUNDLE.is_file():
        pytest.skip(f"the OISP spec bundle is not at {BUNDLE}")
    return PriceBook.load(BUNDLE)


def _response(provider: str, model: str, usage: Usage) -> Event:
    return Event.create(AiResponse(provider=ProviderInfo(name=provider), model=ModelInfo(id=model), usage=usage),
                        confidence=Confidence(level="high", completeness="full"))


@needs_bundle
@pytest.mark.parametrize(("provider", "model", "key"), [
    ("openai", "gpt-4o", "openai/gpt-4o"),
    ("openai", "gpt-4o-2024-08-06", "openai/gpt-4o-2024-08-06"),  # the dated entry when the bundle has one
    ("openai", "gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini"),  # else without the date
    ("openai", "o1-2024-12-17", "openai/o1"),
    ("openai", "gpt-4-0613", "openai/gpt-4"),
    ("openai", "GPT-4o", "openai/gpt-4o"),
    ("azure_openai", "gpt-4o-2024-11-20", "azure_openai/gpt-4o"),
    ("azure_openai", "gpt-5-mini", "azure_openai/gpt-5-mini"),
    ("openrouter", "openai/gpt-4o", "openai/gpt-4o"),  # a gateway's vendor/model
    ("openrouter", "anthropic/claude-sonnet-4.5", "openrouter/anthropic/claude-sonnet-4.5"),
    ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "togetherai/meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    ("mistral", "mistral-large-2411", "mistral/mistral-large-2411"),
    ("mistral", "ministral-8b-2410", "mistral/ministral-8b-latest"),
    ("deepseek", "deepseek-reasoner", "deepseek/deepseek-reasoner"),
    ("aws_bedrock", "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
     "aws_bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0"),
    ("google", "models/gemini-1.5-pro", "google/gemini-1.5-pro"),
    ("anthropic", "claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5-20250929"),
    ("fireworks", "accounts/fireworks/models/deepseek-v3p1", "fireworks/accounts/fireworks/models/deepseek-v3p1"),
])
def test_model_ids_are_matched_exactly_then_without_dates_then_by_vendor(
        book: PriceBook, provider: str, model: str, key: str) -> None:
    price = book.lookup(provider, model)
    assert price is not None and price.key == key


@needs_bundle
@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "my-fine-tune-that-does-not-exist"), ("ollama", "llama3:latest"), (None, "gpt-4o"),
    ("lmstudio", "some/local-model"),
])
def test_unknown_models_are_not_priced(book: PriceBook, provider: str | None, model: str) -> None:
    assert book.lookup(provider, model) is None


@needs_bundle
def test_cached_tokens_are_priced_at_the_cache_read_rate(book: PriceBook) -> None:
    # gpt-4o: input 0.0025, cached 0.00125, output 0.01 per 1k tokens
    cost = book.cost("openai", "gpt-4o", Usage(prompt_tokens=2000, completion_tokens=500, cached_tokens=1000))
    assert cost is not None
    assert cost.input_usd == pytest.approx(1000 * 0.0025 / 1000 + 1000 * 0.00125 / 1000)
    assert cost.output_usd == pytest.approx(500 * 0.01 / 1000)
    assert cost.total_usd == pytest.approx(cost.input_usd + cost.output_usd)


@needs_bundle
def test_reasoning_tokens_inside_the_completion_are_not_billed_twice(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=500, reasoning_tokens=400, total_tokens=1500)
    cost = book.cost("openai", "o1", usage)
    assert cost is not None and cost.output_usd == pytest.approx(500 * 0.06 / 1000)


@needs_bundle
def test_reasoning_tokens_counted_beside_the_completion_are_billed_at_the_reasoning_rate(book: PriceBook) -> None:
    usage = Usage(prompt_tokens=14, completion_tokens=2, reasoning_tokens=320, total_tokens=336)
    cost = book.cost("xai", "grok-3-mini", usage)  # output 0.0005, reasoning 0.0005 per 1k
    assert cost is not None and cost.output_usd == pytest.approx(322 * 0.0005 / 1000)


@needs_bundle
def test_cache_writes_use_the_cache_write_rate(book: PriceBook) -> None:
    # claude-sonnet-4-5: input 0.003, cache read 0.0003, cache write 0.00375
    usage = Usage(prompt_tokens=3000, completion_tokens=0, cached_tokens=1000, cache_creation_tokens=1000)
    cost = book.cost("anthropic", "claude-sonnet-4-5", usage)
    assert cost is not None
    assert cost.input_usd == pytest.approx((1000 * 0.003 + 1000 * 0.0003 + 1000 * 0.00375) / 1000)


@needs_bundle
def test_without_a_cache_price_cached_tokens_cost_the_input_rate(book: PriceBook) -> None:
    cost = book.cost("groq", "llama-3.3-70b-versatile", Usage(prompt_tokens=1000, completion_tokens=0,
                                                              cached_tokens=500))
    assert cost is not None and cost.input_usd == pytest.approx(1000 * 0.00059 / 1000)


@needs_bundle
def test_the_enricher_fills_the_usage_costs_of_a_decoded_response(oisp_schema: SchemaValidator) -> None:
    pipeline = Pipeline({}, enrichers=[PricingEnricher.load(BUNDLE)])
    events = [pipeline.process(e) for e in replay(load("openai_chat_vision_tools"))]
    response = one(events, "ai.response")
    usage = response.data.usage
    # gpt-4o-2024-08-06: 266 fresh + 1024 cached prompt tokens, 17 completion tokens
    assert usage.input_cost_usd == pytest.approx((266 * 0.0025 + 1024 * 0.00125) / 1000)
    assert usage.output_cost_usd == pytest.approx(17 * 0.01 / 1000)
    assert usage.total_cost_usd == pytest.approx(usage.input_cost_usd + usage.output_cost_usd)
    assert response.attrs["oisp.pricing.model"] == "openai/gpt-4o-2024-08-06"
    for event in events:
        oisp_schema.assert_valid(event.to_dict())


@needs_bundle
def test_the_enricher_prices_azure_deployments_by_the_answering_model_and_embeddings() -> None:
    enricher = PricingEnricher.load(BUNDLE)
    azure = one([enricher(e) for e in replay(load("azure_chat_stream"))], "ai.response")
    assert azure.attrs["oisp.pricing.model"] == "azure_openai/gpt-4o"
    assert azure.data.usage.total_cost_usd > 0
    embedding = one([enricher(e) for e in replay(load("openai_embeddings_float"))], "ai.embedding")
    assert embedding.data.extra["total_cost_usd"] == pytest.approx(14 * 0.00002 / 1000)


@needs_bundle
def test_the_enricher_leaves_unpriceable_and_already_priced_events_alone() -> None:
    enricher = PricingEnricher.load(BUNDLE)
    request = replay(load("openai_chat_vision_tools"))[0]
    assert enricher(request) is request
    unknown = _response("openai", "no-such-model", Usage(prompt_tokens=10, completion_tokens=1))
    assert enricher(unknown) is unknown
    no_usage = _response("openai", "gpt-4o", Usage())
    assert enricher(no_usage) is no_usage
    priced = _response("openai", "gpt-4o", Usage(prompt_tokens=10, completion_tokens=1, total_cost_usd=9.0))
    assert enricher(priced) is priced
    error = one(replay(load("openai_chat_error_401")), "ai.response")
    assert enricher(error) is error


def test_a_bundle_that_cannot_be_used_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        PriceBook.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="not JSON"):
        PriceBook.load(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"version": "1"}))
    with pytest.raises(ConfigurationError, match="no 'models' table"):
        PricingEnricher.load(tmp_path / "empty.json")


def test_a_small_bundle_without_the_spec() -> None:
    book = PriceBook({"openai/gpt-x": {"input_cost_per_1k": 0.001, "output_cost_per_1k": 0.002},
                      "openai/free": {"mode": "chat"}, "broken": "not a table"})
    assert len(book) == 1 and book.lookup("openai", "free") is None
    cost = book.cost("openai", "gpt-x-2025-01-01", Usage(prompt_tokens=1000, completion_tokens=1000))
    assert cost is not None and (cost.input_usd, cost.output_usd, cost.total_usd) == (0.001, 0.002, 0.003)


def test_the_shipped_prices_are_the_spec_bundles_and_price_calls_out_of_the_box() -> None:
    shipped = PriceBook.packaged()
    assert len(shipped) > 1000
    usage = Usage(prompt_tokens=1000, completion_tokens=1000)
    cost = shipped.cost("openai", "gpt-4o-2024-08-06", usage)
    assert cost is not None and cost.input_usd > 0 and cost.output_usd > cost.input_usd
    event = PricingEnricher.load()(_response("anthropic", "claude-3-5-haiku-20241022", usage))
    assert event.data.usage.total_cost_usd  # type: ignore[attr-defined]
    site_bundle = BUNDLE.parent.parent.parent / "site" / "spec" / "v0.1" / "bundle.json"
    if site_bundle.is_file():  # the shipped table is the site bundle's, prices only
        models = json.loads(site_bundle.read_text())["models"]
        entry = models["openai/gpt-4o"]
        assert shipped.lookup("openai", "gpt-4o").input == entry["input_cost_per_1k"]  # type: ignore[union-attr]


def test_runs_price_calls_unless_pricing_is_turned_off(tmp_path: Path) -> None:
    from oisp.config import load_config
    from oisp.decode_setup import build_pipeline
    from oisp.plugins import create_plugin_manager

    plugins = create_plugin_manager()
    config = tmp_path / "oisp.toml"
    config.write_text("")
    pipeline = build_pipeline(plugins, load_config(config))
    assert any(isinstance(e, PricingEnricher) for e in pipeline._enrichers)
    config.write_text("[pricing]\nenabled = false\n")
    pipeline = build_pipeline(plugins, load_config(config))
    assert not any(isinstance(e, PricingEnricher) for e in pipeline._enrichers)
    config.write_text('[pricing]\nenabled = "yes"\n')
    with pytest.raises(ConfigurationError, match="pricing.enabled"):
        load_config(config)
