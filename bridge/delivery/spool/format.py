"""The spool's on-disk format, sans-I/O: record framing, segment scanning and resync, the cursor, file names.

Everything here is a pure function of bytes; ``store`` does the reading, writing and fsyncing.

On-disk layout of a spool directory:

* ``<first_seq:020d>.seg`` -- segment files, a concatenation of records. The last one is the active segment.
* ``cursor`` -- the highest committed (delivered) sequence number, replaced atomically.
* ``LOCK`` -- ``flock``'ed while a process has the spool open.
* ``<segment>.corrupt-<offset>`` -- bytes that recovery cut out of a segment, kept for inspection.

Record framing (little-endian)::

    magic   3s  b"VKS"
    version u8  1
    seq     u64 sequence number, contiguous from 1
    length  u32 payload length in bytes
    crc     u32 zlib.crc32 over the 16 header bytes before it, then the payload
    payload length bytes

Cursor file (16 bytes): ``b"VKC\\x01"``, u64 seq, u32 crc32 of the first 12 bytes.
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

_CURSOR = struct.Struct("<4sQI")
_CURSOR_MAGIC: Final = b"VKC\x01"
CURSOR_BYTES: Final = _CURSOR.size  # 16
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


def encode_cursor(seq: int) -> bytes:
    """The 16-byte cursor file content for ``seq``."""
    head = _CURSOR_MAGIC + seq.to_bytes(8, "little")
    return head + zlib.crc32(head).to_bytes(4, "little")


def decode_cursor(raw: bytes) -> int | None:
    """The sequence number in a cursor file, or None if the file is corrupt."""
    if len(raw) == _CURSOR.size:
        magic, seq, crc = _CURSOR.unpack(raw)
        if magic == _CURSOR_MAGIC and zlib.crc32(raw[:12]) == crc:
            return int(seq)
    return None


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
