"""Whether the cluster answers, and whether a producer still makes progress: the sans-I/O rule both sinks'
watchdogs apply (:class:`bridge.delivery.kafka.KafkaSink`, :class:`bridge.delivery.librdkafka.LibrdkafkaSink`).

The sinks report when the cluster answered (a produce ack, a metadata probe), and ask, about once a second,
:meth:`ProgressWatch.stalled` with how long records have waited for their outcome: aiokafka's sink passes the
send time of its oldest unsettled record (so a wedge of some partitions counts too); librdkafka's, which gives
records up by itself after the publish timeout, the time since when records have waited without any settling.

A producer is *stalled* when a record has waited, and the cluster has answered all along, for more than
``stall_timeout_s``. A plain outage is no stall (the cluster does not
answer: a new producer could not help, and replacing it would only churn), and the clock starts again when the
cluster comes back, so a healthy producer gets ``stall_timeout_s`` to deliver its backlog after an outage before
it is judged. A wedged one (aiokafka issue #1038: partitions muted for ever behind a dead metadata task) is then
replaced within ``stall_timeout_s`` plus one watchdog tick of the cluster answering again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

#: How often an idle sink asks the cluster for metadata when nothing was acknowledged lately: this keeps
#: ``reachable`` current without traffic (one small request a second).
PROBE_INTERVAL_S: Final = 1.0
#: Bound on one probe: a cluster that does not answer within it counts as not answering.
PROBE_TIMEOUT_S: Final = 2.0
#: ``reachable`` stays True this long after the cluster's last answer: three probes may fail before it turns.
REACHABLE_WINDOW_S: Final = 3.0
#: Each stall replacement in a row (records never stopped waiting in between) doubles the bound, up to this many
#: times: a partition the cluster itself cannot serve while it answers for the others (aiokafka's oldest record
#: waits) costs a replacement every 2 minutes at most, not every ``stall_timeout_s``.
MAX_STALL_DOUBLINGS: Final = 3


#: What each replacement reason (``vod_bridge_producer_replacements_total{reason}``) means, for the sinks' log line.
REPLACEMENT_CAUSES: Final = {
    "sender_died": "sender routine stopped unexpectedly",
    "metadata_task_died": "client's metadata task stopped unexpectedly",
    "poll_thread_died": "poll thread stopped unexpectedly",
    "stalled": "made no progress while the cluster answered",
}


class ProgressWatch:
    """The reachability and stall rule, on an injected monotonic clock (no I/O, no tasks)."""

    def __init__(
        self,
        stall_timeout_s: float,
        *,
        reachable_window_s: float = REACHABLE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._window_s = reachable_window_s
        self.clock = clock
        self._last_answer: float | None = None
        #: When the cluster's current run of answers began (None: it never answered).
        self._answering_since: float | None = None
        #: Stall replacements since records last stopped waiting altogether.
        self._strikes = 0

    def answered(self) -> None:
        """The cluster answered a request (a produce ack, a metadata response)."""
        now = self.clock()
        if not self._reachable_at(now):
            self._answering_since = now
        self._last_answer = now

    @property
    def reachable(self) -> bool:
        """True while the cluster answered within the last ``reachable_window_s``."""
        return self._reachable_at(self.clock())

    def _reachable_at(self, now: float) -> bool:
        return self._last_answer is not None and now - self._last_answer <= self._window_s

    def quiet_for_s(self) -> float:
        """Seconds since the cluster last answered (infinite before its first answer): probe when it grows."""
        return float("inf") if self._last_answer is None else self.clock() - self._last_answer

    def stalled(self, waiting_since: float | None) -> bool:
        """True when the producer is stalled: a record has waited for its outcome since ``waiting_since`` (None:
        nothing waits), and the cluster has answered all along for more than the bound of that wait
        (``stall_timeout_s``, doubled for each :meth:`replaced` in a row).

        Measured up to the cluster's last answer, not up to now: time without answers never counts."""
        if waiting_since is None:
            self._strikes = 0  # caught up: the next stall is judged afresh
            return False
        if self._last_answer is None or self._answering_since is None or not self._reachable_at(self.clock()):
            return False
        return self._last_answer - max(waiting_since, self._answering_since) > self.bound_s

    @property
    def bound_s(self) -> float:
        """The stall bound now: ``stall_timeout_s``, doubled for each stall replacement in a row."""
        return self.stall_timeout_s * float(1 << min(self._strikes, MAX_STALL_DOUBLINGS))

    def replaced(self) -> None:
        """The producer was replaced because it stalled: the next one gets twice the time, until records stop
        waiting altogether (``stalled(None)``)."""
        self._strikes += 1
