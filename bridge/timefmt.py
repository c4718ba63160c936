"""Timestamps as the record contract writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339_utc(moment: datetime) -> str:
    """``2026-11-26T11:30:31.123Z``: millisecond precision, always UTC."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
