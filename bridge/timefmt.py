"""Timestamps as the record contract writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)

#: The last formatted millisecond: (milliseconds since the epoch, text, UTF-8 bytes). Every record of one
#: millisecond carries the same ``received-at``, and a busy bridge handles several callbacks per millisecond.
#: One tuple, replaced whole: a reader in another thread (the JSON log formatter) sees an old or a new entry,
#: never half of each.
_last: tuple[int | None, str, bytes] = (None, "", b"")


def rfc3339_utc(moment: datetime) -> str:
    """``2026-11-26T11:30:31.123Z``: millisecond precision (truncated, not rounded), always UTC."""
    return _format(moment)[1]


def rfc3339_utc_bytes(moment: datetime) -> bytes:
    """:func:`rfc3339_utc` as UTF-8 bytes (a Kafka header value)."""
    return _format(moment)[2]


def _format(moment: datetime) -> tuple[int | None, str, bytes]:
    global _last  # noqa: PLW0603 (a one-entry cache)
    if moment.tzinfo is not UTC:
        # Another zone, or a naive time (local time, as astimezone reads it): the rare path, not cached.
        text = _slow(moment)
        return None, text, text.encode()
    # Exact integer milliseconds (floor, also before 1970): two moments share a key only when their texts match.
    key = (moment - _EPOCH) // _MILLISECOND
    entry = _last
    if entry[0] == key:
        return entry
    text = _slow(moment)
    entry = _last = (key, text, text.encode())
    return entry


def _slow(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
