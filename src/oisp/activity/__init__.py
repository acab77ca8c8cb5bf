"""Agent activity: the processes AI-calling programs start and the files they touch, as OISP events.

:class:`AgentScope` decides which processes are agent processes (sans-io). :class:`Activity` runs the sources of
this platform (Linux: the kernel's process-events connector and fanotify; elsewhere psutil polling) and emits
their events; it and its settings are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from oisp.activity.scope import AgentScope

if TYPE_CHECKING:
    from oisp.activity.monitor import Activity
    from oisp.activity.settings import ActivitySettings, ActivityStats

_LAZY = {
    "Activity": "oisp.activity.monitor",
    "ActivitySettings": "oisp.activity.settings",
    "ActivityStats": "oisp.activity.settings",
}

__all__ = ["Activity", "ActivitySettings", "ActivityStats", "AgentScope"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oisp.activity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
