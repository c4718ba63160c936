"""A durable, append-only, fsync'ed local record log (write-ahead spool).

The webhook receiver acknowledges an event only once it is in the spool; a forwarder drains it to Kafka in
sequence order and commits what Kafka acknowledged. Delivery is at-least-once: a lost cursor or a failed
batch may cause re-delivery, never loss of an acknowledged record.

On-disk layout of ``directory``:

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

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final

from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

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
CURSOR_NAME: Final = "cursor"
_LOCK_NAME: Final = "LOCK"
_SEGMENT_RE: Final = re.compile(r"^(\d{20})\.seg$")

DEFAULT_SEGMENT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_BYTES: Final = 1024 * 1024 * 1024


class SpoolError(BridgeError):
    """The spool cannot store or serve records (I/O error, closed, in use, invalid argument)."""

    code = "spool_error"


class SpoolFull(SpoolError):
    """Appending would exceed ``max_bytes``; the sender should retry after the forwarder drained some."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "spool_full"


@dataclass(frozen=True, slots=True)
class SpoolProblem:
    """One defect found while opening the spool. ``offset`` is a byte offset into ``file``."""

    file: str
    offset: int
    #: "truncated header", "truncated payload", "bad crc", "bad magic", "bad version", "bad length",
    #: "sequence gap", "sequence out of order", "corrupt cursor"
    reason: str
    #: How many bytes were skipped (and copied to ``moved_to``); 0 when no bytes were skipped.
    skipped_bytes: int = 0
    moved_to: str | None = None


@dataclass(slots=True, eq=False)
class _Segment:
    first_seq: int
    path: Path
    #: Durable, published size: the offset where the next record goes.
    size: int = 0
    seqs: array[int] = field(default_factory=lambda: array("Q"))
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lengths: array[int] = field(default_factory=lambda: array("I"))
    #: Only the active segment keeps a file descriptor open.
    fd: int | None = None

    @property
    def last_seq(self) -> int | None:
        return self.seqs[-1] if self.seqs else None


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def encode_header(seq: int, payload: bytes) -> bytes:
    """The 20-byte record header of ``payload`` stored as ``seq``."""
    head = _HEADER.pack(MAGIC, VERSION, seq, len(payload), 0)[:_CRC_OFFSET]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "little")


def _parse(data: bytes | memoryview, pos: int) -> tuple[int, int] | str:
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


