"""Repeated resets of every broker with produce requests in flight, then a drain without a restart, on both Kafka
clients (scenario 5 of issue 17).

Proves that short, repeated connection resets (a broker bouncing, a load balancer dropping connections) never
leave the bridge wedged: once the network is back, with nobody restarting anything, the spool drains to 0 and
every acknowledged key is in Kafka within a bound — for the default client (aiokafka, on uvloop) and for
librdkafka. Each trial is a fresh cluster and bridge; ``FAULT_TRIALS=N`` runs N of them per client, so that a rare
wedge (aiokafka issue #1038: the client's metadata task dies on uvloop's ``RuntimeError``) shows up as a count of
failed trials.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import pytest
from conftest import wait_until
from faultkit import drive
from scenarios import TRIALS, Rig, poll, result, rig

pytestmark = pytest.mark.timeout(200)

EVENTS = 1000
#: Per client, new callbacks a second: as fast as possible (more publishes in flight at each cut) while the load
#: still outlasts the cuts and the recoveries between them (~7 s for aiokafka, ~12 s for librdkafka).
RATE_PER_S = {"aiokafka": 90.0, "librdkafka": 60.0}
#: How long each cut lasts: short, and different, so resets hit publishes at different stages.
CUTS_S = (0.3, 0.7, 0.5, 1.0, 0.4, 0.6, 0.3, 0.8)
#: From the heal to an empty spool and every acked key in Kafka: generous for a loaded 2-core machine, short
#: enough that a wedged client fails the trial quickly.
DRAIN_BOUND_S = 30.0
#: After a failed trial, how much longer to watch for a late recovery: a slow drain and a wedge read differently.
LATER_S = 30.0

CLIENTS = {
    # The production default: aiokafka on uvloop (BRIDGE_EVENT_LOOP=auto picks it when installed).
    "aiokafka": {"BRIDGE_KAFKA_CLIENT": "aiokafka", "BRIDGE_EVENT_LOOP": "uvloop"},
    "librdkafka": {"BRIDGE_KAFKA_CLIENT": "librdkafka"},
}
NEEDS = {"aiokafka": "uvloop", "librdkafka": "confluent_kafka"}


@pytest.mark.parametrize("trial", range(1, TRIALS + 1), ids=lambda n: f"trial{n}")
@pytest.mark.parametrize("client", list(CLIENTS))
async def test_repeated_resets_with_publishes_in_flight_then_drain(client: str, trial: int, tmp_path: Path) -> None:
    """Eight short resets (0.3-1 s) of every broker port while 16 senders post 1,000 events, each cut made while
    the bridge has publishes awaiting a Kafka ack; then, without a restart, the spool drains to 0 and every
    acked key is in Kafka within 30 s of the last heal."""
    if importlib.util.find_spec(NEEDS[client]) is None:
        pytest.skip(f"{client}: {NEEDS[client]} is not installed")
    keys = [f"resets-{client}-{trial}-{i}" for i in range(EVENTS)]
    in_flight_at_cuts: list[int] = []
    async with rig(tmp_path, **CLIENTS[client]) as r:
        report = r.report
        load = asyncio.create_task(
            drive(r.bridge.url, keys, concurrency=16, report=report, retry_for_s=90, rate_per_s=RATE_PER_S[client])
        )
        await wait_until(lambda: len(report.acked) >= 100, timeout_s=30)
        heals = [time.monotonic()]  # then the time of each heal
        wedged = ""
        try:
            await _reset_repeatedly(r, in_flight_at_cuts, heals)
            assert not load.done(), "the load still runs at the last heal (every cut came mid-load)"
            drain_s = await r.wait_drained(DRAIN_BOUND_S)
            await asyncio.wait_for(load, timeout=DRAIN_BOUND_S)
            drain_s = max(drain_s, await r.wait_drained(DRAIN_BOUND_S))
            lost = await r.witness.wait_for(set(report.acked), timeout_s=DRAIN_BOUND_S)
        except (AssertionError, TimeoutError) as exc:
            # A wedge: report the trial's figures like any other, then fail it with what was seen.
            drain_s, lost = time.monotonic() - heals[-1], set(report.acked) - r.witness.seen
            later = await _acks_again_within(r, LATER_S)
            wedged = (
                f"{type(exc).__name__}: {exc}\n"
                + (f"Kafka acked again {later:.1f}s later" if later is not None else f"still no ack {LATER_S:g}s later")
                + f"\n{await r.diagnose()}"
            )
        finally:
            load.cancel()
        in_kafka_s = time.monotonic() - heals[-1]
        alive = r.alive()
    result(
        f"resets x{len(CUTS_S)} ({client}, trial {trial}/{TRIALS})",
        r,
        lost,
        cuts_done=heals[-1] - r.started,
        drained_after_heal=drain_s,
        all_in_kafka_after_heal=in_kafka_s,
    )
    print(f"  cuts made: {len(in_flight_at_cuts)}/{len(CUTS_S)}; publishes in flight at each: {in_flight_at_cuts}")
    assert not wedged, f"no drain without a restart: {wedged}"
    assert alive, "the bridge is still running (nobody restarted it)"
    assert len(report.acked) == EVENTS, "every event got its 200 after VOD-like retries"
    assert not lost, f"acked but not in Kafka: {sorted(lost)[:10]}"


async def _reset_repeatedly(r: Rig, in_flight_at_cuts: list[int], heals: list[float]) -> None:
    """Cut every broker port with resets, once per ``CUTS_S``, each time while publishes await an ack and
    after the producer recovered from the cut before (Kafka acks again); note the publishes in flight at each
    cut and the time of each heal."""
    for number, cut_s in enumerate(CUTS_S):
        if number:
            published = await r.published()

            async def acking(before: float = published) -> bool:
                return await r.published() > before

            await poll(acking, timeout_s=DRAIN_BOUND_S, what=f"Kafka acking again after cut {number}")
        seen: list[float] = []

        async def publishing(seen: list[float] = seen) -> bool:
            seen.append(await r.in_flight())
            return seen[-1] > 0

        await poll(publishing, timeout_s=15, interval_s=0.005, what=f"publishes in flight before cut {number + 1}")
        r.firewall.cut(r.ports, "reset")  # no await since the count was read: it is the count at the cut
        in_flight_at_cuts.append(int(seen[-1]))
        # The cut's length is the fault itself, not a wait for some condition.
        await asyncio.sleep(cut_s)
        r.firewall.heal()
        heals.append(time.monotonic())


async def _acks_again_within(r: Rig, timeout_s: float) -> float | None:
    """How long until Kafka acknowledges anything more of this bridge, or None if not within ``timeout_s``."""
    before = await r.published()

    async def acking() -> bool:
        return await r.published() > before

    try:
        return await poll(acking, timeout_s=timeout_s, what="Kafka acking again")
    except AssertionError:
        return None
