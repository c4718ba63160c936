"""The spool store: segments, reads, commit, recovery from torn and corrupt files, locking, crashes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spoolkit import Gate

from bridge.delivery.spool import store
from bridge.delivery.spool.format import CURSOR_NAME, HEADER_BYTES, MAX_PAYLOAD_BYTES, encode_header
from bridge.delivery.spool.store import DEFAULT_READ_MAX_BYTES, Spool, SpoolError, SpoolFull, SpoolInUse, sync_to_disk
from bridge.errors import BridgeError

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
EVERYTHING = 1 << 40


def segs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def everything(spool: Spool) -> list[tuple[int, bytes]]:
    return spool.read(0, EVERYTHING)


def frame(seq: int, payload: bytes) -> bytes:
    return encode_header(seq, payload) + payload


def write_three(directory: Path) -> tuple[list[bytes], list[int]]:
    """A one-segment spool with three records; returns the payloads and each record's start offset."""
    payloads = [b"first-" * 4, b"the-middle-record", b"third-" * 4]
    with Spool.open(directory, fsync=False) as spool:
        assert spool.append(payloads) == [1, 2, 3]
    offsets = [0, HEADER_BYTES + len(payloads[0]), 2 * HEADER_BYTES + len(payloads[0]) + len(payloads[1])]
    return payloads, offsets


def reasons(spool: Spool) -> list[str]:
    return [p.reason for p in spool.recovery_report]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def promptly(fn: Callable[[], T], timeout_s: float = 5.0) -> T:
    """``fn()``, run in another thread; fails if it does not finish within ``timeout_s`` (it is blocked)."""
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "blocked behind the disk I/O of another thread"
    if errors:
        raise errors[0]
    return box[0]


# -- basics ------------------------------------------------------------------------------------------------------


def test_round_trip_across_many_segments(tmp_path: Path) -> None:
    payloads = [bytes([i % 256]) * (i * 7 % 100) for i in range(60)]
    with Spool.open(tmp_path, segment_max_bytes=200, fsync=False) as spool:
        seqs: list[int] = []
        for start in range(0, len(payloads), 7):  # uneven batches that straddle segment boundaries
            seqs += spool.append(payloads[start : start + 7])
        assert seqs == list(range(1, 61))
        assert everything(spool) == list(enumerate(payloads, 1))
        assert len(segs(tmp_path)) > 5
        # Paging with the reader's own position returns the same sequence.
        paged: list[tuple[int, bytes]] = []
        while batch := spool.read(paged[-1][0] if paged else 0, 4):
            assert len(batch) <= 4
            paged += batch
        assert paged == list(enumerate(payloads, 1))
        assert spool.read(57, 100) == [(58, payloads[57]), (59, payloads[58]), (60, payloads[59])]
        assert spool.read(60, 10) == []
        assert spool.read(0, 0) == []
        # A byte cap still returns at least one record.
        assert [s for s, _ in spool.read(0, 100, max_bytes=1)] == [1]
        assert sum(len(p) for _, p in spool.read(0, 100, max_bytes=300)) <= 300
    # Each file is named after its first record and starts with it.
    for path in segs(tmp_path):
        data = path.read_bytes()
        assert int.from_bytes(data[4:12], "little") == int(path.stem)
    with Spool.open(tmp_path, segment_max_bytes=200, fsync=False) as spool:
        assert everything(spool) == list(enumerate(payloads, 1))
        assert spool.recovery_report == []


def test_sequence_numbers_continue_across_reopen(tmp_path: Path) -> None:
    with Spool.open(tmp_path, segment_max_bytes=100, fsync=False) as spool:
        assert spool.last_seq == 0
        assert spool.append([b"a" * 30, b"b" * 30, b"c" * 30]) == [1, 2, 3]
    for round_ in range(3):
        with Spool.open(tmp_path, segment_max_bytes=100, fsync=False) as spool:
            assert spool.last_seq == 3 + 2 * round_
            assert spool.append([b"x" * 50, b"y"]) == [4 + 2 * round_, 5 + 2 * round_]
            assert spool.recovery_report == []
    with Spool.open(tmp_path, fsync=False) as spool:
        assert [s for s, _ in everything(spool)] == list(range(1, 10))


