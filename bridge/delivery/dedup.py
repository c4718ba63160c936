"""Optional suppression of repeated events within a time window (VOD retries, re-delivery, both modes on).

Keyed by (EventType, key, Status): a PullComplete that goes PROCESSING -> FINISH is two events, not one
repeat. An event is remembered only *after* it was acknowledged (by Kafka or the spool), so a failed publish
can never suppress its own retry. Delivery stays at least once: two copies arriving concurrently, or after
the window, or at two bridge replicas, are both published.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from bridge.vod.model import VodEvent

DedupKey = tuple[str, str, str | None]


def dedup_key(event: VodEvent) -> DedupKey:
    status = getattr(event.payload, "Status", None)
    return (event.event_type, event.key, status if isinstance(status, str) else None)


class DedupWindow:
    """A bounded TTL set: at most ``max_entries`` keys, each forgotten ``window_s`` after it was recorded."""

    def __init__(self, window_s: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[DedupKey, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, event: VodEvent) -> bool:
        """True if an equal event was recorded less than ``window_s`` ago."""
        self._expire()
        return dedup_key(event) in self._seen

    def record(self, event: VodEvent) -> None:
        """Remember an acknowledged event."""
        key = dedup_key(event)
        self._seen.pop(key, None)
        self._seen[key] = self._clock() + self._window_s
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        now = self._clock()
        # Entries are in insertion (= expiry) order, so stop at the first live one.
        while self._seen:
            key, expires_at = next(iter(self._seen.items()))
            if expires_at > now:
                break
            del self._seen[key]
