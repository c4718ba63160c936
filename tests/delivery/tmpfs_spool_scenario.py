"""Two Kafka outages with the spool on a 1 MiB tmpfs, in a private mount namespace (run by test_spool_tmpfs.py).

Run as ``unshare --mount --propagation private python tmpfs_spool_scenario.py DIR BOOTSTRAP TOPIC IDEMPOTENCE``.
It mounts the tmpfs on DIR, then, with a real ``KafkaSink`` and ``SpoolForwarder``:

1. outage 1: the sink is not connected; events are stored until the spool refuses (``SpoolNoRoom``); then a
   ballast file fills what is left of the filesystem, so the disk is 100% full;
2. Kafka "comes back" (the sink connects) and the forwarder drains the spool on that full disk, no restart;
   (after a restart on the full disk);
3. the ballast goes; outage 2: the forwarder is stopped and events are stored until the spool refuses again;
4. the forwarder drains again;
5. outage 3 without the free-space floor: the filesystem's ENOSPC refuses; then the last drain.

It prints one JSON line with what happened; the test checks it and reads the topic.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import KafkaSettings
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.spool import AsyncSpool, Spool
from bridge.errors import SpoolNoRoom
from bridge.ops.metrics import Metrics
from bridge.vod.model import VodEvent

#: About the size of a VOD callback: the issue saw 1,049 of them fit in 1 MiB.
VALUE_BYTES = 800


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def event(key: str) -> VodEvent:
    value = json.dumps({"EventType": "PullComplete", "Key": key, "Pad": "x" * VALUE_BYTES}).encode()
    return VodEvent(event_type="PullComplete", key=key, value=value, payload=None)


async def fill(forwarder: SpoolForwarder, prefix: str) -> tuple[list[str], str]:
    """Store events until the spool refuses one; the keys acknowledged, and the refusal's code and message."""
    stored: list[str] = []
    now = datetime.now(UTC)
    while True:
        key = f"{prefix}-{len(stored)}"
        try:
            await forwarder.store(event(key), source="callback", received_at=now)
        except SpoolNoRoom as exc:
            return stored, f"{exc.code}: {exc.message}"
        stored.append(key)


def fill_the_disk(path: Path) -> int:
    """Write a ballast file until the filesystem says ENOSPC; returns its size."""
    written = 0
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                written += out.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return written


async def drain(spool: AsyncSpool, sink: KafkaSink, metrics: Metrics, topic: str) -> tuple[SpoolForwarder, float]:
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    started = time.monotonic()
    task = asyncio.create_task(forwarder.run())
    async with asyncio.timeout(60):
        while forwarder.depth:
            await asyncio.sleep(0.05)  # polls a real condition (the spool's depth), not a synchronisation by time
    elapsed_s = time.monotonic() - started
    forwarder.stop()
    await task
    return forwarder, elapsed_s


async def scenario(directory: Path, bootstrap: str, topic: str, idempotence: bool) -> dict[str, Any]:
    spool_dir = directory / "spool"
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=bootstrap, topic=topic, enable_idempotence=idempotence, linger_ms=0, publish_timeout_s=5.0
    )
    sink = KafkaSink(settings, metrics)  # not connected yet: Kafka is "away"
    raw = Spool.open(spool_dir)
    spool = AsyncSpool(raw)
    out: dict[str, Any] = {
        "filesystem_bytes": os.statvfs(directory).f_blocks * os.statvfs(directory).f_frsize,
        "segment_max_bytes": raw.segment_max_bytes,
        "min_free_bytes": raw.min_free_bytes,
    }
    try:
        first = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
        out["outage1"], out["refusal1"] = await fill(first, "o1")
        out["accepting_after_refusal"] = first.accepting
        out["ballast_bytes"] = fill_the_disk(directory / "ballast")
        out["free_bytes_when_full"] = free_bytes(directory)
        _, out["refusal_on_full_disk"] = await fill(first, "full")
        # A restart on the full disk (the bridge died at every one) keeps every event.
        await spool.close()
        raw = Spool.open(spool_dir)
        spool = AsyncSpool(raw)
        out["depth_after_restart_on_full_disk"] = raw.depth
        await asyncio.wait_for(sink.connect(), timeout=30)  # Kafka is back
        forwarder, out["drain1_s"] = await drain(spool, sink, metrics, topic)
        out["accepting_after_drain"] = forwarder.accepting
        out["spool_dir_bytes_after_drain1"] = dir_bytes(spool_dir)
        out["spool_files_after_drain1"] = sorted(p.name for p in spool_dir.iterdir())
        (directory / "ballast").unlink()
        out["outage2"], out["refusal2"] = await fill(forwarder, "o2")  # stopped: nothing forwards meanwhile
        _, out["drain2_s"] = await drain(spool, sink, metrics, topic)
        out["spool_dir_bytes_after_drain2"] = dir_bytes(spool_dir)
        # Without the floor, the filesystem's ENOSPC is what refuses: the last line of defence, and it holds.
        await spool.close()
        raw = Spool.open(spool_dir, min_free_bytes=0)
        spool = AsyncSpool(raw)
        no_floor = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
        out["outage3"], out["refusal3"] = await fill(no_floor, "o3")
        out["free_bytes_after_outage3"] = free_bytes(directory)
        _, out["drain3_s"] = await drain(spool, sink, metrics, topic)
        out["spool_dir_bytes_after_drain3"] = dir_bytes(spool_dir)
        out["depth"] = raw.depth
        out["cursor_write_failures"] = raw.cursor_write_failures
        out["cursor_write_failures_metric"] = [
            line for line in metrics.render().decode().splitlines() if line.startswith("vod_bridge_spool_cursor_write")
        ]
    finally:
        await spool.close()
        await sink.close()
    return out


def main() -> None:
    directory, bootstrap, topic, idempotence = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], check=True)
    print(json.dumps(asyncio.run(scenario(directory, bootstrap, topic, idempotence))), flush=True)


if __name__ == "__main__":
    main()
