"""The spool on a full disk: every write site fails (ENOSPC, EIO) in turn, and nothing acknowledged is lost.

Failures are injected by substituting the store's module-level I/O helpers (``_pwrite_all``, ``_create_file``,
``_free_bytes``) and its sync step; everything else is real files and real syncs.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.delivery.spool import store
from bridge.delivery.spool.format import (
    CURSOR_FILE_BYTES,
    CURSOR_NAME,
    HEADER_BYTES,
    CursorState,
    decode_cursor,
    decode_cursor_state,
    encode_cursor_slot,
    encode_cursor_v1,
    encode_header,
    segment_name,
)
from bridge.delivery.spool.store import Spool, SpoolError, SpoolFull, SyncKind, sync_to_disk

RECORD = b"r" * 80  # 100 bytes on disk
REPO = Path(__file__).resolve().parents[2]


def path_of(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


class FailingWrites:
    """``_pwrite_all`` that fails with ``err`` for files whose name ``matches``, while ``armed``."""

    def __init__(self, matches: Callable[[str], bool], err: int = errno.ENOSPC) -> None:
        self.real = store._pwrite_all
        self.matches = matches
        self.err = err
        self.armed = True
        self.failed = 0

    def __call__(self, fd: int, data: bytes, offset: int) -> None:
        if self.armed and self.matches(path_of(fd).name):
            self.failed += 1
            # A real ENOSPC may come after part of the data reached the file: write half of it first.
            self.real(fd, data[: len(data) // 2], offset)
            raise OSError(self.err, os.strerror(self.err))
        self.real(fd, data, offset)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def segs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.seg"))


def drain(spool: Spool, *, batch: int = 7) -> list[int]:
    """Read and commit everything in batches, as the forwarder does; returns the sequence numbers read."""
    seen: list[int] = []
    while records := spool.read(spool.committed_seq, batch):
        seen += [seq for seq, _ in records]
        spool.commit(records[-1][0])
    return seen


# -- the cursor -------------------------------------------------------------------------------------------------


def test_a_cursor_that_cannot_be_written_never_stops_commits_and_is_logged_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=store.__name__)
    failing = FailingWrites(lambda name: name == CURSOR_NAME)
    with Spool.open(tmp_path, segment_max_bytes=300, max_bytes=10_000, min_free_bytes=0) as spool:
        spool.append([RECORD] * 12)  # four segments of three
        spool.commit(2)
        monkeypatch.setattr(store, "_pwrite_all", failing)
        spool.commit(4)
        spool.commit(7)
        # The commits went on in memory, and delivered segments were deleted all the same: space is freed.
        assert (spool.committed_seq, spool.cursor_write_failures, spool.cursor_failing) == (7, 2, True)
        assert segs(tmp_path) == [segment_name(7), segment_name(10)]
        assert decode_cursor((tmp_path / CURSOR_NAME).read_bytes()) == 2, "the cursor on disk is the old one"
        assert spool.append([RECORD]) == [13], "appends go on too"
    # A restart while the cursor was failing: the oldest segment bounds what is sent again; nothing is lost.
    with Spool.open(tmp_path, segment_max_bytes=300, max_bytes=10_000, min_free_bytes=0) as spool:
        assert spool.committed_seq == 6
        assert drain(spool) == list(range(7, 14))
        # This open's attempt to bring the cursor up to date, and the drain's one commit.
        assert spool.cursor_write_failures == 2
        failing.armed = False
        spool.append([RECORD])
        spool.commit(14)
        assert not spool.cursor_failing
    assert decode_cursor((tmp_path / CURSOR_NAME).read_bytes()) == 14
    messages = [r.getMessage() for r in caplog.records if "cursor" in r.getMessage()]
    failing_lines = [m for m in messages if "cannot write the cursor" in m]
    assert len(failing_lines) == 2, messages  # once per open (each is a new state), not once per commit
    assert "No space left on device" in failing_lines[0]
    assert [m for m in messages if "written again" in m] == ["spool: the cursor is written again (committed_seq=14)"]


def test_a_failed_cursor_sync_is_counted_not_fatal_and_the_next_write_avoids_the_good_slot(tmp_path: Path) -> None:
    fail_cursor_sync = [False]

    def sync(fd: int, path: Path, kind: SyncKind) -> None:
        if fail_cursor_sync[0] and kind == "cursor":
            raise OSError(errno.EIO, "injected EIO")
        sync_to_disk(fd, path, kind)

    with Spool.open(tmp_path, sync=sync, min_free_bytes=0) as spool:
        spool.append([b"a", b"b", b"c"])
        spool.commit(1)
        good = decode_cursor_state((tmp_path / CURSOR_NAME).read_bytes())
        assert good is not None and good.seq == 1
        fail_cursor_sync[0] = True
        spool.commit(2)
        assert (spool.committed_seq, spool.cursor_write_failures) == (2, 1)
        assert spool.append([b"d"]) == [4], "a cursor sync failure does not make the spool unusable"
        # The failed write went to the other slot; tear it completely: the good slot is untouched.
        raw = bytearray((tmp_path / CURSOR_NAME).read_bytes())
        other = 512 * (1 - good.slot)
        raw[other : other + 24] = b"\xff" * 24
        (tmp_path / CURSOR_NAME).write_bytes(bytes(raw))
        assert decode_cursor_state(bytes(raw)) == good
        fail_cursor_sync[0] = False
        spool.commit(3)
        # Written again to the same (non-good) slot, with a generation never used before.
        state = decode_cursor_state((tmp_path / CURSOR_NAME).read_bytes())
        assert state is not None and (state.seq, state.slot) == (3, 1 - good.slot)
        assert state.generation > good.generation + 1


def test_one_sync_per_commit_and_the_cursor_file_never_grows(tmp_path: Path) -> None:
    with Spool.open(tmp_path, segment_max_bytes=1 << 20, min_free_bytes=0) as spool:
        spool.append([RECORD] * 100)
        before = spool.commit_fsync_count
        inode = (tmp_path / CURSOR_NAME).stat().st_ino
        for seq in range(1, 51):
            spool.commit(seq)
        assert spool.commit_fsync_count - before == 50
        assert (tmp_path / CURSOR_NAME).stat().st_ino == inode, "overwritten in place, never replaced"
        assert (tmp_path / CURSOR_NAME).stat().st_size == CURSOR_FILE_BYTES
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        assert spool.committed_seq == 50


def test_a_version_1_cursor_keeps_its_position_and_migrates_in_place(tmp_path: Path) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        spool.append([b"a", b"b", b"c", b"d"])
    cursor = tmp_path / CURSOR_NAME
    cursor.write_bytes(encode_cursor_v1(2))  # as the previous version left it
    assert Spool.inspect(tmp_path).committed_seq == 2
    inode = cursor.stat().st_ino
    with Spool.open(tmp_path, fsync=False) as spool:
        assert (spool.committed_seq, spool.recovery_report) == (2, [])
        # Migrated by writing slot 1 (the v1 cursor is slot 0, generation 0): no new file.
        assert decode_cursor_state(cursor.read_bytes()) == CursorState(2, 1, 1)
        assert cursor.read_bytes()[:16] == encode_cursor_v1(2)
        spool.commit(3)
        assert decode_cursor_state(cursor.read_bytes()) == CursorState(3, 2, 0)
    assert cursor.stat().st_ino == inode
    assert Spool.inspect(tmp_path).committed_seq == 3


@pytest.mark.parametrize("torn", ["newest", "oldest"])
def test_a_torn_slot_falls_back_to_the_other_one(tmp_path: Path, torn: str) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        spool.append([b"a", b"b", b"c", b"d"])
        spool.commit(2)
        spool.commit(3)
    cursor = tmp_path / CURSOR_NAME
    state = decode_cursor_state(cursor.read_bytes())
    assert state is not None and state.seq == 3
    slot = state.slot if torn == "newest" else 1 - state.slot
    raw = bytearray(cursor.read_bytes())
    raw[512 * slot + 10 : 512 * slot + 24] = encode_cursor_slot(9, 99)[10:24]  # half of another write
    cursor.write_bytes(bytes(raw))
    with Spool.open(tmp_path, fsync=False) as spool:
        # A torn newest slot re-delivers record 3; a torn older slot costs nothing.
        assert spool.committed_seq == (2 if torn == "newest" else 3)
        assert spool.recovery_report == []
        assert [s for s, _ in spool.read(spool.committed_seq, 10)] == list(range(spool.committed_seq + 1, 5))


def test_a_cursor_that_cannot_be_created_at_open_is_created_by_a_later_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = FailingWrites(lambda name: name == CURSOR_NAME)
    monkeypatch.setattr(store, "_pwrite_all", failing)
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        assert spool.cursor_write_failures == 1
        assert not (tmp_path / CURSOR_NAME).exists(), "no partial cursor is left behind"
        spool.append([b"a", b"b"])
        failing.armed = False
        spool.commit(1)
        assert not spool.cursor_failing
    assert decode_cursor((tmp_path / CURSOR_NAME).read_bytes()) == 1


# -- appends and segments ---------------------------------------------------------------------------------------


def test_enospc_on_append_is_spool_full_and_leaves_the_segment_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = FailingWrites(lambda name: name.endswith(".seg"))
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        spool.append([RECORD] * 3)
        size = (tmp_path / segment_name(1)).stat().st_size
        monkeypatch.setattr(store, "_pwrite_all", failing)
        with pytest.raises(SpoolFull, match="no space left for the spool"):
            spool.append([RECORD] * 2)
        assert (tmp_path / segment_name(1)).stat().st_size == size, "the partial write was cut off"
        assert spool.last_seq == 3
        failing.armed = False
        assert spool.append([RECORD]) == [4]
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        assert (spool.last_seq, spool.recovery_report) == (4, [])


def test_a_segment_that_cannot_be_created_is_spool_full_and_the_prefix_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = store._create_file
    armed = [True]

    def create(path: Path) -> int:
        if armed[0] and path.name.endswith(".seg"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_create(path)

    with Spool.open(tmp_path, segment_max_bytes=300, min_free_bytes=0) as spool:
        monkeypatch.setattr(store, "_create_file", create)
        with pytest.raises(SpoolFull, match="no space left for a new spool segment"):
            spool.append([RECORD] * 5)  # three fit in the first segment, the fourth needs a new one
        # The first three are durable (at-least-once: the caller retries the whole batch).
        assert spool.last_seq == 3
        armed[0] = False
        assert spool.append([RECORD] * 2) == [4, 5]
        assert segs(tmp_path) == [segment_name(1), segment_name(4)]


def test_a_failed_directory_sync_on_roll_leaves_no_file_that_blocks_the_next_roll(tmp_path: Path) -> None:
    fail_dir = [False]

    def sync(fd: int, path: Path, kind: SyncKind) -> None:
        if fail_dir[0] and kind == "directory":
            raise OSError(errno.EIO, "injected EIO")
        sync_to_disk(fd, path, kind)

    with Spool.open(tmp_path, segment_max_bytes=300, sync=sync, min_free_bytes=0) as spool:
        spool.append([RECORD] * 3)
        fail_dir[0] = True
        with pytest.raises(SpoolError, match="cannot sync the directory"):
            spool.append([RECORD])
        assert segs(tmp_path) == [segment_name(1)]
        fail_dir[0] = False
        assert spool.append([RECORD]) == [4]


def test_a_segment_fsync_failure_still_makes_the_spool_unusable(tmp_path: Path) -> None:
    fail = [False]

    def sync(fd: int, path: Path, kind: SyncKind) -> None:
        if fail[0] and kind == "segment":
            raise OSError(errno.EIO, "injected EIO")
        sync_to_disk(fd, path, kind)

    with Spool.open(tmp_path, sync=sync, min_free_bytes=0) as spool:
        spool.append([RECORD])
        fail[0] = True
        with pytest.raises(SpoolError, match="fsync failed"):
            spool.append([RECORD])
        fail[0] = False
        # The page cache may have dropped the data: no append is acknowledged on top of it until a reopen.
        with pytest.raises(SpoolError, match="unusable after an fsync failure"):
            spool.append([RECORD])
        spool.commit(1)  # forwarding what is durable goes on


# -- the bound, the floor and reclaiming ----------------------------------------------------------------------


class FakeFilesystem:
    """``_free_bytes`` of a filesystem of ``capacity`` bytes holding only the spool directory's files."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity

    def __call__(self, path: Path) -> int:
        return self.capacity - dir_bytes(self.directory)


