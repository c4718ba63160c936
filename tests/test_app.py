"""The wiring point's own duties: what the sink's cleanup context reports when the producer closes."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import sample_event, wait_until
from mockcluster import MockCluster

from bridge.app import COMPONENTS, create_app
from bridge.config import DeliverySettings, KafkaSettings, Settings

pytestmark = pytest.mark.integration


async def test_records_abandoned_at_close_are_counted(topic: str) -> None:
    """A record Kafka never acknowledged, still held when the bounded flush gives up, is counted in
    ``vod_bridge_producer_abandoned_total`` (the process then exits 0: its sender was answered 503)."""
    with MockCluster() as cluster:
        kafka = KafkaSettings(
            bootstrap_servers=cluster.bootstrap_servers, topic=topic, enable_idempotence=True, publish_timeout_s=1.0
        )
        settings = Settings(kafka=kafka, delivery=DeliverySettings(dead_letter_topic=f"{topic}.dlq"))
        app = create_app(settings)
        metrics = app[COMPONENTS].metrics
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            await wait_until(lambda: app[COMPONENTS].sink.ready, timeout_s=15)
            assert (await client.post("/vod/callback", json=sample_event("acked"))).status == 200
            cluster.kill()
            assert (await client.post("/vod/callback", json=sample_event("never-acked"))).status == 503
        finally:
            await client.close()
    assert metrics.registry.get_sample_value("vod_bridge_producer_abandoned_total") == 1
