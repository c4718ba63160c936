"""The one delivery path, against a real broker and with either Kafka client: outcomes, dead letters, and
de-duplication across sources."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import Kafka, headers_of, read_records, sample_event, value_of

from bridge.config import KafkaClient, KafkaSettings
from bridge.delivery.clients import ProducerSink, make_sink
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.pipeline import (
    DeadLettered,
    Delivery,
    Duplicate,
    Failed,
    Published,
    Refused,
    Spooled,
    delivered,
)
from bridge.delivery.spool import AsyncSpool, Spool
from bridge.ops.embedded import free_port
from bridge.ops.metrics import Metrics
from bridge.vod.decode import read_event
from bridge.vod.model import Undecodable, VodEvent

pytestmark = [pytest.mark.integration, pytest.mark.producer]


def item(body: dict[str, object]) -> VodEvent | Undecodable:
    return read_event(json.dumps(body).encode())


def event(task_id: str, **payload: object) -> VodEvent:
    decoded = item(sample_event(task_id, **payload))
    assert isinstance(decoded, VodEvent)
    return decoded


NO_KEY = {"EventType": "PullComplete", "PullCompleteEvent": {"ErrCode": 70000, "Message": "no task id"}}


@pytest.fixture(params=["aiokafka", "librdkafka"])
def sink_client(request: pytest.FixtureRequest) -> KafkaClient:
    """The Kafka client behind the sink (``BRIDGE_KAFKA_CLIENT``): tests taking it run once with each."""
    client: KafkaClient = request.param
    return client


@pytest.fixture
async def sink(kafka: Kafka, topic: str, sink_client: KafkaClient) -> AsyncIterator[ProducerSink]:
    settings = KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        enable_idempotence=kafka.supports_idempotence,
        publish_timeout_s=5.0,
        client=sink_client,
    )
    sink = make_sink(settings, Metrics())
    await asyncio.wait_for(sink.connect(), timeout=15)
    yield sink
    await sink.close()


def delivery_on(sink: ProducerSink, topic: str, metrics: Metrics, **options: object) -> Delivery:
    return Delivery(sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq", **options)  # type: ignore[arg-type]


async def test_published_and_dead_lettered_outcomes(kafka: Kafka, topic: str, sink: ProducerSink) -> None:
    metrics = Metrics()
    delivery = delivery_on(sink, topic, metrics)
    now = datetime.now(UTC)
    published = await delivery.deliver(event("t-1"), source="callback", received_at=now)
    dead = await delivery.deliver(item(NO_KEY), source="callback", received_at=now)
    assert isinstance(published, Published) and published.topic == topic and delivered(published)
    assert isinstance(dead, DeadLettered) and dead.reason == "missing_key" and delivered(dead)
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"t-1" and headers_of(record)["event-format"] == "eventcontent"
    (letter,) = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=1)
    headers = headers_of(letter)
    assert headers["error-reason"] == "missing_key" and headers["source"] == "callback"
    assert headers["event-type"] == "PullComplete" and value_of(letter) == NO_KEY
    rendered = metrics.render().decode()
    assert 'vod_bridge_events_dead_lettered_total{reason="missing_key",source="callback"} 1.0' in rendered


async def test_reject_policy_refuses_callbacks_but_never_pulled_events(
    kafka: Kafka, topic: str, sink: ProducerSink
) -> None:
    delivery = delivery_on(sink, topic, Metrics(), invalid_callbacks="reject")
    now = datetime.now(UTC)
    refused = await delivery.deliver(item(NO_KEY), source="callback", received_at=now)
    assert isinstance(refused, Refused) and refused.error.reason == "missing_key" and not delivered(refused)
    # A pulled event has no 400 to go back to: it is dead-lettered (and so confirmed) whatever the policy.
    pulled = await delivery.deliver(item(NO_KEY), source="pull", received_at=now)
    assert isinstance(pulled, DeadLettered)
    (letter,) = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=1)
    assert headers_of(letter)["source"] == "pull"


async def test_kafka_unreachable_is_a_failure_not_an_exception(topic: str, sink_client: KafkaClient) -> None:
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}", topic=topic, enable_idempotence=False, client=sink_client
    )
    delivery = delivery_on(make_sink(settings, Metrics()), topic, Metrics())
    outcome = await delivery.deliver(event("t-x"), source="pull", received_at=datetime.now(UTC))
    assert isinstance(outcome, Failed) and outcome.error.code == "not_ready" and not delivered(outcome)


async def test_poller_confirms_a_repeat_only_when_kafka_has_the_original(
    kafka: Kafka, topic: str, sink: ProducerSink, tmp_path: Path
) -> None:
    """A callback copy that is only spooled must not let the poller confirm (and VOD forget) the event."""
    metrics = Metrics()
    delivery = delivery_on(sink, topic, metrics, dedup=DedupWindow(300, 1000))
    spool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    delivery.use_spool(forwarder)
    now = datetime.now(UTC)
    try:
        # One event already waits in the spool (the forwarder is not running): callbacks queue behind it.
        await forwarder.store(event("older"), source="callback", received_at=now)
        assert isinstance(await delivery.deliver(event("x"), source="callback", received_at=now), Spooled)
        # The callback copy is only on this disk: a callback repeat is a duplicate, a pulled one is published.
        assert isinstance(await delivery.deliver(event("x"), source="callback", received_at=now), Duplicate)
        pulled = await delivery.deliver(event("x"), source="pull", received_at=now)
        assert isinstance(pulled, Published)
        # Now Kafka has it: every further copy is a duplicate, and the poller may confirm it.
        again = await delivery.deliver(event("x"), source="pull", received_at=now)
        assert isinstance(again, Duplicate) and delivered(again)
    finally:
        await spool.close()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"x" and headers_of(record)["source"] == "pull"
    assert 'vod_bridge_events_duplicate_total{source="pull"} 1.0' in metrics.render().decode()
