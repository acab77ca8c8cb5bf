"""Which program made an AI call: the OISP ``app`` object, from the process and from the request.

The apps come from a data table (``oisp/data/apps.json``, see its ``_comment`` for the rules) that plugins extend
through the ``oisp_apps`` hook (:class:`~oisp.hookspecs.ProviderSpec`). Two independent sources name an app:

* the **process** (:meth:`AppTable.for_process`): its name, executable path, command line (the script an
  interpreter runs, the npm package's path), macOS bundle id, and those of its ancestors. The innermost app of the
  chain that is not an AI host wins (Claude Code started in VS Code's terminal is Claude Code); an AI host (an
  editor) is named only when nothing more specific is found, and is then kept in ``extra.host_app``;
* the **request** (:meth:`AppTable.for_request`): ``User-Agent`` and the client headers apps send (Copilot's
  ``Editor-Plugin-Version`` and ``Copilot-Integration-Id``, Codex's ``originator``, the ``X-Title`` and
  ``HTTP-Referer`` that agents send to model routers). The version comes from the User-Agent where it says it.

:func:`merge` combines them: the request's app is more specific (the Copilot extension inside VS Code, an agent run
by a generic interpreter); the process's app then stays in ``extra.host_app``. Both are pure functions of their
inputs (sans-io), so they are tested with plain values.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import attrs

from oisp.events import App
from oisp.events.context import ParentProcess, ProcessInfo

__all__ = ["AppSignature", "AppTable", "builtin_signatures", "merge"]

logger = logging.getLogger(__name__)

_APP_FIELDS = ("app_id", "name", "vendor", "category", "type", "is_ai_host")
_INTERPRETERS = frozenset({"node", "nodejs", "bun", "deno", "python", "python3", "pythonw", "uv", "uvx", "npx",
                           "pipx"})
#: Headers an app signature may look at (others are never read: they can hold credentials).
_HEADER_LIMIT = 512


@attrs.frozen(kw_only=True)
class AppSignature:
    """One app and how to recognise it (see ``oisp/data/apps.json`` for the meaning of each rule)."""

    app_id: str
    name: str
    vendor: str | None = None
    category: str | None = None
    type: str | None = None
    is_ai_host: bool = False
    process_names: tuple[str, ...] = ()
    exe_contains: tuple[str, ...] = ()
    cmdline_contains: tuple[str, ...] = ()
    script_names: tuple[str, ...] = ()
    bundle_ids: tuple[str, ...] = ()
    user_agent: tuple[re.Pattern[str], ...] = ()
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> AppSignature:
        """A signature from a table entry (``{"app_id", "name", ..., "match": {...}}``); raises ValueError."""
        if not isinstance(entry.get("app_id"), str) or not isinstance(entry.get("name"), str):
            raise ValueError(f"app entry {entry!r}: app_id and name (strings) are required")
        match = entry.get("match") or {}
        if not isinstance(match, Mapping):
            raise ValueError(f"app {entry['app_id']!r}: match must be a table")

        def strings(key: str, lower: bool = False) -> tuple[str, ...]:
            value = match.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"app {entry['app_id']!r}: match.{key} must be a list of strings")
            return tuple(v.lower() if lower else v for v in value)

        headers = match.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError(f"app {entry['app_id']!r}: match.headers must map header names to patterns")
        try:
            user_agent = tuple(re.compile(p) for p in strings("user_agent"))
            header_rules = tuple((str(k).lower(), re.compile(v)) for k, v in headers.items())
        except re.error as exc:
            raise ValueError(f"app {entry['app_id']!r}: invalid pattern: {exc}") from None
        return cls(
            app_id=entry["app_id"], name=entry["name"], vendor=_str(entry.get("vendor")),
            category=_str(entry.get("category")), type=_str(entry.get("type")),
            is_ai_host=entry.get("is_ai_host") is True, process_names=strings("process_names", lower=True),
            exe_contains=strings("exe_contains"), cmdline_contains=strings("cmdline_contains"),
            script_names=strings("script_names", lower=True), bundle_ids=strings("bundle_ids"),
            user_agent=user_agent, headers=header_rules,
        )

    def app(self, *, version: str | None = None, bundle_id: str | None = None, source: str) -> App:
        """The OISP ``app`` for this signature (``extra.identified_by`` says which source named it)."""
        return App(app_id=self.app_id, name=self.name, vendor=self.vendor, category=self.category, type=self.type,
                   version=version, bundle_id=bundle_id, tier="identified", is_ai_app=not self.is_ai_host or None,
                   is_ai_host=self.is_ai_host or None, extra={"identified_by": source})

    # --- matching ------------------------------------------------------------------------------------
    def matches_process(self, name: str | None, exe: str | None, cmdline: str | None,
                        bundle_id: str | None) -> bool:
        if bundle_id and bundle_id in self.bundle_ids:
            return True
        if exe and any(part in exe for part in self.exe_contains):
            return True
        for candidate in (name, os.path.basename(exe) if exe else None):
            if candidate and _program(candidate) in self.process_names:
                return True
        if cmdline:
            if any(part in cmdline for part in self.cmdline_contains):
                return True
            if self.script_names:
                script = _script_of(cmdline)
                if script is not None and script in self.script_names:
                    return True
        return False

    def match_request(self, user_agent: str | None, headers: Mapping[str, str]) -> tuple[bool, str | None]:
        """(matches?, the version the User-Agent gives)."""
        if user_agent:
            for pattern in self.user_agent:
                found = pattern.search(user_agent)
                if found is not None:
                    return True, found.groupdict().get("version")
        for header, pattern in self.headers:
            value = headers.get(header)
            if value is not None and pattern.search(value[:_HEADER_LIMIT]):
                return True, None
        return False, None


def _program(name: str) -> str:
    return name.lower().removesuffix(".exe")


def _script_of(cmdline: str) -> str | None:
    """The script an interpreter runs (``node /usr/lib/node_modules/.bin/gemini`` -> ``gemini``), lower case."""
    words = cmdline.split()
    if len(words) < 2 or _program(os.path.basename(words[0])).rstrip("0123456789.") not in _INTERPRETERS:
        return None
    for word in words[1:]:
        if word.startswith("-"):
            continue
        base = _program(os.path.basename(word))
        return base.removesuffix(".py").removesuffix(".mjs").removesuffix(".cjs")
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@lru_cache(maxsize=1)
def builtin_signatures() -> tuple[AppSignature, ...]:
    """The apps oisp ships (``oisp/data/apps.json``)."""
    text = resources.files("oisp.data").joinpath("apps.json").read_text(encoding="utf-8")
    return tuple(AppSignature.from_mapping(entry) for entry in json.loads(text)["apps"])


class AppTable:
    """Recognises apps from processes and requests. Plugin signatures come first (they may refine a built-in)."""

    def __init__(self, signatures: Iterable[AppSignature] | None = None, *, builtins: bool = True) -> None:
        extra = list(signatures or ())
        self.signatures: tuple[AppSignature, ...] = (*extra, *(builtin_signatures() if builtins else ()))

    @classmethod
    def from_plugins(cls, plugins: Any) -> AppTable:
        """The built-in table plus what the plugins' ``oisp_apps`` hooks add (a plugin's bad entry is logged and
        skipped)."""
        extra: list[AppSignature] = []
        for name, result in plugins.call_each("oisp_apps"):
            for entry in result or ():
                try:
                    extra.append(entry if isinstance(entry, AppSignature) else AppSignature.from_mapping(entry))
                except (ValueError, TypeError, AttributeError) as exc:
                    logger.error("plugin %s: app entry skipped: %s", name, exc)
        return cls(extra)

    def for_process(self, process: ProcessInfo, ancestors: Sequence[ParentProcess] = ()) -> App | None:
        """The app of a process and its ancestors (innermost non-host app; else the outermost AI host)."""
        chain: list[tuple[str | None, str | None, str | None, str | None]] = [
            (process.name, process.exe, process.cmdline, process.bundle_id)]
        chain += [(a.name, a.exe, a.cmdline, None) for a in ancestors]
        agent: tuple[AppSignature, str | None] | None = None
        host: tuple[AppSignature, str | None] | None = None
        for name, exe, cmdline, bundle_id in chain:
            signature = next((s for s in self.signatures if s.matches_process(name, exe, cmdline, bundle_id)), None)
            if signature is None:
                continue
            if not signature.is_ai_host:
                agent = agent or (signature, bundle_id)  # the innermost app
            else:
                host = (signature, bundle_id)  # the outermost host
        if agent is not None:
            app = agent[0].app(bundle_id=agent[1], source="process")
            if host is not None:
                app = attrs.evolve(app, extra={**app.extra, "host_app": host[0].app_id})
            return app
        return host[0].app(bundle_id=host[1], source="process") if host is not None else None

    def for_request(self, headers: Mapping[str, str] | Any) -> App | None:
        """The app a request's headers name (``headers`` with a case-insensitive ``get``), or None."""
        user_agent = headers.get("user-agent")
        for signature in self.signatures:
            matched, version = signature.match_request(user_agent, headers)
            if matched:
                return signature.app(version=version, source="request")
        return None


def merge(process_app: App | None, request_app: App | None) -> App | None:
    """The app of an exchange: the request's when it names one more specific than the process's (the process's
    app id then kept in ``extra.host_app``), else the process's (given the request's version when the same app)."""
    if request_app is None:
        return process_app
    if process_app is None:
        return request_app
    if process_app.app_id == request_app.app_id:
        if process_app.version is None and request_app.version is not None:
            return attrs.evolve(process_app, version=request_app.version)
        return process_app
    if request_app.is_ai_host and not process_app.is_ai_host:
        return process_app  # the process is an agent inside the editor the request names
    return attrs.evolve(request_app, bundle_id=request_app.bundle_id or process_app.bundle_id,
                        extra={**request_app.extra, "host_app": process_app.app_id})
