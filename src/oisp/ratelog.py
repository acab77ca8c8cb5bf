"""Logging that cannot flood: a message logged at most once per interval, with how often it recurred."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Throttled"]


class Throttled:
    """Logs its message at most once per ``interval`` seconds; the next message says how many were left out."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        #: Occurrences left out since the last message.
        self.suppressed = 0
        #: Every occurrence, logged or not.
        self.total = 0

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` at ``level`` unless one was logged within the interval; True when logged."""
        self.total += 1
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, self.suppressed, self.interval)
        self.suppressed = 0
        self._next = now + self.interval
        self.logger.log(level, message, *args)
        return True