def test_depth_last_seq_and_bytes(tmp_path: Path) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        assert (spool.last_seq, spool.committed_seq, spool.depth, spool.bytes_on_disk) == (0, 0, 0, 0)
        spool.append([b"abc", b""])
        assert (spool.last_seq, spool.depth, spool.bytes_on_disk) == (2, 2, 2 * HEADER_BYTES + 3)
        spool.commit(1)
        assert (spool.committed_seq, spool.depth) == (1, 1)
        spool.commit(1)  # idempotent
        spool.commit(0)  # moving backwards is a no-op
        assert spool.committed_seq == 1
        with pytest.raises(ValueError, match="beyond last_seq"):
            spool.commit(3)
        assert spool.append([]) == []


def test_commit_deletes_delivered_segments_and_survives_reopen(tmp_path: Path) -> None:
    payloads = [b"%03d" % i * 10 for i in range(40)]  # 30-byte payloads, 50-byte records
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:  # three records per segment
        spool.append(payloads)
        before_files, before_bytes = len(segs(tmp_path)), spool.bytes_on_disk
        assert before_files == 14
        spool.commit(10)  # segments 1-3, 4-6, 7-9 are fully delivered; 10-12 is not
        assert segs(tmp_path)[0].name == f"{10:020d}.seg"
        assert spool.bytes_on_disk == before_bytes - 9 * 50
        assert spool.read(10, 1) == [(11, payloads[10])]
        assert spool.read(0, 2) == [(10, payloads[9]), (11, payloads[10])]  # what is left, committed or not
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        assert (spool.committed_seq, spool.last_seq, spool.depth) == (10, 40, 30)
        assert spool.read(spool.committed_seq, 100) == list(enumerate(payloads, 1))[10:]
        spool.commit(40)
        # Everything is delivered: the active segment is rolled away from and deleted, and the new (empty)
        # one's name keeps the sequence going.
        assert [p.name for p in segs(tmp_path)] == [f"{41:020d}.seg"]
        assert (spool.bytes_on_disk, spool.undelivered_bytes) == (0, 0)
        assert spool.append([b"next"]) == [41]
    # Without the cursor the oldest remaining segment still tells what was delivered.
    (tmp_path / CURSOR_NAME).unlink()
    with Spool.open(tmp_path, fsync=False) as spool:
        assert spool.committed_seq == 40
        assert spool.read(spool.committed_seq, 10) == [(41, b"next")]


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with Spool.open(tmp_path, fsync=False), pytest.raises(SpoolInUse, match="in use"):
        Spool.open(tmp_path, fsync=False)
    Spool.open(tmp_path, fsync=False).close()
    assert issubclass(SpoolInUse, SpoolError)


def test_closed_spool_and_oversized_record_raise_spool_error(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, fsync=False)
    with pytest.raises(SpoolError, match="exceeds"):
        spool.append([b"x" * (MAX_PAYLOAD_BYTES + 1)])
    spool.close()
    spool.close()
    for call in (lambda: spool.append([b"x"]), lambda: spool.read(0, 1), lambda: spool.commit(0)):
        with pytest.raises(SpoolError, match="closed"):
            call()
    assert issubclass(SpoolFull, SpoolError) and issubclass(SpoolError, BridgeError)


def test_spool_full_is_all_or_nothing_and_commit_makes_room(tmp_path: Path) -> None:
    record = b"r" * 80  # 100 bytes on disk
    with Spool.open(tmp_path, segment_max_bytes=300, max_bytes=1000, fsync=False) as spool:
        spool.append([record] * 9)
        with pytest.raises(SpoolFull) as info:
            spool.append([record, record])  # one would fit, two do not: nothing is written
        assert info.value.code == "spool_full" and info.value.status == 503
        assert (spool.last_seq, spool.bytes_on_disk) == (9, 900)
        assert spool.append([record]) == [10]
        with pytest.raises(SpoolFull):
            spool.append([b""])
        spool.commit(6)  # frees the segments holding 1-3 and 4-6
        assert spool.bytes_on_disk == 400
        assert spool.append([record] * 6) == list(range(11, 17))
        assert [s for s, _ in spool.read(6, 100)] == list(range(7, 17))


