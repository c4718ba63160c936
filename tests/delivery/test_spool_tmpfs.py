"""End to end on a real 1 MiB tmpfs: the spool fills, the disk fills, Kafka comes back, and the spool drains by
itself on that full disk; the next outage spools about as much again. Runs ``tmpfs_spool_scenario.py`` in a
private mount namespace (``unshare --mount``), so it needs root (or the right to unshare and mount)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Kafka, read_records

pytestmark = [pytest.mark.integration]

SCENARIO = Path(__file__).with_name("tmpfs_spool_scenario.py")
REPO = Path(__file__).resolve().parents[2]


def _can_mount_a_tmpfs(directory: Path) -> str | None:
    """None if ``unshare --mount`` and a tmpfs mount work here, else why not."""
    probe = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs"]
    try:
        done = subprocess.run([*probe, str(directory)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if done.returncode != 0:
        return f"unshare --mount + mount -t tmpfs not permitted here: {done.stderr.strip() or done.returncode}"
    return None


async def test_a_spool_on_a_full_tmpfs_drains_by_itself_and_takes_as_much_again(
    kafka: Kafka, topic: str, tmp_path: Path
) -> None:
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    reason = _can_mount_a_tmpfs(mount_point)
    if reason is not None:
        pytest.skip(reason)
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, str(SCENARIO), str(mount_point)]
    command += [kafka.bootstrap_servers, topic, "1" if kafka.supports_idempotence else "0"]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, stderr.decode()[-3000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    summary = {k: v for k, v in result.items() if not k.startswith("outage")}
    counts = {k: len(v) for k, v in result.items() if k.startswith("outage")}
    print(json.dumps({**counts, **summary}))

    assert result["filesystem_bytes"] == 1024 * 1024
    assert (result["segment_max_bytes"], result["min_free_bytes"]) == (64 * 1024, 52428)
    outage1, outage2 = result["outage1"], result["outage2"]
    # The spool's own floor refused first, with its own code, before the filesystem said ENOSPC...
    assert result["refusal1"].startswith(
        "spool_full: kafka unavailable and no room in the spool: no room for the spool"
    )
    assert not result["accepting_after_refusal"]
    # ...and with the disk then 100% full (a ballast file took the rest), appends are still refused the same way.
    assert result["free_bytes_when_full"] == 0
    assert result["refusal_on_full_disk"].startswith("spool_full: ")
    assert len(outage1) > 800, "most of the 1 MiB holds events"
    assert result["depth_after_restart_on_full_disk"] == len(outage1), "a restart on the full disk keeps them all"
    # Drained on the full disk without another restart.
    assert result["accepting_after_drain"]
    # A drained spool holds almost nothing: the 1 KiB cursor and at most a part of one segment.
    assert result["spool_dir_bytes_after_drain1"] <= 1024 + 64 * 1024 // 4
    # The next outage spools about as much again (the issue saw 61 of 300 after a full drain).
    assert len(outage2) >= 0.95 * len(outage1)
    assert result["spool_dir_bytes_after_drain2"] <= 1024 + 64 * 1024 // 4
    # Without the floor the filesystem refuses with ENOSPC: still a clean 503 spool_full, nothing half-written.
    outage3 = result["outage3"]
    assert result["refusal3"].startswith("spool_full: kafka unavailable and no room in the spool: no space left")
    assert "No space left on device" in result["refusal3"]
    assert len(outage3) >= len(outage1)
    assert result["depth"] == 0 and result["spool_dir_bytes_after_drain3"] <= 1024 + 64 * 1024 // 4
    # The cursor never needed a new block: not one write failed, full disk or not.
    assert result["cursor_write_failures"] == 0
    assert result["cursor_write_failures_metric"] == ["vod_bridge_spool_cursor_write_failures_total 0.0"]

    acknowledged = outage1 + outage2 + outage3
    records = await read_records(kafka.bootstrap_servers, topic, count=len(acknowledged), timeout_s=60)
    keys = [r.key.decode() for r in records]
    assert sorted(keys) == sorted(acknowledged), "every acknowledged event reached Kafka, exactly once"
