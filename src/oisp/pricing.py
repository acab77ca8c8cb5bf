"""Cost in USD of AI calls, from the model prices in an OISP spec bundle.

oisp ships the prices of the OISP spec bundle's ``models`` table as package data (``oisp/data/model_prices.json``,
Apache-2.0, see its NOTICE), so costs work out of the box (:meth:`PriceBook.packaged`); a newer bundle given with
``--pricing`` or ``[pricing] bundle`` replaces them.

The OISP spec publishes a bundle (``spec/v0.1/bundle.json``; the website's newer bundle has the same
``models`` table) whose ``models`` map ``provider/model`` to prices per 1,000 tokens: ``input_cost_per_1k``,
``output_cost_per_1k`` and, for some models, ``cache_read_cost_per_1k``, ``cache_write_cost_per_1k`` and
``reasoning_cost_per_1k``. :class:`PricingEnricher`, a pipeline enricher, fills ``usage.input_cost_usd``,
``output_cost_usd`` and ``total_cost_usd`` of every ``ai.response`` whose model it can price (and a
``total_cost_usd`` in ``ai.embedding`` data), and names the price it used in ``attrs["oisp.pricing.model"]``.

Usage is read the OpenAI way: ``prompt_tokens`` counts every input token, the ``cached_tokens`` read from a
prompt cache and the ``cache_creation_tokens`` written to one included; they are priced at the cache rates
when the bundle has them. Reasoning tokens are part of ``completion_tokens``, unless ``total_tokens`` shows
they were counted beside it (then they are priced as reasoning, or output, tokens).

Model ids are matched in this order, under each bundle provider that stands for the event's provider (Azure
OpenAI falls back to OpenAI's prices, Together is ``togetherai``, Vertex is ``google_vertex``...): the id as
given, then without a ``models/`` prefix, an Ollama/Hugging Face ``:tag`` or a Bedrock region prefix, then
without a date or version suffix (``gpt-4o-2024-08-06`` → ``gpt-4o``), then with ``-latest``; gateways
(OpenRouter, Hugging Face, Together...) that name models ``vendor/model`` are then looked up under the vendor.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from oisp.errors import ConfigurationError
from oisp.events import AiEmbedding, AiResponse, Event, Usage

__all__ = ["Cost", "ModelPrice", "PriceBook", "PricingEnricher"]

logger = logging.getLogger(__name__)

#: oisp provider name -> the bundle's provider names to look under, in order.
_PROVIDER_ALIASES: Mapping[str, tuple[str, ...]] = {
    "azure_openai": ("azure_openai", "openai"),
    "together": ("togetherai", "together"),
    "google": ("google", "google_vertex"),
    "vertex": ("google_vertex", "google"),
    "aws_bedrock": ("aws_bedrock",),
    "huggingface": ("huggingface",),
    "lmstudio": ("lmstudio",),
}
#: Vendors that a gateway's ``vendor/model`` ids name, as bundle providers.
_VENDORS: Mapping[str, str] = {
    "openai": "openai", "anthropic": "anthropic", "google": "google", "mistralai": "mistral", "mistral": "mistral",
    "deepseek": "deepseek", "deepseek-ai": "deepseek", "x-ai": "xai", "xai": "xai", "cohere": "cohere",
    "meta-llama": "llama", "perplexity": "perplexity", "qwen": "alibaba",
}
_DATE_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|@\d{8}|-v\d+(?::\d+)?)$")
_BEDROCK_REGION = re.compile(r"^(?:us|eu|apac|au|ca|jp|us-gov|global)\.")


@attrs.frozen
class ModelPrice:
    """One model's prices in USD per 1,000 tokens (None: the bundle does not say)."""

    #: The bundle key (``openai/gpt-4o``).
    key: str
    input: float | None
    output: float | None
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None


@attrs.frozen
class Cost:
    """What a call cost in USD."""

    input_usd: float
    output_usd: float
    price: ModelPrice

    @property
    def total_usd(self) -> float:
        return _round(self.input_usd + self.output_usd)


def _round(value: float) -> float:
    return round(value, 10)


