"""The repeat gate: one line per repeating condition, a bounded number of summaries, one line when it ends."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from bridge.ops.repeats import RepeatGate


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def quiet_root() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # the gate passes everything at DEBUG
    yield
    root.setLevel(level)


def record(msg: str, *args: object, level: int = logging.ERROR, name: str = "aiokafka.conn") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_outage_of_a_minute_logs_a_handful_of_lines(quiet_root: None) -> None:
    clock = Clock()
    ended: list[logging.LogRecord] = []
    gate = RepeatGate(summary_interval_s=30, quiet_s=10, clock_s=clock, emit=ended.append)
    passed = []
    # 120 lines a second for 60 s, alternating over three brokers: one condition (one template).
    for tick in range(60 * 120):
        clock.now_s = tick / 120
        line = record("Unable connect to node with id %s: %s", tick % 3 + 1, "Connect call failed")
        if gate.filter(line):
            passed.append(line.getMessage())
    assert len(passed) == 2, passed  # the first line, then one summary per 30 s (the next would be at 60 s)
    assert passed[0] == "Unable connect to node with id 1: Connect call failed"
    assert "repeated 3600 times in the last 30s" in passed[1]
    clock.now_s = 59.0
    assert gate.end_quiet() == 0, "still repeating"
    clock.now_s = 70.0
    assert gate.end_quiet() == 1 and gate.active() == 0
    (end,) = ended
    assert end.levelno == logging.INFO
    assert end.getMessage().startswith("ended after 7200 occurrences over 60s: Unable connect to node")


def test_conditions_are_kept_apart_and_info_passes(quiet_root: None) -> None:
    clock = Clock()
    gate = RepeatGate(summary_interval_s=60, clock_s=clock, emit=lambda r: None)
    assert gate.filter(record("a %s", 1)) and gate.filter(record("b %s", 1))
    assert not gate.filter(record("a %s", 2))
    assert gate.filter(record("a %s", 3, name="other.logger")), "same text from another logger is its own condition"
    assert all(gate.filter(record("info %s", i, level=logging.INFO)) for i in range(10))


def test_a_single_occurrence_ends_silently(quiet_root: None) -> None:
    clock = Clock()
    ended: list[logging.LogRecord] = []
    gate = RepeatGate(quiet_s=5, clock_s=clock, emit=ended.append)
    assert gate.filter(record("once"))
    clock.now_s = 6
    assert gate.end_quiet() == 1 and ended == []


def test_debug_keeps_every_line() -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        gate = RepeatGate(clock_s=Clock(), emit=lambda r: None)
        assert all(gate.filter(record("same")) for _ in range(100))
    finally:
        root.setLevel(level)
