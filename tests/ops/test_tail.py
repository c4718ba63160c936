"""The record printer of `vod-bridge dev` and `vod-bridge tail`."""

from __future__ import annotations

from types import SimpleNamespace

from bridge.delivery.records import dead_letter_headers, event_headers
from bridge.ops.tail import format_record
from bridge.vod.decode import decode_event

BODY = b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t-1"}}'


def test_an_event_record_prints_its_summary_and_value() -> None:
    from datetime import UTC, datetime

    event = decode_event(BODY)
    headers = event_headers(event, source="callback", received_at=datetime(2026, 11, 27, tzinfo=UTC))
    record = SimpleNamespace(topic="vod.events", partition=1, offset=7, key=b"t-1", value=BODY, headers=headers)
    summary, value = format_record(record, pretty=False).split("\n", 1)
    assert summary == "2026-11-27T00:00:00.000Z vod.events[1]@7 key=t-1 type=PullComplete source=callback"
    assert value == BODY.decode()


def test_a_dead_letter_says_why() -> None:
    from datetime import UTC, datetime

    headers = dead_letter_headers(
        source="pull", received_at=datetime(2026, 11, 27, tzinfo=UTC), reason="missing_key", error="no TaskId"
    )
    record = SimpleNamespace(topic="vod.events.dlq", partition=0, offset=0, key=None, value=b"{}", headers=headers)
    summary = format_record(record).split("\n", 1)[0]
    assert summary.endswith("key=- type=- source=pull dead-letter=missing_key")
