"""The forwarder on a full disk, against a real broker: a full spool is ``spool_full``, a cursor or a refused/ copy
that cannot be written never stops forwarding, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import errno
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import Kafka, read_records, wait_until
from test_forwarder import _connected, _drain, _event, forward_one_no_topic_takes

from bridge.delivery import forwarder as forwarder_module
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.spool import AsyncSpool, Spool, store
from bridge.errors import PublishFailed, SpoolNoRoom
from bridge.ops.metrics import Metrics

pytestmark = [pytest.mark.integration, pytest.mark.producer]


def series(metrics: Metrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not rendered")


async def test_a_full_spool_is_spool_full_until_forwarding_frees_room(kafka: Kafka, topic: str, tmp_path: Path) -> None:
    metrics = Metrics()
    spool = AsyncSpool(Spool.open(tmp_path, max_bytes=2000, min_free_bytes=0, fsync=False))
    sink = await _connected(kafka, topic)
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    now = datetime.now(UTC)
    stored: list[str] = []
    try:
        assert forwarder.accepting
        with pytest.raises(SpoolNoRoom) as info:
            for n in range(100):
                await forwarder.store(_event(f"k{n}"), source="callback", received_at=now)
                stored.append(f"k{n}")
        error = info.value
        assert isinstance(error, PublishFailed) and error.retriable
        assert (error.code, error.cause, error.status, error.retry_after_s) == ("spool_full", "spool_full", 503, 5)
        assert "max_bytes=2000" in error.message
        assert not forwarder.accepting
        assert 1 <= len(stored) < 100
        task = asyncio.create_task(forwarder.run())
        try:
            await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
            assert forwarder.accepting, "a commit freed room"
            await forwarder.store(_event("after"), source="callback", received_at=now)
            stored.append("after")
            await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
        finally:
            forwarder.stop()
            await asyncio.wait_for(task, timeout=10)
    finally:
        await spool.close()
        await sink.close()
    records = await read_records(kafka.bootstrap_servers, topic, count=len(stored))
    assert sorted(r.key.decode() for r in records) == sorted(stored)


async def test_cursor_write_failures_are_counted_and_forwarding_goes_on(
    kafka: Kafka, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store._pwrite_all

    def no_room_for_the_cursor(fd: int, data: bytes, offset: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/cursor"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    metrics = Metrics()
    raw = Spool.open(tmp_path, segment_max_bytes=4096, min_free_bytes=0)
    spool = AsyncSpool(raw)
    sink = await _connected(kafka, topic)
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    now = datetime.now(UTC)
    try:
        for n in range(40):
            await forwarder.store(_event(f"k{n}"), source="callback", received_at=now)
        monkeypatch.setattr(store, "_pwrite_all", no_room_for_the_cursor)
        await _drain(forwarder)
        assert raw.cursor_failing and raw.cursor_write_failures >= 1
        assert series(metrics, "vod_bridge_spool_cursor_write_failures_total") == raw.cursor_write_failures
        # Delivered segments went all the same: only the active one (or its empty successor) is left.
        assert raw.segment_count == 1
    finally:
        await spool.close()
        await sink.close()
    records = await read_records(kafka.bootstrap_servers, topic, count=40)
    assert sorted(r.key.decode() for r in records) == sorted(f"k{n}" for n in range(40))


async def test_a_refused_record_that_cannot_be_copied_aside_stays_in_the_spool_and_is_retried(
    kafka: Kafka, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = forwarder_module._write_refused
    failures_left = [2]

    def full_disk_twice(path: Path, value: bytes) -> None:
        if failures_left[0]:
            failures_left[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, value)

    monkeypatch.setattr(forwarder_module, "_write_refused", full_disk_twice)
    metrics = Metrics()
    huge_value = await forward_one_no_topic_takes(kafka, topic, tmp_path, metrics)
    assert failures_left == [0]
    (kept,) = (tmp_path / "refused").iterdir()
    assert kept.read_bytes() == huge_value
    assert series(metrics, "vod_bridge_spool_set_aside_failures_total") == 2
    assert series(metrics, "vod_bridge_spool_set_aside_total") == 1
    records = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert [r.key for r in records] == [b"after-huge"], "published once, not again at each retry of its neighbour"
