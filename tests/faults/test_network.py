"""Every broker unreachable for a while, in the middle of the load, with the spool on (scenario 2 of issue 17).

Proves the core promise through a real network fault on every broker port (iptables on the namespace's loopback,
so the brokers' advertised ports are cut too, which a proxy cannot do): while Kafka is unreachable each callback is
still answered 200 (Kafka, or the fsync'ed spool after the publish budget), and after the heal, with nobody
restarting anything, the spool drains to 0 by itself and every acknowledged key is in Kafka.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import wait_until
from faultkit import drive
from netns import CutMode
from scenarios import result, rig

pytestmark = pytest.mark.timeout(120)

EVENTS = 1600
RATE_PER_S = 100.0  # the load lasts ~16 s: the cut starts ~4 s in and ends ~4 s before the last key
CUT_S = 8.0
DRAIN_BOUND_S = 30.0


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
async def test_every_broker_unreachable_mid_load(mode: CutMode, tmp_path: Path) -> None:
    """An ~8 s cut of every broker port (dropped packets, or resets) mid-load: every callback answered 200,
    the spool drains to 0 within 30 s of the heal without a restart, and no acknowledged key is lost."""
    keys = [f"cut-{mode}-{i}" for i in range(EVENTS)]
    failure = ""
    async with rig(tmp_path) as r:
        report = r.report
        load = asyncio.create_task(
            drive(r.bridge.url, keys, concurrency=16, report=report, retry_for_s=60, rate_per_s=RATE_PER_S)
        )
        await wait_until(lambda: len(report.acked) >= 300, timeout_s=30)
        acked_before = len(report.acked)
        r.firewall.cut(r.ports, mode)
        cut_at = time.monotonic()
        # The fault's length is the scenario (Kafka gone for CUT_S), not a wait for some condition.
        await asyncio.sleep(CUT_S)
        acked_during = len(report.acked) - acked_before
        r.firewall.heal()
        healed_at = time.monotonic()
        load_running_at_heal = not load.done()
        drain_s = load_s = 0.0
        try:
            # The spool drains while the rest of the load still comes in (behind the spooled events, in order).
            drain_s = await r.wait_drained(DRAIN_BOUND_S)
            await asyncio.wait_for(load, timeout=60)
            load_s = time.monotonic() - r.started
            await r.wait_drained(DRAIN_BOUND_S)  # and empty once the load ended
            lost = await r.witness.wait_for(set(report.acked), timeout_s=DRAIN_BOUND_S)
            r.assert_alive("after the outage")
        except (AssertionError, TimeoutError) as exc:
            # Report the figures like any other run, then fail with what was seen.
            failure = f"{type(exc).__name__}: {exc}\n{await r.diagnose()}"
            lost = set(report.acked) - r.witness.seen
        finally:
            load.cancel()
        in_kafka_s = time.monotonic() - healed_at
    result(
        f"every broker unreachable ({mode}, {CUT_S:g} s)",
        r,
        lost,
        cut=healed_at - cut_at,
        load=load_s,
        drained_after_heal=drain_s,
        all_in_kafka_after_heal=in_kafka_s,
    )
    assert not failure, failure
    assert load_running_at_heal, "the load still ran at the heal (the cut came mid-load)"
    assert acked_during > 0, "callbacks were answered 200 while every broker was unreachable (spooled)"
    assert report.statuses == {200: EVENTS}, "every callback answered 200 at its first attempt"
    assert not lost, f"acked but not in Kafka: {sorted(lost)[:10]}"
