"""The one retry pacing of the bridge: exponential back-off with jitter."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial_s`` up to ``max_s``, each with ±20 % jitter so that many bridges (or
    many loops of one bridge) do not retry in lockstep. :meth:`reset` after a success."""

    def __init__(self, initial_s: float, max_s: float, *, jitter: float = 0.2) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self._initial_s = initial_s
        self._max_s = max_s
        self._jitter = jitter
        self._next_s = initial_s

    def next_delay_s(self) -> float:
        """The delay to wait now; the following one will be twice as long (up to ``max_s``)."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self._max_s)
        return delay_s * random.uniform(1 - self._jitter, 1 + self._jitter)

    def reset(self) -> None:
        self._next_s = self._initial_s