def _price(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _model_variants(model: str) -> Iterator[str]:
    """Spellings of a model id to try, most specific first."""
    seen: set[str] = set()
    bases = [model, model.lower()]
    for base in list(bases):
        stripped = base.removeprefix("models/")
        stripped = _BEDROCK_REGION.sub("", stripped)
        bases.append(stripped)
        if ":" in stripped and not stripped.endswith((":0", ":1", ":2")):
            bases.append(stripped.split(":", 1)[0])
    for base in bases:
        candidates = [base]
        undated = base
        while True:
            shorter = _DATE_SUFFIX.sub("", undated)
            if shorter == undated or not shorter:
                break
            undated = shorter
            candidates.append(undated)
        candidates.append(undated + "-latest")
        for candidate in candidates:
            if candidate not in seen:
                seen.add(candidate)
                yield candidate


class PriceBook:
    """The model prices of a spec bundle, with the lookup rules of this module."""

    def __init__(self, models: Mapping[str, Mapping[str, Any]]) -> None:
        self._prices: dict[str, ModelPrice] = {}
        for key, entry in models.items():
            if not isinstance(entry, Mapping):
                continue
            price = ModelPrice(key=key, input=_price(entry.get("input_cost_per_1k")),
                               output=_price(entry.get("output_cost_per_1k")),
                               cache_read=_price(entry.get("cache_read_cost_per_1k")),
                               cache_write=_price(entry.get("cache_write_cost_per_1k")),
                               reasoning=_price(entry.get("reasoning_cost_per_1k")))
            if price.input is not None or price.output is not None:
                self._prices[key] = price
                self._prices.setdefault(key.lower(), price)
        self.lookup = functools.lru_cache(maxsize=4096)(self._lookup)

    @classmethod
    def load(cls, path: str | Path) -> PriceBook:
        """Read a bundle file; a missing, unreadable or model-less file is a :class:`ConfigurationError`."""
        path = Path(path).expanduser()
        try:
            bundle = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"pricing.bundle: cannot read {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"pricing.bundle: {path} is not JSON: {exc}") from None
        models = bundle.get("models") if isinstance(bundle, Mapping) else None
        if not isinstance(models, Mapping) or not models:
            raise ConfigurationError(f"pricing.bundle: {path} has no 'models' table; give an OISP spec bundle "
                                     "(spec/v0.1/bundle.json)")
        book = cls(models)
        logger.info("pricing: %d priced models from %s", len(book), path)
        return book

    @classmethod
    def packaged(cls) -> PriceBook:
        """The prices oisp ships (the spec bundle's ``models`` table, prices only)."""
        return _packaged_book()

    def __len__(self) -> int:
        return len({p.key for p in self._prices.values()})

    def _lookup(self, provider: str | None, model: str) -> ModelPrice | None:
        """The price of ``model`` as ``provider`` serves it, or None."""
        providers = list(_PROVIDER_ALIASES.get(provider or "", (provider,) if provider else ()))
        for name in providers:
            for variant in _model_variants(model):
                price = self._prices.get(f"{name}/{variant}")
                if price is not None:
                    return price
        if "/" in model:  # a gateway's vendor/model id
            vendor, _, rest = model.partition("/")
            vendor_provider = _VENDORS.get(vendor.lower(), vendor.lower())
            for variant in _model_variants(rest):
                price = self._prices.get(f"{vendor_provider}/{variant}")
                if price is not None:
                    return price
            return self._lookup(None, rest) if provider else None
        return None

    def cost(self, provider: str | None, model: str, usage: Usage) -> Cost | None:
        """The cost of one call, or None when the model is unknown or the usage says too little."""
        price = self.lookup(provider, model)
        if price is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
            return None
        prompt = usage.prompt_tokens or 0
        cached = min(usage.cached_tokens or 0, prompt)
        written = min(usage.cache_creation_tokens or 0, prompt - cached)
        fresh = prompt - cached - written
        rate_in = price.input or 0.0
        input_usd = (fresh * rate_in + cached * (price.cache_read if price.cache_read is not None else rate_in)
                     + written * (price.cache_write if price.cache_write is not None else rate_in)) / 1000
        completion = usage.completion_tokens or 0
        rate_out = price.output or 0.0
        output_usd = completion * rate_out / 1000
        reasoning = usage.reasoning_tokens or 0
        if reasoning and usage.total_tokens is not None and usage.total_tokens >= prompt + completion + reasoning:
            rate = price.reasoning if price.reasoning is not None else rate_out
            output_usd += reasoning * rate / 1000  # counted beside the completion, billed on top of it
        return Cost(_round(input_usd), _round(output_usd), price)


class PricingEnricher:
    """A pipeline enricher (``Pipeline(enrichers=[PricingEnricher.load(path)])``) that prices AI calls."""

    def __init__(self, book: PriceBook) -> None:
        self.book = book

    @classmethod
    def load(cls, path: str | Path | None = None) -> PricingEnricher:
        """An enricher with the prices of the bundle at ``path`` (None: the prices oisp ships)."""
        return cls(PriceBook.packaged() if path is None else PriceBook.load(path))

    def __call__(self, event: Event) -> Event:
        data = event.data
        if isinstance(data, AiResponse):
            return self._response(event, data)
        if isinstance(data, AiEmbedding):
            return self._embedding(event, data)
        return event

    def _response(self, event: Event, data: AiResponse) -> Event:
        usage = data.usage
        if usage is None or usage.total_cost_usd is not None or data.model is None or not data.model.id:
            return event
        provider = data.provider.name if data.provider is not None else None
        cost = self.book.cost(provider, data.model.id, usage)
        if cost is None:
            return event
        priced = attrs.evolve(usage, input_cost_usd=cost.input_usd, output_cost_usd=cost.output_usd,
                              total_cost_usd=cost.total_usd)
        return attrs.evolve(event, data=attrs.evolve(data, usage=priced),
                            attrs={**(event.attrs or {}), "oisp.pricing.model": cost.price.key})

    def _embedding(self, event: Event, data: AiEmbedding) -> Event:
        if data.model is None or not data.model.id or data.total_tokens is None or "total_cost_usd" in data.extra:
            return event
        provider = data.provider.name if data.provider is not None else None
        cost = self.book.cost(provider, data.model.id, Usage(prompt_tokens=data.total_tokens))
        if cost is None:
            return event
        return attrs.evolve(event, data=attrs.evolve(data, extra={**data.extra, "total_cost_usd": cost.total_usd}),
                            attrs={**(event.attrs or {}), "oisp.pricing.model": cost.price.key})


@functools.lru_cache(maxsize=1)
def _packaged_book() -> PriceBook:
    from importlib.resources import files

    text = files("oisp").joinpath("data/model_prices.json").read_text(encoding="utf-8")
    return PriceBook(json.loads(text)["models"])
