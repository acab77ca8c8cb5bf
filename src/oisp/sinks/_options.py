"""Strict option checks shared by the network sinks (``kafka``, ``webhook``): every error names the option."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from oisp.errors import ConfigurationError

__all__ = ["Options"]


class Options:
    """Reads a sink's ``[[sinks]]`` table (without ``kind``): unknown keys and wrong types are errors naming them."""

    def __init__(self, kind: str, options: Mapping[str, Any], allowed: Collection[str]) -> None:
        self.kind = kind
        unknown = set(options) - set(allowed)
        if unknown:
            raise ConfigurationError(
                f"sinks.{kind}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        self._options = {key: value for key, value in options.items() if value is not None}

    def name(self, key: str) -> str:
        return f"sinks.{self.kind}.{key}"

    def has(self, key: str) -> bool:
        return key in self._options

    def string(self, key: str, default: str | None = None, *, required: str | None = None) -> str | None:
        value = self._options.get(key, default)
        if value is None:
            if required is not None:
                raise ConfigurationError(f"{self.name(key)}: required ({required})")
            return None
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{self.name(key)}: {value!r} must be a non-empty string")
        return value

    def choice(self, key: str, default: str, choices: Collection[str]) -> str:
        value = self._options.get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise ConfigurationError(f"{self.name(key)}: {value!r} must be one of {sorted(choices)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self._options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigurationError(f"{self.name(key)}: {value!r} must be an integer >= {minimum}")
        return value

    def seconds(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._options.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                or value < 0 or (value == 0 and not allow_zero)):
            raise ConfigurationError(
                f"{self.name(key)}: {value!r} must be a {'' if allow_zero else 'positive '}number of seconds"
                + (" (>= 0)" if allow_zero else "")
            )
        return float(value)

    def table(self, key: str, value_types: tuple[type, ...]) -> dict[str, Any]:
        """A table of string keys whose values have one of ``value_types`` (bool is only allowed if listed)."""
        value = self._options.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{self.name(key)}: {value!r} must be a table")
        out: dict[str, Any] = {}
        names = "/".join(t.__name__ for t in value_types)
        for item_key, item in value.items():
            if not isinstance(item_key, str) or not item_key:
                raise ConfigurationError(f"{self.name(key)}: key {item_key!r} must be a non-empty string")
            if (isinstance(item, bool) and bool not in value_types) or not isinstance(item, value_types):
                raise ConfigurationError(f"{self.name(key)}.{item_key}: {item!r} must be a {names}")
            out[item_key] = item
        return out
