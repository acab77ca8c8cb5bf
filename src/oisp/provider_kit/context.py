"""Per-run state of the decode side: :class:`DecoderContext`.

Some facts outlive one exchange: the tool calls a model made (answered by a later request), a Replicate
prediction created by one call and finished by another. Such state belongs to one run of the decoder, not to
the process: two decoders in one process (two captures in one script, a test beside a running sensor) must
never see each other's calls. The :class:`~oisp.event_decoder.EventDecoder` owns one context and hands it to every
``oisp_exchange_decoder`` call; a provider keeps its tables in it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from oisp.provider_kit.tool_calls import ToolCallRegistry

__all__ = ["DecoderContext"]

T = TypeVar("T")


class DecoderContext:
    """The state one decoding run shares across its exchanges (thread-safe: the proxy decodes concurrently).

    ``tool_calls`` links tool results to the calls they answer (:class:`ToolCallRegistry`); :meth:`state` gives
    each provider a table of its own, made on first use::

        table = context.state("replicate.predictions", PredictionTable)
    """

    def __init__(self, *, max_tool_calls: int = 50_000) -> None:
        #: The tool calls models made in this run (call id -> its ``agent.tool_call`` event).
        self.tool_calls = ToolCallRegistry(max_tool_calls)
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def state(self, key: str, factory: Callable[[], T]) -> T:
        """This run's state object under ``key`` (name it after your provider), built by ``factory`` once."""
        value = self._state.get(key)
        if value is None:
            with self._lock:
                value = self._state.get(key)
                if value is None:
                    value = self._state[key] = factory()
        return value
