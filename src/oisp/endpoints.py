"""The table of AI endpoints: which (host, port) pairs oisp intercepts, and which provider serves them.

There is no core list: each provider plugin declares its own endpoints (``oisp_endpoints``), oisp's built-in
ones too, and the table is built from all of them (:meth:`EndpointTable.from_plugins`) plus the configured hosts.

Host patterns: ``*`` stands for one or more characters inside one DNS label (``*.openai.azure.com`` matches
``myres.openai.azure.com``; ``*-aiplatform.googleapis.com`` matches ``us-central1-aiplatform.googleapis.com``);
it never spans a dot, so a pattern cannot be stretched over other domains. Matching is case-insensitive and
ignores a trailing dot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from oisp.errors import ConfigurationError
from oisp.hookspecs import EndpointSpec

if TYPE_CHECKING:
    from oisp.plugins import OispPluginManager

__all__ = ["EndpointTable", "permitted_domains"]

_LABEL = re.compile(r"^[a-z0-9*_-]+$")


def _normalize(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _compile(pattern: str) -> re.Pattern[str]:
    labels = pattern.split(".")
    if not pattern or any(not label or (":" not in pattern and not _LABEL.match(label)) for label in labels):
        raise ConfigurationError(
            f"endpoints: {pattern!r} is not a host name or pattern (labels of a-z, 0-9, '-', '_', '*')"
        )
    parts = [re.escape(label).replace(r"\*", "[^.]+") for label in labels]
    return re.compile("^" + r"\.".join(parts) + "$")


@attrs.define
class _Entry:
    spec: EndpointSpec
    regex: re.Pattern[str] | None


class EndpointTable:
    """Answers "is this (host, port) an AI endpoint, and whose?"; built from :class:`EndpointSpec` entries."""

    def __init__(self, specs: Iterable[EndpointSpec] = ()) -> None:
        self._exact: dict[tuple[str, int], EndpointSpec] = {}
        self._patterns: list[_Entry] = []
        for spec in specs:
            self.add(spec)

    @classmethod
    def from_plugins(cls, plugins: OispPluginManager | None = None) -> EndpointTable:
        """The table of every endpoint the provider plugins declare (oisp's own and the installed ones, unless
        ``plugins`` says otherwise)."""
        if plugins is None:
            from oisp.plugins import create_plugin_manager

            plugins = create_plugin_manager()
        return cls(plugins.endpoints())

    def add(self, spec: EndpointSpec) -> None:
        """Add one endpoint (a later entry for the same exact host and port replaces the earlier one)."""
        host = _normalize(spec.host)
        if not 0 < spec.port < 65536:
            raise ConfigurationError(f"endpoints: port {spec.port!r} of {spec.host!r} must be 1-65535")
        spec = attrs.evolve(spec, host=host)
        if "*" in host:
            self._patterns.append(_Entry(spec, _compile(host)))
        else:
            if ":" not in host:  # validate names; IPv6 literals are taken as they are
                _compile(host)
            self._exact[(host, spec.port)] = spec

    def remove(self, host: str, port: int | None = None) -> int:
        """Remove entries for ``host`` (a name or the exact pattern text), on ``port`` or on any port."""
        host = _normalize(host)
        before = len(self)
        self._exact = {k: v for k, v in self._exact.items() if not (k[0] == host and port in (None, k[1]))}
        self._patterns = [e for e in self._patterns if not (e.spec.host == host and port in (None, e.spec.port))]
        return before - len(self)

    def match(self, host: str | None, port: int) -> EndpointSpec | None:
        """The endpoint serving ``host:port``, or None when it is not an AI endpoint."""
        if not host:
            return None
        host = _normalize(host)
        exact = self._exact.get((host, port))
        if exact is not None:
            return exact
        for entry in self._patterns:
            if entry.spec.port == port and entry.regex is not None and entry.regex.match(host):
                return entry.spec
        return None

    def hosts(self) -> list[EndpointSpec]:
        """Every entry, exact hosts first."""
        return [*self._exact.values(), *(e.spec for e in self._patterns)]

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)


def permitted_domains(specs: Iterable[EndpointSpec], extra: Iterable[str] = ()) -> list[str]:
    """The DNS subtrees a name-constrained CA must permit to cover ``specs`` (and ``extra`` domains).

    A name constraint cannot express a wildcard inside a name, so a pattern is widened to the labels after its
    last ``*``: ``*.openai.azure.com`` -> ``openai.azure.com``, ``bedrock-runtime.*.amazonaws.com`` ->
    ``amazonaws.com``. IP addresses need no entry (the constrained CA permits loopback addresses only).
    """
    domains: set[str] = set()
    for host in [*(spec.host for spec in specs), *extra]:
        host = _normalize(host)
        if not host or ":" in host or host.replace(".", "").isdigit():
            continue
        labels = host.split(".")
        starred = [i for i, label in enumerate(labels) if "*" in label]
        if starred:
            labels = labels[starred[-1] + 1:]
        if labels:
            domains.add(".".join(labels))
    return sorted(domains)