def test_the_free_space_floor_refuses_before_the_disk_is_full_and_reclaims_delivered_bytes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(store, "_free_bytes", FakeFilesystem(spool_dir, capacity=CURSOR_FILE_BYTES + 1500))
    with Spool.open(spool_dir, segment_max_bytes=1 << 20, max_bytes=1 << 30, min_free_bytes=500, fsync=False) as spool:
        spool.append([RECORD] * 10)  # 1000 bytes: 500 left, the floor
        with pytest.raises(SpoolFull, match="would leave less than min_free_bytes=500 free") as info:
            spool.append([b""])
        assert info.value.code == "spool_full"
        spool.commit(4)
        # The bound counts undelivered bytes but the disk does not: delivered records still hold their space.
        # With 400 bytes delivered in the active segment, nothing can be reclaimed until all of it is delivered.
        with pytest.raises(SpoolFull):
            spool.append([RECORD])
        spool.commit(10)
        # Now the append rolls away from the delivered segment and deletes it, then fits.
        assert spool.append([RECORD] * 5) == [11, 12, 13, 14, 15]
        assert segs(spool_dir) == [segment_name(11)]


def test_a_statvfs_failure_does_not_refuse_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(store, "_free_bytes", broken)
    with Spool.open(tmp_path, min_free_bytes=1 << 40, fsync=False) as spool:
        assert spool.append([RECORD]) == [1]


