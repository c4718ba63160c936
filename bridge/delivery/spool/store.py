"""The spool store: a durable, append-only, fsync'ed local record log (write-ahead spool), thread-safe.

The webhook receiver acknowledges an event only once it is in the spool; a forwarder drains it to Kafka in
sequence order and commits what Kafka acknowledged. Delivery is at-least-once: a lost cursor or a failed
batch may cause re-delivery, never loss of an acknowledged record. Opening a spool recovers it from torn
and corrupt files. The file format is in ``format``.

Every flush to disk goes through one injectable *sync step* (:data:`SyncStep`, default :func:`sync_to_disk`), so
tests can block it or record the order of syncs; the production path calls it directly.

A full disk never stops the spool: appends are refused (``SpoolFull``) before the filesystem is full (the bound
counts undelivered bytes; a free-space floor keeps headroom), a commit overwrites the preallocated cursor in
place (no new block), delivered segments are deleted as soon as the cursor passes them, and a cursor that still
cannot be written is counted and logged while forwarding goes on (a restart may then re-send, never lose).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import threading
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final, Literal, TypeAlias

from bridge.delivery.spool.format import (
    CURSOR_FILE_BYTES,
    CURSOR_NAME,
    HEADER_BYTES,
    LOCK_NAME,
    MAX_PAYLOAD_BYTES,
    CursorState,
    cursor_slot_offset,
    decode_cursor,
    decode_cursor_state,
    encode_cursor_file,
    encode_cursor_slot,
    encode_header,
    parse_record,
    scan_segment,
    segment_first_seq,
    segment_name,
    spool_positions,
)
from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

#: Segment size bounds; between them a segment is 1/16 of the bound (or of the filesystem, if smaller), so
#: forwarding frees space segment by segment long before the spool is full.
DEFAULT_SEGMENT_MAX_BYTES: Final = 64 * 1024 * 1024
MIN_SEGMENT_BYTES: Final = 64 * 1024
SEGMENTS_PER_BOUND: Final = 16
DEFAULT_MAX_BYTES: Final = 1024 * 1024 * 1024
#: Default free-space floor: 5% of the filesystem, at most 64 MiB (52 KiB on a 1 MiB tmpfs).
MAX_DEFAULT_MIN_FREE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MIN_FREE_FRACTION: Final = 20
#: Default bound of one ``read``: a batch of small records, or one large record, never more than this.
DEFAULT_READ_MAX_BYTES: Final = 4 * 1024 * 1024


class SpoolError(BridgeError):
    """The spool cannot store or serve records (I/O error, closed, in use, invalid argument)."""

    code = "spool_error"


class SpoolFull(SpoolError):
    """No room: appending would exceed ``max_bytes`` or the free-space floor, or the disk is full.

    The sender should retry after the forwarder drained some.
    """

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "spool_full"


class SpoolInUse(SpoolError):
    """Another process has the spool directory open (holds its ``LOCK``)."""

    code = "spool_in_use"


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


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """Positions of a spool that is not open, as ``Spool.open`` would recover them (see ``Spool.inspect``)."""

    directory: Path
    committed_seq: int
    last_seq: int

    @property
    def depth(self) -> int:
        """Records not yet committed: ``last_seq - committed_seq``."""
        return self.last_seq - self.committed_seq


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


@dataclass(slots=True, eq=False)
class _ReadSlice:
    """Records ``seqs`` of ``segment``, copied from the index so they can be read without ``_state_lock``."""

    segment: _Segment
    seqs: array[int]
    offsets: array[int]
    lengths: array[int]
    #: Owned by the reader (a dup or a fresh open): keeps the file readable if a commit deletes it meanwhile.
    fd: int | None = None


#: What a sync makes durable: a segment's records (an append, or a cut at recovery), the cursor file, bytes set
#: aside at recovery, or a directory's entries (a file created or renamed in it).
SyncKind: TypeAlias = Literal["segment", "cursor", "set-aside", "directory"]
#: ``sync(fd, path, kind)`` returns once what was written through ``fd`` (the open ``path``) is on stable storage.
SyncStep: TypeAlias = Callable[[int, Path, SyncKind], None]


def sync_to_disk(fd: int, path: Path, kind: SyncKind) -> None:
    """The production :data:`SyncStep`: ``fdatasync`` for file data, ``fsync`` for directories.

    ``fdatasync`` flushes a file's data and the metadata needed to read it back, which includes the size an
    append or a cut changed; it skips timestamps. A file's name is made durable by syncing its directory.
    """
    if kind == "directory" or sys.platform == "darwin":  # macOS has no fdatasync
        os.fsync(fd)
    else:
        os.fdatasync(fd)


# The other disk I/O helpers are module functions so tests can substitute slow or failing ones.


def sync_directory(path: Path, sync: SyncStep = sync_to_disk) -> None:
    """Make the entries of directory ``path`` (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync(fd, path, "directory")
    finally:
        os.close(fd)


def _create_file(path: Path) -> int:
    """Create ``path`` (it must not exist) and return a read-write descriptor."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still allocate on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _filesystem_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def segment_size_for(max_bytes: int, filesystem_bytes: int) -> int:
    """The segment size for a bound: 1/16 of ``max_bytes`` (or of the filesystem if smaller), 64 KiB..64 MiB."""
    return max(
        MIN_SEGMENT_BYTES, min(DEFAULT_SEGMENT_MAX_BYTES, min(max_bytes, filesystem_bytes) // SEGMENTS_PER_BOUND)
    )


def default_min_free_bytes(filesystem_bytes: int) -> int:
    """The free-space floor when none is configured: 5% of the filesystem, at most 64 MiB."""
    return min(MAX_DEFAULT_MIN_FREE_BYTES, filesystem_bytes // DEFAULT_MIN_FREE_FRACTION)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise SpoolError(f"short read: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def _lock(directory: Path) -> int:
    """Open and ``flock`` the spool's ``LOCK`` file; raises ``SpoolInUse`` if another process holds it."""
    try:
        lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SpoolError(f"cannot open spool directory {directory}: {exc}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise SpoolInUse(f"spool directory {directory} is in use by another process") from exc
        raise SpoolError(f"cannot lock spool directory {directory}: {exc}") from exc
    return lock_fd


def probe_lock(directory: Path) -> None:
    """Take the spool's directory lock and release it at once, as a pre-flight check (``vod-bridge check``).

    Creates the ``LOCK`` file if missing, as :meth:`Spool.open` does, and touches nothing else. Raises
    :class:`SpoolInUse` if another process holds the spool, :class:`SpoolError` if the lock cannot be taken.
    """
    os.close(_lock(Path(directory)))


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(first_seq, path)`` of every segment file in ``directory``, oldest first."""
    return sorted(
        (first_seq, p)
        for p in directory.iterdir()
        if (first_seq := segment_first_seq(p.name)) is not None and p.is_file()
    )


class Spool:
    """The spool. Thread-safe: one writer at a time (``append`` serialises), reads and commits concurrently.

    Readers only ever see records whose ``append`` made them durable. Use ``Spool.open``, not the constructor.
    The properties (``depth``, ``last_seq``, ...) never wait for the disk, so an event loop may read them.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_max_bytes: int,
        max_bytes: int,
        min_free_bytes: int,
        sync: SyncStep | None,
        lock_fd: int,
        segments: list[_Segment],
        last_seq: int,
        committed_seq: int,
        cursor: CursorState | None,
        recovery_report: list[SpoolProblem],
    ) -> None:
        self._dir = directory
        self._segment_max_bytes = segment_max_bytes
        self._max_bytes = max_bytes
        self._min_free_bytes = min_free_bytes
        #: A fully committed active segment at least this large is rolled away from (and deleted) by a commit,
        #: so a drained spool holds almost no bytes; smaller ones wait, to spare a file per trickle of commits.
        self._drained_roll_bytes = max(1, min(segment_max_bytes // 4, 256 * 1024))
        #: None when opened with ``fsync=False``: nothing is flushed (tests only).
        self._sync = sync
        self._lock_fd: int | None = lock_fd
        # _state_lock guards the index (segments, sizes, seqs) and is never held across disk I/O (no read,
        # write, fsync, open or close of a file), so the event loop reading depth/last_seq never waits for the
        # disk. _write_lock serialises writers and _commit_lock serialises cursor writes; both are taken
        # before _state_lock, never after, and may be held across I/O.
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._segments = segments
        self._last_seq = last_seq
        self._committed_seq = committed_seq
        self._bytes = sum(s.size for s in segments)
        #: What ``max_bytes`` bounds: the records not yet committed (delivered ones wait only for deletion).
        self._undelivered = sum(
            HEADER_BYTES + length
            for seg in segments
            for seq, length in zip(seg.seqs, seg.lengths, strict=True)
            if seq > committed_seq
        )
        # The cursor file: its descriptor (opened lazily, so a cursor that could not be created at open is
        # created by a later commit), the newest generation written or attempted, and the slot that holds the
        # newest valid one: the next write goes to the other slot, so a torn write never damages it.
        self._cursor_fd: int | None = None
        self._cursor_generation = cursor.generation if cursor is not None else 0
        self._cursor_slot: int | None = cursor.slot if cursor is not None else None
        #: Cursor writes that failed (the commit went on), and whether the last one failed.
        self.cursor_write_failures = 0
        self._cursor_failing = False
        self._closed = False
        #: Set when an fsync failed: the page cache may have dropped the dirty pages, so later appends
        #: could be acknowledged on top of lost data. Reopening re-verifies the files.
        self._broken: str | None = None
        #: Number of data syncs issued by ``append`` (one per batch, two if the batch crossed a segment).
        self.fsync_count = 0
        #: Number of syncs issued by ``commit`` (one per cursor write, one more when it creates the file).
        self.commit_fsync_count = 0
        self.recovery_report = recovery_report

    # -- opening and recovery -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_max_bytes: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_free_bytes: int | None = None,
        fsync: bool = True,
        sync: SyncStep = sync_to_disk,
    ) -> Spool:
        """Open (creating if needed) the spool in ``directory`` and recover it; see ``recovery_report``.

        ``max_bytes`` bounds the undelivered bytes. ``min_free_bytes`` is the free space an append must leave
        on the filesystem (None: :func:`default_min_free_bytes`; 0: no floor). ``segment_max_bytes`` None derives
        it with :func:`segment_size_for`. ``sync`` is called for every flush to disk (``fsync=False``: none, for
        tests that do not need durability). Raises ``SpoolInUse`` if another process holds the spool,
        ``SpoolError`` if the directory is unusable.
        """
        if (segment_max_bytes is not None and segment_max_bytes <= 0) or max_bytes <= 0:
            raise ValueError("segment_max_bytes and max_bytes must be positive")
        if min_free_bytes is not None and min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        directory = Path(directory)
        step = sync if fsync else None
        try:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created and step is not None:
                sync_directory(directory.parent, step)
            filesystem_bytes = _filesystem_bytes(directory)
        except OSError as exc:
            raise SpoolError(f"cannot open spool directory {directory}: {exc}") from exc
        if segment_max_bytes is None:
            segment_max_bytes = segment_size_for(max_bytes, filesystem_bytes)
        if min_free_bytes is None:
            min_free_bytes = default_min_free_bytes(filesystem_bytes)
        lock_fd = _lock(directory)
        try:
            return cls._recover(
                directory,
                lock_fd,
                segment_max_bytes=segment_max_bytes,
                max_bytes=max_bytes,
                min_free_bytes=min_free_bytes,
                sync=step,
            )
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def inspect(cls, directory: Path) -> SpoolStatus:
        """Where ``Spool.open`` would find a closed spool, without changing any file.

        Holds the directory lock while it scans every segment (raises ``SpoolInUse`` if a process has the
        spool open), repairs nothing and logs nothing. A missing directory is an empty spool. ``SpoolError``
        on I/O errors.
        """
        directory = Path(directory)
        if not directory.is_dir():
            return SpoolStatus(directory, 0, 0)
        lock_fd = _lock(directory)
        try:
            try:
                raw = (directory / CURSOR_NAME).read_bytes()
            except FileNotFoundError:
                raw = None
            # A corrupt cursor counts as 0, as in recovery: the depth is overstated, never understated.
            cursor_seq = (decode_cursor(raw) if raw is not None else None) or 0
            named = _list_segments(directory)
            last_good = named[0][0] - 1 if named else 0
            for _, path in named:
                last_good = scan_segment(path.read_bytes(), last_good).last_good
        except OSError as exc:
            raise SpoolError(f"cannot inspect spool {directory}: {exc}") from exc
        finally:
            os.close(lock_fd)
        committed, last_seq = spool_positions(cursor_seq, [first for first, _ in named], last_good)
        return SpoolStatus(directory, committed, last_seq)

    @classmethod
    def _recover(
        cls,
        directory: Path,
        lock_fd: int,
        *,
        segment_max_bytes: int,
        max_bytes: int,
        min_free_bytes: int,
        sync: SyncStep | None,
    ) -> Spool:
        report: list[SpoolProblem] = []
        clean_tail = True
        try:
            with contextlib.suppress(FileNotFoundError):
                # Left by a version that replaced the cursor by renaming a new file over it.
                (directory / (CURSOR_NAME + ".tmp")).unlink()
            cursor, cursor_bytes = cls._read_cursor(directory, report)
            named = _list_segments(directory)
            segments: list[_Segment] = []
            last_good = named[0][0] - 1 if named else 0
            for n, (first_seq, path) in enumerate(named):
                seg, last_good, clean_tail = cls._recover_segment(
                    path, last_good, report, first_seq=first_seq, is_last=n == len(named) - 1, sync=sync
                )
                segments.append(seg)
        except OSError as exc:
            raise SpoolError(f"cannot recover spool {directory}: {exc}") from exc

        cursor_seq = cursor.seq if cursor is not None else 0
        committed, last_seq = spool_positions(cursor_seq, [first for first, _ in named], last_good)

        try:
            active = segments[-1] if segments else None
            expected_first = (
                None if active is None else (active.last_seq + 1 if active.last_seq is not None else active.first_seq)
            )
            if active is not None and not clean_tail and active.last_seq is None:
                # Nothing valid in it and no room to copy its bytes: set the whole file aside by renaming it.
                aside = active.path.with_name(f"{active.path.name}.corrupt-0")
                os.replace(active.path, aside)
                logger.warning("spool recovery: %s holds no valid record; renamed to %s", active.path.name, aside.name)
                segments.pop()
                active = segments[-1] if segments else None
                clean_tail = active is None
            # A tail that could not be cut (no room to copy it aside first) stays; appends go to a new segment.
            if active is None or expected_first != last_seq + 1 or not clean_tail:
                # Start a fresh segment so sequence numbers inside each file stay contiguous.
                active = _Segment(first_seq=last_seq + 1, path=directory / segment_name(last_seq + 1))
                active.fd = _create_file(active.path)
                if sync is not None:
                    sync_directory(directory, sync)
                segments.append(active)
            else:
                active.fd = os.open(active.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot open active segment in {directory}: {exc}") from exc

        spool = cls(
            directory,
            segment_max_bytes=segment_max_bytes,
            max_bytes=max_bytes,
            min_free_bytes=min_free_bytes,
            sync=sync,
            lock_fd=lock_fd,
            segments=segments,
            last_seq=last_seq,
            committed_seq=committed,
            cursor=cursor,
            recovery_report=report,
        )
        if cursor is None or cursor.seq != committed or cursor_bytes < CURSOR_FILE_BYTES:
            # Create (or migrate) the cursor now, while there may be room: commits only overwrite it in place.
            spool._persist_cursor(committed)
        logger.info(
            "spool opened: dir=%s segments=%d last_seq=%d committed_seq=%d bytes=%d segment_max_bytes=%d"
            " min_free_bytes=%d problems=%d",
            directory,
            len(segments),
            last_seq,
            committed,
            spool.bytes_on_disk,
            segment_max_bytes,
            min_free_bytes,
            len(report),
        )
        return spool

    @staticmethod
    def _read_cursor(directory: Path, report: list[SpoolProblem]) -> tuple[CursorState | None, int]:
        """The cursor's newest valid slot (None if missing or corrupt) and the file's size."""
        try:
            raw = (directory / CURSOR_NAME).read_bytes()
        except FileNotFoundError:
            return None, 0
        state = decode_cursor_state(raw)
        if state is not None:
            return state, len(raw)
        # Treating it as 0 re-delivers what was already sent; guessing higher could lose records.
        report.append(SpoolProblem(CURSOR_NAME, 0, "corrupt cursor", skipped_bytes=0))
        logger.warning("spool recovery: %s is corrupt (%d bytes); treating committed_seq as 0", CURSOR_NAME, len(raw))
        return None, len(raw)

    @staticmethod
    def _recover_segment(
        path: Path,
        last_good: int,
        report: list[SpoolProblem],
        *,
        first_seq: int,
        is_last: bool,
        sync: SyncStep | None,
    ) -> tuple[_Segment, int, bool]:
        """Index ``path``, skipping or cutting away anything that is not a valid next record.

        Returns the segment, the new last good sequence number, and whether the file now ends with its last
        good record. Bytes are cut only after they were copied aside; when that copy fails (a full disk), they
        stay in place, unindexed, and the file is left uncut (appends then go to a new segment).
        """
        data = path.read_bytes()
        scan = scan_segment(data, last_good)
        uncopied: list[int] = []
        seg = _Segment(first_seq=first_seq, path=path, size=len(data))
        seg.seqs, seg.offsets, seg.lengths = scan.seqs, scan.offsets, scan.lengths
        for defect in scan.defects:
            if defect.reason == "sequence gap":
                report.append(SpoolProblem(path.name, defect.offset, "sequence gap"))
                logger.warning(
                    "spool recovery: %s offset %d: sequence gap (expected %d, found %d); %d records missing",
                    path.name,
                    defect.offset,
                    defect.expected_seq,
                    defect.found_seq,
                    defect.found_seq - defect.expected_seq,
                )
                continue
            end = defect.offset + defect.skipped_bytes
            try:
                moved_to: str | None = _set_aside(path, data, defect.offset, end, sync=sync)
            except SpoolError as exc:
                moved_to = None
                uncopied.append(defect.offset)
                logger.warning(
                    "spool recovery: %s offset %d: %s; %d bytes left in place, not copied aside (%s)",
                    path.name,
                    defect.offset,
                    defect.reason,
                    defect.skipped_bytes,
                    exc.message,
                )
            problem = SpoolProblem(path.name, defect.offset, defect.reason, defect.skipped_bytes, moved_to)
            report.append(problem)
            if moved_to is None:
                continue
            logger.warning(
                "spool recovery: %s offset %d: %s; %s %d bytes (copied to %s)",
                path.name,
                defect.offset,
                defect.reason,
                defect.action,
                defect.skipped_bytes,
                moved_to,
            )
        # Only bytes copied aside may be cut: the tail from the first defect after the last good record.
        tail_copied = not any(offset >= scan.good_end for offset in uncopied)
        cut_to = scan.cut_at
        if is_last and scan.good_end < seg.size:
            # Everything after the last good record was reported and copied aside; appends go right after it.
            cut_to = scan.good_end
        if cut_to is not None and tail_copied and _try_truncate(path, cut_to, sync=sync):
            seg.size = cut_to
        return seg, scan.last_good, seg.size == scan.good_end

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
        """Size of all segment files, delivered records included; set-aside corrupt bytes are not counted."""
        with self._state_lock:
            return self._bytes

    @property
    def undelivered_bytes(self) -> int:
        """File bytes of the records not yet committed: what ``max_bytes`` bounds."""
        with self._state_lock:
            return self._undelivered

    @property
    def segment_max_bytes(self) -> int:
        return self._segment_max_bytes

    @property
    def min_free_bytes(self) -> int:
        """Free space an append must leave on the filesystem (0: no floor)."""
        return self._min_free_bytes

    @property
    def cursor_failing(self) -> bool:
        """True while the last cursor write failed (commits go on in memory)."""
        return self._cursor_failing

    @property
    def segment_count(self) -> int:
        with self._state_lock:
            return len(self._segments)

    # -- writing --------------------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> list[int]:
        """Store ``payloads`` and return their sequence numbers; with ``fsync`` they are durable on return.

        The whole batch costs one fsync (two when it crosses into a new segment). Raises ``SpoolFull`` if the
        batch does not fit in ``max_bytes`` or would go below ``min_free_bytes`` (nothing is written), or if the
        filesystem says ENOSPC all the same; ``SpoolError`` on other I/O errors. After an error a prefix of the
        batch may already be durable and will be delivered: callers retry, so at-least-once.
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
        """Raise ``SpoolFull`` unless ``needed_bytes`` fit in ``max_bytes`` and above the free-space floor.

        The bound counts undelivered bytes only. Below the floor, delivered bytes still on disk are reclaimed
        first (a fully committed active segment is rolled away from and deleted). The caller holds
        ``_write_lock``.
        """
        with self._state_lock:
            undelivered = self._undelivered
        if undelivered + needed_bytes > self._max_bytes:
            raise SpoolFull(
                f"spool full: {undelivered} undelivered + {needed_bytes} bytes would exceed max_bytes={self._max_bytes}"
            )
        if self._min_free_bytes == 0 or self._room_above_floor(needed_bytes):
            return
        self._reclaim()
        if not self._room_above_floor(needed_bytes):
            raise SpoolFull(
                f"no room for the spool: {needed_bytes} more bytes would leave less than"
                f" min_free_bytes={self._min_free_bytes} free on its filesystem"
            )

    def _room_above_floor(self, needed_bytes: int) -> bool:
        try:
            free = _free_bytes(self._dir)
        except OSError as exc:
            # The write itself still reports ENOSPC: the floor is headroom, not the last line of defence.
            logger.debug("spool: cannot read free space of %s: %s", self._dir, exc)
            return True
        return free - needed_bytes >= self._min_free_bytes

    def _reclaim(self) -> None:
        """Delete delivered segments, rolling away from the active one if all of it is delivered.

        The caller holds ``_write_lock``. A new segment that cannot be created is logged, not raised: the
        append that asked is refused anyway.
        """
        with self._state_lock:
            active = self._segments[-1]
            # Only a segment holding records can be rolled away from: its name is below any new sequence number.
            drained = active.last_seq is not None and active.last_seq <= self._committed_seq
            first = self._last_seq + 1
        if drained:
            try:
                self._roll(first)
            except SpoolError as exc:
                logger.debug("spool: cannot roll away from a delivered segment: %s", exc.message)
        self._delete(self._detach_collectable())

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
        if self._sync is not None:
            try:
                self._sync(seg.fd, seg.path, "segment")
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
            self._undelivered += len(data)
            self._last_seq = pending[-1][0]

    def _roll(self, first_seq: int) -> _Segment:
        """Create and activate a new segment; the caller holds ``_write_lock``."""
        path = self._dir / segment_name(first_seq)
        try:
            fd = _create_file(path)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"no space left for a new spool segment: {exc}") from exc
            raise SpoolError(f"cannot create segment {path.name}: {exc}") from exc
        try:
            if self._sync is not None:
                # The new name must be durable before records in it are acknowledged.
                sync_directory(self._dir, self._sync)
        except OSError as exc:
            # Remove it, or the next roll to the same name would fail for ever (O_EXCL).
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise SpoolError(f"cannot sync the directory for segment {path.name}: {exc}") from exc
        seg = _Segment(first_seq=first_seq, path=path, fd=fd)
        with self._state_lock:
            old = self._segments[-1]
            self._segments.append(seg)
            old_fd, old.fd = old.fd, None
        # Readers hold their own descriptor (a dup), so closing this one cannot break a read in progress.
        if old_fd is not None:
            os.close(old_fd)
        logger.debug("spool: new segment %s", path.name)
        return seg

    # -- reading --------------------------------------------------------------------------------------------

    def read(
        self, after_seq: int, max_records: int, *, max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> list[tuple[int, bytes]]:
        """Up to ``max_records`` durable records with ``seq > after_seq``, in order, as ``(seq, payload)``.

        ``max_bytes`` caps the file bytes read (headers included); at least one record is returned, so a
        record larger than the cap cannot block a reader. Records are verified again; one that fails its CRC
        now (bit rot since open) is logged and skipped, never returned. The index is copied under the lock
        and the files are read without it, so ``depth``/``last_seq`` callers never wait for this read.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_records <= 0:
            return []
        while True:
            slices = self._plan_read(after_seq, max_records, max_bytes)
            try:
                if self._open_slices(slices):
                    return self._read_slices(slices)
            finally:
                for s in slices:
                    if s.fd is not None:
                        os.close(s.fd)
            # A commit deleted a planned segment between planning and opening: its records are delivered and
            # gone from the index, so planning again skips them. Each retry follows one such deletion.

    def _plan_read(self, after_seq: int, max_records: int, max_bytes: int) -> list[_ReadSlice]:
        """Copy the index entries a read returns; dups the active segment's descriptor. No disk I/O."""
        slices: list[_ReadSlice] = []
        count = total = 0
        with self._state_lock:
            if self._closed:
                raise SpoolError("spool is closed")
            try:
                for seg in self._segments:
                    last = seg.last_seq
                    if last is None or last <= after_seq:
                        continue
                    n = len(seg.seqs)
                    i = bisect_right(seg.seqs, after_seq)
                    base = seg.offsets[i]
                    # Records are in file order, so the span read grows with each one: every record starting
                    # at or before base + budget - HEADER_BYTES fits except possibly the last of them.
                    budget = max_bytes - total
                    j = bisect_right(seg.offsets, base + budget - HEADER_BYTES, i, min(n, i + max_records - count))
                    if j > i and seg.offsets[j - 1] + HEADER_BYTES + seg.lengths[j - 1] - base > budget:
                        j -= 1
                    if j == i and count == 0:
                        j = i + 1  # at least one record, however large
                    if j > i:
                        s = _ReadSlice(seg, seg.seqs[i:j], seg.offsets[i:j], seg.lengths[i:j])
                        slices.append(s)
                        if seg.fd is not None:
                            s.fd = os.dup(seg.fd)
                        count += j - i
                        total += seg.offsets[j - 1] + HEADER_BYTES + seg.lengths[j - 1] - base
                    if j < n:
                        break  # stopped by a cap
            except OSError as exc:
                for s in slices:
                    if s.fd is not None:
                        os.close(s.fd)
                raise SpoolError(f"cannot read spool: {exc}") from exc
        return slices

    def _open_slices(self, slices: list[_ReadSlice]) -> bool:
        """Open every planned segment without a descriptor; False if a commit deleted one meanwhile."""
        for s in slices:
            if s.fd is not None:
                continue
            try:
                s.fd = os.open(s.segment.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                with self._state_lock:
                    still_indexed = any(seg is s.segment for seg in self._segments)
                if still_indexed:
                    raise SpoolError(f"cannot read {s.segment.path.name}: {exc}") from exc
                return False
            except OSError as exc:
                raise SpoolError(f"cannot read {s.segment.path.name}: {exc}") from exc
        return True

    def _read_slices(self, slices: list[_ReadSlice]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for s in slices:
            assert s.fd is not None
            name = s.segment.path.name
            base = s.offsets[0]
            end = s.offsets[-1] + HEADER_BYTES + s.lengths[-1]
            try:
                data = _pread_exact(s.fd, end - base, base)
            except OSError as exc:
                raise SpoolError(f"cannot read {name}: {exc}") from exc
            for seq, offset, length in zip(s.seqs, s.offsets, s.lengths, strict=True):
                pos = offset - base
                parsed = parse_record(data, pos)
                if isinstance(parsed, str) or parsed != (seq, length):
                    reason = parsed if isinstance(parsed, str) else "header does not match index"
                    logger.error(
                        "spool: %s offset %d (seq %d) is corrupt on read: %s; record skipped", name, offset, seq, reason
                    )
                    continue
                start = pos + HEADER_BYTES
                out.append((seq, data[start : start + length]))
        return out

    # -- committing -----------------------------------------------------------------------------------------

    def commit(self, seq: int) -> None:
        """Mark everything ``<= seq`` delivered: persist the cursor, then delete fully delivered segments.

        Returns after the cursor's sync (one, in place). A cursor that cannot be written does not fail the
        commit: it is counted (``cursor_write_failures``) and logged once per change, the commit goes on in
        memory, and delivered segments are still deleted (the oldest remaining segment bounds what a restart
        re-sends). Committing below ``committed_seq`` is a no-op; above ``last_seq`` is a ``ValueError``.
        """
        with self._commit_lock:
            with self._state_lock:
                if self._closed:
                    raise SpoolError("spool is closed")
                if seq > self._last_seq:
                    raise ValueError(f"cannot commit seq {seq} beyond last_seq {self._last_seq}")
                if seq <= self._committed_seq:
                    return
            # The cursor's sync runs under _commit_lock only: readers of committed_seq keep the old value
            # until the new one is durable.
            self._persist_cursor(seq)
            with self._state_lock:
                self._undelivered -= self._record_bytes_between(self._committed_seq, seq)
                self._committed_seq = seq
            self._delete(self._detach_collectable())
        self._roll_if_drained()

    def _record_bytes_between(self, after_seq: int, through_seq: int) -> int:
        """File bytes of the indexed records ``after_seq < seq <= through_seq``; the caller holds ``_state_lock``."""
        total = 0
        for seg in self._segments:
            last = seg.last_seq
            if last is None or last <= after_seq:
                continue
            i = bisect_right(seg.seqs, after_seq)
            j = bisect_right(seg.seqs, through_seq)
            if i == j:
                break
            total += (j - i) * HEADER_BYTES + sum(seg.lengths[i:j])
        return total

    def _roll_if_drained(self) -> None:
        """After a commit: roll away from (and delete) a fully delivered active segment of some size.

        Skipped while an append holds ``_write_lock`` (the segment is getting records) or when the new segment
        cannot be created; ``_reserve`` reclaims it later if the room is needed.
        """
        if not self._write_lock.acquire(blocking=False):
            return
        try:
            with self._state_lock:
                if self._closed or self._broken is not None:
                    return
                active = self._segments[-1]
                last = active.last_seq
                if last is None or last > self._committed_seq or active.size < self._drained_roll_bytes:
                    return
            self._reclaim()
        finally:
            self._write_lock.release()

    def _persist_cursor(self, seq: int) -> bool:
        """Write ``seq`` to the cursor; False if that failed (counted, logged when the state changes)."""
        try:
            self._write_cursor(seq)
        except OSError as exc:
            self.cursor_write_failures += 1
            if not self._cursor_failing:
                self._cursor_failing = True
                logger.error(
                    "spool: cannot write the cursor (%s); forwarding goes on, but a restart may send again"
                    " what was delivered since the last cursor write",
                    exc,
                )
            return False
        if self._cursor_failing:
            self._cursor_failing = False
            logger.warning("spool: the cursor is written again (committed_seq=%d)", seq)
        return True

    def _write_cursor(self, seq: int) -> None:
        """Overwrite the cursor slot not holding the newest generation with ``seq``; returns after its sync.

        Needs no free disk space once the file exists. Creating it (first commit, or a spool of an earlier
        version) writes the whole file and syncs it and the directory. Raises ``OSError``.
        """
        path = self._dir / CURSOR_NAME
        generation = self._cursor_generation + 1
        # Used up even if the write fails: a generation is never written twice with different contents.
        self._cursor_generation = generation
        if self._cursor_fd is None:
            try:
                self._cursor_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self._cursor_fd = self._create_cursor(path, seq, generation)
                self._cursor_slot = 0
                return
        slot = 0 if self._cursor_slot is None else 1 - self._cursor_slot
        _pwrite_all(self._cursor_fd, encode_cursor_slot(seq, generation), cursor_slot_offset(slot))
        if self._sync is not None:
            self._sync(self._cursor_fd, path, "cursor")
            self.commit_fsync_count += 1
        self._cursor_slot = slot

    def _create_cursor(self, path: Path, seq: int, generation: int) -> int:
        fd = _create_file(path)
        try:
            _pwrite_all(fd, encode_cursor_file(seq, generation), 0)
            if self._sync is not None:
                self._sync(fd, path, "cursor")
                # The name must be durable before a commit deletes the segments the cursor skips.
                sync_directory(self._dir, self._sync)
                self.commit_fsync_count += 2
        except OSError:
            os.close(fd)
            # A partial file would be taken for a corrupt cursor; the next commit creates it again.
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return fd

    def _detach_collectable(self) -> list[_Segment]:
        """Remove from the index every non-active segment whose records are all committed."""
        fds: list[int] = []
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
                        fds.append(seg.fd)
                        seg.fd = None
                else:
                    keep.append(seg)
            self._segments = keep
        for fd in fds:
            os.close(fd)
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
        """Close files and release the directory lock; waits for an in-progress ``append``/``commit``.

        Idempotent. It may wait for an fsync, so call it from a worker thread, not the event loop.
        """
        with self._write_lock, self._commit_lock:
            with self._state_lock:
                if self._closed:
                    return
                self._closed = True
                fds = [seg.fd for seg in self._segments if seg.fd is not None]
                for seg in self._segments:
                    seg.fd = None
                if self._cursor_fd is not None:
                    fds.append(self._cursor_fd)
                    self._cursor_fd = None
                lock_fd, self._lock_fd = self._lock_fd, None
            for fd in fds:
                os.close(fd)
            if lock_fd is not None:
                os.close(lock_fd)  # last: another process may open the spool from here on

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_file_durably(path: Path, data: bytes, *, sync: SyncStep | None = sync_to_disk) -> None:
    """Write ``data`` as the whole of file ``path``; with ``sync``, returns once its bytes and its name are durable.

    Raises ``OSError``, leaving no partial file that could pass for a whole one.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(fd, data, 0)
            if sync is not None:
                sync(fd, path, "set-aside")
        finally:
            os.close(fd)
        if sync is not None:
            sync_directory(path.parent, sync)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _set_aside(path: Path, data: bytes, start: int, end: int, *, sync: SyncStep | None) -> str:
    """Copy ``data[start:end]`` to ``<path>.corrupt-<start>`` and return that file's name."""
    aside = path.with_name(f"{path.name}.corrupt-{start}")
    try:
        # Durable, name included, before the segment is cut.
        write_file_durably(aside, data[start:end], sync=sync)
    except OSError as exc:
        # Refuse to cut bytes we could not preserve.
        raise SpoolError(f"cannot set aside corrupt bytes of {path.name} to {aside.name}: {exc}") from exc
    return aside.name


def _truncate(path: Path, size: int, *, sync: SyncStep | None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if sync is not None:
            sync(fd, path, "segment")
    finally:
        os.close(fd)
    if sync is not None:
        sync_directory(path.parent, sync)


def _try_truncate(path: Path, size: int, *, sync: SyncStep | None) -> bool:
    """Cut ``path`` to ``size``; False (logged) if that failed, and the file is then treated as uncut."""
    try:
        _truncate(path, size, sync=sync)
    except OSError as exc:
        logger.warning(
            "spool recovery: cannot cut %s to %d bytes (%s); appends start a new segment", path.name, size, exc
        )
        return False
    return True
