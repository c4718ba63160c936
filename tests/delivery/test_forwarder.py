"""The receiver with a durable spool: 200 while Kafka is down, forwarded in order when it returns."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Kafka, headers_of, read_records, sample_event, value_of, wait_until
from faultkit import OwnBroker

from bridge.app import COMPONENTS
from bridge.config import HttpSettings, KafkaSettings, Settings, SpoolSettings
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.records import Headers
from bridge.delivery.spool import AsyncSpool, Spool
from bridge.errors import PublishFailed, RecordTooLarge
from bridge.ops.embedded import free_port
from bridge.ops.metrics import Metrics
from bridge.vod.decode import decode_event
from bridge.vod.model import VodEvent

pytestmark = [pytest.mark.integration, pytest.mark.producer]


def spool_settings(bootstrap: str, topic: str, spool_dir: Path, *, idempotence: bool, **spool: object) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap, topic=topic, enable_idempotence=idempotence, linger_ms=0, publish_timeout_s=2.0
        ),
        http=HttpSettings(),
        spool=SpoolSettings(dir=str(spool_dir), publish_budget_s=0.5, **spool),  # type: ignore[arg-type]
    )


async def test_spooled_while_kafka_is_away_then_forwarded_in_order(
    own_broker: OwnBroker, make_client, topic, tmp_path
) -> None:
    own_broker.take_away()
    settings = spool_settings(
        own_broker.bootstrap_servers, topic, tmp_path / "spool", idempotence=own_broker.supports_idempotence
    )
    client = await make_client(settings, wait_ready=False)
    assert (await client.get("/readyz")).status == 200, "with a spool the bridge accepts events without Kafka"
    for progress in range(20):
        # Every other one names its VOD application in the path: the header must survive the spool.
        path = "/vod/callback/1500001" if progress % 2 else "/vod/callback"
        response = await client.post(path, json=sample_event("ordered", Progress=progress))
        assert response.status == 200
        assert (await response.json())["status"] == "spooled"
    forwarder = client.server.app[COMPONENTS].forwarder
    assert forwarder is not None and forwarder.depth == 20

    await own_broker.bring_back(topic)
    await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
    # New events go straight to Kafka again once the backlog is gone.
    direct = await client.post("/vod/callback", json=sample_event("ordered", Progress=20))
    assert (await direct.json())["status"] == "published"
    records = await read_records(own_broker.bootstrap_servers, topic, count=21)
    assert [value_of(r)["PullCompleteEvent"]["Progress"] for r in records] == list(range(21))
    assert all(r.key == b"ordered" and headers_of(r)["source"] == "callback" for r in records)
    assert [headers_of(r).get("vod-sub-app-id") for r in records[:20]] == [None, "1500001"] * 10


async def test_spool_survives_a_restart_and_reports_a_torn_tail(
    own_broker: OwnBroker, make_client, topic, tmp_path, caplog
) -> None:
    spool_dir = tmp_path / "spool"
    settings = spool_settings(
        own_broker.bootstrap_servers, topic, spool_dir, idempotence=own_broker.supports_idempotence
    )
    own_broker.take_away()
    first = await make_client(settings, wait_ready=False)
    for i in range(5):
        assert (await first.post("/vod/callback", json=sample_event(f"kept-{i}"))).status == 200
    await first.close()

    # A crash mid-write leaves a partial record at the end of the last segment.
    segment = sorted(spool_dir.glob("*.seg"))[-1]
    with segment.open("ab") as f:
        f.write(b"\x00\x01partial-record-without-its-end")

    caplog.set_level(logging.WARNING)
    await own_broker.bring_back(topic)
    second = await make_client(settings)
    forwarder = second.server.app[COMPONENTS].forwarder
    assert forwarder is not None
    await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
    records = await read_records(own_broker.bootstrap_servers, topic, count=5)
    assert sorted(r.key.decode() for r in records) == [f"kept-{i}" for i in range(5)]
    assert "spool recovery" in caplog.text


async def test_full_spool_answers_503(make_client, topic, tmp_path) -> None:
    client = await make_client(
        spool_settings(f"127.0.0.1:{free_port()}", topic, tmp_path / "spool", idempotence=False, max_bytes=1024 * 1024),
        wait_ready=False,
    )
    big = sample_event("big", SessionContext="x" * 300_000)
    forwarder = client.server.app[COMPONENTS].forwarder
    assert forwarder is not None and forwarder.accepting
    statuses = [(await client.post("/vod/callback", json=big)).status for _ in range(6)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[-1] == 503
    assert not forwarder.accepting
    response = await client.post("/vod/callback", json=big)
    # Distinct from an outage without a spool: the sender (and the metrics) can tell a full spool.
    assert (await response.json())["error"] == "spool_full"
    assert response.headers["Retry-After"] == "5"
    rendered = client.server.app[COMPONENTS].metrics.render().decode()
    assert 'vod_bridge_publish_failures_total{code="spool_full",source="callback"} 4.0' in rendered


# ---- the forwarder on its own: a record Kafka refuses for good never wedges the queue --------------------------


class RefusingSink:
    """The real sink, except that it refuses chosen keys: for good (as a broker refuses a record too large for a
    topic) or once (as a retriable error does)."""

    def __init__(self, inner: KafkaSink, *, refuse_for_good: set[bytes], fail_once: set[bytes] = frozenset()) -> None:
        self.inner = inner
        self.refuse_for_good = refuse_for_good
        self.fail_once = set(fail_once)
        self.sent: list[tuple[str, bytes | None]] = []

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, **kwargs: Any) -> Any:
        if key in self.refuse_for_good and not topic.endswith(".dlq"):
            raise RecordTooLarge(
                f"refused {key!r} for topic {topic}", retriable=False, cause="MessageSizeTooLargeError"
            )
        if key in self.fail_once:
            self.fail_once.discard(key)
            raise PublishFailed(f"transient failure for {key!r}", cause="timeout")
        ack = await self.inner.send(topic, key, value, headers, **kwargs)
        self.sent.append((topic, key))
        return ack


def _event(task_id: str, **payload: object) -> VodEvent:
    return decode_event(json.dumps(sample_event(task_id, **payload)).encode())


async def _connected(kafka: Kafka, topic: str, **settings: Any) -> KafkaSink:
    kafka_settings = KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        enable_idempotence=kafka.supports_idempotence,
        publish_timeout_s=5.0,
    )
    sink = KafkaSink(kafka_settings, Metrics(), **settings)
    await asyncio.wait_for(sink.connect(), timeout=15)
    return sink


async def _drain(forwarder: SpoolForwarder) -> None:
    task = asyncio.create_task(forwarder.run())
    try:
        await wait_until(lambda: forwarder.depth == 0, timeout_s=30)
    finally:
        forwarder.stop()
        await asyncio.wait_for(task, timeout=10)


async def test_a_record_kafka_refuses_for_good_is_dead_lettered_and_the_queue_moves_on(
    kafka: Kafka, topic: str, tmp_path: Path
) -> None:
    inner = await _connected(kafka, topic)
    # b"ahead" fails once after b"refused" was dead-lettered: it must be retried alone, its neighbours not again.
    sink = RefusingSink(inner, refuse_for_good={b"refused"}, fail_once={b"ahead"})
    metrics = Metrics()
    spool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    now = datetime.now(UTC)
    try:
        for task_id in ("before", "refused", "ahead", "behind"):
            await forwarder.store(_event(task_id), source="callback", received_at=now, sub_app_id=1500001)
        await _drain(forwarder)
    finally:
        await spool.close()
        await inner.close()
    records = await read_records(kafka.bootstrap_servers, topic, count=3, settle_s=0.5)
    assert sorted(r.key for r in records) == [b"ahead", b"before", b"behind"], "each published exactly once"
    (letter,) = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=1, settle_s=0.3)
    headers = headers_of(letter)
    assert headers["error-reason"] == "kafka_refused" and "refused" in headers["error"]
    assert headers["event-type"] == "PullComplete" and value_of(letter)["PullCompleteEvent"]["TaskId"] == "refused"
    assert headers["vod-sub-app-id"] == "1500001", "the dead letter still names its VOD application"
    assert all(headers_of(r)["vod-sub-app-id"] == "1500001" for r in records)
    assert sink.sent.count((topic, b"behind")) == 1 and sink.sent.count((topic, b"before")) == 1
    rendered = metrics.render().decode()
    assert 'vod_bridge_events_dead_lettered_total{reason="kafka_refused",source="callback"} 1.0' in rendered


async def forward_one_no_topic_takes(kafka: Kafka, topic: str, spool_dir: Path, metrics: Metrics) -> bytes:
    """Spool a record neither its topic nor the dead-letter topic takes, then one they do; forward both until the
    spool is drained. Returns the refused record's value."""
    # A real client-side limit: a record over max_request_size is refused by the producer for every topic.
    sink = await _connected(kafka, topic, max_record_bytes=1024)
    spool = AsyncSpool(Spool.open(spool_dir, fsync=False))
    forwarder = SpoolForwarder(spool, sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    huge = _event("huge", SessionContext="x" * 200_000)
    now = datetime.now(UTC)
    try:
        await forwarder.store(huge, source="callback", received_at=now)
        await forwarder.store(_event("after-huge"), source="callback", received_at=now)
        await _drain(forwarder)
    finally:
        await spool.close()
        await sink.close()
    return huge.value


async def test_a_record_no_topic_takes_is_kept_on_disk_not_retried_for_ever(
    kafka: Kafka, topic: str, tmp_path: Path
) -> None:
    metrics = Metrics()
    huge_value = await forward_one_no_topic_takes(kafka, topic, tmp_path, metrics)
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=0.5)
    assert record.key == b"after-huge"
    (kept,) = (tmp_path / "refused").iterdir()
    assert kept.read_bytes() == huge_value
    assert "vod_bridge_spool_set_aside_total 1.0" in metrics.render().decode()


async def test_records_spooled_by_the_previous_version_are_forwarded(kafka: Kafka, topic: str, tmp_path: Path) -> None:
    """A spool written before headers were stored (format v1 with seven fields) still forwards, with the
    headers of the record contract rebuilt."""
    event = _event("from-v1")
    received_at = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    legacy = msgspec.msgpack.encode((1, event.event_type, event.key, event.value, "callback", received_at, None))
    with Spool.open(tmp_path, fsync=False) as store:
        store.append([legacy])
    sink = await _connected(kafka, topic)
    spool = AsyncSpool(Spool.open(tmp_path, fsync=False))
    forwarder = SpoolForwarder(spool, sink, Metrics(), topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    try:
        await _drain(forwarder)
    finally:
        await spool.close()
        await sink.close()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    headers = headers_of(record)
    assert record.key == b"from-v1" and record.value == event.value
    assert headers["received-at"] == "2026-11-01T12:00:00.000Z" and headers["event-format"] == "eventcontent"