def test_a_drained_spool_holds_almost_no_bytes(tmp_path: Path) -> None:
    with Spool.open(tmp_path, max_bytes=6 * 1024 * 1024, min_free_bytes=0) as spool:
        assert spool.segment_max_bytes == 6 * 1024 * 1024 // 16
        spool.append([b"e" * 2000] * 2000)  # 4 MB, eleven segments
        assert dir_bytes(tmp_path) > 4_000_000
        assert drain(spool, batch=256) == list(range(1, 2001))
        assert (spool.depth, spool.undelivered_bytes, spool.bytes_on_disk) == (0, 0, 0)
        assert segs(tmp_path) == [segment_name(2001)]
        # What is left: the cursor, the lock file and one empty segment.
        assert dir_bytes(tmp_path) == CURSOR_FILE_BYTES


def test_a_small_drain_keeps_its_segment_until_it_is_worth_a_new_file(tmp_path: Path) -> None:
    with Spool.open(tmp_path, segment_max_bytes=64 * 1024, min_free_bytes=0) as spool:
        spool.append([RECORD] * 3)
        spool.commit(3)
        # 300 bytes: rolling a new file after every trickle of commits would cost a directory sync each time.
        assert segs(tmp_path) == [segment_name(1)]
        spool.append([RECORD] * 200)
        spool.commit(203)
        assert segs(tmp_path) == [segment_name(204)]


