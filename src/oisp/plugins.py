"""Plugin discovery and isolated hook calls.

:func:`create_plugin_manager` builds the ``pluggy.PluginManager("oisp")`` with the hook contract of
:mod:`oisp.hookspecs`, registers oisp's built-in providers and sinks through the same hooks a third party uses,
and loads third-party plugins from the ``oisp.providers`` and ``oisp.sinks`` entry point groups.

A plugin that fails, at import or in a hook, is logged with its name and skipped; the others go on.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import attrs
import pluggy

from oisp import hookspecs
from oisp.errors import ConfigurationError, PluginError
from oisp.hookspecs import EndpointSpec, Sink, SinkFactory

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUPS",
    "OispPluginManager",
    "PluginInfo",
    "create_plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUPS = ("oisp.providers", "oisp.sinks")

#: Modules of oisp's own plugins; registered exactly as entry-point plugins are.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "oisp.providers.mcp",
    "oisp.providers.compatible",
    "oisp.providers.coding_agents",
    "oisp.providers.openai",
    "oisp.providers.ollama",
    "oisp.providers.replicate",
    "oisp.providers.anthropic",
    "oisp.providers.google",
    "oisp.providers.cohere",
    "oisp.providers.huggingface",
    "oisp.providers.bedrock",
    "oisp.providers.cursor",
    "oisp.providers.grpc",
    "oisp.providers.metadata",
    "oisp.sinks.builtin",
)


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its registered name and, for entry-point plugins, the distribution that ships it."""

    name: str
    group: str
    package: str | None
    version: str | None
    builtin: bool


class OispPluginManager:
    """The ``pluggy`` plugin manager of oisp, with calls that isolate each plugin's failures."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs.ProviderSpec)
        self.pm.add_hookspecs(hookspecs.SinkSpec)
        self._info: dict[str, PluginInfo] = {}
        self.failures: dict[str, str] = {}

    # registration -------------------------------------------------------------------------------
    def register(self, plugin: object, name: str, *, group: str = "oisp.providers", builtin: bool = False,
                 package: str | None = None, version: str | None = None) -> None:
        """Register a plugin object or module under ``name`` (a second plugin with the same name is an error)."""
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        self.pm.register(plugin, name=name)
        self._info[name] = PluginInfo(name, group, package, version, builtin)

    def load_builtins(self) -> None:
        """Register oisp's own providers and sinks."""
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            group = "oisp.sinks" if ".sinks" in module_name else "oisp.providers"
            self.register(module, module_name, group=group, builtin=True)

    def load_entrypoints(self) -> None:
        """Load every plugin advertised in the ``oisp.providers`` and ``oisp.sinks`` entry point groups.

        A plugin that cannot be imported is logged with its name and recorded in :attr:`failures`.
        """
        for group in ENTRY_POINT_GROUPS:
            for ep in entry_points(group=group):
                self._load_entrypoint(group, ep)

    def _load_entrypoint(self, group: str, ep: EntryPoint) -> None:
        name = f"{group}:{ep.name}"
        if self.pm.has_plugin(name):
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # any import failure of foreign code must not stop oisp
            self.failures[name] = f"{type(exc).__name__}: {exc}"
            logger.error("plugin %s (%s) failed to load: %s", name, ep.value, exc, exc_info=True)
            return
        dist = ep.dist
        self.register(plugin, name, group=group, package=dist.name if dist else None,
                      version=dist.version if dist else None)

    # introspection ------------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin, in registration order."""
        return [self._info[n] for n, _ in self.pm.list_name_plugin() if n in self._info]

    # isolated hook calls ------------------------------------------------------------------------
    def call_each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call one hook on each plugin separately, in pluggy's order, yielding ``(plugin name, result)``.

        A plugin that raises is logged with its name and skipped; ``None`` results are skipped.
        """
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            try:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                logger.error("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc, exc_info=True)
                continue
            if result is not None:
                yield impl.plugin_name, result

    def endpoints(self) -> list[EndpointSpec]:
        """All endpoints every provider plugin declares."""
        found: list[EndpointSpec] = []
        for name, specs in self.call_each("oisp_endpoints"):
            for spec in specs:
                if isinstance(spec, EndpointSpec):
                    found.append(spec)
                else:
                    logger.error("plugin %s returned %r from oisp_endpoints, not an EndpointSpec", name, spec)
        return found

    def sink_types(self) -> dict[str, tuple[str, SinkFactory]]:
        """Sink kind -> (plugin name, factory); the first plugin to offer a kind keeps it."""
        kinds: dict[str, tuple[str, SinkFactory]] = {}
        for name, offered in self.call_each("oisp_sink_types"):
            if not isinstance(offered, Mapping):
                logger.error("plugin %s returned %r from oisp_sink_types, not a mapping", name, offered)
                continue
            for kind, factory in offered.items():
                if kind in kinds:
                    logger.warning("sink kind %r of plugin %s is shadowed by plugin %s", kind, name, kinds[kind][0])
                    continue
                kinds[kind] = (name, factory)
        return kinds

    def check_sink_kinds(self, kinds: Iterable[str]) -> None:
        """Raise PluginError for the first kind no plugin offers (before anything is created or written)."""
        offered = self.sink_types()
        for kind in kinds:
            if kind not in offered:
                raise PluginError(f"unknown sink kind {kind!r}; available: {', '.join(sorted(offered)) or 'none'}")

    def create_sink(self, kind: str, options: Mapping[str, Any] | None = None) -> Sink:
        """Build a sink of ``kind`` from its options; unknown kinds and failing factories raise PluginError."""
        kinds = self.sink_types()
        if kind not in kinds:
            raise PluginError(f"unknown sink kind {kind!r}; available: {', '.join(sorted(kinds)) or 'none'}")
        plugin_name, factory = kinds[kind]
        try:
            sink = factory(dict(options or {}))
        except (PluginError, ConfigurationError):
            raise
        except Exception as exc:
            raise PluginError(f"sink {kind!r} (plugin {plugin_name}) could not be created: {exc}") from exc
        if not isinstance(sink, Sink):
            raise PluginError(f"sink {kind!r} (plugin {plugin_name}) returned {sink!r}, which has no write/close")
        return sink


def create_plugin_manager(*, builtins: bool = True, entrypoints: bool = True) -> OispPluginManager:
    """A plugin manager with oisp's built-in plugins and every installed third-party plugin."""
    manager = OispPluginManager()
    if builtins:
        manager.load_builtins()
    if entrypoints:
        manager.load_entrypoints()
    return manager
