"""The record contract's headers: exact names, values and order, whatever is prebuilt behind them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bridge.delivery import records
from bridge.delivery.records import dead_letter_headers, event_headers, undecodable_headers
from bridge.vod.model import Undecodable, VodEvent

RECEIVED_AT = datetime(2026, 11, 26, 11, 30, 31, 123456, tzinfo=UTC)


def event(event_type: str = "PullComplete", **fields: object) -> VodEvent:
    return VodEvent(event_type=event_type, key="t-1", value=b"{}", payload=None, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("event_type", ["PullComplete", "SomethingNew", "ü"])
@pytest.mark.parametrize("source", ["callback", "pull"])
@pytest.mark.parametrize("fmt", ["eventcontent", "legacy-v2"])
def test_event_headers(event_type: str, source: records.Source, fmt: str) -> None:
    headers = event_headers(event(event_type, format=fmt), source=source, received_at=RECEIVED_AT)
    assert headers == [
        ("event-type", event_type.encode()),
        ("source", source.encode()),
        ("received-at", b"2026-11-26T11:30:31.123Z"),
        ("content-type", b"application/json"),
        ("event-format", fmt.encode()),
    ]


def test_event_handle_and_extra_come_last_and_lists_are_not_shared() -> None:
    extra = [("traceparent", b"00-abc-def-01")]
    first = event_headers(event(event_handle="h-1"), source="pull", received_at=RECEIVED_AT, extra=extra)
    assert first[5:] == [("event-handle", b"h-1"), ("traceparent", b"00-abc-def-01")]
    first.append(("mutated", b"yes"))
    second = event_headers(event(), source="pull", received_at=RECEIVED_AT)
    assert len(second) == 5 and ("mutated", b"yes") not in second


def test_received_at_follows_the_clock_across_milliseconds() -> None:
    for us in (0, 999, 1000, 1999, 2000):
        moment = RECEIVED_AT.replace(microsecond=0) + timedelta(microseconds=us)
        (value,) = [v for k, v in event_headers(event(), source="callback", received_at=moment) if k == "received-at"]
        assert value == f"2026-11-26T11:30:31.{us // 1000:03d}Z".encode()


def test_dead_letter_headers() -> None:
    item = Undecodable(reason="missing_key", message="no TaskId", value=b"{}", event_type="PullComplete")
    assert undecodable_headers(item, source="callback", received_at=RECEIVED_AT) == [
        ("source", b"callback"),
        ("received-at", b"2026-11-26T11:30:31.123Z"),
        ("content-type", b"application/json"),
        ("error-reason", b"missing_key"),
        ("error", b"no TaskId"),
        ("event-type", b"PullComplete"),
    ]
    long = dead_letter_headers(source="pull", received_at=RECEIVED_AT, reason="r", error="x" * 5000)
    assert long[4] == ("error", b"x" * records.MAX_ERROR_BYTES)


def test_sub_app_id_header_is_the_decimal_sub_app_id_before_extra() -> None:
    extra = [("traceparent", b"00-abc-def-01")]
    headers = event_headers(
        event(event_handle="h-1"), source="pull", received_at=RECEIVED_AT, sub_app_id=1500012345, extra=extra
    )
    assert headers[5:] == [("event-handle", b"h-1"), ("vod-sub-app-id", b"1500012345"), *extra]
    item = Undecodable(reason="missing_key", message="no TaskId", value=b"{}")
    letter = undecodable_headers(item, source="callback", received_at=RECEIVED_AT, sub_app_id=7)
    assert letter[-1] == (records.SUB_APP_ID, b"7")
    assert records.SUB_APP_ID not in dict(event_headers(event(), source="pull", received_at=RECEIVED_AT))