def _resync(data: bytes, pos: int, min_seq: int) -> int | None:
    """Offset of the next well-formed record at or after ``pos`` with ``seq >= min_seq``."""
    while (pos := data.find(_SYNC_MARK, pos)) != -1:
        parsed = _parse(data, pos)
        if not isinstance(parsed, str) and parsed[0] >= min_seq:
            return pos
        pos += 1
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise SpoolError(f"short read: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


class Spool:
    """The spool. Thread-safe: one writer at a time (``append`` serialises), reads and commits concurrently.

    Readers only ever see records whose ``append`` made them durable. Use ``Spool.open``, not the constructor.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_max_bytes: int,
        max_bytes: int,
        fsync: bool,
        lock_fd: int,
        segments: list[_Segment],
        last_seq: int,
        committed_seq: int,
        recovery_report: list[SpoolProblem],
    ) -> None:
        self._dir = directory
        self._segment_max_bytes = segment_max_bytes
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._lock_fd: int | None = lock_fd
        # _state_lock guards the index (segments, sizes, seqs); it is never held across an fsync of segment
        # data so readers on the event loop do not wait for the disk. _write_lock serialises writers and
        # _commit_lock serialises cursor writes; both are taken before _state_lock, never after.
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._segments = segments
        self._last_seq = last_seq
        self._committed_seq = committed_seq
        self._bytes = sum(s.size for s in segments)
        self._closed = False
        #: Set when an fsync failed: the page cache may have dropped the dirty pages, so later appends
        #: could be acknowledged on top of lost data. Reopening re-verifies the files.
        self._broken: str | None = None
        #: Number of data fsyncs issued by ``append`` (one per batch, two if the batch crossed a segment).
        self.fsync_count = 0
        self.recovery_report = recovery_report

    # -- opening and recovery -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: bool = True,
    ) -> Spool:
        """Open (creating if needed) the spool in ``directory`` and recover it; see ``recovery_report``.

        Raises ``SpoolError`` if another process holds the spool or the directory is unusable.
        """
        if segment_max_bytes <= 0 or max_bytes <= 0:
            raise ValueError("segment_max_bytes and max_bytes must be positive")
        directory = Path(directory)
        try:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created and fsync:
                _fsync_dir(directory.parent)
            lock_fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot open spool directory {directory}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            raise SpoolError(f"spool directory {directory} is in use by another process") from exc
        try:
            return cls._recover(
                directory, lock_fd, segment_max_bytes=segment_max_bytes, max_bytes=max_bytes, fsync=fsync
            )
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(cls, directory: Path, lock_fd: int, *, segment_max_bytes: int, max_bytes: int, fsync: bool) -> Spool:
        report: list[SpoolProblem] = []
        try:
            with contextlib.suppress(FileNotFoundError):
                (directory / (CURSOR_NAME + ".tmp")).unlink()
            cursor_seq = cls._read_cursor(directory, report)
            named = sorted(
                (int(m.group(1)), directory / m.group(0))
                for p in directory.iterdir()
                if (m := _SEGMENT_RE.match(p.name)) is not None and p.is_file()
            )
            segments: list[_Segment] = []
            last_good = named[0][0] - 1 if named else 0
            for n, (first_seq, path) in enumerate(named):
                seg, last_good = cls._scan_segment(
                    path, last_good, report, first_seq=first_seq, is_last=n == len(named) - 1, fsync=fsync
                )
                segments.append(seg)
        except OSError as exc:
            raise SpoolError(f"cannot recover spool {directory}: {exc}") from exc

        # Records older than the first segment were deleted by a commit, so they were delivered even if the
        # cursor is gone. The next sequence number must exceed everything ever handed out, so a reader
        # positioned at the cursor never skips a new record.
        committed = max(cursor_seq, named[0][0] - 1 if named else 0)
        last_seq = max(last_good, committed, named[-1][0] - 1 if named else 0)

        try:
            active = segments[-1] if segments else None
            expected_first = (
                None if active is None else (active.last_seq + 1 if active.last_seq is not None else active.first_seq)
            )
            if active is None or expected_first != last_seq + 1:
                # Start a fresh segment so sequence numbers inside each file stay contiguous.
                active = _Segment(first_seq=last_seq + 1, path=directory / segment_name(last_seq + 1))
                active.fd = os.open(active.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                if fsync:
                    _fsync_dir(directory)
                segments.append(active)
            else:
                active.fd = os.open(active.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot open active segment in {directory}: {exc}") from exc

        spool = cls(
            directory,
            segment_max_bytes=segment_max_bytes,
            max_bytes=max_bytes,
            fsync=fsync,
            lock_fd=lock_fd,
            segments=segments,
            last_seq=last_seq,
            committed_seq=committed,
            recovery_report=report,
        )
        logger.info(
            "spool opened: dir=%s segments=%d last_seq=%d committed_seq=%d bytes=%d problems=%d",
            directory,
            len(segments),
            last_seq,
            committed,
            spool.bytes_on_disk,
            len(report),
        )
        return spool

    @staticmethod
    def _read_cursor(directory: Path, report: list[SpoolProblem]) -> int:
        try:
            raw = (directory / CURSOR_NAME).read_bytes()
        except FileNotFoundError:
            return 0
        if len(raw) == _CURSOR.size:
            magic, seq, crc = _CURSOR.unpack(raw)
            if magic == _CURSOR_MAGIC and zlib.crc32(raw[:12]) == crc:
                return int(seq)
        # Treating it as 0 re-delivers what was already sent; guessing higher could lose records.
        report.append(SpoolProblem(CURSOR_NAME, 0, "corrupt cursor", skipped_bytes=0))
        logger.warning("spool recovery: %s is corrupt (%d bytes); treating committed_seq as 0", CURSOR_NAME, len(raw))
        return 0

    @staticmethod
    def _scan_segment(
        path: Path, last_good: int, report: list[SpoolProblem], *, first_seq: int, is_last: bool, fsync: bool
    ) -> tuple[_Segment, int]:
        """Index ``path``, skipping or cutting away anything that is not a valid next record.

        Returns the segment and the new last good sequence number. Every skipped byte is first copied aside.
        """
        data = path.read_bytes()
        seg = _Segment(first_seq=first_seq, path=path, size=len(data))

        def skip(pos: int, end: int, reason: str, action: str) -> None:
            moved_to = _set_aside(path, data, pos, end, fsync=fsync)
            report.append(SpoolProblem(path.name, pos, reason, skipped_bytes=end - pos, moved_to=moved_to))
            logger.warning(
                "spool recovery: %s offset %d: %s; %s %d bytes (copied to %s)",
                path.name,
                pos,
                reason,
                action,
                end - pos,
                moved_to,
            )

        pos = good_end = 0
        while pos < len(data):
            parsed = _parse(data, pos)
            if isinstance(parsed, str):
                nxt = _resync(data, pos + 1, last_good + 1)
                if nxt is None:
                    skip(pos, len(data), parsed, "truncated")
                    _truncate(path, pos, fsync=fsync)
                    seg.size = pos
                    break
                skip(pos, nxt, parsed, "skipped to the next valid record")
                pos = nxt
                continue
            seq, length = parsed
            end = pos + HEADER_BYTES + length
            if seq <= last_good:
                skip(pos, end, "sequence out of order", f"seq {seq} after {last_good}, skipped")
                pos = end
                continue
            if seq != last_good + 1:
                report.append(SpoolProblem(path.name, pos, "sequence gap"))
                logger.warning(
                    "spool recovery: %s offset %d: sequence gap (expected %d, found %d); %d records missing",
                    path.name,
                    pos,
                    last_good + 1,
                    seq,
                    seq - last_good - 1,
                )
            seg.seqs.append(seq)
            seg.offsets.append(pos)
            seg.lengths.append(length)
            last_good = seq
            pos = good_end = end
        if is_last and good_end < seg.size:
            # Everything after the last good record was reported and copied aside; appends go right after it.
            _truncate(path, good_end, fsync=fsync)
            seg.size = good_end
        return seg, last_good

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def committed_seq(self) -> int:
        """Highest sequence number known delivered (persisted in the cursor)."""
        with self._state_lock:
            return self._committed_seq

    @property
    def last_seq(self) -> int:
        """Highest sequence number handed out and durable (0 when none ever was)."""
        with self._state_lock:
            return self._last_seq

    @property
    def depth(self) -> int:
        """Records not yet committed: ``last_seq - committed_seq``."""
        with self._state_lock:
            return self._last_seq - self._committed_seq

    @property
    def bytes_on_disk(self) -> int:
        """Size of all segment files (what ``max_bytes`` bounds); set-aside corrupt bytes are not counted."""
        with self._state_lock:
            return self._bytes

    @property
    def segment_count(self) -> int:
        with self._state_lock:
            return len(self._segments)

    # -- writing --------------------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> list[int]:
        """Store ``payloads`` and return their sequence numbers; with ``fsync`` they are durable on return.

        The whole batch costs one fsync (two when it crosses into a new segment). Raises ``SpoolFull`` if the
        batch does not fit in ``max_bytes`` (nothing is written), ``SpoolError`` on I/O errors. After an error
        a prefix of the batch may already be durable and will be delivered: callers retry, so at-least-once.
        """
        for payload in payloads:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise SpoolError(f"record of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES} byte limit")
        with self._write_lock:
            self._check_writable()
            if not payloads:
                return []
            self._reserve(sum(HEADER_BYTES + len(p) for p in payloads))
            with self._state_lock:
                seg = self._segments[-1]
                first = self._last_seq + 1
            seqs = list(range(first, first + len(payloads)))
            pos = seg.size
            chunks: list[bytes] = []
            pending: list[tuple[int, int, int]] = []
            for seq, payload in zip(seqs, payloads, strict=True):
                record_bytes = HEADER_BYTES + len(payload)
                if pos > 0 and pos + record_bytes > self._segment_max_bytes:
                    self._flush(seg, chunks, pending)
                    seg = self._roll(seq)
                    pos, chunks, pending = 0, [], []
                chunks.append(encode_header(seq, payload))
                chunks.append(payload)
                pending.append((seq, pos, len(payload)))
                pos += record_bytes
            self._flush(seg, chunks, pending)
            return seqs

    def _check_writable(self) -> None:
        if self._closed:
            raise SpoolError("spool is closed")
        if self._broken is not None:
            raise SpoolError(f"spool is unusable after an fsync failure ({self._broken}); reopen it")

    def _reserve(self, needed_bytes: int) -> None:
        """Raise ``SpoolFull`` unless ``needed_bytes`` fit, reclaiming a fully committed active segment first."""
        with self._state_lock:
            if self._bytes + needed_bytes <= self._max_bytes:
                return
            active = self._segments[-1]
            # Only a segment holding records can be rolled away from: its name is below any new sequence number.
            reclaimable = active.last_seq is not None and active.last_seq <= self._committed_seq
            used = self._bytes
        if reclaimable:
            # Otherwise a drained spool whose active segment is near max_bytes could never accept again.
            self._roll(self.last_seq + 1)
            self._delete(self._detach_collectable())
            with self._state_lock:
                used = self._bytes
                if used + needed_bytes <= self._max_bytes:
                    return
        raise SpoolFull(f"spool full: {used} + {needed_bytes} bytes would exceed max_bytes={self._max_bytes}")

    def _flush(self, seg: _Segment, chunks: list[bytes], pending: list[tuple[int, int, int]]) -> None:
        """Write ``chunks`` at the end of ``seg``, fsync, then publish the records to readers."""
        if not pending:
            return
        assert seg.fd is not None
        data = b"".join(chunks)
        try:
            _pwrite_all(seg.fd, data, seg.size)
        except OSError as exc:
            # Cut the partial write off so the next batch starts at a record boundary.
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError as trunc_exc:
                self._broken = f"ftruncate after failed write: {trunc_exc}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"no space left for the spool: {exc}") from exc
            raise SpoolError(f"spool write failed: {exc}") from exc
        if self._fsync:
            try:
                os.fsync(seg.fd)
            except OSError as exc:
                self._broken = str(exc)
                raise SpoolError(f"spool fsync failed: {exc}") from exc
            self.fsync_count += 1
        with self._state_lock:
            for seq, offset, length in pending:
                seg.seqs.append(seq)
                seg.offsets.append(offset)
                seg.lengths.append(length)
            seg.size += len(data)
            self._bytes += len(data)
            self._last_seq = pending[-1][0]

    def _roll(self, first_seq: int) -> _Segment:
        """Create and activate a new segment; the caller holds ``_write_lock``."""
        path = self._dir / segment_name(first_seq)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            if self._fsync:
                # The new name must be durable before records in it are acknowledged.
                _fsync_dir(self._dir)
        except OSError as exc:
            raise SpoolError(f"cannot create segment {path.name}: {exc}") from exc
        seg = _Segment(first_seq=first_seq, path=path, fd=fd)
        with self._state_lock:
            old = self._segments[-1]
            self._segments.append(seg)
            if old.fd is not None:
                os.close(old.fd)
                old.fd = None
        logger.debug("spool: new segment %s", path.name)
        return seg

    # -- reading --------------------------------------------------------------------------------------------

    def read(self, after_seq: int, max_records: int, *, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` durable records with ``seq > after_seq``, in order, as ``(seq, payload)``.

        ``max_bytes`` caps the payload total (at least one record is returned). Records are verified again;
        one that fails its CRC now (bit rot since open) is logged and skipped, never returned.
        """
        out: list[tuple[int, bytes]] = []
        if max_records <= 0:
            return out
        total = 0
        with self._state_lock:
            if self._closed:
                raise SpoolError("spool is closed")
            for seg in self._segments:
                last = seg.last_seq
                if last is None or last <= after_seq:
                    continue
                i = bisect_right(seg.seqs, after_seq)
                j = i
                while j < len(seg.seqs) and len(out) + (j - i) < max_records:
                    if max_bytes is not None and (out or j > i) and total + seg.lengths[j] > max_bytes:
                        break
                    total += seg.lengths[j]
                    j += 1
                if j > i:
                    self._read_range(seg, i, j, out)
                if len(out) >= max_records or j < len(seg.seqs):
                    break
        return out

    def _read_range(self, seg: _Segment, i: int, j: int, out: list[tuple[int, bytes]]) -> None:
        """Append records ``i..j-1`` of ``seg`` to ``out``; the caller holds ``_state_lock``."""
        base = seg.offsets[i]
        end = seg.offsets[j - 1] + HEADER_BYTES + seg.lengths[j - 1]
        try:
            if seg.fd is not None:
                data = _pread_exact(seg.fd, end - base, base)
            else:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = _pread_exact(fd, end - base, base)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise SpoolError(f"cannot read {seg.path.name}: {exc}") from exc
        for k in range(i, j):
            pos = seg.offsets[k] - base
            parsed = _parse(data, pos)
            if isinstance(parsed, str) or parsed != (seg.seqs[k], seg.lengths[k]):
                reason = parsed if isinstance(parsed, str) else "header does not match index"
                logger.error(
                    "spool: %s offset %d (seq %d) is corrupt on read: %s; record skipped",
                    seg.path.name,
                    seg.offsets[k],
                    seg.seqs[k],
                    reason,
                )
                continue
            start = pos + HEADER_BYTES
            out.append((seg.seqs[k], data[start : start + seg.lengths[k]]))

    # -- committing -----------------------------------------------------------------------------------------

    def commit(self, seq: int) -> None:
        """Mark everything ``<= seq`` delivered: persist the cursor, then delete fully delivered segments.

        Committing below ``committed_seq`` is a no-op; above ``last_seq`` is a ``ValueError``.
        """
        with self._commit_lock:
            with self._state_lock:
                if self._closed:
                    raise SpoolError("spool is closed")
                if seq > self._last_seq:
                    raise ValueError(f"cannot commit seq {seq} beyond last_seq {self._last_seq}")
                if seq <= self._committed_seq:
                    return
            self._write_cursor(seq)
            with self._state_lock:
                self._committed_seq = seq
            self._delete(self._detach_collectable())

    def _write_cursor(self, seq: int) -> None:
        head = _CURSOR_MAGIC + seq.to_bytes(8, "little")
        raw = head + zlib.crc32(head).to_bytes(4, "little")
        tmp = self._dir / (CURSOR_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _pwrite_all(fd, raw, 0)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._dir / CURSOR_NAME)
            if self._fsync:
                _fsync_dir(self._dir)
        except OSError as exc:
            raise SpoolError(f"cannot write spool cursor: {exc}") from exc

    def _detach_collectable(self) -> list[_Segment]:
        """Remove from the index every non-active segment whose records are all committed."""
        with self._state_lock:
            keep: list[_Segment] = []
            doomed: list[_Segment] = []
            active = self._segments[-1]
            for seg in self._segments:
                last = seg.last_seq
                if seg is not active and (last is None or last <= self._committed_seq):
                    doomed.append(seg)
                    self._bytes -= seg.size
                    if seg.fd is not None:
                        os.close(seg.fd)
                        seg.fd = None
                else:
                    keep.append(seg)
            self._segments = keep
        return doomed

    def _delete(self, segments: list[_Segment]) -> None:
        for seg in segments:
            try:
                seg.path.unlink(missing_ok=True)
            except OSError as exc:
                # Harmless: its records are committed; the next open will index it again and it will go later.
                logger.warning("spool: cannot delete %s: %s", seg.path.name, exc)
            else:
                logger.debug("spool: deleted delivered segment %s", seg.path.name)

    # -- closing --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close files and release the directory lock; waits for an in-progress ``append``. Idempotent."""
        with self._write_lock, self._commit_lock, self._state_lock:
            if self._closed:
                return
            self._closed = True
            for seg in self._segments:
                if seg.fd is not None:
                    os.close(seg.fd)
                    seg.fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _set_aside(path: Path, data: bytes, start: int, end: int, *, fsync: bool) -> str:
    """Copy ``data[start:end]`` to ``<path>.corrupt-<start>`` and return that file's name."""
    aside = path.with_name(f"{path.name}.corrupt-{start}")
    try:
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(fd, data[start:end], 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if fsync:
            # The copy's name must be durable before the segment is cut.
            _fsync_dir(path.parent)
    except OSError as exc:
        # Refuse to cut bytes we could not preserve.
        raise SpoolError(f"cannot set aside corrupt bytes of {path.name} to {aside.name}: {exc}") from exc
    return aside.name


def _truncate(path: Path, size: int, *, fsync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if fsync:
        _fsync_dir(path.parent)


class AsyncSpool:
    """Asyncio front of a ``Spool`` that coalesces concurrent ``append`` calls into one fsync'ed batch.

    One batch is written at a time in a worker thread; callers arriving meanwhile form the next batch.
    """

    def __init__(self, spool: Spool, *, max_batch_records: int = 1024, max_batch_bytes: int = 8 * 1024 * 1024) -> None:
        self.spool = spool
        self._max_batch_records = max_batch_records
        self._max_batch_bytes = max_batch_bytes
        self._queue: deque[tuple[bytes, asyncio.Future[int]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._data = asyncio.Event()
        self._closing = False

    @property
    def last_seq(self) -> int:
        return self.spool.last_seq

    @property
    def committed_seq(self) -> int:
        return self.spool.committed_seq

    @property
    def depth(self) -> int:
        return self.spool.depth

    async def append(self, payload: bytes) -> int:
        """Store ``payload`` durably and return its sequence number; raises ``SpoolFull``/``SpoolError``.

        If the caller is cancelled after its batch started, the record may still be stored (at-least-once).
        """
        if self._closing:
            raise SpoolError("spool is closing")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="spool-writer")
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    seqs = await asyncio.to_thread(self.spool.append, [p for p, _ in batch])
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else SpoolError(repr(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), seq in zip(batch, seqs, strict=True):
                    if not fut.done():
                        fut.set_result(seq)
                # Wake every wait_for_data() caller; they re-check last_seq against their position.
                self._data.set()
                self._data = asyncio.Event()
        finally:
            self._writer = None

    def _take_batch(self) -> list[tuple[bytes, asyncio.Future[int]]]:
        batch: list[tuple[bytes, asyncio.Future[int]]] = []
        batch_bytes = 0
        while self._queue and len(batch) < self._max_batch_records:
            payload, fut = self._queue[0]
            if batch and batch_bytes + len(payload) > self._max_batch_bytes:
                break
            self._queue.popleft()
            if fut.done():  # the caller was cancelled before anything was written: drop it
                continue
            batch.append((payload, fut))
            batch_bytes += len(payload)
        return batch

    async def wait_for_data(self, after_seq: int, timeout_s: float) -> bool:
        """Wait until ``last_seq > after_seq``; False if ``timeout_s`` passed first.

        Only appends made through this wrapper wake waiters early.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.spool.last_seq <= after_seq:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            event = self._data
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return self.spool.last_seq > after_seq
        return True

    async def read(self, after_seq: int, max_records: int, *, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """``Spool.read`` in a worker thread (it may hit the disk after a restart)."""
        return await asyncio.to_thread(self.spool.read, after_seq, max_records, max_bytes=max_bytes)

    async def commit(self, seq: int) -> None:
        """``Spool.commit`` in a worker thread (it fsyncs the cursor)."""
        await asyncio.to_thread(self.spool.commit, seq)

    async def close(self) -> None:
        """Finish queued appends (an in-progress write included), then close the spool."""
        self._closing = True
        while self._writer is not None:
            await asyncio.shield(self._writer)
        self.spool.close()
