"""Where the decoder process runs: on a CPU of its own, as a batch task, so that its batches of work do not land
on the core that relays the apps' bytes.

With requests back to back, the decoder process is busy most of the time; when the scheduler puts it on the
core where the relay (or the app, or its server) is about to wake, that request waits out the decoder process's
time slice: the keep-alive tail (p99) of a few milliseconds. Kept on the last CPU the proxy may use, and marked
``SCHED_BATCH`` (Linux: it never preempts a task that wakes up), it leaves the other cores to the latency path.
On a single-CPU machine, or with ``decoder_cpu = "any"``, the scheduler decides.
"""

from __future__ import annotations

import logging
import os
import sys

import psutil

__all__ = ["CPU_CHOICES", "decoder_process_count", "place_decoder_process"]

logger = logging.getLogger(__name__)

#: ``last``: the last CPU oisp may run on, as a batch task (Linux); ``any``: wherever the scheduler puts it.
CPU_CHOICES = ("last", "any")


def place_decoder_process(pid: int, choice: str = "last", index: int = 0) -> str | None:
    """Apply ``choice`` to the decoder process ``pid`` (the ``index``-th: ``last`` puts the first on the last CPU,
    the next on the one before, and so on, leaving the first CPU to the relay); what was done (for the log), or
    None when nothing was.

    Never raises: a placement that the platform refuses leaves the decoder process where it is (logged).
    """
    if choice not in CPU_CHOICES:
        raise ValueError(f"decoder_cpu must be one of {', '.join(CPU_CHOICES)}, not {choice!r}")
    if choice == "any":
        return None
    try:
        process = psutil.Process(pid)
        allowed = sorted(psutil.Process().cpu_affinity() or [])
        if len(allowed) < 2:
            return None
        cpu = allowed[-1 - index % (len(allowed) - 1)]
        process.cpu_affinity([cpu])
    except (AttributeError, psutil.Error, OSError, ValueError) as exc:  # no affinity on this platform (macOS)
        logger.debug("decoder process %d: CPU placement not applied (%s)", pid, exc)
        return None
    done = f"CPU {cpu} of {len(allowed)}"
    if sys.platform == "linux":
        try:
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
            done += ", SCHED_BATCH"
        except OSError as exc:
            logger.debug("decoder process %d: SCHED_BATCH not applied (%s)", pid, exc)
    return done


def decoder_process_count(configured: int | None) -> int:
    """How many decoder processes to start: ``configured``, or (None, ``"auto"``) one per CPU oisp may use beyond
    the one the relay needs, at least one (on a 2-CPU machine: one, so the relay keeps a core of its own)."""
    if configured is not None:
        return max(1, configured)
    try:
        cpus = len(psutil.Process().cpu_affinity() or [])
    except (AttributeError, psutil.Error, OSError):  # no affinity on this platform (macOS)
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)
