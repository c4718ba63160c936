"""Kafka going away: never a 200 without an ack; service recovers when the broker returns."""

from __future__ import annotations

import time

import pytest
from conftest import read_records, sample_event
from faultkit import create_topic

from bridge.config import HttpSettings, KafkaSettings, Settings
from bridge.embedded import EmbeddedBroker

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker():
    """A broker this test may stop and restart (tansu: in memory, so a restart starts empty)."""
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


async def test_broker_stopped_gives_503_then_recovers(own_broker: EmbeddedBroker, make_client, topic) -> None:
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=own_broker.bootstrap_servers,
            topic=topic,
            enable_idempotence=False,
            publish_timeout_s=2.0,
            linger_ms=0,
        ),
        http=HttpSettings(),
    )
    client = await make_client(settings)
    assert (await client.post("/vod/callback", json=sample_event("before"))).status == 200

    own_broker.stop()
    started = time.monotonic()
    response = await client.post("/vod/callback", json=sample_event("during"))
    elapsed_s = time.monotonic() - started
    assert response.status == 503
    error = await response.json()
    assert error["error"] == "kafka_unavailable"
    assert "Retry-After" in response.headers
    assert elapsed_s < 2.0 + 1.5, "the publish timeout bounds how long VOD waits"

    own_broker.start()
    # tansu keeps topics in memory: a restarted broker has forgotten the topic, and a producer with cached
    # metadata does not re-trigger auto-creation. A real Kafka keeps its topics, so recreate it here.
    await create_topic(own_broker.bootstrap_servers, topic)
    deadline = time.monotonic() + 20
    statuses = []
    while time.monotonic() < deadline:
        response = await client.post("/vod/callback", json=sample_event("after"))
        statuses.append(response.status)
        if response.status == 200:
            break
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}, "while recovering the bridge answers 503, never anything else"
    records = await read_records(own_broker.bootstrap_servers, topic, count=1)
    assert {r.key for r in records} == {b"after"}
