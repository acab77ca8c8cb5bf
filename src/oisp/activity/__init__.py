"""Agent activity: the processes AI-calling programs start and the files they touch, as OISP events.

:class:`AgentScope` decides which processes are agent processes (sans-io). The sources (Linux: the kernel's
process-events connector and fanotify; elsewhere psutil polling) and the :class:`Activity` monitor that runs
them are imported on first use.
"""

from __future__ import annotations

from oisp.activity.scope import AgentScope

__all__ = ["AgentScope"]
