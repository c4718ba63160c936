"""Spools that a worker count does not open are found, and a start that would strand their events is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.delivery.spool.store import Spool
from bridge.delivery.spool.stranded import (
    StrandedSpool,
    check_no_stranded,
    find_stranded,
    spool_dirs,
    worker_spool_dir,
)
from bridge.errors import ConfigError


def spool_with(directory: Path, events: int, *, committed: int = 0) -> Path:
    """A closed spool in ``directory`` holding ``events`` records, the first ``committed`` of them delivered."""
    with Spool.open(directory, fsync=False) as spool:
        spool.append([b"event-%d" % i for i in range(events)])
        if committed:
            spool.commit(committed)
    return directory


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refusal(root: Path, workers: int) -> str:
    with pytest.raises(ConfigError) as info:
        check_no_stranded(root, workers)
    return info.value.message


def test_spool_dirs_per_worker_count(tmp_path: Path) -> None:
    assert spool_dirs(tmp_path, 1) == [tmp_path]
    assert spool_dirs(tmp_path, 3) == [tmp_path / "worker-0", tmp_path / "worker-1", tmp_path / "worker-2"]
    assert worker_spool_dir(tmp_path, 7) == tmp_path / "worker-7"
    with pytest.raises(ValueError, match="at least 1"):
        find_stranded(tmp_path, 0)


def test_scaling_down_with_events_in_a_dropped_worker_is_refused(tmp_path: Path) -> None:
    for index, events in enumerate([4, 0, 5]):
        spool_with(worker_spool_dir(tmp_path, index), events)
    assert find_stranded(tmp_path, 2) == [StrandedSpool(tmp_path / "worker-2", 5, 3)]
    message = refusal(tmp_path, 2)
    assert message == (
        f"refusing to start: BRIDGE_WORKERS=2 does not open these spools under BRIDGE_SPOOL_DIR={tmp_path}, "
        "so nothing would forward their events:\n"
        f"  {tmp_path}/worker-2: 5 undelivered events (opened with BRIDGE_WORKERS>=3)\n"
        "Start once with BRIDGE_WORKERS=3 until vod_bridge_spool_depth is 0 on every worker, stop, then start "
        "with BRIDGE_WORKERS=2."
    )
    # The advice works: three workers open everything, and once drained two are fine again.
    check_no_stranded(tmp_path, 3)
    with Spool.open(tmp_path / "worker-2", fsync=False) as spool:
        spool.commit(spool.last_seq)
    check_no_stranded(tmp_path, 2)


def test_leftover_directories_without_events_are_fine_and_left_untouched(tmp_path: Path) -> None:
    (tmp_path / "worker-2").mkdir()  # never used
    spool_with(tmp_path / "worker-3", 3, committed=3)  # drained
    spool_with(tmp_path / "worker-0", 2)  # opened by both counts below
    (tmp_path / "worker-x").mkdir()  # not ours
    spool_with(tmp_path / "worker-x", 1)
    before = snapshot(tmp_path)
    assert find_stranded(tmp_path, 2) == []
    check_no_stranded(tmp_path, 2)
    assert snapshot(tmp_path) == before  # nothing created, repaired or deleted
    # No spool configured, or a spool directory that does not exist yet: nothing to check.
    check_no_stranded(None, 4)
    check_no_stranded(tmp_path / "missing", 4)
    assert not (tmp_path / "missing").exists()


def test_scaling_up_from_one_worker_with_events_in_the_root_is_refused(tmp_path: Path) -> None:
    spool_with(tmp_path, 7, committed=2)
    assert find_stranded(tmp_path, 3) == [StrandedSpool(tmp_path, 5, 1)]
    message = refusal(tmp_path, 3)
    assert f"  {tmp_path}: 5 undelivered events (opened with BRIDGE_WORKERS=1)" in message
    assert message.endswith(
        "Start once with BRIDGE_WORKERS=1 until vod_bridge_spool_depth is 0, stop, then start with BRIDGE_WORKERS=3."
    )
    check_no_stranded(tmp_path, 1)


def test_going_back_to_one_worker_with_events_in_worker_spools_is_refused(tmp_path: Path) -> None:
    spool_with(tmp_path / "worker-0", 1)
    spool_with(tmp_path / "worker-1", 2)
    assert find_stranded(tmp_path, 1) == [
        StrandedSpool(tmp_path / "worker-0", 1, 2),
        StrandedSpool(tmp_path / "worker-1", 2, 2),
    ]
    message = refusal(tmp_path, 1)
    assert f"  {tmp_path}/worker-0: 1 undelivered event (opened with BRIDGE_WORKERS>=2)" in message
    assert f"  {tmp_path}/worker-1: 2 undelivered events (opened with BRIDGE_WORKERS>=2)" in message
    assert message.endswith(
        "Start once with BRIDGE_WORKERS=2 until vod_bridge_spool_depth is 0 on every worker, stop, then start "
        "with BRIDGE_WORKERS=1."
    )


def test_a_spool_open_in_another_process_is_reported_as_in_use(tmp_path: Path) -> None:
    spool_with(tmp_path / "worker-1", 2)
    with Spool.open(tmp_path / "worker-3", fsync=False):
        assert find_stranded(tmp_path, 1) == [
            StrandedSpool(tmp_path / "worker-1", 2, 2),
            StrandedSpool(tmp_path / "worker-3", None, 4),
        ]
        message = refusal(tmp_path, 1)
    assert f"  {tmp_path}/worker-3: in use by another process (opened with BRIDGE_WORKERS>=4)" in message
    assert f"Another process has {tmp_path}/worker-3 open" in message
    assert "Start once with BRIDGE_WORKERS=2 until" in message  # the count that drains what is known


def test_events_in_both_the_root_and_worker_spools_get_a_step_by_step_plan(tmp_path: Path) -> None:
    spool_with(tmp_path, 3)
    spool_with(tmp_path / "worker-0", 1)
    spool_with(tmp_path / "worker-2", 2)
    # With one worker the worker spools are stranded, and BRIDGE_WORKERS=3 would strand the root: no single
    # count drains everything, so the advice must not send the operator back and forth.
    message = refusal(tmp_path, 1)
    assert message.splitlines()[-1] == (
        f"{tmp_path} itself (BRIDGE_WORKERS=1) and worker-<i> spools (BRIDGE_WORKERS>1) both hold events, so no "
        f"single start drains them all. Move worker-0, worker-2 out of {tmp_path}, start once with "
        "BRIDGE_WORKERS=1 until vod_bridge_spool_depth is 0, stop, move them back, start with BRIDGE_WORKERS=3 "
        "until vod_bridge_spool_depth is 0 on every worker, stop, then start with BRIDGE_WORKERS=1."
    )
    # With three workers only the root is stranded, but BRIDGE_WORKERS=1 would strand the worker spools.
    message = refusal(tmp_path, 3)
    assert f"  {tmp_path}: 3 undelivered events (opened with BRIDGE_WORKERS=1)" in message
    assert message.splitlines()[-1].endswith(
        f"Move worker-0, worker-2 out of {tmp_path}, start once with BRIDGE_WORKERS=1 until "
        "vod_bridge_spool_depth is 0, stop, move them back and start with BRIDGE_WORKERS=3."
    )


def test_an_unreadable_spool_is_a_config_error(tmp_path: Path) -> None:
    spool_with(tmp_path / "worker-1", 1)
    (tmp_path / "worker-1" / "LOCK").unlink()
    (tmp_path / "worker-1" / "LOCK").mkdir()  # the lock file cannot be opened
    with pytest.raises(ConfigError, match=r"cannot check .* BRIDGE_WORKERS=1 would strand"):
        check_no_stranded(tmp_path, 1)
