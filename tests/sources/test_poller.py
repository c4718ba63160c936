"""The reliable-callback poller against the fake VOD API and a real broker.

The sink is the real KafkaSink; ``AckClock`` only timestamps its acks so the tests can prove that every
ConfirmEvents came after the Kafka ack of the event it confirms.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import Kafka, headers_of, read_records, sample_event, value_of, wait_until
from fakevod import FakeVod
from faultkit import OwnBroker
from msgspec.structs import replace

from bridge.app import COMPONENTS, create_app
from bridge.config import KafkaSettings, PollerSettings, Settings
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.pipeline import Delivery
from bridge.delivery.records import EVENT_HANDLE, SUB_APP_ID, Headers, header
from bridge.errors import ConfigError, UpstreamError
from bridge.ops.metrics import Metrics
from bridge.sources.poller import VISIBILITY_WINDOW_S, Poller, check_window
from bridge.vod.api import Credentials, VodClient
from bridge.vod.model import Undecodable, VodEvent

pytestmark = [pytest.mark.integration, pytest.mark.producer]

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
        self.sub_app_id = inner.sub_app_id

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
        assert SUB_APP_ID not in headers, "no SubAppId configured: the default application, no header"
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
    own_broker: OwnBroker, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap_servers,
        topic=topic,
        enable_idempotence=own_broker.supports_idempotence,
        linger_ms=0,
        publish_timeout_s=1.0,
    )
    sink = AckClock(await connected_sink(settings, metrics))
    own_broker.take_away()
    ids = [fake_vod.add_event(sample_event(f"outage-{i}")) for i in range(10)]
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    task = asyncio.create_task(poller.run())
    try:
        await wait_until(lambda: fake_vod.pulls >= 2, timeout_s=15)
        assert fake_vod.confirmed == [], "nothing may be confirmed while Kafka is down"
        assert poller.stats.published == 0

        await own_broker.bring_back(topic)  # tansu forgets topics on restart
        await wait_until(lambda: not fake_vod.pending_ids, timeout_s=40)
    finally:
        poller.stop()
        await asyncio.wait_for(task, timeout=10)
        await sink.inner.close()
    records = await read_records(own_broker.bootstrap_servers, topic, count=10)
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
    assert metrics.pulls.labels("error", "")._value.get() == 3
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"after-errors"


async def test_stop_during_long_poll_returns_promptly(kafka: Kafka, topic: str, vod_client: VodClient, fake_vod):
    fake_vod.pull_delay_s = 10.0
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    task = asyncio.create_task(poller.run())
    try:
        await fake_vod.wait_for_pulls(1)  # the first PullEvents is now parked in the 10 s long poll
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


class AcksAfterNextPull(AckClock):
    """The real sink, with each ack held back until the fake VOD has received a second PullEvents, for at most
    ``hold_s``: a pipelining poller pulls again while its first batch waits for these acks."""

    def __init__(self, inner: KafkaSink, vod: FakeVod, *, hold_s: float) -> None:
        super().__init__(inner)
        self.vod = vod
        self.hold_s = hold_s
        self.held_until_timeout = 0

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers, **kwargs: Any) -> Any:
        try:
            await self.vod.wait_for_pulls(2, timeout_s=self.hold_s)
        except TimeoutError:
            self.held_until_timeout += 1
        return await super().send(topic, key, value, headers, **kwargs)


# Pipelined, the acks wait for the second pull (the bound is only a safety net); not pipelined, that pull cannot
# come before the batch is confirmed, so the acks are held a little while to give a wrong overlap its chance.
@pytest.mark.parametrize(("batches_in_flight", "pipelined", "hold_s"), [(2, True, 10.0), (1, False, 0.3)])
async def test_next_pull_overlaps_the_publishing_batch(
    kafka: Kafka,
    topic: str,
    fake_vod: FakeVod,
    vod_client: VodClient,
    *,
    batches_in_flight: int,
    pipelined: bool,
    hold_s: float,
) -> None:
    metrics = Metrics()
    sink = AcksAfterNextPull(await connected_sink(kafka_settings(kafka, topic), metrics), fake_vod, hold_s=hold_s)
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
    assert (sink.held_until_timeout == 0) is pipelined, "pipelined, the second pull came while acks were held"
    for handle, _, confirmed_at in fake_vod.confirmed:
        assert confirmed_at >= sink.acked_at[handle], "pipelining must not move a confirm before its ack"
    assert poller.stats.confirmed == 48


# ---- the confirm window counts from the PullEvents request ---------------------------------------------------


async def test_confirm_age_includes_a_slow_pull_answer(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    fake_vod.visibility_timeout_s = 30.0
    fake_vod.answer_delay_s = 1.0  # the events' windows run while their answer is on its way
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    ids = [fake_vod.add_event(sample_event(f"late-{i}")) for i in range(3)]
    poller = make_poller(vod_client, sink, poller_settings(topic), metrics, topic=topic)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.close()
    assert {event_id for _, event_id, _ in fake_vod.confirmed} == set(ids)
    assert poller.stats.confirm_ages_s and min(poller.stats.confirm_ages_s) >= fake_vod.answer_delay_s
    assert poller.stats.max_confirm_age_s >= fake_vod.answer_delay_s
    assert metrics.confirm_age._sum.get() >= fake_vod.answer_delay_s


@pytest.mark.parametrize(("answer_delay_s", "retried"), [(0.0, True), (2.0, False)])
async def test_confirm_is_retried_only_while_the_window_from_the_request_allows(
    kafka: Kafka,
    topic: str,
    fake_vod: FakeVod,
    vod_client: VodClient,
    *,
    answer_delay_s: float,
    retried: bool,
) -> None:
    # A 3 s window: the first confirm fails (retriable) right after the answer. Without a delay 3 s remain, so it
    # is retried; after a 2 s answer under 1 s remains, too little for a retry (back-off + 1 s margin), although
    # only a few milliseconds passed since the answer arrived.
    window_s = 3.0
    fake_vod.visibility_timeout_s = window_s
    fake_vod.answer_delay_s = answer_delay_s
    fake_vod.fail_next(1, code="InternalError", action="ConfirmEvents")
    event_id = fake_vod.add_event(sample_event("confirm-retry"))
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    delivery = Delivery(sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    poller = Poller(vod_client, delivery, poller_settings(topic), metrics, ready=lambda: sink.ready, window_s=window_s)
    try:
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.close()
    confirms = [(r.params["EventHandles"], r.outcome) for r in fake_vod.requests if r.action == "ConfirmEvents"]
    assert [outcome for _, outcome in confirms] == ["InternalError", "ok"]
    (first, _), (second, _) = confirms
    if retried:
        assert second == first and fake_vod.deliveries[event_id] == 1
    else:
        # No retry of the first handle: VOD handed the event out again, and the new handle was confirmed.
        assert second != first and fake_vod.deliveries[event_id] == 2
        assert poller.stats.not_confirmed == 1
    assert poller.stats.confirmed == 1


# ---- one event that raises does not cost the rest of its batch, nor the poller ---------------------------------


class RaisesFor:
    """The real delivery path, except that delivering ``key`` raises: a bug, not a delivery failure."""

    def __init__(self, inner: Delivery, key: str) -> None:
        self.inner = inner
        self.key = key

    async def deliver(self, item: VodEvent | Undecodable, **kwargs: Any) -> Any:
        if isinstance(item, VodEvent) and item.key == self.key:
            raise RuntimeError(f"bug while delivering {self.key}")
        return await self.inner.deliver(item, **kwargs)


async def test_an_event_that_raises_leaves_its_batch_confirmed_and_the_poller_running(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    sink = AckClock(await connected_sink(kafka_settings(kafka, topic), metrics))
    fine = [fake_vod.add_event(sample_event(f"fine-{i}")) for i in range(5)]
    bad_id = fake_vod.add_event(sample_event("boom"))
    fine += [fake_vod.add_event(sample_event(f"fine-{i}")) for i in range(5, 10)]
    delivery = Delivery(sink, metrics, topic_for=lambda _: topic, dead_letter_topic=f"{topic}.dlq")
    poller = Poller(vod_client, RaisesFor(delivery, "boom"), poller_settings(topic), metrics, ready=lambda: sink.ready)
    task = asyncio.create_task(poller.run())
    try:
        # The fake's window is 1 s: VOD keeps handing the failing event out, and the poller keeps pulling.
        await wait_until(lambda: task.done() or fake_vod.deliveries[bad_id] >= 3, timeout_s=20)
        assert not task.done(), "the poller stopped"
    finally:
        poller.stop()
        await asyncio.wait_for(task, timeout=10)
        await sink.inner.close()
    assert {event_id for _, event_id, _ in fake_vod.confirmed} == set(fine)
    assert bad_id in fake_vod.pending_ids
    first_confirm = next(r for r in fake_vod.requests if r.action == "ConfirmEvents")
    assert first_confirm.outcome == "ok" and len(first_confirm.params["EventHandles"]) == 10, "one batch of 11"
    assert all(confirmed_at >= sink.acked_at[h] for h, _, confirmed_at in fake_vod.confirmed)
    errors = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(errors) >= 2
    assert all(r.levelno == logging.ERROR and r.exc_info is not None for r in errors)
    assert "PullComplete" in errors[0].getMessage() and "EH-" in errors[0].getMessage()
    assert metrics.publish_failed.labels("pull", "internal_error")._value.get() == len(errors)
    records = await read_records(kafka.bootstrap_servers, topic, count=10)
    assert sorted(r.key.decode() for r in records) == sorted(f"fine-{i}" for i in range(10))


class ConfirmRaisesOnce:
    """A VOD client whose first ConfirmEvents raises something that is not an ``UpstreamError`` (a bug)."""

    def __init__(self, inner: VodClient) -> None:
        self.inner = inner
        self.sub_app_id = inner.sub_app_id
        self.raised = False

    async def pull_events(self) -> list[bytes]:
        return await self.inner.pull_events()

    async def confirm_events(self, handles: Sequence[str]) -> None:
        if not self.raised:
            self.raised = True
            raise RuntimeError("bug in ConfirmEvents")
        await self.inner.confirm_events(handles)


async def test_a_batch_that_raises_does_not_stop_the_poller(
    kafka: Kafka, topic: str, fake_vod: FakeVod, vod_client: VodClient
) -> None:
    metrics = Metrics()
    sink = await connected_sink(kafka_settings(kafka, topic), metrics)
    ids = [fake_vod.add_event(sample_event(f"again-{i}")) for i in range(3)]
    poller = make_poller(ConfirmRaisesOnce(vod_client), sink, poller_settings(topic), metrics, topic=topic)
    try:
        # The unconfirmed batch comes back after the fake's 1 s window and is confirmed then.
        await run_until(poller, lambda: not fake_vod.pending_ids)
    finally:
        await sink.close()
    assert all(fake_vod.deliveries[event_id] == 2 for event_id in ids)
    assert metrics.publish_failed.labels("pull", "internal_error")._value.get() == 1


# ---- start-up check: the worst case must fit VOD's confirm window ----------------------------------------------


@pytest.mark.parametrize(
    ("publish_timeout_s", "request_timeout_s"),
    [(10.0, 10.0), (2.0, 5.0), (20.0, 5.0), (29.0, 0.5)],
)
def test_check_window_accepts_timeouts_that_fit(publish_timeout_s: float, request_timeout_s: float) -> None:
    check_window(publish_timeout_s, request_timeout_s)


@pytest.mark.parametrize(
    ("publish_timeout_s", "request_timeout_s"),
    [(10.5, 10.0), (10.0, 10.5), (1.0, 15.0), (30.0, 0.1)],
)
def test_check_window_refuses_timeouts_that_cannot_fit(publish_timeout_s: float, request_timeout_s: float) -> None:
    with pytest.raises(ConfigError) as caught:
        check_window(publish_timeout_s, request_timeout_s)
    message = caught.value.message
    assert "BRIDGE_VOD_REQUEST_TIMEOUT_S" in message and "BRIDGE_KAFKA_PUBLISH_TIMEOUT_S" in message
    assert f"{2 * request_timeout_s + publish_timeout_s:g}s exceeds the {VISIBILITY_WINDOW_S:g}s" in message


def test_check_window_accepts_a_worst_case_equal_to_the_window() -> None:
    # Each part is a strict bound (a pull or confirm taking its whole timeout failed; so did such a publish).
    check_window(1.0, 1.0, window_s=3.0)
    with pytest.raises(ConfigError, match=r"= 3s exceeds the 2\.5s"):
        check_window(1.0, 1.0, window_s=2.5)


# ---- several VOD applications (BRIDGE_VOD_SUB_APP_IDS): one loop each, in one app ---------------------------------


async def serve_pollers(settings: Settings) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings, credentials=CREDENTIALS)))
    await client.start_server()
    return client


def pulls_of(vod: FakeVod, sub_app_id: int, outcome: str) -> int:
    return sum(
        1
        for r in vod.requests
        if r.action == "PullEvents" and r.params.get("SubAppId") == sub_app_id and r.outcome == outcome
    )


@pytest.mark.parametrize(
    "configured",
    [{"sub_app_ids": [1500001, 1500002]}, {"sub_app_id": 1500003}],
    ids=["several", "single"],
)
async def test_each_loop_confirms_what_it_pulled_under_its_own_sub_app_id(
    kafka: Kafka,
    topic: str,
    fake_vod: FakeVod,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    *,
    configured: dict[str, Any],
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.poller")
    fake_vod.visibility_timeout_s = 30.0  # a slow test machine must not turn into re-deliveries
    loops: list[int] = configured.get("sub_app_ids") or [configured["sub_app_id"]]
    expected: dict[str, str] = {}
    for sub_app_id in loops:
        for i in range(20):  # more than one batch (16) per application
            fake_vod.add_event(sample_event(f"{sub_app_id}-{i}"), sub_app_id=sub_app_id)
            expected[f"{sub_app_id}-{i}"] = str(sub_app_id)
    default_app_only = fake_vod.add_event(sample_event("default-app"))  # no loop pulls the default application
    poller = poller_settings(topic, endpoint=fake_vod.endpoint, **configured)
    client = await serve_pollers(replace(make_settings(), callback_enabled=False, poller=poller))
    try:
        await wait_until(lambda: fake_vod.pending_ids == [default_app_only], timeout_s=20)
        components = client.server.app[COMPONENTS]
        assert [p.sub_app_id for p in components.pollers] == loops
        rendered = components.metrics.render().decode()
    finally:
        await client.close()

    records = await read_records(kafka.bootstrap_servers, topic, count=len(expected))
    assert {r.key.decode(): headers_of(r)[SUB_APP_ID] for r in records} == expected
    assert len(records) == len(expected)
    # Every handle went back with the SubAppId of the PullEvents that handed it out, and VOD took it.
    assert len(fake_vod.confirm_log) == len(expected)
    assert all(c.accepted and c.sub_app_id == c.pulled_under for c in fake_vod.confirm_log), fake_vod.confirm_log
    assert fake_vod.rejected_confirms == [] and fake_vod.deliveries[default_app_only] == 0
    assert {r.params.get("SubAppId") for r in fake_vod.requests} == set(loops)
    for sub_app_id in loops:
        assert f'vod_bridge_poller_events_confirmed_total{{sub_app_id="{sub_app_id}"}} 20.0' in rendered
        lines = [r.getMessage() for r in caplog.records if r.name == f"bridge.sources.poller.{sub_app_id}"]
        assert any(line.startswith(f"poller started for the SubAppId {sub_app_id}:") for line in lines), lines
        assert any(line.startswith(f"poller stopped for the SubAppId {sub_app_id}: ") for line in lines), lines


async def test_a_sub_app_the_api_refuses_does_not_hold_up_the_others(
    kafka: Kafka,
    topic: str,
    fake_vod: FakeVod,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.poller")
    fake_vod.visibility_timeout_s = 30.0
    # Once 1500002's events are gone its loop parks in the long poll: shutdown must interrupt it, not wait 10 s.
    fake_vod.pull_delay_s = 10.0
    fake_vod.refuse_sub_app(1500001, "UnauthorizedOperation")  # e.g. a key without permission on that application
    refused = [fake_vod.add_event(sample_event(f"refused-{i}"), sub_app_id=1500001) for i in range(3)]
    for i in range(10):
        fake_vod.add_event(sample_event(f"served-{i}"), sub_app_id=1500002)
    poller = poller_settings(topic, endpoint=fake_vod.endpoint, sub_app_ids=[1500001, 1500002])
    client = await serve_pollers(replace(make_settings(), callback_enabled=False, poller=poller))
    try:
        # The refused loop keeps retrying on its own back-off while the other one delivers everything. The metric
        # is waited for too: the fake API counts a refused pull before the poller has read the refusal.
        registry = client.server.app[COMPONENTS].metrics.registry
        await wait_until(
            lambda: (
                not fake_vod.pending_for(1500002)
                and pulls_of(fake_vod, 1500001, "UnauthorizedOperation") >= 3
                and (
                    registry.get_sample_value(
                        "vod_bridge_poller_pulls_total", {"outcome": "error", "sub_app_id": "1500001"}
                    )
                    or 0
                )
                >= 3
            ),
            timeout_s=20,
        )
        rendered = client.server.app[COMPONENTS].metrics.render().decode()
    finally:
        closing = time.monotonic()
        await client.close()
        closed_in_s = time.monotonic() - closing
    assert closed_in_s < 5.0, "both loops stop within the shutdown, the parked long poll included"

    records = await read_records(kafka.bootstrap_servers, topic, count=10)
    assert sorted(r.key.decode() for r in records) == sorted(f"served-{i}" for i in range(10))
    assert {headers_of(r)[SUB_APP_ID] for r in records} == {"1500002"}
    assert sorted(fake_vod.pending_ids) == sorted(refused)
    assert all(c.sub_app_id == c.pulled_under == 1500002 for c in fake_vod.confirm_log)
    errors = dict(re.findall(r'vod_bridge_poller_pulls_total\{outcome="error",sub_app_id="(\d+)"\} (\S+)', rendered))
    assert float(errors["1500001"]) >= 3 and float(errors["1500002"]) == 0, errors
    refusals = [r for r in caplog.records if r.name == "bridge.sources.poller.1500001" and "failed" in r.getMessage()]
    assert refusals and all(r.levelno == logging.ERROR for r in refusals)
    assert "PullEvents for the SubAppId 1500001 failed" in refusals[0].getMessage()
    assert "UnauthorizedOperation" in refusals[0].getMessage()
    stopped = {r.name for r in caplog.records if r.getMessage().startswith("poller stopped for the SubAppId")}
    assert stopped == {"bridge.sources.poller.1500001", "bridge.sources.poller.1500002"}