def test_the_bound_counts_undelivered_bytes_only(tmp_path: Path) -> None:
    with Spool.open(tmp_path, segment_max_bytes=1 << 20, max_bytes=500, min_free_bytes=0, fsync=False) as spool:
        spool.append([b"z" * 80] * 5)
        with pytest.raises(SpoolFull, match=r"spool full: 500 undelivered \+ 21 bytes would exceed max_bytes=500"):
            spool.append([b"z"])
        spool.commit(3)
        assert (spool.undelivered_bytes, spool.bytes_on_disk) == (200, 500)
        # Delivered bytes still on disk (the segment is not full yet) do not count against the bound.
        assert spool.append([b"z" * 80] * 3) == [6, 7, 8]
        assert (spool.undelivered_bytes, spool.bytes_on_disk) == (500, 800)
        with pytest.raises(SpoolFull):
            spool.append([b""])
        spool.commit(8)
        assert spool.undelivered_bytes == 0
        assert spool.append([b"z" * 80] * 5) == [9, 10, 11, 12, 13]
    with Spool.open(tmp_path, segment_max_bytes=1 << 20, max_bytes=500, min_free_bytes=0, fsync=False) as spool:
        assert (spool.committed_seq, spool.undelivered_bytes) == (8, 500), "recovered from the index and cursor"


def test_reads_and_commits_while_another_thread_appends(tmp_path: Path) -> None:
    total = 600
    with Spool.open(tmp_path, segment_max_bytes=2000, fsync=False) as spool:

        def writer() -> None:
            for start in range(0, total, 5):
                spool.append([b"%d" % i for i in range(start + 1, start + 6)])

        thread = threading.Thread(target=writer)
        thread.start()
        position, seen = 0, []
        deadline = time.monotonic() + 10
        while position < total and time.monotonic() < deadline:
            for seq, payload in spool.read(position, 50):
                assert seq == position + 1 and payload == b"%d" % seq
                position = seq
                seen.append(seq)
            if position:
                spool.commit(position)
        thread.join()
        assert seen == list(range(1, total + 1))
        assert spool.depth == 0


def test_reads_are_capped_in_bytes_and_still_return_a_record_larger_than_the_cap(tmp_path: Path) -> None:
    small, big = b"s" * 100, b"B" * 5000  # 120 and 5020 bytes on disk
    with Spool.open(tmp_path, segment_max_bytes=250, fsync=False) as spool:  # two small records per segment
        spool.append([small] * 10 + [big] + [small] * 3)
        # The cap counts headers and applies across segments.
        assert [s for s, _ in spool.read(0, 100, max_bytes=360)] == [1, 2, 3]
        assert [s for s, _ in spool.read(0, 100, max_bytes=359)] == [1, 2]
        assert [s for s, _ in spool.read(0, 2, max_bytes=10_000)] == [1, 2]
        assert spool.read(10, 100, max_bytes=120) == [(11, big)]  # alone, but not stuck
        assert [s for s, _ in spool.read(9, 100, max_bytes=5140)] == [10, 11]
        assert [s for s, _ in spool.read(9, 100, max_bytes=5260)] == [10, 11, 12]
        with pytest.raises(ValueError, match="max_bytes"):
            spool.read(0, 1, max_bytes=0)
    mib = 1024 * 1024
    with Spool.open(tmp_path / "large", fsync=False) as spool:
        spool.append([b"m" * mib] * 6)
        # Without max_bytes a read is still bounded (4 MiB: three 1 MiB records and their headers fit).
        fit = DEFAULT_READ_MAX_BYTES // (mib + HEADER_BYTES)
        assert 1 < fit < 6
        assert [s for s, _ in spool.read(0, 100)] == list(range(1, fit + 1))


