"""RFC 3339 timestamps of the record contract, and the per-millisecond cache behind them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from bridge.timefmt import rfc3339_utc, rfc3339_utc_bytes


def reference(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_millisecond_precision_truncated_and_utc() -> None:
    moment = datetime(2026, 11, 26, 11, 30, 31, 123999, tzinfo=UTC)
    assert rfc3339_utc(moment) == "2026-11-26T11:30:31.123Z"
    assert rfc3339_utc_bytes(moment) == b"2026-11-26T11:30:31.123Z"
    assert rfc3339_utc(moment.astimezone(timezone(timedelta(hours=8)))) == "2026-11-26T11:30:31.123Z"


def test_cache_never_serves_a_neighbouring_millisecond() -> None:
    start = datetime(2026, 11, 26, 23, 59, 59, 998000, tzinfo=UTC)
    # Across millisecond, second, minute, hour and day boundaries, one microsecond apart around each edge,
    # asked repeatedly and out of order: every answer must be the moment's own text.
    moments = [start + timedelta(microseconds=us) for us in (0, 999, 1000, 1001, 1999, 2000, 2001, 3500)]
    for moment in [*moments, *reversed(moments), *moments]:
        assert rfc3339_utc(moment) == reference(moment), moment
        assert rfc3339_utc_bytes(moment) == reference(moment).encode(), moment
    assert rfc3339_utc(start + timedelta(microseconds=2000)) == "2026-11-27T00:00:00.000Z"


def test_same_millisecond_other_day_or_zone_is_not_a_hit() -> None:
    moment = datetime(2026, 1, 1, 0, 0, 0, 500, tzinfo=UTC)
    assert rfc3339_utc(moment) == "2026-01-01T00:00:00.000Z"
    assert rfc3339_utc(moment + timedelta(days=1)) == "2026-01-02T00:00:00.000Z"
    assert rfc3339_utc(moment.replace(tzinfo=timezone(timedelta(hours=1)))) == "2025-12-31T23:00:00.000Z"
    assert rfc3339_utc(moment) == "2026-01-01T00:00:00.000Z"


def test_before_1970_floors_to_its_own_millisecond() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    before = epoch - timedelta(microseconds=500)
    assert rfc3339_utc(epoch) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_utc(before) == "1969-12-31T23:59:59.999Z"
    assert rfc3339_utc(before - timedelta(microseconds=600)) == "1969-12-31T23:59:59.998Z"


def test_now_matches_the_reference() -> None:
    for _ in range(1000):
        moment = datetime.now(UTC)
        assert rfc3339_utc(moment) == reference(moment)
