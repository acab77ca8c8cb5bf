"""The pipeline stage that runs the :class:`~oisp.activity.linking.Linker` on the live event stream.

It gives the sans-io linker its clock (``time.monotonic_ns``, the clock of the kernel's event times and of
``ts_mono``) and the activity watermark, and tells the pipeline when to poll it: while events are held, every
``poll_interval`` seconds (the watermark moves on without events) and at the latest when the oldest held event's
``max_hold`` ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from oisp.activity.linking import Linker
from oisp.events import Event

__all__ = ["FedWatermark", "LinkingStage", "RemoteWatermark", "ShardedWatermark", "link_activity"]


class _Observer(Protocol):
    """What :func:`link_activity` needs of an :class:`~oisp.activity.Activity`."""

    def watermark_ns(self) -> int: ...


class LinkingStage:
    """A :class:`~oisp.pipeline.Stage` around a :class:`Linker`.

    ``watermark`` returns the kernel time (monotonic ns) up to which every activity event has been emitted into
    the pipeline (``Activity.watermark``), or None when not known; ``hold_ms`` bounds how long an event is held.
    """

    def __init__(self, *, watermark: Callable[[], int | None] | None = None, hold_ms: float = 250.0,
                 linker: Linker | None = None, poll_interval: float = 0.01,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if hold_ms < 0 or poll_interval <= 0:
            raise ValueError("hold_ms must be >= 0 and poll_interval > 0")
        self.linker = linker if linker is not None else Linker(max_hold_ns=int(hold_ms * 1_000_000))
        self._watermark = watermark
        self._clock = clock
        self._poll_interval = poll_interval

    def _mark(self) -> int | None:
        return self._watermark() if self._watermark is not None else None

    def feed(self, event: Event) -> list[Event]:
        """Feed one (enriched) event to the linker; the events to pass on now."""
        return self.linker.feed(event, self._clock(), self._mark())

    def poll(self) -> list[Event]:
        """The held events whose wait is over."""
        return self.linker.poll(self._clock(), self._mark())

    def next_wakeup(self) -> float | None:
        """Seconds until :meth:`poll` is due; None when nothing is held."""
        deadline = self.linker.next_deadline()
        if deadline is None:
            return None
        return max(0.0, min(self._poll_interval, (deadline - self._clock()) / 1e9))

    def flush(self) -> list[Event]:
        """Every held event and the end of every open agent session."""
        return self.linker.flush(self._clock())

    def __repr__(self) -> str:
        return f"LinkingStage(pending={self.linker.pending}, stats={self.linker.stats})"




class RemoteWatermark:
    """The watermark of an :class:`~oisp.activity.Activity` that runs in another process and sends its events
    and then its watermark over an ordered channel (the decoder process's, from the proxy's process): the value
    last received, 0 (nothing is known yet, so held events wait up to their bound) before the first."""

    def __init__(self) -> None:
        self._mark = 0

    def advance(self, mark_ns: int) -> None:
        """The sender's watermark moved to ``mark_ns`` (monotonic); it never goes back."""
        if mark_ns > self._mark:
            self._mark = mark_ns

    def watermark_ns(self) -> int:
        return self._mark


class ShardedWatermark:
    """The watermark of events that reach the linking stage on several ordered channels: the activity's
    (:class:`RemoteWatermark`'s, part 0) and one per decoder process that forwards the events it decoded (parts 1
    and on, see :mod:`oisp.decoder_process`). Each part says up to when (monotonic ns) every event it carries has
    arrived; the watermark is the lowest of them, so an activity event is not taken before the tool call of another
    shard's connection that came before it."""

    def __init__(self, parts: int = 1) -> None:
        if parts < 1:
            raise ValueError("parts must be at least 1")
        self._marks = [0] * parts
        self._mark = 0

    def advance(self, mark_ns: int, part: int = 0) -> None:
        """Part ``part`` moved to ``mark_ns``; a part never goes back."""
        marks = self._marks
        if 0 <= part < len(marks) and mark_ns > marks[part]:
            marks[part] = mark_ns
            self._mark = min(marks)

    def watermark_ns(self) -> int:
        return self._mark


class FedWatermark:
    """The activity watermark as far as the pipeline has *taken in* the events: the activity emits a batch into
    the pipeline's queue and then moves its watermark, so a stage reading the watermark directly could believe
    events still waiting in the queue behind the one it is fed had already come. A watermark read after ``n``
    events were emitted counts once the pipeline has taken ``n`` events (processed, failed or dropped)."""

    def __init__(self, pipeline: Any, activity: _Observer) -> None:
        self._pipeline = pipeline
        self._activity = activity
        #: (events emitted when read, watermark read), oldest first; one entry per emitted count.
        self._samples: deque[tuple[int, int]] = deque()
        self._committed: int | None = None

    def __call__(self) -> int | None:
        stats = self._pipeline.stats
        emitted = stats.emitted
        mark = self._activity.watermark_ns()
        samples = self._samples
        if samples and samples[-1][0] == emitted:
            samples[-1] = (emitted, max(mark, samples[-1][1]))
        else:
            samples.append((emitted, mark))
        taken = stats.processed + stats.failed_processing + stats.dropped_ingress
        while samples and samples[0][0] <= taken:
            _, value = samples.popleft()
            self._committed = value if self._committed is None else max(self._committed, value)
        return self._committed


def link_activity(pipeline: Any, activity: _Observer | None, *, hold_ms: float = 250.0) -> LinkingStage | None:
    """Link ``activity``'s events to the tool calls in ``pipeline`` (an :class:`~oisp.pipeline.Pipeline` the
    activity emits into and learns agents from): add a :class:`LinkingStage` on the activity's watermark. Without
    activity (None), nothing is added and the pipeline runs as before."""
    if activity is None:
        return None
    stage = LinkingStage(watermark=FedWatermark(pipeline, activity), hold_ms=hold_ms)
    pipeline.add_stage(stage)
    return stage
