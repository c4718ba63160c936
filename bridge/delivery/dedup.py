"""Optional suppression of exact repeats within a time window (VOD retries, re-delivery, both modes on).

Keyed by a digest of the lossless record value, so only a byte-identical event is a repeat: a second
PROCESSING ProcedureStateChanged or a corrected PullComplete with the same TaskId and Status is a different
event and is published. Transport fields (``EventHandle``, ``Sign``, ``T``) are not part of the value, so a
re-delivered or re-signed copy still matches.

An event is remembered only *after* it was acknowledged (by Kafka or the spool), with which of the two it
was, so a failed publish can never suppress its own retry, and the poller can refuse to confirm a copy whose
original is only spooled. Delivery stays at least once: two copies arriving concurrently, or after the
window, or at two bridge replicas, are both published.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from bridge.vod.model import VodEvent


class Seen(msgspec.Struct, frozen=True):
    """What is remembered of an acknowledged event."""

    expires_at: float
    #: True when Kafka acknowledged it; False when it is only in the local spool.
    in_kafka: bool


def digest(event: VodEvent) -> bytes:
    """A 128-bit digest of what makes two events the same record: type, key and value."""
    h = hashlib.blake2b(digest_size=16)
    h.update(event.event_type.encode())
    h.update(b"\0")
    h.update(event.key.encode())
    h.update(b"\0")
    h.update(event.value)
    return h.digest()


class DedupWindow:
    """A bounded TTL map: at most ``max_entries`` digests, each forgotten ``window_s`` after it was recorded."""

    def __init__(self, window_s: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, Seen] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, event: VodEvent) -> Seen | None:
        """How an identical event was acknowledged less than ``window_s`` ago, or ``None``."""
        self._expire()
        return self._seen.get(digest(event))

    def record(self, event: VodEvent, *, in_kafka: bool) -> None:
        """Remember an acknowledged event (``in_kafka`` False: only spooled). A Kafka ack is never downgraded."""
        key = digest(event)
        earlier = self._seen.pop(key, None)
        in_kafka = in_kafka or (earlier is not None and earlier.in_kafka)
        self._seen[key] = Seen(self._clock() + self._window_s, in_kafka)
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        now = self._clock()
        # Entries are in insertion (= expiry) order, so stop at the first live one.
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen.expires_at > now:
                break
            del self._seen[key]
