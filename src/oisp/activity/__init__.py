"""Agent activity: the processes AI-calling programs start and the files they touch, as OISP events.

:class:`AgentScope` decides which processes are agent processes (sans-io). :class:`Activity` runs the sources of
this platform (Linux: the kernel's process-events connector and fanotify; elsewhere psutil polling) and emits
their events; :class:`Linker` (sans-io) links their effects to the tool calls that caused them, and
:func:`link_activity` puts it into a :class:`~oisp.pipeline.Pipeline` as a stage. All but the scope are imported
on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from oisp.activity.scope import AgentScope

if TYPE_CHECKING:
    from oisp.activity.link_stage import LinkingStage, link_activity
    from oisp.activity.linking import Linker, LinkerStats
    from oisp.activity.monitor import Activity
    from oisp.activity.settings import ActivitySettings, ActivityStats

_LAZY = {
    "Activity": "oisp.activity.monitor",
    "ActivitySettings": "oisp.activity.settings",
    "ActivityStats": "oisp.activity.settings",
    "Linker": "oisp.activity.linking",
    "LinkerStats": "oisp.activity.linking",
    "LinkingStage": "oisp.activity.link_stage",
    "link_activity": "oisp.activity.link_stage",
}

__all__ = ["Activity", "ActivitySettings", "ActivityStats", "AgentScope", "Linker", "LinkerStats", "LinkingStage",
           "link_activity"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oisp.activity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
