"""The reachability and stall rule both sinks' watchdogs apply (bridge.delivery.progress), on a hand-driven clock."""

from __future__ import annotations

from bridge.delivery.progress import ProgressWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(stall_timeout_s: float = 10.0) -> tuple[ProgressWatch, Clock]:
    clock = Clock()
    return ProgressWatch(stall_timeout_s, reachable_window_s=3.0, clock=clock), clock


def test_reachable_while_the_cluster_answered_within_the_window() -> None:
    w, clock = watch()
    assert not w.reachable, "before the first answer"
    assert w.quiet_for_s() == float("inf")
    w.answered()
    clock.now += 3.0
    assert w.reachable and w.quiet_for_s() == 3.0
    clock.now += 0.5
    assert not w.reachable
    w.answered()
    assert w.reachable


def test_a_plain_outage_is_no_stall() -> None:
    w, clock = watch()
    w.answered()
    sent_at = clock.now
    clock.now += 60.0  # nothing answers for a minute, a record waits all along
    assert not w.stalled(sent_at)


def test_records_waiting_while_the_cluster_answers_is_a_stall() -> None:
    w, clock = watch()
    w.answered()
    sent_at = clock.now
    for _ in range(10):  # the probe answers every second, the record is never settled
        clock.now += 1.0
        w.answered()
        assert not w.stalled(sent_at)
    clock.now += 0.5
    w.answered()
    assert w.stalled(sent_at)
    assert not w.stalled(None), "nothing waits: nothing is stalled"


def test_after_an_outage_the_producer_gets_the_whole_bound_to_deliver_its_backlog() -> None:
    w, clock = watch()
    w.answered()
    sent_at = clock.now
    clock.now += 30.0  # the outage: the record waited 30 s, but the cluster did not answer
    w.answered()  # back
    back_at = clock.now
    while clock.now < back_at + 10.0:
        assert not w.stalled(sent_at)
        clock.now += 1.0
        w.answered()
    clock.now += 0.5
    w.answered()
    assert w.stalled(sent_at)


def test_time_without_answers_never_counts() -> None:
    w, clock = watch(stall_timeout_s=1.0)
    w.answered()
    sent_at = clock.now
    clock.now += 2.9  # within the reachable window, but the cluster has not answered since the record was sent
    assert w.reachable and not w.stalled(sent_at)
    w.answered()
    assert w.stalled(sent_at)


def test_a_young_record_is_not_stalled() -> None:
    w, clock = watch()
    for _ in range(100):  # the cluster answered every second for 100 s
        w.answered()
        clock.now += 1.0
    w.answered()
    assert not w.stalled(clock.now - 5.0)
    assert w.stalled(clock.now - 10.5)


def test_stall_replacements_in_a_row_double_the_bound_until_records_stop_waiting() -> None:
    """A partition the cluster cannot serve while it answers for the others must not cost a replacement every
    ``stall_timeout_s``: 10 s, then 20, 40, 80 s at most, and 10 s again once nothing waited."""
    w, clock = watch(stall_timeout_s=10.0)
    for expected_bound_s in (10.0, 20.0, 40.0, 80.0, 80.0):
        sent_at = clock.now
        w.answered()
        while not w.stalled(sent_at):
            clock.now += 1.0
            w.answered()
        assert clock.now - sent_at == expected_bound_s + 1.0
        w.replaced()
    assert not w.stalled(None)  # caught up
    sent_at = clock.now
    for _ in range(11):
        clock.now += 1.0
        w.answered()
    assert w.bound_s == 10.0 and w.stalled(sent_at)


def test_every_replacement_reason_has_its_log_text() -> None:
    from bridge.delivery.progress import REPLACEMENT_CAUSES
    from bridge.ops.metrics import REPLACEMENT_REASONS

    assert set(REPLACEMENT_CAUSES) == set(REPLACEMENT_REASONS)
