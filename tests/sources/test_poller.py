"""The reliable-callback poller against the fake VOD API and a real broker.

The sink is the real KafkaSink; ``AckClock`` only timestamps its acks so the tests can prove that every
ConfirmEvents came after the Kafka ack of the event it confirms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from conftest import Kafka, headers_of, read_records, sample_event, value_of, wait_until
from fakevod import FakeVod
from faultkit import create_topic

from bridge.app import create_app
from bridge.config import KafkaSettings, PollerSettings
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.pipeline import Delivery
from bridge.delivery.records import EVENT_HANDLE, Headers, header
from bridge.errors import UpstreamError
from bridge.ops.embedded import EmbeddedBroker
from bridge.ops.metrics import Metrics
from bridge.sources.poller import Poller
from bridge.vod.api import Credentials, VodClient

pytestmark = pytest.mark.integration

CREDENTIALS = Credentials("AKIDtestTESTtest1234", "test-secret-key-5678")


class AckClock:
    """Delegates to the real sink and records when each event handle's record was acked."""

    def __init__(self, inner: KafkaSink) -> None:
        self.inner = inner
        self.acked_at: dict[str, float] = {}

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, **kwargs: Any) -> Any:
        ack = await self.inner.send(topic, key, value, headers, **kwargs)
        handle = header(headers, EVENT_HANDLE)
        assert handle is not None
        self.acked_at[handle] = time.monotonic()
        return ack


class ConfirmFails:
    """A VOD client whose ConfirmEvents never gets through (a bridge that dies between ack and confirm)."""

    def __init__(self, inner: VodClient) -> None:
        self.inner = inner

    async def pull_events(self) -> list[bytes]:
        return await self.inner.pull_events()

    async def confirm_events(self, handles: Sequence[str]) -> None:
        raise UpstreamError("confirm lost", retriable=False)


def poller_settings(topic: str, **overrides: Any) -> PollerSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "idle_interval_s": 0.05,
        **overrides,
    }
    return PollerSettings(**values)


@pytest.fixture
async def fake_vod() -> AsyncIterator[FakeVod]:
    async with FakeVod(
        secret_id=CREDENTIALS.secret_id, secret_key=CREDENTIALS.secret_key, visibility_timeout_s=1.0
    ) as vod:
        yield vod


@pytest.fixture
async def vod_client(fake_vod: FakeVod) -> AsyncIterator[VodClient]:
    async with __import__("aiohttp").ClientSession() as session:
        yield VodClient(session, CREDENTIALS, endpoint=fake_vod.endpoint, request_timeout_s=5)


