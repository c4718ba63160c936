"""One line per repeating condition, not one per occurrence: a logging filter for outage noise.

With Kafka down, aiokafka logs every failed connection attempt to every broker ("Unable connect to node ...")
and the sink's retries warn on each round: about 120 lines a second against a three-broker cluster, exactly
when an operator needs a clear signal. :class:`RepeatGate` lets the first record of each condition through,
then at most one summary per ``summary_interval_s`` (how many, since when), and one line when the condition
has been quiet for ``quiet_s`` (it ended). The suppressed detail is still there at DEBUG (the gate passes
everything when the logger is at DEBUG), and the state is in the metrics (``vod_bridge_kafka_connected``,
``vod_bridge_publish_failures_total``).

A condition is one logger and one message template (``record.msg`` before its arguments are filled in), so
"Unable connect to node with id 1" and "... id 2" are one condition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from bridge.timefmt import rfc3339_utc


@dataclass(slots=True)
class _Condition:
    first: logging.LogRecord
    started_s: float
    last_seen_s: float
    last_summary_s: float
    #: Occurrences suppressed since the last line about this condition.
    suppressed: int = 0
    total: int = 1


class RepeatGate(logging.Filter):
    """Attach to a handler. Records below ``min_level`` and every record while the root logger is at DEBUG pass
    unchanged; others pass once per condition, then as summaries. Thread-safe; a daemon thread, alive only
    while some condition is active, writes the "ended" lines."""

    def __init__(
        self,
        *,
        summary_interval_s: float = 60.0,
        quiet_s: float = 10.0,
        min_level: int = logging.WARNING,
        clock_s: Callable[[], float] = time.monotonic,
        emit: Callable[[logging.LogRecord], None] | None = None,
    ) -> None:
        super().__init__()
        self._summary_interval_s = summary_interval_s
        self._quiet_s = quiet_s
        self._min_level = min_level
        self._clock_s = clock_s
        #: Where the gate's own lines (summaries that arrive late, "ended" lines) go: the root logger's handlers.
        self._emit = emit or _to_root_handlers
        self._lock = threading.Lock()
        self._conditions: dict[tuple[str, str], _Condition] = {}
        self._watcher: threading.Thread | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_gate", False) or record.levelno < self._min_level:
            return True
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True  # the detail is wanted: keep every line
        key = (record.name, str(record.msg))
        now_s = self._clock_s()
        with self._lock:
            condition = self._conditions.get(key)
            if condition is None:
                self._conditions[key] = _Condition(record, now_s, now_s, now_s)
                self._ensure_watcher()
                return True
            condition.total += 1
            condition.last_seen_s = now_s
            if now_s - condition.last_summary_s < self._summary_interval_s:
                condition.suppressed += 1
                return False
            repeated = condition.suppressed + 1
            condition.suppressed = 0
            condition.last_summary_s = now_s
        record.msg = f"{record.getMessage()} (repeated {repeated} times in the last {self._summary_interval_s:g}s,"
        record.msg += f" {condition.total} since {_wall(condition.started_s, now_s)})"
        record.args = None
        return True

    def end_quiet(self) -> int:
        """Write the "ended" line of every condition quiet for ``quiet_s``; returns how many ended."""
        now_s = self._clock_s()
        with self._lock:
            ended = [(k, c) for k, c in self._conditions.items() if now_s - c.last_seen_s >= self._quiet_s]
            for key, _ in ended:
                del self._conditions[key]
        for _, condition in ended:
            if condition.total > 1:
                self._emit(_ended_record(condition, now_s))
        return len(ended)

    def active(self) -> int:
        with self._lock:
            return len(self._conditions)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="log-repeat-gate", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(self._quiet_s, 1.0))
            self.end_quiet()
            with self._lock:
                if not self._conditions:
                    self._watcher = None
                    return


def _wall(started_s: float, now_s: float) -> str:
    return rfc3339_utc(datetime.fromtimestamp(time.time() - (now_s - started_s), UTC))


def _ended_record(condition: _Condition, now_s: float) -> logging.LogRecord:
    first = condition.first
    record = logging.LogRecord(
        first.name,
        logging.INFO,
        first.pathname,
        first.lineno,
        "ended after %d occurrences over %.0fs: %s",
        (condition.total, condition.last_seen_s - condition.started_s, first.getMessage()),
        None,
    )
    record.repeat_gate = True
    return record


def _to_root_handlers(record: logging.LogRecord) -> None:
    for handler in logging.getLogger().handlers:
        if record.levelno >= handler.level:
            handler.handle(record)
