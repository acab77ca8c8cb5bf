"""The decoder process's CPU priority: idle while it keeps up, normal while it falls behind (Linux).

On a machine whose cores are busy (two cores shared by an app, its server, the relay and the decoder process), a
task that wakes up on the core where the decoder process is working a batch (several milliseconds of decoding)
waits for the decoder process's time slice to end: the keep-alive tail. As a ``SCHED_IDLE`` task the decoder
process is preempted at once by any other task that wakes on its core, so its batches no longer land inside a
request; it gets the CPU time nothing else wants.

That alone would starve it on a machine kept busy by other work: the proxy's buffer would fill and decoding of
connections would be cut short. So it is idle only while it keeps up, and a normal task again as soon as it
falls behind: when a batch of copies is large (at least :data:`BEHIND_BYTES`: a backlog, or a bulk transfer),
when its oldest copy waited :data:`BEHIND_LAG_NS`, or when one batch takes longer than :data:`BEHIND_SECONDS`
(preempted again and again). It becomes idle again once it has kept up for :data:`HOLD_SECONDS`.

Leaving ``SCHED_IDLE`` needs ``CAP_SYS_NICE`` (or an ``RLIMIT_NICE`` of 20), which the decoder process gives up
with its privileges: then the proxy's process, which started it as root, does it when asked (a ``PRIORITY``
frame). A decoder process that nobody could bring back stays a normal task (never idle).

:class:`PriorityPolicy` is the decision (fed observations, it says which priority to have); :class:`CpuPriority`
applies it to the decoding thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

__all__ = ["BEHIND_BYTES", "BEHIND_LAG_NS", "BEHIND_SECONDS", "CAUGHT_UP_BYTES", "CAUGHT_UP_LAG_NS", "HOLD_SECONDS",
           "CpuPriority", "PriorityPolicy", "can_leave_idle", "restore_priority"]

logger = logging.getLogger(__name__)

#: A batch of copies this large means the decoder process is behind, or a bulk transfer is on (the relay hands
#: copies over once 256 KiB wait): normal priority. Batches of requests back to back are far smaller.
BEHIND_BYTES = 192 * 1024
#: A batch whose oldest copy was read by the relay this long ago: behind (the relay's batches are 20 ms apart).
BEHIND_LAG_NS = 60_000_000
#: One batch still being decoded after this long (wall clock): preempted again and again, behind (a batch is
#: normally 5 to 20 ms of work; a collection of the oldest generation can add 20 more).
BEHIND_SECONDS = 0.1
#: Idle again only after this long without falling behind, with a small, fresh batch.
HOLD_SECONDS = 1.0
#: What counts as small and fresh.
CAUGHT_UP_BYTES = 96 * 1024
CAUGHT_UP_LAG_NS = 30_000_000

_CAP_SYS_NICE = 23


class PriorityPolicy:
    """When to be idle and when normal (no I/O: fed observations, it answers with the priority to have)."""

    def __init__(self) -> None:
        self.idle = True
        self._behind_at = float("-inf")

    def batch(self, size: int, lag_ns: int | None, now: float) -> bool:
        """A batch of ``size`` bytes of copies arrived, its oldest copy ``lag_ns`` old (None: no copies in it);
        whether to be idle while decoding it."""
        if size >= BEHIND_BYTES or (lag_ns is not None and lag_ns >= BEHIND_LAG_NS):
            return self.behind(now)
        if (not self.idle and now - self._behind_at >= HOLD_SECONDS and size < CAUGHT_UP_BYTES
                and (lag_ns is None or lag_ns < CAUGHT_UP_LAG_NS)):
            self.idle = True
        return self.idle

    def behind(self, now: float) -> bool:
        """The decoder process is behind: normal priority (for at least :data:`HOLD_SECONDS`)."""
        self._behind_at = now
        self.idle = False
        return False


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def can_leave_idle() -> bool:
    """Whether this process may leave ``SCHED_IDLE`` (Linux, with ``CAP_SYS_NICE`` or ``RLIMIT_NICE`` 20). The
    decoder process asks before it drops its privileges too: the proxy's process has what it started with."""
    if sys.platform != "linux" or not hasattr(os, "SCHED_IDLE"):
        return False
    import resource

    if _has_cap_sys_nice():
        return True
    return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - os.getpriority(os.PRIO_PROCESS, 0)


def restore_priority(pid: int, policy: int) -> None:
    """In the proxy's process: make the decoder process's decoding thread (``pid``, its main thread) a task of
    ``policy`` again (``SCHED_OTHER`` or ``SCHED_BATCH`` only). Never raises."""
    if sys.platform != "linux" or policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except OSError as exc:
        logger.debug("decoder process %d: scheduling policy %d not restored: %s", pid, policy, exc)


class CpuPriority:
    """Applies :class:`PriorityPolicy` to the thread that made it (the decoding loop).

    ``self_return``: this thread may leave ``SCHED_IDLE`` itself (it kept ``CAP_SYS_NICE``, or ``RLIMIT_NICE``
    allows it); ``ask``: otherwise, how to ask the proxy's process to do it (sends the policy to come back to).
    Call :meth:`batch` when a batch arrives, :meth:`slow` when one batch took :data:`BEHIND_SECONDS`. With
    ``enabled`` False, or when nobody could bring it back, it does nothing.
    """

    def __init__(self, enabled: bool, *, self_return: bool, ask: Callable[[int], object] | None) -> None:
        self.enabled = enabled and sys.platform == "linux" and (self_return or ask is not None)
        self.policy = PriorityPolicy()
        #: How many times the decoding thread became a normal task again.
        self.returns = 0
        self.idle = False
        self._self_return = self_return
        self._ask = ask
        self._tid = threading.get_native_id()
        #: The policy to come back to (``SCHED_BATCH`` with ``decoder_cpu = "last"``).
        self._normal = 0
        if self.enabled and sys.platform == "linux":
            self._normal = os.sched_getscheduler(0)
        if self.enabled:
            self._apply(True)

    def batch(self, size: int, lag_ns: int | None, now: float) -> bool:
        """A batch arrived (``size`` bytes of copies, the oldest ``lag_ns`` old; ``now``: ``time.monotonic()``);
        True when the proxy's process was asked to bring this one back (the caller lets the frame go out now)."""
        idle = self.policy.batch(size, lag_ns, now)
        return self._apply(idle) if idle != self.idle else False

    def slow(self, now: float) -> bool:
        """The batch being decoded took longer than :data:`BEHIND_SECONDS`: behind (returns as :meth:`batch`)."""
        self.policy.behind(now)
        return self._apply(False) if self.idle else False

    def stop(self) -> None:
        """A normal task again (the decoder process is finishing: the rest of its work must not starve)."""
        if self.enabled and self.idle:
            self._apply(False)

    def _apply(self, idle: bool) -> bool:
        """Become idle or normal; True when the proxy's process was asked to do it."""
        if sys.platform != "linux":
            return False
        if idle:
            try:
                os.sched_setscheduler(self._tid, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:  # a sandbox that forbids it: stay a normal task
                logger.debug("decoder process: SCHED_IDLE not applied: %s", exc)
                self.enabled = False
                return False
            self.idle = True
            return False
        self.idle = False
        self.returns += 1
        if self._self_return:
            try:
                os.sched_setscheduler(self._tid, self._normal, os.sched_param(0))
                return False
            except OSError as exc:
                logger.debug("decoder process: cannot leave SCHED_IDLE itself: %s", exc)
                self._self_return = False
        if self._ask is not None:
            self._ask(self._normal)
            return True
        self.enabled = False  # nobody can bring it back: never idle again
        return False
