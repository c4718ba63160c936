"""The bridge process crashing: SIGKILLed again and again under load, and killed with events spooled and the last
spool segment torn as a crash mid-write leaves it (scenarios 1 and 4 of issue 17).

Proves that a 200 is a promise a crash cannot break: every key the bridge acknowledged, before any of the kills,
reaches Kafka once a bridge runs again (restarted with the same settings and spool, as a supervisor would), and a
damaged spool tail neither stops the start nor costs an acknowledged record.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from conftest import wait_until
from faultkit import drive
from scenarios import metric_sum, result, rig

from bridge.delivery.spool.format import HEADER_BYTES, encode_header, scan_segment, segment_first_seq

pytestmark = pytest.mark.timeout(180)

DRAIN_BOUND_S = 30.0
#: The kills of the SIGKILL loop that come while Kafka is cut, with events only in the spool.
SPOOL_KILLS = (4, 5, 6)


async def test_sigkill_loop_under_load_with_the_spool(tmp_path: Path) -> None:
    """2,000 events from 16 senders retrying as VOD does, the bridge SIGKILLed 10 times and restarted each time
    while the load runs: every event is acknowledged in the end, and every acknowledged key is in Kafka.

    Kills 4 to 6 come while every broker is cut (resets): callbacks are spooled then, so those kills hit a bridge
    with events only in its spool, and the restarts after them start with a spool to drain; Kafka is back before
    kill 7, whose restart forwards what is left while new callbacks queue behind it."""
    events, kills = 2000, 10
    keys = [f"kill-{i}" for i in range(events)]
    restarts_s: list[float] = []
    in_flight_at_kills: list[int] = []
    spooled = 0
    async with rig(tmp_path) as r:
        report = r.report
        load = asyncio.create_task(
            drive(r.bridge.url, keys, concurrency=16, report=report, retry_for_s=90, rate_per_s=150)
        )
        for kill in range(1, kills + 1):
            # Spread the kills over the load: kill k once k/11 of the events were acknowledged...
            target = kill * events // (kills + 1)
            if kill == SPOOL_KILLS[0]:
                r.firewall.cut(r.ports, "reset")
            elif kill == SPOOL_KILLS[-1] + 1:
                r.firewall.heal()
            await wait_until(lambda target=target: len(report.acked) >= target, timeout_s=30, interval_s=0.005)
            # (Spooled by this process so far: its counters die with it.)
            spooled += int(await metric_sum(r.bridge.port, "vod_bridge_events_spooled_total"))
            # ...at a moment when callbacks are open, so that some die with the bridge, unanswered.
            await wait_until(lambda: report.in_flight > 0, timeout_s=10, interval_s=0.001)
            in_flight_at_kills.append(report.in_flight)  # no await between this and the kill
            r.bridge.kill()
            started = time.monotonic()
            await r.bridge.start()
            restarts_s.append(time.monotonic() - started)
        assert not load.done(), "the load was still running at the last kill"
        await asyncio.wait_for(load, timeout=120)
        load_s = time.monotonic() - r.started
        drain_s = await r.wait_drained(DRAIN_BOUND_S)
        spooled += int(await metric_sum(r.bridge.port, "vod_bridge_events_spooled_total"))
        lost = await r.witness.wait_for(set(report.acked), timeout_s=DRAIN_BOUND_S)
    result(
        f"SIGKILL x{kills} under load, spool on (~{spooled} spooled)",
        r,
        lost,
        load=load_s,
        slowest_restart=max(restarts_s),
        drained=drain_s,
    )
    print(f"  callbacks in flight at each kill: {in_flight_at_kills}")
    assert len(restarts_s) == kills and min(in_flight_at_kills) > 0
    assert len(report.acked) == events, "every event got its 200 after VOD-like retries"
    assert not lost, f"acked but not in Kafka: {sorted(lost)[:10]}"


def tear(segment: Path, how: str) -> bytes:
    """Append to ``segment`` what a crash in the middle of writing the next record leaves behind, and return it:
    ``partial-record`` is the start of a well-formed next record (its header and half its payload);
    ``garbage`` is bytes that are no record at all (a torn page of something else)."""
    data = segment.read_bytes()
    scan = scan_segment(data, (segment_first_seq(segment.name) or 1) - 1)
    assert scan.seqs and not scan.defects, f"{segment.name} holds intact records before the tear"
    last_offset, last_length = scan.offsets[-1], scan.lengths[-1]
    payload = data[last_offset + HEADER_BYTES : last_offset + HEADER_BYTES + last_length]
    if how == "partial-record":
        torn = encode_header(scan.seqs[-1] + 1, payload) + payload[: len(payload) // 2]
    else:
        torn = random.Random(17).randbytes(777)
    with segment.open("ab") as out:
        out.write(torn)
    return torn


@pytest.mark.parametrize("how", ["partial-record", "garbage"])
async def test_torn_spool_tail_after_a_crash(how: str, tmp_path: Path) -> None:
    """Events spooled while Kafka is cut, the bridge SIGKILLed, the last segment torn; then Kafka back and the
    bridge restarted: it starts, sets the damaged bytes aside (``<segment>.corrupt-<offset>``), drains the spool
    to 0 and every acknowledged key is in Kafka."""
    async with rig(tmp_path) as r:
        report = r.report
        await drive(r.bridge.url, [f"direct-{i}" for i in range(100)], concurrency=16, report=report)
        r.firewall.cut(r.ports, "reset")
        await drive(r.bridge.url, [f"spooled-{i}" for i in range(300)], concurrency=16, report=report)
        spooled = await r.spool_depth()
        r.bridge.kill()
        segments = sorted(r.spool_dir.glob("*.seg"))
        assert segments, "the spool has segments"
        torn = tear(segments[-1], how)
        r.firewall.heal()
        started = time.monotonic()
        await r.bridge.start()
        start_s = time.monotonic() - started
        drain_s = await r.wait_drained(DRAIN_BOUND_S)
        lost = await r.witness.wait_for(set(report.acked), timeout_s=DRAIN_BOUND_S)
        aside = sorted(r.spool_dir.glob(f"{segments[-1].name}.corrupt-*"))
    result(f"torn spool tail ({how}, {spooled} spooled)", r, lost, restart=start_s, drained=drain_s)
    assert spooled > 0, "events were spooled before the crash"
    assert len(report.acked) == 400, "every event was answered 200 (Kafka, or the spool)"
    assert [path.read_bytes() for path in aside] == [torn], "exactly the torn bytes were set aside"
    assert not lost, f"acked but not in Kafka: {sorted(lost)[:10]}"