def test_a_read_blocked_on_the_disk_blocks_neither_the_properties_nor_appends_nor_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = [b"%03d" % i * 10 for i in range(9)]  # 50-byte records, three per segment
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        spool.append(payloads)
        gate = Gate(store._pread_exact)
        monkeypatch.setattr(store, "_pread_exact", gate)
        result: list[list[tuple[int, bytes]]] = []
        reader = threading.Thread(target=lambda: result.append(spool.read(0, 6)))
        reader.start()
        try:
            assert gate.entered.wait(5)
            # The reader is inside pread now: what the event loop asks for on every callback still answers.
            assert promptly(lambda: (spool.depth, spool.last_seq, spool.committed_seq)) == (9, 9, 0)
            assert promptly(lambda: spool.append([b"late"])) == [10]
            # This commit deletes the two segments the blocked read is reading from.
            promptly(lambda: spool.commit(9))
            assert [p.name for p in segs(tmp_path)] == [f"{10:020d}.seg"]
        finally:
            gate.release.set()
            reader.join(5)
        assert result == [list(enumerate(payloads, 1))[:6]]  # read from the descriptors it held
        assert spool.read(0, 100) == [(10, b"late")]


def test_a_read_planned_before_a_commit_deleted_its_segments_reads_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = [b"%03d" % i * 10 for i in range(10)]  # segments 1-3, 4-6, 7-9 and the active 10
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        spool.append(payloads)
        plan = spool._plan_read
        plans = 0

        def plan_then_commit(*args: int) -> list[store._ReadSlice]:
            nonlocal plans
            plans += 1
            slices = plan(*args)
            if plans == 1:
                spool.commit(6)  # between planning and opening: segments 1-3 and 4-6 disappear
            return slices

        monkeypatch.setattr(spool, "_plan_read", plan_then_commit)
        fds = open_fds()
        assert spool.read(0, 100) == list(enumerate(payloads, 1))[6:]
        assert plans == 2
        assert open_fds() == fds  # the duplicated descriptor of the active segment was closed
        # A segment that vanished without a commit is an error, not an endless retry.
        monkeypatch.undo()
        segs(tmp_path)[0].unlink()
        with pytest.raises(SpoolError, match="cannot read"):
            spool.read(0, 100)


@pytest.mark.parametrize("operation", ["append", "roll", "commit"])
def test_an_fsync_never_blocks_the_properties_or_reads(tmp_path: Path, operation: str) -> None:
    gate = Gate(sync_to_disk, armed=False)
    with Spool.open(tmp_path, segment_max_bytes=100, sync=gate) as spool:  # fsync on
        spool.append([b"x" * 30])  # 50 bytes
        gate.armed = True
        calls: dict[str, Callable[[], object]] = {
            "append": lambda: spool.append([b"y" * 10]),  # fits: the data fsync blocks
            "roll": lambda: spool.append([b"z" * 40]),  # does not fit: the new segment's directory fsync blocks
            "commit": lambda: spool.commit(1),  # the cursor fsync blocks
        }
        outcome: list[object] = []
        worker = threading.Thread(target=lambda: outcome.append(calls[operation]()))
        worker.start()
        try:
            assert gate.entered.wait(5)
            state = promptly(lambda: (spool.depth, spool.last_seq, spool.committed_seq, spool.read(0, 10)))
            # Nothing becomes visible before it is durable: no new record, no new committed_seq.
            assert state == (1, 1, 0, [(1, b"x" * 30)])
        finally:
            gate.release.set()
            worker.join(5)
        assert outcome == [None] if operation == "commit" else outcome == [[2]]
        assert spool.depth == (0 if operation == "commit" else 2)


