"""The spool's on-disk format, sans-I/O: record framing, segment scanning and resync, the cursor, file names.

Everything here is a pure function of bytes; ``store`` does the reading, writing and fsyncing.

On-disk layout of a spool directory:

* ``<first_seq:020d>.seg`` -- segment files, a concatenation of records. The last one is the active segment.
* ``cursor`` -- the highest committed (delivered) sequence number, overwritten in place (see below).
* ``LOCK`` -- ``flock``'ed while a process has the spool open.
* ``<segment>.corrupt-<offset>`` -- bytes that recovery cut out of a segment, kept for inspection (on a full
  disk, a last segment with no valid record is renamed to ``<segment>.corrupt-0`` instead of copied).
* ``refused/<seq:020d>.record`` -- values that Kafka and the dead-letter topic both refused (the forwarder's).

Segments are deleted once every record in them is committed; a commit also rolls away from a fully committed
active segment (if it holds at least a quarter of a segment), so a drained spool is little more than ``cursor``.

Record framing (little-endian)::

    magic   3s  b"VKS"
    version u8  1
    seq     u64 sequence number, contiguous from 1
    length  u32 payload length in bytes
    crc     u32 zlib.crc32 over the 16 header bytes before it, then the payload
    payload length bytes

Cursor file (``CURSOR_FILE_BYTES`` = 1024 bytes, created once and then only overwritten in place, so a commit
needs no free disk space): two slots, at offsets 0 and 512 (different sectors, so a torn write of one leaves the
other intact), each::

    magic      4s  b"VKC\\x02"
    generation u64 incremented by every write; the valid slot with the highest one is the cursor
    seq        u64 highest committed sequence number
    crc        u32 zlib.crc32 of the 20 bytes before it

A writer always overwrites the slot that does *not* hold the newest valid generation. The u64 generation does
not wrap in practice (one commit per nanosecond would take 584 years). If neither slot is valid the cursor
counts as 0: records are re-delivered, never lost.

The cursor format of version 1 (16 bytes: ``b"VKC\\x01"``, u64 seq, u32 crc32 of the first 12 bytes) is still
read: it sits where slot 0 is and counts as generation 0, so the first write of a new version goes to slot 1
and the file migrates in place.
"""

from __future__ import annotations

import re
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Final

MAGIC: Final = b"VKS"
VERSION: Final = 1
_HEADER = struct.Struct("<3sBQII")
HEADER_BYTES: Final = _HEADER.size  # 20
_CRC_OFFSET: Final = HEADER_BYTES - 4
_SYNC_MARK: Final = MAGIC + bytes([VERSION])
#: Hard limit of the format; a length field above it is treated as corruption during recovery.
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024