@pytest.mark.parametrize(
    ("max_bytes", "filesystem_bytes", "segment_bytes", "floor_bytes"),
    [
        (1 << 30, 1 << 40, 64 << 20, 64 << 20),  # the default bound on a big volume
        (6 << 20, 1 << 40, 384 << 10, 64 << 20),
        (1 << 30, 1 << 20, 64 << 10, 52428),  # a 1 MiB tmpfs
        (1 << 20, 1 << 30, 64 << 10, 53687091),
    ],
)
def test_segment_size_and_floor_are_derived_from_the_bound_and_the_filesystem(
    max_bytes: int, filesystem_bytes: int, segment_bytes: int, floor_bytes: int
) -> None:
    assert store.segment_size_for(max_bytes, filesystem_bytes) == segment_bytes
    assert store.default_min_free_bytes(filesystem_bytes) == floor_bytes


# -- recovery on a full disk ------------------------------------------------------------------------------------


def test_recovery_on_a_full_disk_leaves_uncopyable_bytes_in_place_and_appends_after_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        spool.append([b"one", b"two"])
    seg = tmp_path / segment_name(1)
    torn = seg.read_bytes() + encode_header(3, b"three")[:11]  # a crash in the middle of record 3
    seg.write_bytes(torn)
    failing = FailingWrites(lambda name: ".corrupt-" in name)
    monkeypatch.setattr(store, "_pwrite_all", failing)
    caplog.set_level(logging.WARNING, logger=store.__name__)
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        assert failing.failed == 1
        assert seg.read_bytes() == torn, "bytes that could not be copied aside are not cut"
        assert not list(tmp_path.glob("*.corrupt-*")), "no partial copy is left"
        assert [(p.reason, p.moved_to) for p in spool.recovery_report] == [("truncated header", None)]
        assert spool.read(0, 10) == [(1, b"one"), (2, b"two")]
        assert spool.append([b"three"]) == [3]
        assert segs(tmp_path) == [segment_name(1), segment_name(3)]
    assert "11 bytes left in place, not copied aside" in caplog.text
    failing.armed = False
    # With room again, the next start copies them aside and cuts them; nothing acknowledged is lost.
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        assert spool.read(0, 10) == [(1, b"one"), (2, b"two"), (3, b"three")]
        assert [p.moved_to for p in spool.recovery_report] == [f"{seg.name}.corrupt-{len(torn) - 11}"]
        assert seg.stat().st_size == len(torn) - 11


def test_a_torn_first_record_that_cannot_be_copied_aside_is_renamed_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool.open(tmp_path, segment_max_bytes=300, min_free_bytes=0) as spool:
        spool.append([RECORD] * 3)
    # A crash right after the roll: the new segment holds only the first bytes of record 4.
    (tmp_path / segment_name(4)).write_bytes(encode_header(4, RECORD)[:9])
    monkeypatch.setattr(store, "_pwrite_all", FailingWrites(lambda name: ".corrupt-" in name))
    with Spool.open(tmp_path, segment_max_bytes=300, min_free_bytes=0) as spool:
        assert spool.last_seq == 3
        assert spool.append([RECORD]) == [4]
        assert [p.name for p in tmp_path.glob("*.corrupt-*")] == [f"{segment_name(4)}.corrupt-0"]
        assert [s for s, _ in spool.read(0, 10)] == [1, 2, 3, 4]


