"""The asyncio front of the spool: group commit, waiting for data, and no disk I/O on the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from spoolkit import Gate

from bridge.delivery.spool import store
from bridge.delivery.spool.aio import AsyncSpool
from bridge.delivery.spool.format import HEADER_BYTES
from bridge.delivery.spool.store import DEFAULT_READ_MAX_BYTES, Spool, SpoolError, SpoolFull, sync_to_disk


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)  # fsync on: fsync_count counts real fsyncs
    aspool = AsyncSpool(spool)
    payloads = [b"event-%d" % i for i in range(200)]
    seqs = await asyncio.gather(*(aspool.append(p) for p in payloads))
    assert sorted(seqs) == list(range(1, 201))
    assert spool.fsync_count < 20, spool.fsync_count
    by_seq = dict(await aspool.read(0, 1000))
    assert all(by_seq[seq] == payload for seq, payload in zip(seqs, payloads, strict=True))
    # A second wave while a write is in progress forms the next batch.
    first = asyncio.create_task(aspool.append(b"alone"))
    await asyncio.sleep(0)
    wave = [asyncio.create_task(aspool.append(b"wave-%d" % i)) for i in range(50)]
    assert await first == 201
    assert sorted(await asyncio.gather(*wave)) == list(range(202, 252))
    await aspool.commit(251)
    assert aspool.depth == 0 and aspool.committed_seq == 251 and aspool.last_seq == 251
    await aspool.close()


async def test_wait_for_data_wakes_on_append_and_times_out(tmp_path: Path) -> None:
    aspool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    assert await aspool.wait_for_data(0, timeout_s=0.05) is False
    waiter = asyncio.create_task(aspool.wait_for_data(0, timeout_s=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    started = time.monotonic()
    await aspool.append(b"x")
    assert await waiter is True
    assert time.monotonic() - started < 1
    assert await aspool.wait_for_data(0, timeout_s=0) is True
    assert await aspool.wait_for_data(1, timeout_s=0.01) is False
    await aspool.close()


async def test_spool_full_reaches_every_caller_of_the_batch(tmp_path: Path) -> None:
    aspool = AsyncSpool(Spool.open(tmp_path, max_bytes=10 * (HEADER_BYTES + 10), fsync=False))
    results = await asyncio.gather(*(aspool.append(b"0123456789") for _ in range(12)), return_exceptions=True)
    assert all(isinstance(r, SpoolFull) for r in results)
    assert aspool.last_seq == 0
    assert await aspool.append(b"0123456789") == 1
    await aspool.close()


async def test_close_waits_for_the_write_in_progress(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    aspool = AsyncSpool(spool)
    tasks = [asyncio.create_task(aspool.append(b"p%d" % i)) for i in range(30)]
    await asyncio.sleep(0)  # the writer has started
    await aspool.close()
    assert sorted([t.result() for t in tasks]) == list(range(1, 31))
    with pytest.raises(SpoolError):
        await aspool.append(b"late")
    with Spool.open(tmp_path) as reopened:
        assert reopened.last_seq == 30


async def test_read_is_capped_in_bytes_by_default(tmp_path: Path) -> None:
    mib = 1024 * 1024
    aspool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    for _ in range(6):
        await aspool.append(b"m" * mib)
    fit = DEFAULT_READ_MAX_BYTES // (mib + HEADER_BYTES)
    assert [s for s, _ in await aspool.read(0, 100)] == list(range(1, fit + 1))
    assert [s for s, _ in await aspool.read(0, 100, max_bytes=10)] == [1]  # one record however large
    await aspool.close()


async def test_a_read_blocked_on_the_disk_leaves_the_event_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aspool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    for i in range(5):
        await aspool.append(b"event-%d" % i)
    gate = Gate(store._pread_exact, wait_s=5)
    monkeypatch.setattr(store, "_pread_exact", gate)
    read = asyncio.create_task(aspool.read(0, 10))
    assert await asyncio.to_thread(gate.entered.wait, 5)
    # What the callback path asks on every spooled event, on the loop, while the read is inside pread:
    assert (aspool.depth, aspool.last_seq, aspool.committed_seq) == (5, 5, 0)
    assert await aspool.append(b"meanwhile") == 6
    gate.release.set()
    assert await read == [(i + 1, b"event-%d" % i) for i in range(5)]
    await aspool.close()


async def test_close_waits_for_a_commit_in_flight_without_blocking_the_loop(tmp_path: Path) -> None:
    gate = Gate(sync_to_disk, armed=False, wait_s=5)
    aspool = AsyncSpool(Spool.open(tmp_path, sync=gate))  # fsync on: the cursor write fsyncs
    await aspool.append(b"x")
    gate.armed = True
    # A forwarder cancelled during commit leaves the commit running in its thread.
    commit = asyncio.create_task(aspool.commit(1))
    assert await asyncio.to_thread(gate.entered.wait, 5)
    close = asyncio.create_task(aspool.close())
    for _ in range(3):
        await asyncio.sleep(0)  # close has started and waits for the commit's lock in a thread
    assert not close.done()
    gate.release.set()
    await commit
    await close
    with Spool.open(tmp_path, fsync=False) as reopened:
        assert reopened.committed_seq == 1
