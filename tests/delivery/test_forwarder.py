"""The receiver with a durable spool: 200 while Kafka is down, forwarded in order when it returns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import headers_of, read_records, sample_event, value_of, wait_until
from faultkit import create_topic

from bridge.config import HttpSettings, KafkaSettings, Settings, SpoolSettings
from bridge.keys import FORWARDER_KEY
from bridge.ops.embedded import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


def spool_settings(bootstrap: str, topic: str, spool_dir: Path, **spool: object) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap, topic=topic, enable_idempotence=False, linger_ms=0, publish_timeout_s=2.0
        ),
        http=HttpSettings(),
        spool=SpoolSettings(dir=str(spool_dir), publish_budget_s=0.5, **spool),  # type: ignore[arg-type]
    )


async def test_spooled_while_kafka_is_away_then_forwarded_in_order(make_client, topic, tmp_path) -> None:
    port = free_port()
    client = await make_client(spool_settings(f"127.0.0.1:{port}", topic, tmp_path / "spool"), wait_ready=False)
    assert (await client.get("/readyz")).status == 200, "with a spool the bridge accepts events without Kafka"
    for progress in range(20):
        response = await client.post("/vod/callback", json=sample_event("ordered", Progress=progress))
        assert response.status == 200
        assert (await response.json())["status"] == "spooled"
    forwarder = client.server.app[FORWARDER_KEY]
    assert forwarder is not None and forwarder.depth == 20

    broker = EmbeddedBroker(port)
    broker.start()
    try:
        await create_topic(broker.bootstrap_servers, topic)
        await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
        # New events go straight to Kafka again once the backlog is gone.
        direct = await client.post("/vod/callback", json=sample_event("ordered", Progress=20))
        assert (await direct.json())["status"] == "published"
        records = await read_records(broker.bootstrap_servers, topic, count=21)
    finally:
        broker.stop()
    assert [value_of(r)["PullCompleteEvent"]["Progress"] for r in records] == list(range(21))
    assert all(r.key == b"ordered" and headers_of(r)["source"] == "callback" for r in records)


async def test_spool_survives_a_restart_and_reports_a_torn_tail(make_client, topic, tmp_path, caplog) -> None:
    spool_dir = tmp_path / "spool"
    port = free_port()
    first = await make_client(spool_settings(f"127.0.0.1:{port}", topic, spool_dir), wait_ready=False)
    for i in range(5):
        assert (await first.post("/vod/callback", json=sample_event(f"kept-{i}"))).status == 200
    await first.close()

    # A crash mid-write leaves a partial record at the end of the last segment.
    segment = sorted(spool_dir.glob("*.seg"))[-1]
    with segment.open("ab") as f:
        f.write(b"\x00\x01partial-record-without-its-end")

    caplog.set_level(logging.WARNING)
    with EmbeddedBroker(port) as broker:
        await create_topic(broker.bootstrap_servers, topic)
        second = await make_client(spool_settings(broker.bootstrap_servers, topic, spool_dir))
        forwarder = second.server.app[FORWARDER_KEY]
        assert forwarder is not None
        await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
        records = await read_records(broker.bootstrap_servers, topic, count=5)
    assert sorted(r.key.decode() for r in records) == [f"kept-{i}" for i in range(5)]
    assert "spool recovery" in caplog.text


async def test_full_spool_answers_503(make_client, topic, tmp_path) -> None:
    client = await make_client(
        spool_settings(f"127.0.0.1:{free_port()}", topic, tmp_path / "spool", max_bytes=1024 * 1024), wait_ready=False
    )
    big = sample_event("big", SessionContext="x" * 300_000)
    statuses = [(await client.post("/vod/callback", json=big)).status for _ in range(6)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[-1] == 503
    response = await client.post("/vod/callback", json=big)
    assert (await response.json())["error"] == "kafka_unavailable"
