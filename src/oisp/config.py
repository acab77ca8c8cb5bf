"""The ``oisp.toml`` configuration file: every option of the runner, validated strictly.

Unknown keys are errors (a typo must not silently do nothing); every error names the key, the value and what
is allowed. Command-line flags override the file. Example::

    [proxy]
    mode = "explicit"              # explicit | reverse | transparent
    listen = "127.0.0.1:8080"
    upstream_ca = "/etc/ssl/corp-ca.pem"
    resolve = ["api.openai.com:443:127.0.0.1:8443"]
    preconnect_idle = 5             # seconds a spare upstream connection waits for the next client (0: off)

    [endpoints]
    add = [{ provider = "openai", host = "llm.corp.example", port = 443 }]
    remove = ["api.x.ai"]

    [interception]
    interfaces = ["eth0"]
    block_quic = true              # drop QUIC (UDP 443) to AI endpoints so that clients fall back to TCP

    [redaction]
    profile = "default"            # default | metadata-only
    patterns = { ticket = "ACME-[0-9]+" }

    [capture]
    body_cap = 16777216
    streaming_chunks = false
    decoder = "process"            # process (a separate decoder process) | inline (in the proxy's event loop)
    decoder_buffer = 33554432      # bytes the decoder process may fall behind the relay
    decoder_cpu = "any"            # any (wherever the scheduler puts it) | last (a CPU of its own, as a batch task)
    decoder_batch_ms = 20          # copies wait at most this long to go to the decoder process together
    decoder_yield_ms = 0           # the decoder process yields the CPU after this much work in one go (0: never)
    decoder_priority = "idle"      # idle (a SCHED_IDLE task while it keeps up; Linux) | normal
    decoder_user = "nobody"        # started as root, the decoder process becomes this user (default: sudo's user)
    decoder_processes = "auto"     # decoder processes sharing the connections (auto: one per CPU beyond the relay)

    [pricing]
    enabled = true                 # costs in USD, from the prices oisp ships
    bundle = "/path/to/oisp-spec/bundle.json"   # optional: a newer bundle's prices instead

    [activity]
    enabled = true                 # processes and files of AI-calling programs (default: on in transparent mode)
    scope = "agents"               # agents (AI-calling processes and their descendants) | all (rate-limited)

    [ca]
    name_constrained = true        # the CA can only vouch for AI endpoints
    extra_domains = ["llm.corp.example"]

    [[sinks]]
    kind = "jsonl"
    path = "~/oisp-events.jsonl"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oisp.errors import ConfigurationError
from oisp.hookspecs import EndpointSpec

__all__ = ["Config", "default_config_path", "load_config"]

MODES = ("explicit", "reverse", "transparent")
PROFILES = ("default", "metadata-only")
DECODERS = ("process", "inline")
DECODER_CPUS = ("last", "any")
#: The most decoder processes oisp starts (each is a Python interpreter with its own pipeline).
MAX_DECODER_PROCESSES = 64
DECODER_PRIORITIES = ("idle", "normal")
ACTIVITY_SCOPES = ("agents", "all")


def default_config_path() -> Path:
    """``oisp.toml`` in the per-user configuration directory (beside the CA)."""
    from oisp.tls.ca import default_confdir

    return default_confdir() / "oisp.toml"


@attrs.frozen(kw_only=True)
class Config:
    """The validated configuration. Every field has the runner's default."""

    mode: str = "explicit"
    listen: str = "127.0.0.1:8080"
    confdir: Path | None = None
    upstream_ca: Path | None = None
    upstream_insecure: bool = False
    resolve: tuple[str, ...] = ()
    reverse_target: str | None = None
    drain_timeout: float = 5.0
    pinned_ttl: float = 300.0
    #: Seconds a spare upstream connection is kept ready for the next client of a host (0: none).
    preconnect_idle: float = 5.0
    endpoints_add: tuple[EndpointSpec, ...] = ()
    endpoints_remove: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    #: Transparent mode: drop QUIC (UDP 443) to AI endpoints so that clients fall back to TCP, and report it.
    block_quic: bool = True
    redaction_profile: str = "default"
    redaction_patterns: Mapping[str, str] = attrs.field(factory=dict)
    body_cap: int | None = None
    streaming_chunks: bool = False
    #: Where decoding, events and sinks run: ``process`` (a separate decoder process, so they never slow the
    #: relay) or ``inline`` (in the proxy's own event loop, one process).
    decoder: str = "process"
    #: How many bytes the decoder process may fall behind the relay before decoding of a connection stops.
    decoder_buffer: int = 32 * 1024 * 1024
    #: Where the decoder process runs: ``last`` (the last CPU oisp may use, as a batch task, away from the relay)
    #: or ``any`` (wherever the scheduler puts it).
    decoder_cpu: str = "any"
    #: Milliseconds copies may wait to go to the decoder process together (a batch wakes it once, so its work does
    #: not land in the middle of every request on a busy machine; events reach the sinks this much later).
    decoder_batch_ms: float = 20.0
    #: Milliseconds of work after which the decoder process yields the CPU to waiting tasks (0: never): a batch
    #: of copies is many milliseconds of work, which otherwise delays the relay or an app waiting for that core.
    decoder_yield_ms: float = 0.0
    #: The decoder process's CPU priority: ``idle`` (Linux ``SCHED_IDLE``: any other task that wakes up on its CPU
    #: runs first, so its batches never delay the relay or the apps; a normal task again while it falls behind:
    #: :mod:`oisp.decoder_process.priority`) or ``normal``.
    decoder_priority: str = "idle"
    #: The unprivileged user a decoder process started as root becomes once its sinks are open (a name or uid);
    #: None: the user who ran ``sudo``, else ``nobody``; ``"root"``: keep root's privileges (not recommended).
    decoder_user: str | None = None
    #: How many decoder processes share the connections (each connection is decoded by one of them, chosen by a
    #: stable hash of its id); None (``"auto"``): one per CPU beyond the relay's, at least one.
    decoder_processes: int | None = None
    #: Price AI calls (``usage.*_cost_usd``): with ``pricing_bundle``, else with the prices oisp ships.
    pricing: bool = True
    #: Bytes of HPACK dynamic table mirrored per direction of an HTTP/2 connection (a sender using more stops the
    #: decoding of that connection).
    hpack_table_cap: int = 256 * 1024
    pricing_bundle: Path | None = None
    #: Use a name-constrained CA that can only vouch for the AI endpoints (and ``ca_extra_domains``).
    ca_name_constrained: bool = False
    ca_extra_domains: tuple[str, ...] = ()
    sinks: tuple[Mapping[str, Any], ...] = ()
    #: Observe agent activity (processes, files): True/False, or None for the mode's default (on in transparent).
    activity: bool | None = None
    activity_scope: str = "agents"
    activity_include_exe: tuple[str, ...] = ()
    activity_exclude_exe: tuple[str, ...] = ()
    #: None: the default list (:data:`oisp.activity.settings.DEFAULT_SENSITIVE_PATHS`)
    activity_sensitive_paths: tuple[str, ...] | None = None
    activity_hash_files: bool = False
    activity_rate_limit: int = 2000
    #: report the outbound connections of agent processes that the proxy does not intercept
    activity_connections: bool = True
    #: watch the agents' working directories for file changes (None: where the kernel gives no file events)
    activity_watch_directories: bool | None = None
    #: Milliseconds an event may wait for what links it (a tool result for the kernel events before its request,
    #: a kernel event for the other sources and the tool calls of its turn) when activity is on.
    activity_link_hold_ms: float = 250.0

    @property
    def activity_enabled(self) -> bool:
        """Whether agent activity is observed: ``[activity] enabled``, by default on in transparent mode."""
        return self.activity if self.activity is not None else self.mode == "transparent"