# -- a random walk through faults -------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6)),
        st.tuples(st.just("commit"), st.integers(0, 8)),
        st.tuples(st.just("cursor_fails"), st.booleans()),
        st.tuples(st.just("disk_full"), st.booleans()),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_property_no_acknowledged_record_is_lost_whatever_fails(ops: list[tuple[str, int]]) -> None:
    """Appends, commits, cursor failures, a full disk and restarts in any order: every acknowledged record not
    committed is read back whole after each step, a restart never moves the cursor past a commit, and the
    bound's accounting matches what is on disk."""
    fail = {"cursor": False, "segment": False}
    real = store._pwrite_all

    def pwrite(fd: int, data: bytes, offset: int) -> None:
        name = path_of(fd).name
        if (fail["cursor"] and name == CURSOR_NAME) or (fail["segment"] and name.endswith(".seg")):
            real(fd, data[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    acked: dict[int, bytes] = {}
    committed = 0
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(store, "_pwrite_all", pwrite):
        directory = Path(tmp)

        def open_spool() -> Spool:
            return Spool.open(directory, segment_max_bytes=120, max_bytes=1000, min_free_bytes=0, fsync=False)

        spool = open_spool()
        try:
            for op, arg in ops:
                if op == "append":
                    payloads = [b"%d" % (len(acked) + i) * 7 for i in range(arg)]
                    try:
                        seqs = spool.append(payloads)
                    except SpoolFull:
                        pass
                    else:
                        assert all(seq > max(acked, default=0) for seq in seqs)
                        acked.update(zip(seqs, payloads, strict=True))
                elif op == "commit":
                    target = min(spool.last_seq, spool.committed_seq + arg)
                    spool.commit(target)
                    committed = max(committed, target)
                elif op == "cursor_fails":
                    fail["cursor"] = bool(arg)
                elif op == "disk_full":
                    fail["segment"] = bool(arg)
                else:
                    spool.close()
                    spool = open_spool()
                    # At least once: a restart may go back (re-send), never beyond what was committed.
                    assert spool.committed_seq <= committed
                    committed = spool.committed_seq
                records = dict(spool.read(spool.committed_seq, 1 << 20))
                assert all(records[seq] == payload for seq, payload in acked.items() if seq > spool.committed_seq)
                assert spool.undelivered_bytes == sum(HEADER_BYTES + len(p) for p in records.values())
        finally:
            spool.close()


# -- a crash in the middle of commits -----------------------------------------------------------------------------

_COMMITTER = """
import sys
from pathlib import Path
from bridge.delivery.spool import Spool

spool = Spool.open(Path(sys.argv[1]), segment_max_bytes=4096, min_free_bytes=0)
while True:
    seqs = spool.append([b"payload-%d" % (spool.last_seq + k + 1) for k in range(5)])
    for seq in seqs[:3]:
        spool.commit(seq)
        sys.stdout.write("%d\\n" % seq)
        sys.stdout.flush()
"""


def test_a_commit_that_returned_survives_sigkill_and_nothing_uncommitted_is_lost(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _COMMITTER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        lines = [child.stdout.readline() for _ in range(300)]  # 300 commits returned: the kill lands mid-stream
        assert all(lines), child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait()
        lines += child.stdout.read().split(b"\n")
    returned = max(int(line) for line in lines if line.strip())
    with Spool.open(tmp_path, min_free_bytes=0) as spool:
        # The kill may tear an append (recovery cuts it), never the cursor: a process crash keeps the page cache.
        assert "corrupt cursor" not in [p.reason for p in spool.recovery_report]
        # Not behind a commit that returned (re-sending those would be harmless, but the sync said durable)...
        assert spool.committed_seq >= returned
        # ...and every record after it is there, whole: at most the two uncommitted of the last batch + torn tail.
        records = spool.read(spool.committed_seq, 1 << 20)
        assert [seq for seq, _ in records] == list(range(spool.committed_seq + 1, spool.last_seq + 1))
        assert all(payload == b"payload-%d" % seq for seq, payload in records)
        # Delivered segments were deleted as the commits went: a few segments at most, not the whole history.
        assert spool.segment_count <= 3
