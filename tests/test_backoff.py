"""The one back-off of the bridge."""

from __future__ import annotations

import pytest

from bridge.backoff import Backoff


def test_delays_double_up_to_the_ceiling_with_bounded_jitter() -> None:
    backoff = Backoff(0.5, 3.0)
    delays = [backoff.next_delay_s() for _ in range(6)]
    for delay_s, nominal_s in zip(delays, [0.5, 1.0, 2.0, 3.0, 3.0, 3.0], strict=True):
        assert nominal_s * 0.8 <= delay_s <= nominal_s * 1.2


def test_reset_starts_over() -> None:
    backoff = Backoff(1.0, 8.0, jitter=0.0)
    assert [backoff.next_delay_s() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.reset()
    assert backoff.next_delay_s() == 1.0


def test_jitter_spreads_retries() -> None:
    delays = {Backoff(1.0, 1.0).next_delay_s() for _ in range(50)}
    assert len(delays) > 40, "bridges restarted together must not retry in lockstep"


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_invalid_bounds_are_refused(initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s, max_s)
