"""The spool's on-disk format as pure functions: framing, parse reasons, resync, scanning, cursor, names."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bridge.delivery.spool.format import (
    CURSOR_FILE_BYTES,
    CURSOR_SLOT_BYTES,
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    CursorState,
    Defect,
    cursor_slot_offset,
    decode_cursor,
    decode_cursor_state,
    encode_cursor_file,
    encode_cursor_slot,
    encode_cursor_v1,
    encode_header,
    parse_record,
    resync,
    scan_segment,
    segment_first_seq,
    segment_name,
    spool_positions,
)


def frame(seq: int, payload: bytes) -> bytes:
    return encode_header(seq, payload) + payload


def test_a_framed_record_parses_back_to_its_seq_and_length() -> None:
    data = b"junk" + frame(7, b"payload") + frame(8, b"")
    assert HEADER_BYTES == 20
    assert parse_record(data, 4) == (7, 7)
    assert parse_record(data, 4 + HEADER_BYTES + 7) == (8, 0)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda r: r[:10], "truncated header"),
        (lambda r: r[:-1], "truncated payload"),
        (lambda r: b"X" + r[1:], "bad magic"),
        (lambda r: r[:3] + b"\x02" + r[4:], "bad version"),
        (lambda r: r[:12] + (MAX_PAYLOAD_BYTES + 1).to_bytes(4, "little") + r[16:], "bad length"),
        (lambda r: r[:-1] + bytes([r[-1] ^ 1]), "bad crc"),
        (lambda r: r[:4] + bytes([r[4] ^ 1]) + r[5:], "bad crc"),  # the seq is covered by the crc too
    ],
    ids=["short-header", "short-payload", "magic", "version", "length", "payload-bit", "seq-bit"],
)
def test_each_kind_of_damage_has_its_reason(damage: Callable[[bytes], bytes], reason: str) -> None:
    assert parse_record(damage(frame(1, b"some payload")), 0) == reason


def test_resync_finds_the_next_valid_record_not_older_than_min_seq() -> None:
    data = b"VKS\x01garbage" + frame(3, b"old") + frame(5, b"new")
    second = 11 + HEADER_BYTES + 3
    assert resync(data, 0, 1) == 11
    assert resync(data, 0, 4) == second
    assert resync(data, 0, 6) is None


def test_scan_segment_keeps_valid_records_and_describes_the_rest() -> None:
    garbage = b"VKS\x01junk"
    data = frame(1, b"a") + garbage + frame(2, b"bb") + frame(1, b"again") + frame(4, b"dddd") + b"\x00" * 5
    scan = scan_segment(data, 0)
    assert list(scan.seqs) == [1, 2, 4]
    assert list(scan.lengths) == [1, 2, 4]
    at_garbage = HEADER_BYTES + 1
    at_again = at_garbage + len(garbage) + HEADER_BYTES + 2
    at_four = at_again + HEADER_BYTES + 5
    first, *rest = scan.defects
    # What the garbage parses as depends on the bytes after it; where it is and how it is handled does not.
    assert (first.offset, first.skipped_bytes, first.action) == (
        at_garbage,
        len(garbage),
        "skipped to the next valid record",
    )
    assert rest == [
        Defect(at_again, "sequence out of order", HEADER_BYTES + 5, "seq 1 after 2, skipped"),
        Defect(at_four, "sequence gap", expected_seq=3, found_seq=4),
        Defect(at_four + HEADER_BYTES + 4, "truncated header", 5, "truncated"),
    ]
    assert (scan.last_good, scan.good_end, scan.cut_at) == (4, at_four + HEADER_BYTES + 4, at_four + HEADER_BYTES + 4)


def test_scan_of_a_clean_segment_has_no_defects_and_continues_from_last_good() -> None:
    data = frame(11, b"x") + frame(12, b"y")
    scan = scan_segment(data, 10)
    assert (list(scan.seqs), scan.defects, scan.last_good, scan.good_end, scan.cut_at) == (
        [11, 12],
        [],
        12,
        len(data),
        None,
    )
    assert scan_segment(b"", 10).last_good == 10


def _with_slot(raw: bytes, slot: int, content: bytes) -> bytes:
    offset = cursor_slot_offset(slot)
    return raw[:offset] + content + raw[offset + len(content) :]


def test_version_1_cursor_is_still_read_and_its_corruption_detected() -> None:
    raw = encode_cursor_v1(123456789)
    assert len(raw) == 16
    assert decode_cursor_state(raw) == CursorState(123456789, 0, 0)
    assert decode_cursor(raw) == 123456789
    for damaged in (b"", raw[:-1], raw[:6] + bytes([raw[6] ^ 1]) + raw[7:], b"VKC\x03" + raw[4:]):
        assert decode_cursor(damaged) is None


def test_cursor_file_round_trip_takes_the_valid_slot_with_the_highest_generation() -> None:
    raw = encode_cursor_file(10, 1)
    assert len(raw) == CURSOR_FILE_BYTES == 1024
    assert decode_cursor_state(raw) == CursorState(10, 1, 0)
    raw = _with_slot(raw, 1, encode_cursor_slot(20, 2))
    assert decode_cursor_state(raw) == CursorState(20, 2, 1)
    raw = _with_slot(raw, 0, encode_cursor_slot(30, 3))
    assert decode_cursor_state(raw) == CursorState(30, 3, 0)
    # The generation decides, not the slot or the sequence number.
    assert decode_cursor_state(_with_slot(raw, 1, encode_cursor_slot(5, 4))) == CursorState(5, 4, 1)
    assert decode_cursor_state(encode_cursor_slot(7, 2**64 - 1)) == CursorState(7, 2**64 - 1, 0)


@pytest.mark.parametrize("torn_slot", [0, 1])
def test_a_torn_write_of_either_slot_leaves_the_other(torn_slot: int) -> None:
    older, newer = encode_cursor_slot(40, 7), encode_cursor_slot(50, 8)
    intact = _with_slot(_with_slot(encode_cursor_file(0, 0), 1 - torn_slot, older), torn_slot, newer)
    assert decode_cursor(intact) == 50
    for cut in range(CURSOR_SLOT_BYTES):
        # The write of the newer generation stopped after `cut` bytes; the rest is the older slot's content.
        torn = _with_slot(intact, torn_slot, newer[:cut] + encode_cursor_slot(30, 6)[cut:])
        assert decode_cursor_state(torn) == CursorState(40, 7, 1 - torn_slot), cut


def test_both_slots_corrupt_is_no_cursor() -> None:
    raw = _with_slot(encode_cursor_file(9, 1), 1, encode_cursor_slot(10, 2))
    flip_0, flip_1 = cursor_slot_offset(0) + 9, cursor_slot_offset(1) + 9
    damaged = bytearray(raw)
    damaged[flip_0] ^= 1
    damaged[flip_1] ^= 1
    assert decode_cursor(bytes(damaged)) is None
    assert decode_cursor(b"") is None and decode_cursor(b"\0" * CURSOR_FILE_BYTES) is None


def test_a_version_1_cursor_migrates_in_place_through_slot_1() -> None:
    v1 = encode_cursor_v1(99)
    # The first write of this version goes to slot 1 (slot 0 holds the v1 cursor, generation 0).
    migrated = _with_slot(v1.ljust(CURSOR_FILE_BYTES, b"\0"), 1, encode_cursor_slot(120, 1))
    assert decode_cursor_state(migrated) == CursorState(120, 1, 1)
    # Torn: the v1 cursor still counts.
    torn = _with_slot(v1.ljust(CURSOR_FILE_BYTES, b"\0"), 1, encode_cursor_slot(120, 1)[:10])
    assert decode_cursor_state(torn) == CursorState(99, 0, 0)


def test_segment_names() -> None:
    assert segment_name(42) == "00000000000000000042.seg"
    assert segment_first_seq(segment_name(42)) == 42
    for other in ("42.seg", "00000000000000000042.seg.corrupt-0", "cursor", "LOCK", "worker-0"):
        assert segment_first_seq(other) is None


def test_spool_positions() -> None:
    assert spool_positions(0, [], 0) == (0, 0)
    assert spool_positions(5, [1], 9) == (5, 9)
    # Segments before the first one were deleted by a commit: delivered even without a cursor.
    assert spool_positions(0, [40], 41) == (39, 41)
    # The cursor is ahead of the data (the tail was lost): never hand out a committed number again.
    assert spool_positions(3, [1], 2) == (3, 3)
    # An empty last segment still says which numbers were handed out before it.
    assert spool_positions(0, [1, 8], 5) == (0, 7)
