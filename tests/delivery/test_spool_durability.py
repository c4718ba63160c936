"""Proof that the spool is durable before anyone is told so.

A SIGKILL test cannot tell a missing sync (the page cache survives a killed process), so these tests inject the
spool's sync step: one that blocks shows that neither ``AsyncSpool.append`` nor the callback's 200 comes before
the sync returned; one that records shows the order of syncs and deletions.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import sample_event

from bridge.app import COMPONENTS
from bridge.config import HttpSettings, KafkaSettings, Settings, SpoolSettings
from bridge.delivery.spool.aio import AsyncSpool
from bridge.delivery.spool.format import CURSOR_NAME, decode_cursor, segment_first_seq
from bridge.delivery.spool.store import Spool, SyncKind, sync_to_disk
from bridge.ops.embedded import free_port


class SyncGate:
    """A sync step that does the real sync; once ``armed``, the first sync of ``kind`` first waits for ``release``.

    The wait is bounded, so a test that never releases fails instead of hanging a worker thread.
    """

    def __init__(self, kind: SyncKind = "segment") -> None:
        self.kind = kind
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        #: ``time.monotonic()`` when the gated sync returned.
        self.returned_at: float | None = None

    def __call__(self, fd: int, path: Path, kind: SyncKind) -> None:
        gated = self.armed and kind == self.kind and not self.entered.is_set()
        if gated:
            self.entered.set()
            if not self.release.wait(10):
                raise AssertionError("the blocked sync was never released")
        sync_to_disk(fd, path, kind)
        if gated:
            self.returned_at = time.monotonic()


async def still_pending(task: asyncio.Task[Any], within_s: float = 0.3) -> bool:
    """True when ``task`` has not finished within ``within_s`` (it is waiting for something)."""
    done, _ = await asyncio.wait({task}, timeout=within_s)
    return not done


def test_the_production_sync_step_uses_fdatasync_for_data_and_fsync_for_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def recorder(name: str, real: Any) -> Any:
        def call(fd: int) -> None:
            calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        return call

    monkeypatch.setattr(os, "fsync", recorder("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", recorder("fdatasync", real_fdatasync))
    with Spool.open(tmp_path / "spool", segment_max_bytes=100) as spool:
        spool.append([b"x" * 30])
        spool.append([b"y" * 40])  # rolls to a new segment
        spool.commit(2)
    spool_dir = str(tmp_path / "spool")
    directories = {str(tmp_path), spool_dir}
    assert calls
    assert {name for name, path in calls if path in directories} == {"fsync"}
    data = [(name, path) for name, path in calls if path not in directories]
    assert {name for name, _ in data} == {"fdatasync"}
    assert {Path(path).name for _, path in data} == {
        f"{1:020d}.seg",
        f"{2:020d}.seg",
        CURSOR_NAME,
    }


async def test_append_returns_only_after_its_sync_returned(tmp_path: Path) -> None:
    gate = SyncGate()
    aspool = AsyncSpool(Spool.open(tmp_path, sync=gate))
    gate.armed = True
    try:
        append = asyncio.create_task(aspool.append(b"durable"))
        returned_at: list[float] = []
        append.add_done_callback(lambda _: returned_at.append(time.monotonic()))
        assert await asyncio.to_thread(gate.entered.wait, 10), "append never synced"
        assert await still_pending(append), "append returned while its sync was blocked"
        assert aspool.last_seq == 0, "the record is visible before it is durable"
    finally:
        gate.release.set()
    assert await asyncio.wait_for(append, timeout=5) == 1
    assert gate.returned_at is not None and returned_at[0] >= gate.returned_at
    await aspool.close()


def settings_without_kafka(spool_dir: Path) -> Settings:
    """A bridge whose Kafka never answers (nothing listens on the port): every callback goes to the spool."""
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{free_port()}", enable_idempotence=False, linger_ms=0, publish_timeout_s=2.0
        ),
        http=HttpSettings(),
        spool=SpoolSettings(dir=str(spool_dir), publish_budget_s=0.5),
    )


async def test_a_spooled_callback_is_answered_only_after_its_sync_returned(
    make_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = SyncGate()
    real_open = Spool.open

    def open_with_gate(directory: Path, **kwargs: Any) -> Spool:
        return real_open(directory, sync=gate, **kwargs)

    monkeypatch.setattr(Spool, "open", open_with_gate)
    client = await make_client(settings_without_kafka(tmp_path / "spool"), wait_ready=False)
    forwarder = client.server.app[COMPONENTS].forwarder
    assert forwarder is not None
    gate.armed = True
    try:
        post = asyncio.create_task(client.post("/vod/callback", json=sample_event("durable")))
        assert await asyncio.to_thread(gate.entered.wait, 10), "the callback never reached the spool's sync"
        assert await still_pending(post), "answered while the spool's sync was still blocked"
        assert forwarder.depth == 0
    finally:
        released_at = time.monotonic()
        gate.release.set()
    response = await asyncio.wait_for(post, timeout=5)
    answered_at = time.monotonic()
    assert response.status == 200
    assert (await response.json())["status"] == "spooled"
    assert gate.returned_at is not None and answered_at >= gate.returned_at
    assert answered_at - released_at < 2.0, "the answer should follow the sync at once"
    assert forwarder.depth == 1


def test_the_cursor_is_durable_before_the_segments_it_skips_are_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str, list[str]]] = []

    def segment_names() -> list[str]:
        return sorted(p.name for p in tmp_path.glob("*.seg"))

    def recording_sync(fd: int, path: Path, kind: SyncKind) -> None:
        sync_to_disk(fd, path, kind)
        events.append((kind, path.name, segment_names()))

    payloads = [b"%03d" % i * 10 for i in range(10)]  # 50-byte records, three per segment
    with Spool.open(tmp_path, segment_max_bytes=160, sync=recording_sync) as spool:
        spool.append(payloads)
        before = segment_names()
        assert len(before) == 4
        doomed = before[:2]  # records 1-3 and 4-6
        last_of_doomed = segment_first_seq(before[2]) - 1
        real_delete = spool._delete

        cursor_at_delete: list[int | None] = []

        def recording_delete(segments: list[Any]) -> None:
            events.append(("delete", ",".join(s.path.name for s in segments), segment_names()))
            cursor_at_delete.append(decode_cursor((tmp_path / CURSOR_NAME).read_bytes()))
            real_delete(segments)

        monkeypatch.setattr(spool, "_delete", recording_delete)
        events.clear()
        spool.commit(last_of_doomed)
    # One sync per commit: the cursor is overwritten in place (no new file, no rename, no directory sync).
    assert [(kind, name) for kind, name, _ in events] == [("cursor", CURSOR_NAME), ("delete", ",".join(doomed))]
    # The sync happened while every segment was still there; only then were the skipped ones deleted.
    assert all(files == before for _, _, files in events)
    assert cursor_at_delete == [last_of_doomed], "the cursor on disk already skipped them"
    assert segment_names() == before[2:]
