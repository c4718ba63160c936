"""A producer that stops making progress is replaced, with either client, and only then; ``reachable`` (``/readyz``'s
``kafka`` field, ``vod_bridge_kafka_connected``) follows the cluster within seconds (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from conftest import Kafka, wait_until
from faultkit import OwnBroker
from mockcluster import MockCluster
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import COMPONENTS
from bridge.config import HttpSettings, KafkaClient, KafkaSettings, Settings
from bridge.delivery.clients import ProducerSink, make_sink
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.librdkafka import LibrdkafkaSink
from bridge.errors import NotReady, PublishFailed
from bridge.ops.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture(params=["aiokafka", "librdkafka"])
def sink_client(request: pytest.FixtureRequest) -> KafkaClient:
    client: KafkaClient = request.param
    return client


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    """A mock cluster of this test's own, to freeze (idempotent producer on)."""
    with MockCluster(brokers=3) as cluster:
        yield cluster


@pytest.fixture
async def sinks() -> AsyncIterator[list[ProducerSink]]:
    """The sinks a test made, closed at its end whatever happened."""
    made: list[ProducerSink] = []
    yield made
    for sink in made:
        await sink.close(flush_timeout_s=1.0)


def replacements(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("vod_bridge_producer_replacements_total", {"reason": reason})
    assert value is not None
    return value


def connected_gauge(metrics: Metrics) -> float:
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "vod_bridge_kafka_connected"
    ]
    return value


async def _connected(made: list[ProducerSink], settings: KafkaSettings, metrics: Metrics, **options: Any) -> Any:
    sink = make_sink(settings, metrics, **options)
    made.append(sink)
    await asyncio.wait_for(sink.connect(), timeout=15)
    return sink


def _tasks_but_this() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def test_a_wedged_aiokafka_producer_is_replaced_and_leaves_no_task_behind(topic: str) -> None:
    """aiokafka issue #1038's end state, made on purpose: the broker goes away, a produce request fails with a
    connection error and waits for a metadata update, and the client's metadata task is gone (as when uvloop's
    RuntimeError killed it). The watchdog replaces the producer at once; the old one's ``stop()`` would wait for
    ever on its batch, so it is closed by force, and none of its tasks is left."""
    before = _tasks_but_this()
    broker = OwnBroker("tansu")
    broker.start()
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers, topic=topic, enable_idempotence=False, publish_timeout_s=2.0
    )
    sink = KafkaSink(settings, metrics)
    try:
        await asyncio.wait_for(sink.connect(), timeout=15)
        await sink.send(topic, b"k", b"before", [])
        broken = sink._producer
        assert broken is not None
        broker.take_away()
        with pytest.raises(PublishFailed):
            await sink.send(topic, b"k", b"stranded", [], timeout_s=1.0)  # stays in the producer, retried
        assert sink._unacked, "the record is still held by the producer"
        broken.client._sync_task.cancel()  # the metadata task dies: the update the produce request awaits never comes
        await wait_until(lambda: sink._producer is not broken, timeout_s=5)
        assert replacements(metrics, "metadata_task_died") == 1
        with pytest.raises(NotReady):
            await sink.send(topic, b"k", b"meanwhile", [])
        await wait_until(lambda: not sink._unacked, timeout_s=10)  # the old producer's records failed, not kept
        await broker.bring_back(topic)
        await wait_until(lambda: sink.ready, timeout_s=20)
        ack = await sink.send(topic, b"k", b"after", [])
        assert ack.offset >= 0
        assert replacements(metrics, "stalled") == 0 and replacements(metrics, "sender_died") == 0
    finally:
        await sink.close(flush_timeout_s=1.0)
        broker.stop()
    # What is left a few loop turns after close: none of either producer's tasks (sender, produce requests,
    # metadata, connections' readers, the old stop()'s flush), nor the watchdog.
    await wait_until(lambda: not (_tasks_but_this() - before), timeout_s=5)


@pytest.mark.producer
async def test_a_stalled_aiokafka_producer_is_replaced_once_the_cluster_answers(
    kafka: Kafka, topic: str, sinks: list[ProducerSink]
) -> None:
    """A producer that keeps every task alive yet never sends a record (its partitions muted for good, as behind
    a wedged metadata wait) while the cluster answers is replaced after ``stall_timeout_s``."""
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        enable_idempotence=kafka.supports_idempotence,
        publish_timeout_s=5.0,
        stall_timeout_s=2.0,
    )
    sink = await _connected(sinks, settings, metrics)
    await sink.send(topic, b"k", b"before", [])
    stuck = sink._producer
    for partition in stuck.client.cluster.partitions_for_topic(topic):
        stuck._sender._muted_partitions.add(TopicPartition(topic, partition))
    started = time.monotonic()
    with pytest.raises(PublishFailed) as failed:
        # Its own timeout is far away: the replacement fails it (503 or spooled, sent again: at least once).
        await sink.send(topic, b"k", b"stuck", [], timeout_s=30.0)
    # The producer failed, not the record: retriable, so a spool takes it rather than the sender getting a 503.
    assert (failed.value.retriable, failed.value.cause) == (True, "producer_replaced"), failed.value
    elapsed_s = time.monotonic() - started
    assert 2.0 <= elapsed_s < 2.0 + 5.0, f"replaced after {elapsed_s:.1f}s"
    assert replacements(metrics, "stalled") == 1
    await wait_until(lambda: sink.ready, timeout_s=15)
    assert sink._producer is not stuck
    await sink.send(topic, b"k", b"after", [])
    assert replacements(metrics, "stalled") == 1, "a healthy producer is not replaced again"


