"""The record printer of `vod-bridge dev` and `vod-bridge tail`."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer
from conftest import Kafka

from bridge.config import KafkaSettings
from bridge.delivery.records import dead_letter_headers, event_headers
from bridge.ops.tail import format_record, tail
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


@pytest.mark.integration
async def test_tail_prints_what_lands_on_the_topic(kafka: Kafka, topic: str) -> None:
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers, topic=topic, enable_idempotence=False)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, BODY, key=b"t-1", headers=[("event-type", b"PullComplete")])
    finally:
        await producer.stop()
    out = io.StringIO()
    shown = await asyncio.wait_for(tail(settings, [topic], out=out, from_beginning=True, max_records=1), 20)
    assert shown == 1
    summary = out.getvalue().split("\n", 1)[0]
    assert f" {topic}[" in summary and "key=t-1 type=PullComplete" in summary