def test_inspect_reports_positions_without_changing_a_file(tmp_path: Path) -> None:
    assert Spool.inspect(tmp_path / "missing") == store.SpoolStatus(tmp_path / "missing", 0, 0)
    assert not (tmp_path / "missing").exists()
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        spool.append([b"%03d" % i * 10 for i in range(8)])
        spool.commit(4)
        with pytest.raises(SpoolInUse):
            Spool.inspect(tmp_path)
    last = segs(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:-7])  # record 8 torn
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    status = Spool.inspect(tmp_path)
    assert (status.committed_seq, status.last_seq, status.depth) == (4, 7, 3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing repaired, nothing set aside
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        assert (spool.committed_seq, spool.last_seq, spool.depth) == (4, 7, 3)


# -- recovery ----------------------------------------------------------------------------------------------------


def test_truncated_tail_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    payloads, offsets = write_three(pristine)
    (seg,) = segs(pristine)
    original = seg.read_bytes()
    start = offsets[2]
    for cut in range(start + 1, len(original)):
        work = tmp_path / f"cut-{cut}"
        shutil.copytree(pristine, work)
        (work / seg.name).write_bytes(original[:cut])
        with Spool.open(work, fsync=False) as spool:
            assert everything(spool) == [(1, payloads[0]), (2, payloads[1])], cut
            (problem,) = spool.recovery_report
            assert problem.file == seg.name and problem.offset == start
            assert problem.reason == ("truncated header" if cut - start < HEADER_BYTES else "truncated payload")
            assert problem.skipped_bytes == cut - start
            # The cut bytes are kept, and the segment ends at the last good record.
            assert problem.moved_to == f"{seg.name}.corrupt-{start}"
            assert (work / problem.moved_to).read_bytes() == original[start:cut]
            assert (work / seg.name).stat().st_size == start
            assert spool.last_seq == 2
            assert spool.append([b"again"]) == [3]
        with Spool.open(work, fsync=False) as spool:
            assert spool.recovery_report == []
            assert everything(spool) == [(1, payloads[0]), (2, payloads[1]), (3, b"again")]
        shutil.rmtree(work)


def test_flipped_byte_anywhere_in_the_middle_record(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    payloads, offsets = write_three(pristine)
    (seg,) = segs(pristine)
    original = seg.read_bytes()
    for index in range(offsets[1], offsets[2]):
        work = tmp_path / f"flip-{index}"
        shutil.copytree(pristine, work)
        damaged = bytearray(original)
        damaged[index] ^= 0x5A
        (work / seg.name).write_bytes(bytes(damaged))
        with Spool.open(work, fsync=False) as spool:
            assert everything(spool) == [(1, payloads[0]), (3, payloads[2])], index
            first, gap = spool.recovery_report
            assert (first.offset, first.skipped_bytes) == (offsets[1], offsets[2] - offsets[1])
            assert first.reason in {"bad magic", "bad version", "bad crc", "bad length", "truncated payload"}
            assert (gap.offset, gap.reason) == (offsets[2], "sequence gap")
            assert (work / f"{seg.name}.corrupt-{offsets[1]}").read_bytes() == bytes(damaged[offsets[1] : offsets[2]])
            assert spool.append([b"four"]) == [4]
            assert spool.read(3, 10) == [(4, b"four")]
        shutil.rmtree(work)


def test_flipped_byte_is_reported_with_its_reason(tmp_path: Path) -> None:
    _, offsets = write_three(tmp_path)
    (seg,) = segs(tmp_path)
    data = bytearray(seg.read_bytes())
    data[offsets[1] + HEADER_BYTES + 3] ^= 1  # a payload byte of record 2
    seg.write_bytes(bytes(data))
    with Spool.open(tmp_path, fsync=False) as spool:
        assert [(p.offset, p.reason) for p in spool.recovery_report] == [
            (offsets[1], "bad crc"),
            (offsets[2], "sequence gap"),
        ]
    data[offsets[0]] ^= 1  # and the magic of record 1: resync skips both to the next valid record
    seg.write_bytes(bytes(data))
    with Spool.open(tmp_path, fsync=False) as spool:
        assert [(p.offset, p.reason, p.skipped_bytes) for p in spool.recovery_report] == [
            (0, "bad magic", offsets[2]),
            (offsets[2], "sequence gap", 0),
        ]
        assert [s for s, _ in everything(spool)] == [3]


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\x00" * 4096, "bad magic"),  # zero-filled blocks after a crash
        (os.urandom(1000), None),
        (b"VKS", "truncated header"),
        (frame(4, b"never acknowledged")[:-3], "truncated payload"),
        (frame(2, b"an old record again"), "sequence out of order"),
    ],
    ids=["zeros", "random", "partial-magic", "torn-record", "duplicate-seq"],
)
def test_garbage_after_the_last_record(tmp_path: Path, garbage: bytes, reason: str | None) -> None:
    payloads, _ = write_three(tmp_path)
    (seg,) = segs(tmp_path)
    good = seg.read_bytes()
    seg.write_bytes(good + garbage)
    with Spool.open(tmp_path, fsync=False) as spool:
        assert everything(spool) == list(enumerate(payloads, 1))
        assert spool.recovery_report, "garbage must be reported"
        assert spool.recovery_report[0].offset == len(good)
        if reason is not None:
            assert spool.recovery_report[0].reason == reason
        assert sum(p.skipped_bytes for p in spool.recovery_report) == len(garbage)
        assert spool.append([b"four"]) == [4]
    with Spool.open(tmp_path, fsync=False) as spool:
        assert spool.recovery_report == []
        assert everything(spool)[-1] == (4, b"four")


