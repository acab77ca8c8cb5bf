"""What the activity monitor observes and how much (``[activity]`` in ``oisp.toml``), and its counters."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable

import attrs

__all__ = ["DEFAULT_SENSITIVE_PATHS", "ActivitySettings", "ActivityStats", "SensitivePaths"]

#: Paths whose opening is reported (``file.open``): glob patterns; ``~`` is any user's home, a pattern without a
#: ``/`` matches the file name in any directory.
DEFAULT_SENSITIVE_PATHS: tuple[str, ...] = (
    "~/.ssh/*",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa",
    "id_ed25519",
    "~/.aws/credentials",
    "~/.aws/config",
    "~/.config/gcloud/*",
    "~/.azure/*",
    "~/.kube/config",
    "~/.docker/config.json",
    "~/.netrc",
    "~/.git-credentials",
    "~/.npmrc",
    "~/.pypirc",
    "~/.config/google-chrome/*/Cookies",
    "~/.config/chromium/*/Cookies",
    "~/.mozilla/firefox/*/cookies.sqlite",
    "~/snap/firefox/common/.mozilla/firefox/*/cookies.sqlite",
    "~/Library/Application Support/Google/Chrome/*/Cookies",
    "~/Library/Cookies/*",
)

_HOME = r"(?:/root|/home/[^/]+|/Users/[^/]+|[A-Za-z]:[\\/]Users[\\/][^\\/]+)"


class SensitivePaths:
    """Matches paths against the sensitive patterns (one compiled expression)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        parts = []
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if "/" not in pattern:
                parts.append(r"(?:.*/)?" + fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(r")\Z"))
                continue
            body = fnmatch.translate(pattern.removeprefix("~")).removeprefix("(?s:").removesuffix(r")\Z")
            # fnmatch's * crosses '/', which is what "~/.ssh/*" should do (keys in subfolders too)
            parts.append((_HOME if pattern.startswith("~") else "") + body)
        self._regex = re.compile("(?:" + "|".join(f"(?:{p})" for p in parts) + r")\Z", re.S) if parts else None
        # what a path's last name must be for the path to possibly match: a pattern's last part when it has no
        # wildcard (fnmatch's * and ? cross '/': a wildcard in the last part can end in any name)
        names: list[str] = []
        self._any_name = False
        for pattern in self.patterns:
            last = pattern.rsplit("/", 1)[-1]
            if "/" not in pattern:
                names.append(fnmatch.translate(last).removeprefix("(?s:").removesuffix(r")\Z"))
            elif any(c in last for c in "*?["):
                self._any_name = True
            else:
                names.append(re.escape(last))
        self._names = re.compile("(?:" + "|".join(names) + r")\Z", re.S) if names else None

    def may_match_name(self, name: str) -> bool:
        """Whether a path whose last name is ``name`` can be sensitive (False: no need to know its directory)."""
        if self._any_name:
            return True
        return self._names is not None and self._names.match(name) is not None

    def __call__(self, path: str) -> bool:
        """Whether ``path`` (absolute) is sensitive."""
        if self._regex is None:
            return False
        return self._regex.match(path.replace(os.sep, "/") if os.sep != "/" else path) is not None


@attrs.frozen(kw_only=True)
class ActivitySettings:
    """How :class:`~oisp.activity.Activity` observes.

    ``scope``: ``agents`` (processes that made an AI call and their descendants) or ``all`` (every process,
    rate-limited to ``rate_limit`` events a second from processes that are not agent processes; the rest are
    counted in :attr:`ActivityStats.rate_limited`). ``include_exe``/``exclude_exe``: executables (a path or a
    base name) that are always agents / never observed. ``sensitive_paths``: glob patterns whose opening is
    reported. ``hash_files``: add the SHA-256 of files written (read after the writer closed them; files over
    ``hash_limit`` bytes are not hashed). ``processes``/``files``: which sources run. ``fork_events``: emit
    ``process.fork`` for forks of observed processes (lineage of children that never exec). ``connections``:
    report the outbound TCP connections of processes in scope that the proxy does not intercept
    (``network.connect``). ``watch_directories``: watch the working directories of agent processes for file
    changes (None: only where the kernel's file events are not available).
    """

    scope: str = attrs.field(default="agents", validator=attrs.validators.in_(("agents", "all")))
    include_exe: tuple[str, ...] = ()
    exclude_exe: tuple[str, ...] = ()
    sensitive_paths: tuple[str, ...] = DEFAULT_SENSITIVE_PATHS
    hash_files: bool = False
    hash_limit: int = 16 * 1024 * 1024
    rate_limit: int = 2000
    processes: bool = True
    files: bool = True
    fork_events: bool = True
    connections: bool = True
    watch_directories: bool | None = None
    max_tracked: int = 65536
    #: seconds between two polls of the process list where the platform has no kernel events (psutil)
    poll_interval: float = 0.25


@attrs.define
class ActivityStats:
    """Counters of the activity monitor (read them any time; they only grow)."""

    #: events handed to ``emit``
    emitted: int = 0
    #: kernel process records read (fork/exec/exit of every process, before the scope filter)
    process_records: int = 0
    #: kernel file events read (before the scope filter)
    file_records: int = 0
    #: outbound connections observed (before the scope filter for flow events; of agent processes when polled)
    connection_records: int = 0
    #: file changes reported by the directory watcher (before attribution)
    watch_records: int = 0
    #: times the kernel said process events were lost (netlink ENOBUFS: its queue overflowed)
    process_overruns: int = 0
    #: times the kernel said file events were lost (FAN_Q_OVERFLOW)
    file_overflows: int = 0
    #: events of non-agent processes not emitted because of ``rate_limit`` (scope ``all``)
    rate_limited: int = 0
    #: events emitted with something /proc could not tell any more (the process was gone)
    partial: int = 0
    #: kernel records that could not be parsed
    malformed: int = 0
    #: processes that could not be tracked because the scope was full (``max_tracked``)
    scope_overflow: int = 0
    #: sources running, by name (``processes: cn_proc``, ``files: fanotify dfid_name_target``, ...)
    sources: dict[str, str] = attrs.field(factory=dict)
    #: what is not observed and why (missing privileges, a filesystem fanotify refused, the platform)
    limitations: list[str] = attrs.field(factory=list)

    @property
    def lost(self) -> int:
        """Times events were lost in the kernel's queues (each may be many events)."""
        return self.process_overruns + self.file_overflows
