"""The durable callback spool: an fsync'ed, CRC-framed, append-only record log with crash recovery.

``format`` is the on-disk format (sans-I/O), ``store`` the thread-safe ``Spool`` with opening and recovery,
``aio`` the asyncio front ``AsyncSpool``, and ``stranded`` the per-worker directories and the start-up
check that changing the worker count leaves no spooled event behind.
"""

from __future__ import annotations

from bridge.delivery.spool.aio import AsyncSpool
from bridge.delivery.spool.format import CURSOR_NAME, HEADER_BYTES, MAX_PAYLOAD_BYTES, encode_header
from bridge.delivery.spool.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_MAX_BYTES,
    DEFAULT_SEGMENT_MAX_BYTES,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolInUse,
    SpoolProblem,
    SpoolStatus,
    default_min_free_bytes,
    probe_lock,
    segment_size_for,
)
from bridge.delivery.spool.stranded import (
    StrandedSpool,
    check_no_stranded,
    find_stranded,
    spool_dirs,
    worker_spool_dir,
)

__all__ = [
    "CURSOR_NAME",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_READ_MAX_BYTES",
    "DEFAULT_SEGMENT_MAX_BYTES",
    "HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "AsyncSpool",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolInUse",
    "SpoolProblem",
    "SpoolStatus",
    "StrandedSpool",
    "check_no_stranded",
    "default_min_free_bytes",
    "encode_header",
    "find_stranded",
    "probe_lock",
    "segment_size_for",
    "spool_dirs",
    "worker_spool_dir",
]