def test_recovery_logs_a_warning_with_offset_and_reason_but_no_payload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        spool.append([b"SECRET-ONE", b"SECRET-TWO"])
    (seg,) = segs(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-4])
    with caplog.at_level(logging.WARNING, logger="bridge.delivery.spool.store"), Spool.open(tmp_path, fsync=False):
        pass
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name == "bridge.delivery.spool.store"
    assert f"offset {HEADER_BYTES + 10}" in warning.getMessage()
    assert "truncated payload" in warning.getMessage()
    assert "SECRET" not in caplog.text


def test_garbage_inserted_between_records_is_skipped_without_a_gap(tmp_path: Path) -> None:
    payloads, offsets = write_three(tmp_path)
    (seg,) = segs(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data[: offsets[1]] + b"VKS\x01junk" + data[offsets[1] :])
    with Spool.open(tmp_path, fsync=False) as spool:
        assert everything(spool) == list(enumerate(payloads, 1))
        (problem,) = spool.recovery_report  # no "sequence gap": nothing was lost
        assert (problem.offset, problem.skipped_bytes) == (offsets[1], 8)


def test_corruption_in_an_older_segment_that_cannot_be_resynchronised(tmp_path: Path) -> None:
    payloads = [b"%02d" % i * 15 for i in range(12)]  # 50-byte records
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        spool.append(payloads)
    files = segs(tmp_path)
    assert [int(p.stem) for p in files] == [1, 4, 7, 10]
    middle = files[1].read_bytes()
    files[1].write_bytes(middle[:60] + b"\xff" * 10 + middle[70:])  # tears record 5, record 6 follows intact
    files[2].write_bytes(files[2].read_bytes()[:75])  # record 8 torn at the end of a non-last segment
    with Spool.open(tmp_path, segment_max_bytes=160, fsync=False) as spool:
        got = [s for s, _ in everything(spool)]
        assert got == [1, 2, 3, 4, 6, 7, 10, 11, 12]
        assert all(p == payloads[s - 1] for s, p in everything(spool))
        assert [(p.file, p.offset, p.reason) for p in spool.recovery_report] == [
            (files[1].name, 50, "bad length"),
            (files[1].name, 100, "sequence gap"),
            (files[2].name, 50, "truncated payload"),
            (files[3].name, 0, "sequence gap"),
        ]
        assert spool.append([b"13"]) == [13]


def test_corrupt_cursor_counts_as_zero(tmp_path: Path) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        spool.append([b"a", b"b", b"c"])
        spool.commit(2)
    cursor = tmp_path / CURSOR_NAME
    good = cursor.read_bytes()
    both_flipped = bytearray(good)
    both_flipped[6] ^= 1
    both_flipped[512 + 6] ^= 1
    for damaged in (b"", b"garbage", good[:20], bytes(both_flipped), b"\0" * len(good)):
        cursor.write_bytes(damaged)
        with Spool.open(tmp_path, fsync=False) as spool:
            assert spool.committed_seq == 0
            assert reasons(spool) == ["corrupt cursor"]
            assert [s for s, _ in spool.read(spool.committed_seq, 10)] == [1, 2, 3]  # re-delivered, not lost
    cursor.write_bytes(good)
    with Spool.open(tmp_path, fsync=False) as spool:
        assert (spool.committed_seq, spool.recovery_report) == (2, [])


def test_cursor_ahead_of_the_data_never_reuses_a_sequence_number(tmp_path: Path) -> None:
    with Spool.open(tmp_path, fsync=False) as spool:
        spool.append([b"a", b"b", b"c"])
        spool.commit(3)
    (seg,) = segs(tmp_path)
    seg.write_bytes(seg.read_bytes()[: 2 * HEADER_BYTES + 2])  # record 3 vanished, the cursor says 3
    with Spool.open(tmp_path, fsync=False) as spool:
        assert spool.last_seq == 3
        assert spool.append([b"d"]) == [4]
        assert spool.read(spool.committed_seq, 10) == [(4, b"d")]