def make_poller(
    api: Any, sink: Any, settings: PollerSettings, metrics: Metrics, *, topic: str, dedup: DedupWindow | None = None
) -> Poller:
    """The poller wired as ``create_app`` wires it: through the one delivery path, dead letters to ``<topic>.dlq``."""
    delivery = Delivery(sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq", dedup=dedup)
    return Poller(api, delivery, settings, metrics, ready=lambda: sink.ready)


async def connected_sink(settings: KafkaSettings, metrics: Metrics) -> KafkaSink:
    sink = KafkaSink(settings, metrics)
    await asyncio.wait_for(sink.connect(), timeout=15)
    return sink


async def run_until(poller: Poller, condition, *, timeout_s: float = 30) -> None:
    task = asyncio.create_task(poller.run())
    try:
        await wait_until(condition, timeout_s=timeout_s)
    finally:
        poller.stop()
        await asyncio.wait_for(task, timeout=10)


def kafka_settings(kafka: Kafka, topic: str, **overrides: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic": topic,
        "enable_idempotence": kafka.supports_idempotence,
        "linger_ms": 0,
        "publish_timeout_s": 5.0,
        **overrides,
    }
    return KafkaSettings(**values)


async def test_all_events_reach_kafka_and_each_confirm_follows_its_ack(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    sink = AckClock(await connected_sink(kafka_settings(kafka, topic), metrics))
    ids = {fake_vod.add_event(sample_event(f"task-{i}")): f"task-{i}" for i in range(40)}
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.inner.close()

    records = await read_records(kafka.bootstrap_servers, topic, count=40)
    assert sorted(r.key.decode() for r in records) == sorted(ids.values())
    for record in records:
        headers = headers_of(record)
        assert headers["source"] == "pull"
        assert headers["event-handle"]
        assert "EventHandle" not in value_of(record)

    assert {event_id for _, event_id, _ in fake_vod.confirmed} == set(ids)
    for handle, _, confirmed_at in fake_vod.confirmed:
        assert handle in sink.acked_at, "confirmed a handle whose record was never acked"
        assert confirmed_at >= sink.acked_at[handle]
    assert poller.stats.confirmed == 40
    assert 0 < poller.stats.max_confirm_age_s < 5.0, "confirms must come well inside the 30 s window"
    confirm_calls = [r for r in fake_vod.requests if r.action == "ConfirmEvents"]
    assert all(len(r.params["EventHandles"]) <= 16 for r in confirm_calls)
    assert len(confirm_calls) >= 3  # 40 events need at least three calls of <= 16


async def test_kafka_down_nothing_confirmed_then_everything_arrives(
    topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers,
            topic=topic,
            enable_idempotence=False,
            linger_ms=0,
            publish_timeout_s=1.0,
        )
        sink = AckClock(await connected_sink(settings, metrics))
        broker.stop()
        ids = [fake_vod.add_event(sample_event(f"outage-{i}")) for i in range(10)]
        poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
        task = asyncio.create_task(poller.run())
        try:
            await wait_until(lambda: fake_vod.pulls >= 2, timeout_s=15)
            assert fake_vod.confirmed == [], "nothing may be confirmed while Kafka is down"
            assert poller.stats.published == 0

            broker.start()
            await create_topic(broker.bootstrap_servers, topic)  # tansu forgets topics on restart
            await wait_until(lambda: not fake_vod.pending_ids, timeout_s=40)
        finally:
            poller.stop()
            await asyncio.wait_for(task, timeout=10)
            await sink.inner.close()
        records = await read_records(broker.bootstrap_servers, topic, count=10)
    assert {r.key.decode() for r in records} == {f"outage-{i}" for i in range(10)}
    assert {event_id for _, event_id, _ in fake_vod.confirmed} == set(ids)
    assert all(confirmed_at >= sink.acked_at[h] for h, _, confirmed_at in fake_vod.confirmed)


async def test_redelivered_duplicates_keep_their_key(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    ids = [fake_vod.add_event(sample_event(f"dup-{i}")) for i in range(3)]
    try:
        # First bridge: publishes, then its confirms are lost -> nothing confirmed.
        crashed = make_poller(ConfirmFails(vod_client), sink, poller_settings(topic), metrics, topic=topic)
        await run_until(crashed, lambda: crashed.stats.published == 3)
        assert fake_vod.confirmed == []
        # After the visibility timeout VOD hands the same events out again, with new handles.
        healthy = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
        await run_until(healthy, lambda: not fake_vod.pending_ids)
    finally:
        await sink.close()
    records = await read_records(kafka.bootstrap_servers, topic, count=6)
    by_key: dict[str, list[Any]] = {}
    for record in records:
        by_key.setdefault(record.key.decode(), []).append(record)
    assert sorted(by_key) == ["dup-0", "dup-1", "dup-2"]
    for copies in by_key.values():
        assert len(copies) == 2
        assert value_of(copies[0]) == value_of(copies[1])
        assert headers_of(copies[0])["event-handle"] != headers_of(copies[1])["event-handle"]
        assert len({(r.partition) for r in copies}) == 1, "same key, same partition"
    assert all(fake_vod.deliveries[event_id] == 2 for event_id in ids)


async def test_undecodable_event_is_dead_lettered_then_confirmed(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    sink = AckClock(await connected_sink(kafka_settings(kafka, topic), metrics))
    # A type error alone no longer dead-letters (the tolerant reader publishes it); a missing id does.
    bad = {"EventType": "PullComplete", "PullCompleteEvent": {"ErrCode": 70000, "Message": "no task id"}}
    bad_id = fake_vod.add_event(bad)
    good_id = fake_vod.add_event(sample_event("t-good"))
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.inner.close()
    (dead,) = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=1)
    headers = headers_of(dead)
    assert headers["error-reason"] == "missing_key"
    assert "TaskId" in headers["error"]
    assert headers["event-type"] == "PullComplete" and headers["event-handle"]
    assert value_of(dead) == bad, "the body as pulled, minus the transport field EventHandle"
    (good,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert good.key == b"t-good"
    assert {event_id for _, event_id, _ in fake_vod.confirmed} == {bad_id, good_id}
    assert all(confirmed_at >= sink.acked_at[h] for h, _, confirmed_at in fake_vod.confirmed)


async def test_api_errors_back_off_and_recover(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    fake_vod.fail_next(3, code="InternalError")
    fake_vod.add_event(sample_event("after-errors"))
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.close()
    assert metrics.pulls.labels("error")._value.get() == 3
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"after-errors"


async def test_stop_during_long_poll_returns_promptly(kafka: Kafka, topic: str, vod_client: VodClient, fake_vod):
    fake_vod.pull_delay_s = 10.0
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.sleep(0.5)  # the first PullEvents is now parked in the 10 s long poll
        started = time.monotonic()
        poller.stop()
        await asyncio.wait_for(task, timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        await sink.close()
    assert fake_vod.pulls == 0, "the stop interrupted the long poll instead of waiting it out"
    assert fake_vod.confirmed == []


async def test_app_runs_the_poller_without_the_receiver(kafka: Kafka, topic: str, fake_vod: FakeVod, make_settings):
    from aiohttp.test_utils import TestClient, TestServer
    from msgspec.structs import replace

    base = make_settings()
    settings = replace(base, callback_enabled=False, poller=poller_settings(topic, endpoint=fake_vod.endpoint))
    fake_vod.add_event(sample_event("via-app"))
    client = TestClient(TestServer(create_app(settings, credentials=CREDENTIALS)))
    await client.start_server()
    try:
        await wait_until(lambda: not fake_vod.pending_ids, timeout_s=20)
        assert (await client.post("/vod/callback", json=sample_event("x"))).status == 404
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"via-app" and headers_of(record)["source"] == "pull"


class SlowAcks(AckClock):
    """The real sink, with each ack held back a little: long enough to see the next pull overlap."""

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await super().send(topic, key, value, headers, **kwargs)


@pytest.mark.parametrize(("batches_in_flight", "pipelined"), [(2, True), (1, False)])
async def test_next_pull_overlaps_the_publishing_batch(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient, *, batches_in_flight: int, pipelined: bool
) -> None:
    metrics = Metrics()
    sink = SlowAcks(await connected_sink(kafka_settings(kafka, topic), metrics))
    for i in range(48):
        fake_vod.add_event(sample_event(f"pipe-{i}"))
    settings = poller_settings(topic, max_batches_in_flight=batches_in_flight)
    poller = make_poller(vod_client, sink, settings, metrics, topic=topic)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.inner.close()
    actions = [r.action for r in fake_vod.requests if r.outcome == "ok"]
    first_confirm = actions.index("ConfirmEvents")
    assert (actions[:first_confirm].count("PullEvents") >= 2) is pipelined, actions
    for handle, _, confirmed_at in fake_vod.confirmed:
        assert confirmed_at >= sink.acked_at[handle], "pipelining must not move a confirm before its ack"
    assert poller.stats.confirmed == 48
