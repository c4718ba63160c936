"""The spool's disk full while Kafka is unreachable (scenario 3 of issue 17).

Proves that a full disk only refuses new callbacks (503, which VOD retries) and costs nothing else: the bridge does
not exit, once Kafka is back its spool drains to 0 by itself on that same full disk (committing what Kafka acked
needs no free space), every acknowledged key reaches Kafka, and the drained spool keeps no space, so a second
outage can again spool about as many events as the first.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import sample_event
from faultkit import drive
from netns import tmpfs
from scenarios import Rig, result, rig

pytestmark = pytest.mark.timeout(180)

DISK_BYTES = 1024 * 1024
DRAIN_BOUND_S = 30.0
#: A batch of callbacks per round while filling the disk; at most this many rounds (~4x what 1 MiB holds).
BATCH, MAX_BATCHES = 100, 40


async def spool_until_full(r: Rig, prefix: str) -> int:
    """With Kafka cut, post batches of callbacks (each tried once: VOD would retry the 503s later, and they are
    not acknowledged) until the spool refuses them with 503s; return how many were acknowledged (spooled)."""
    acked_before = len(r.report.acked)
    for batch in range(MAX_BATCHES):
        refused_before = r.report.statuses.get(503, 0)
        keys = [f"{prefix}-{batch}-{i}" for i in range(BATCH)]
        await drive(r.bridge.url, keys, concurrency=16, report=r.report, retry_for_s=0.01)
        r.assert_alive(f"while the {prefix} outage filled its spool")
        if r.report.statuses.get(503, 0) - refused_before >= BATCH // 2:
            return len(r.report.acked) - acked_before
    raise AssertionError(f"no 503s after {MAX_BATCHES * BATCH} callbacks: the spool never filled its 1 MiB disk")


async def assert_refused_as_full(r: Rig, outage: str) -> None:
    """A full spool says so: a callback too big for what is left gets 503 ``spool_full`` (not
    ``kafka_unavailable``), and ``/readyz`` is 503 with ``"spool": "full"`` while the spool holds events."""
    event = {**sample_event(f"{outage}-too-big"), "Padding": "x" * 64 * 1024}
    async with aiohttp.ClientSession() as session, session.post(r.bridge.url, json=event) as response:
        body = await response.json()
        assert (response.status, body["error"]) == (503, "spool_full"), body
        assert response.headers["Retry-After"].isdigit()
    readyz = await r.bridge.readyz()
    assert (readyz["status"], readyz["spool"]) == ("not_ready", "full") and readyz["spool_depth"] > 0, readyz
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{r.bridge.port}/metrics") as got:
        metrics = await got.text()
    assert re.search(r'vod_bridge_publish_failures_total\{code="spool_full",source="callback"\} [1-9]', metrics)


async def test_full_spool_disk_then_heal(tmp_path: Path) -> None:
    """Spool on a 1 MiB tmpfs, every broker cut (resets), callbacks until 503 (disk full); heal: the bridge
    keeps running, the spool drains to 0 by itself, every acked key is in Kafka; a second outage spools again
    at least 3/4 as many events as the first."""
    spooled: list[int] = []
    durations: dict[str, float] = {}
    failure = ""
    with tmpfs(tmp_path / "disk", DISK_BYTES) as disk:
        async with rig(tmp_path, spool_dir=disk / "spool") as r:
            await drive(r.bridge.url, [f"direct-{i}" for i in range(50)], concurrency=16, report=r.report)
            try:
                for outage in ("first", "second"):
                    r.firewall.cut(r.ports, "reset")
                    started = time.monotonic()
                    spooled.append(await spool_until_full(r, outage))
                    durations[f"{outage}_fill"] = time.monotonic() - started
                    await assert_refused_as_full(r, outage)
                    r.firewall.heal()
                    durations[f"{outage}_drain"] = await r.wait_drained(DRAIN_BOUND_S)
                    readyz = await r.bridge.readyz()
                    assert (readyz["status"], readyz["spool"]) == ("ready", "accepting"), readyz
                lost = await r.witness.wait_for(set(r.report.acked), timeout_s=DRAIN_BOUND_S)
            except AssertionError as exc:
                failure = str(exc)
                # Whatever did reach Kafka counts: the witness may still be reconnecting after the cut.
                lost = await r.witness.wait_for(set(r.report.acked), timeout_s=15)
            r.firewall.heal()
    result(f"full spool disk (1 MiB tmpfs; spooled per outage {spooled})", r, lost, **durations)
    assert not failure, failure
    assert len(spooled) == 2 and spooled[0] > 0, "the first outage spooled events until the disk was full"
    assert spooled[1] >= 0.75 * spooled[0], f"a drained spool keeps no space: {spooled[1]} vs {spooled[0]} spooled"
    assert not lost, f"acked but not in Kafka: {sorted(lost)[:10]}"