# -- properties --------------------------------------------------------------------------------------------------

_payload_lists = st.lists(st.binary(max_size=120), max_size=25)


def _write(directory: Path, payloads: list[bytes], batch: int, segment_max_bytes: int) -> None:
    with Spool.open(directory, segment_max_bytes=segment_max_bytes, fsync=False) as spool:
        for start in range(0, len(payloads), batch):
            spool.append(payloads[start : start + batch])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payloads=_payload_lists,
    batch=st.integers(1, 6),
    segment_max_bytes=st.sampled_from([40, 300, 1 << 20]),
    cut=st.integers(min_value=0),
)
def test_property_truncated_last_segment_yields_an_exact_prefix(
    payloads: list[bytes], batch: int, segment_max_bytes: int, cut: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write(directory, payloads, batch, segment_max_bytes)
        last = segs(directory)[-1]
        data = last.read_bytes()
        last.write_bytes(data[: cut % (len(data) + 1)])
        status = Spool.inspect(directory)
        with Spool.open(directory, segment_max_bytes=segment_max_bytes, fsync=False) as spool:
            assert (spool.committed_seq, spool.last_seq) == (status.committed_seq, status.last_seq)
            records = everything(spool)
            expected = list(enumerate(payloads, 1))
            assert records == expected[: len(records)]
            assert len(records) >= int(last.stem) - 1  # earlier segments are untouched
            assert spool.append([b"after"]) == [len(records) + 1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payloads=_payload_lists.filter(bool),
    segment_max_bytes=st.sampled_from([60, 1 << 20]),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_property_corrupted_bytes_never_reach_a_reader(
    payloads: list[bytes], segment_max_bytes: int, flips: list[tuple[int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write(directory, payloads, 3, segment_max_bytes)
        files = segs(directory)
        for where, mask in flips:
            path = files[where % len(files)]
            data = bytearray(path.read_bytes())
            if data:
                data[where % len(data)] ^= mask
                path.write_bytes(bytes(data))
        status = Spool.inspect(directory)
        with Spool.open(directory, segment_max_bytes=segment_max_bytes, fsync=False) as spool:
            assert (spool.committed_seq, spool.last_seq) == (status.committed_seq, status.last_seq)
            records = everything(spool)
            expected = dict(enumerate(payloads, 1))
            assert all(expected[seq] == payload for seq, payload in records)
            assert [s for s, _ in records] == sorted({s for s, _ in records})
            if len(records) < len(payloads):
                assert spool.recovery_report
            next_seq = spool.last_seq + 1
            assert next_seq > max((s for s, _ in records), default=0)
            assert spool.append([b"after"]) == [next_seq]


# -- crash -------------------------------------------------------------------------------------------------------------

_CHILD = """
import sys
from pathlib import Path
from bridge.delivery.spool import Spool

spool = Spool.open(Path(sys.argv[1]), segment_max_bytes=8192)
seq = 0
while True:
    batch = [b"payload-%d-" % (seq + k + 1) + b"x" * ((seq + k) * 37 % 700) for k in range(seq % 4 + 1)]
    for got in spool.append(batch):
        sys.stdout.write("%d\\n" % got)
    sys.stdout.flush()
    seq += len(batch)
"""


def test_every_acknowledged_append_survives_sigkill(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        first = child.stdout.readline()
        assert first, child.stderr.read().decode()
        time.sleep(0.4)  # let it run; the kill lands wherever it lands, usually mid-write or mid-fsync
        child.send_signal(signal.SIGKILL)
        child.wait()
        output = first + child.stdout.read()
    # Only whole lines were printed after append returned; a partial line is not an acknowledgement.
    acked = [int(line) for line in output.split(b"\n")[:-1]]
    assert acked == list(range(1, len(acked) + 1)) and len(acked) > 10
    with Spool.open(tmp_path) as spool:
        records = everything(spool)
        seqs = [s for s, _ in records]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= len(acked)
        for seq, payload in records:
            assert payload.startswith(b"payload-%d-" % seq)
        print(f"\ncrash test: {len(acked)} acknowledged, {len(seqs)} on disk, report={spool.recovery_report}")