class _Table:
    """Reads one TOML table, remembering which keys were used so leftovers are reported."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def string(self, key: str, *, choices: tuple[str, ...] | None = None) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigurationError(f"{self.key(key)}: {value!r} must be a string")
        if choices is not None and value not in choices:
            raise ConfigurationError(f"{self.key(key)}: {value!r} is not allowed; allowed: {', '.join(choices)}")
        return value

    def path(self, key: str) -> Path | None:
        value = self.string(key)
        return Path(value).expanduser() if value is not None else None

    def boolean(self, key: str) -> bool | None:
        value = self._get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigurationError(f"{self.key(key)}: {value!r} must be true or false")
        return value

    def number(self, key: str, *, integer: bool = False, zero: bool = False) -> float | int | None:
        value: Any = self._get(key)
        if value is None:
            return None
        ok = isinstance(value, int) or (not integer and isinstance(value, float))
        if isinstance(value, bool) or not ok or value < 0 or (value == 0 and not zero):
            kind = "integer" if integer else "number"
            what = f"{'an' if integer else 'a'} {kind} >= 0" if zero else f"a positive {kind}"
            raise ConfigurationError(f"{self.key(key)}: {value!r} must be {what}")
        number: float | int = value
        return number

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{self.key(key)}: {value!r} must be a list of strings")
        return tuple(value)

    def table(self, key: str) -> _Table | None:
        value = self._get(key)
        return None if value is None else _Table(value, self.key(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            allowed = ", ".join(sorted(self.used))
            raise ConfigurationError(
                f"{self.where or 'oisp.toml'}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")


def _endpoint(value: Any, where: str) -> EndpointSpec:
    table = _Table(value, where)
    provider = table.string("provider")
    host = table.string("host")
    port = table.number("port", integer=True)
    tls = table.boolean("tls")
    table.finish()
    if not provider or not host:
        raise ConfigurationError(f"{where}: provider and host are required, e.g. "
                                 "{ provider = \"openai\", host = \"llm.corp.example\" }")
    if port is not None and not 0 < port < 65536:
        raise ConfigurationError(f"{where}.port: {port!r} must be 1-65535")
    return EndpointSpec(provider, host, int(port or 443), True if tls is None else tls)


def parse_config(data: Mapping[str, Any], *, source: str = "oisp.toml") -> Config:
    """Validate a parsed TOML document."""
    root = _Table(data, "")
    values: dict[str, Any] = {}
    proxy = root.table("proxy")
    if proxy is not None:
        values["mode"] = proxy.string("mode", choices=MODES)
        values["listen"] = proxy.string("listen")
        values["confdir"] = proxy.path("confdir")
        values["upstream_ca"] = proxy.path("upstream_ca")
        values["upstream_insecure"] = proxy.boolean("upstream_insecure")
        values["resolve"] = proxy.strings("resolve")
        values["reverse_target"] = proxy.string("reverse_target")
        values["drain_timeout"] = proxy.number("drain_timeout")
        values["pinned_ttl"] = proxy.number("pinned_ttl")
        values["preconnect_idle"] = proxy.number("preconnect_idle", zero=True)
        proxy.finish()
    endpoints = root.table("endpoints")
    if endpoints is not None:
        added = endpoints._get("add") or []
        if not isinstance(added, list):
            raise ConfigurationError(f"endpoints.add: {added!r} must be a list of tables")
        values["endpoints_add"] = tuple(_endpoint(v, f"endpoints.add[{i}]") for i, v in enumerate(added))
        values["endpoints_remove"] = endpoints.strings("remove")
        endpoints.finish()
    interception = root.table("interception")
    if interception is not None:
        values["interfaces"] = interception.strings("interfaces")
        values["block_quic"] = interception.boolean("block_quic")
        interception.finish()
    redaction = root.table("redaction")
    if redaction is not None:
        values["redaction_profile"] = redaction.string("profile", choices=PROFILES)
        patterns = redaction.table("patterns")
        if patterns is not None:
            values["redaction_patterns"] = {k: patterns.string(k) for k in list(patterns.data)}
            patterns.finish()
        redaction.finish()
    capture = root.table("capture")
    if capture is not None:
        values["body_cap"] = capture.number("body_cap", integer=True)
        values["streaming_chunks"] = capture.boolean("streaming_chunks")
        values["decoder"] = capture.string("decoder", choices=DECODERS)
        values["decoder_buffer"] = capture.number("decoder_buffer", integer=True)
        values["decoder_cpu"] = capture.string("decoder_cpu", choices=DECODER_CPUS)
        values["decoder_batch_ms"] = capture.number("decoder_batch_ms", zero=True)
        values["decoder_yield_ms"] = capture.number("decoder_yield_ms", zero=True)
        values["decoder_priority"] = capture.string("decoder_priority", choices=DECODER_PRIORITIES)
        values["decoder_user"] = capture.string("decoder_user")
        values["decoder_processes"] = _decoder_processes(capture, capture._get("decoder_processes"))
        values["hpack_table_cap"] = capture.number("hpack_table_cap", integer=True)
        capture.finish()
    ca = root.table("ca")
    if ca is not None:
        values["ca_name_constrained"] = ca.boolean("name_constrained")
        values["ca_extra_domains"] = ca.strings("extra_domains")
        ca.finish()
    activity = root.table("activity")
    if activity is not None:
        values["activity"] = activity.boolean("enabled")
        values["activity_scope"] = activity.string("scope", choices=ACTIVITY_SCOPES)
        values["activity_include_exe"] = activity.strings("include_exe")
        values["activity_exclude_exe"] = activity.strings("exclude_exe")
        values["activity_sensitive_paths"] = activity.strings("sensitive_paths")
        values["activity_hash_files"] = activity.boolean("hash_files")
        values["activity_rate_limit"] = activity.number("rate_limit", integer=True)
        values["activity_link_hold_ms"] = activity.number("link_hold_ms", zero=True)
        values["activity_connections"] = activity.boolean("connections")
        values["activity_watch_directories"] = activity.boolean("watch_directories")
        activity.finish()
    pricing = root.table("pricing")
    if pricing is not None:
        values["pricing"] = pricing.boolean("enabled")
        values["pricing_bundle"] = pricing.path("bundle")
        pricing.finish()
    sinks = root._get("sinks")
    if sinks is not None:
        if not isinstance(sinks, list):
            raise ConfigurationError(f"sinks: {sinks!r} must be an array of tables ([[sinks]])")
        parsed = []
        for i, sink in enumerate(sinks):
            if not isinstance(sink, Mapping) or not isinstance(sink.get("kind"), str):
                raise ConfigurationError(f"sinks[{i}]: each sink needs kind = \"jsonl\" (or stdout, or a plugin's)")
            parsed.append(dict(sink))
        values["sinks"] = tuple(parsed)
    root.finish()
    return Config(**{k: v for k, v in values.items() if v is not None})


def load_config(path: Path | None = None, *, required: bool = False) -> Config:
    """Read ``path`` (default :func:`default_config_path`); a missing default file gives the defaults."""
    target = path or default_config_path()
    if not target.exists():
        if required or path is not None:
            raise ConfigurationError(f"config: {str(target)!r} does not exist")
        return Config()
    try:
        data = tomllib.loads(target.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config: {target} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"config: cannot read {target}: {exc.strerror or exc}") from None
    return parse_config(data, source=str(target))


def _decoder_processes(capture: _Table, value: Any) -> int | None:
    """``decoder_processes``: ``"auto"`` (None) or a count from 1 to :data:`MAX_DECODER_PROCESSES`."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DECODER_PROCESSES:
        raise ConfigurationError(f"{capture.key('decoder_processes')}: {value!r} must be \"auto\" or an integer "
                                 f"from 1 to {MAX_DECODER_PROCESSES}")
    return value