_CURSOR_V1 = struct.Struct("<4sQI")
_CURSOR_V1_MAGIC: Final = b"VKC\x01"
_CURSOR_SLOT = struct.Struct("<4sQQI")
_CURSOR_MAGIC: Final = b"VKC\x02"
#: Bytes of one cursor slot, and the offset of slot 1 (slot 0 is at 0).
CURSOR_SLOT_BYTES: Final = _CURSOR_SLOT.size  # 24
CURSOR_SLOT_STRIDE: Final = 512
CURSOR_FILE_BYTES: Final = 2 * CURSOR_SLOT_STRIDE
CURSOR_NAME: Final = "cursor"
LOCK_NAME: Final = "LOCK"
_SEGMENT_RE: Final = re.compile(r"^(\d{20})\.seg$")


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record is ``first_seq``."""
    return f"{first_seq:020d}.seg"


def segment_first_seq(name: str) -> int | None:
    """The first sequence number encoded in a segment file name, or None if ``name`` is not a segment."""
    m = _SEGMENT_RE.match(name)
    return int(m.group(1)) if m is not None else None


def encode_header(seq: int, payload: bytes) -> bytes:
    """The 20-byte record header of ``payload`` stored as ``seq``."""
    head = _HEADER.pack(MAGIC, VERSION, seq, len(payload), 0)[:_CRC_OFFSET]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "little")


def parse_record(data: bytes | memoryview, pos: int) -> tuple[int, int] | str:
    """``(seq, length)`` of a well-formed record at ``pos``, else the reason it is not one."""
    end = len(data)
    if end - pos < HEADER_BYTES:
        return "truncated header"
    magic, version, seq, length, crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return "bad magic"
    if version != VERSION:
        return "bad version"
    if length > MAX_PAYLOAD_BYTES:
        return "bad length"
    start = pos + HEADER_BYTES
    if end - start < length:
        return "truncated payload"
    view = memoryview(data)
    if zlib.crc32(view[start : start + length], zlib.crc32(view[pos : pos + _CRC_OFFSET])) != crc:
        return "bad crc"
    return seq, length


def resync(data: bytes, pos: int, min_seq: int) -> int | None:
    """Offset of the next well-formed record at or after ``pos`` with ``seq >= min_seq``."""
    while (pos := data.find(_SYNC_MARK, pos)) != -1:
        parsed = parse_record(data, pos)
        if not isinstance(parsed, str) and parsed[0] >= min_seq:
            return pos
        pos += 1
    return None


@dataclass(frozen=True, slots=True)
class CursorState:
    """The newest valid slot of a cursor file."""

    seq: int
    generation: int
    #: 0 or 1; a version-1 cursor file is slot 0 with generation 0.
    slot: int


def cursor_slot_offset(slot: int) -> int:
    """Byte offset of cursor slot ``slot`` (0 or 1) in the cursor file."""
    return slot * CURSOR_SLOT_STRIDE


def encode_cursor_slot(seq: int, generation: int) -> bytes:
    """The ``CURSOR_SLOT_BYTES`` of one cursor slot."""
    head = _CURSOR_SLOT.pack(_CURSOR_MAGIC, generation, seq, 0)[: CURSOR_SLOT_BYTES - 4]
    return head + zlib.crc32(head).to_bytes(4, "little")


def encode_cursor_file(seq: int, generation: int) -> bytes:
    """A whole new cursor file: slot 0 holds ``seq`` at ``generation``, slot 1 is empty (invalid)."""
    return encode_cursor_slot(seq, generation).ljust(CURSOR_FILE_BYTES, b"\0")


def encode_cursor_v1(seq: int) -> bytes:
    """The 16-byte cursor file of format version 1 (tests and migration only; never written any more)."""
    head = _CURSOR_V1_MAGIC + seq.to_bytes(8, "little")
    return head + zlib.crc32(head).to_bytes(4, "little")


def _decode_slot(raw: bytes, slot: int) -> CursorState | None:
    offset = cursor_slot_offset(slot)
    chunk = raw[offset : offset + CURSOR_SLOT_BYTES]
    if len(chunk) == CURSOR_SLOT_BYTES:
        magic, generation, seq, crc = _CURSOR_SLOT.unpack(chunk)
        if magic == _CURSOR_MAGIC and zlib.crc32(chunk[:-4]) == crc:
            return CursorState(int(seq), int(generation), slot)
    if slot == 0 and len(chunk) >= _CURSOR_V1.size:
        magic, seq, crc = _CURSOR_V1.unpack(chunk[: _CURSOR_V1.size])
        if magic == _CURSOR_V1_MAGIC and zlib.crc32(chunk[:12]) == crc:
            return CursorState(int(seq), 0, 0)
    return None


def decode_cursor_state(raw: bytes) -> CursorState | None:
    """The valid slot with the highest generation in a cursor file, or None if neither slot is valid."""
    slots = [state for slot in (0, 1) if (state := _decode_slot(raw, slot)) is not None]
    return max(slots, key=lambda state: state.generation, default=None)


def decode_cursor(raw: bytes) -> int | None:
    """The sequence number in a cursor file (either format), or None if the file is corrupt."""
    state = decode_cursor_state(raw)
    return None if state is None else state.seq


@dataclass(frozen=True, slots=True)
class Defect:
    """Bytes of a segment that are not the valid next record, or a gap in the sequence numbers."""

    offset: int
    #: A ``SpoolProblem`` reason: "truncated header", "bad crc", ..., "sequence out of order", "sequence gap".
    reason: str
    #: Bytes from ``offset`` that recovery skips; 0 for a gap (nothing is skipped, records are missing).
    skipped_bytes: int = 0
    #: What recovery does with the skipped bytes, for the log ("truncated", "skipped to the next valid record").
    action: str = ""
    #: For a gap: the sequence number that should have come next, and the one found instead.
    expected_seq: int = 0
    found_seq: int = 0


@dataclass(slots=True)
class SegmentScan:
    """The valid records of one segment file, in order, and what is wrong with the rest."""

    seqs: array[int] = field(default_factory=lambda: array("Q"))
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lengths: array[int] = field(default_factory=lambda: array("I"))
    #: In file order; the set-aside and log order of recovery.
    defects: list[Defect] = field(default_factory=list)
    #: Highest valid sequence number so far (the input's ``last_good`` if the segment holds none).
    last_good: int = 0
    #: End of the last valid record: an active segment is cut back to here.
    good_end: int = 0
    #: Where the file must be cut because nothing valid follows (its bytes are the last defect), or None.
    cut_at: int | None = None


def scan_segment(data: bytes, last_good: int) -> SegmentScan:
    """Index ``data`` (a whole segment file) given the highest valid sequence number before it.

    A record is kept only if it is well-formed and its sequence number exceeds every one before it; anything
    else is a ``Defect``, and scanning resynchronises on the next record that qualifies.
    """
    scan = SegmentScan(last_good=last_good)
    pos = 0
    while pos < len(data):
        parsed = parse_record(data, pos)
        if isinstance(parsed, str):
            nxt = resync(data, pos + 1, scan.last_good + 1)
            if nxt is None:
                scan.defects.append(Defect(pos, parsed, len(data) - pos, "truncated"))
                scan.cut_at = pos
                break
            scan.defects.append(Defect(pos, parsed, nxt - pos, "skipped to the next valid record"))
            pos = nxt
            continue
        seq, length = parsed
        end = pos + HEADER_BYTES + length
        if seq <= scan.last_good:
            action = f"seq {seq} after {scan.last_good}, skipped"
            scan.defects.append(Defect(pos, "sequence out of order", end - pos, action))
            pos = end
            continue
        if seq != scan.last_good + 1:
            scan.defects.append(Defect(pos, "sequence gap", expected_seq=scan.last_good + 1, found_seq=seq))
        scan.seqs.append(seq)
        scan.offsets.append(pos)
        scan.lengths.append(length)
        scan.last_good = seq
        pos = scan.good_end = end
    return scan


def spool_positions(cursor_seq: int, first_seqs: list[int], last_good: int) -> tuple[int, int]:
    """``(committed_seq, last_seq)`` of a spool from its cursor, its sorted segment names and its scan.

    Records older than the first segment were deleted by a commit, so they were delivered even if the cursor
    is gone. ``last_seq`` exceeds every sequence number ever handed out, so a reader positioned at the cursor
    never skips a new record.
    """
    committed = max(cursor_seq, first_seqs[0] - 1 if first_seqs else 0)
    last_seq = max(last_good, committed, first_seqs[-1] - 1 if first_seqs else 0)
    return committed, last_seq