async def test_a_stalled_librdkafka_producer_is_replaced_once_the_cluster_answers(
    kafka: Kafka, topic: str, sinks: list[ProducerSink]
) -> None:
    """A handle whose deliveries never settle (its delivery reports lost before they reach the sink) while the
    cluster answers the probe is replaced after ``stall_timeout_s``; the new handle delivers."""
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        enable_idempotence=kafka.supports_idempotence,
        publish_timeout_s=30.0,
        stall_timeout_s=2.0,
        client="librdkafka",
    )
    sink = await _connected(sinks, settings, metrics)
    assert isinstance(sink, LibrdkafkaSink)
    await sink.send(topic, b"k", b"before", [])
    stuck = sink._producer
    sink._delivered = lambda *report: None  # type: ignore[method-assign]
    started = time.monotonic()
    waiting = asyncio.create_task(sink.send(topic, b"k", b"stuck", [], timeout_s=30.0))
    await wait_until(lambda: replacements(metrics, "stalled") == 1, timeout_s=2.0 + 6.0)
    elapsed_s = time.monotonic() - started
    assert elapsed_s >= 2.0, f"replaced after {elapsed_s:.1f}s, before the stall bound"
    del sink._delivered  # the new handle's reports arrive again
    await wait_until(lambda: sink.ready, timeout_s=15)
    assert sink._producer is not stuck
    await sink.send(topic, b"k", b"after", [])
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError, PublishFailed):  # purged with the old handle, or cancelled
        await waiting
    assert replacements(metrics, "stalled") == 1, "a healthy producer is not replaced again"


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_an_outage_is_no_stall(
    cluster: MockCluster, topic: str, client: KafkaClient, sinks: list[ProducerSink]
) -> None:
    """Records wait through an outage longer than ``stall_timeout_s``: a new producer could not help, so the
    producer is kept, and it delivers them once the cluster is back."""
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=cluster.bootstrap_servers,
        topic=topic,
        publish_timeout_s=30.0,
        stall_timeout_s=1.0,
        client=client,
    )
    sink = await _connected(sinks, settings, metrics)
    await sink.send(topic, b"k", b"before", [])
    cluster.pause()
    waiting = asyncio.create_task(sink.send(topic, b"k", b"through", [], timeout_s=30.0))
    await wait_until(lambda: not sink.reachable, timeout_s=10)
    with pytest.raises(TimeoutError):  # three stall timeouts with records waiting: no replacement
        await wait_until(lambda: replacements(metrics, "stalled") > 0, timeout_s=3.0)
    cluster.resume()
    ack = await asyncio.wait_for(waiting, timeout=20)
    assert ack.offset >= 0 and sink.reachable
    assert replacements(metrics, "stalled") == 0


async def test_a_librdkafka_producer_whose_poll_thread_ended_is_replaced(
    kafka: Kafka, topic: str, sinks: list[ProducerSink]
) -> None:
    """Without its poll thread a librdkafka producer never reports a delivery again: a new handle."""
    metrics = Metrics()
    settings = KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        enable_idempotence=kafka.supports_idempotence,
        publish_timeout_s=5.0,
        client="librdkafka",
    )
    sink = await _connected(sinks, settings, metrics)
    assert isinstance(sink, LibrdkafkaSink)
    await sink.send(topic, b"k", b"before", [])
    broken, polling = sink._producer, sink._polling
    assert polling is not None
    sink._stop_polling.set()  # the poll thread ends, as if it had died
    await wait_until(lambda: not polling.is_alive(), timeout_s=5)
    await wait_until(lambda: replacements(metrics, "poll_thread_died") == 1, timeout_s=5)
    await wait_until(lambda: sink.ready, timeout_s=15)
    assert sink._producer is not broken and sink._polling is not polling
    ack = await sink.send(topic, b"k", b"after", [])
    assert ack.offset >= 0


async def test_readiness_says_whether_kafka_answers_now(
    cluster: MockCluster, topic: str, sink_client: KafkaClient, make_client: Callable[..., Any]
) -> None:
    """Idle (no sends), with either client: ``/readyz``'s ``kafka`` field and ``vod_bridge_kafka_connected`` turn
    within seconds of every broker freezing, and back within seconds of the cluster answering again."""
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=cluster.bootstrap_servers, topic=topic, client=sink_client),
        http=HttpSettings(),
    )
    client = await make_client(settings)
    components = client.server.app[COMPONENTS]

    async def kafka_field() -> str:
        response = await client.get("/readyz")
        assert response.status == 200, "ready: the producer exists (readiness itself is unchanged)"
        field: str = (await response.json())["kafka"]
        return field

    assert await kafka_field() == "connected" and connected_gauge(components.metrics) == 1.0
    cluster.pause()
    paused_at = time.monotonic()
    await wait_until(lambda: not components.sink.reachable, timeout_s=10)
    turned_s = time.monotonic() - paused_at
    assert turned_s < 6.0, f"unreachable after {turned_s:.1f}s"
    assert await kafka_field() == "unreachable" and connected_gauge(components.metrics) == 0.0
    cluster.resume()
    resumed_at = time.monotonic()
    await wait_until(lambda: components.sink.reachable, timeout_s=10)
    assert time.monotonic() - resumed_at < 4.0
    assert await kafka_field() == "connected" and connected_gauge(components.metrics) == 1.0
