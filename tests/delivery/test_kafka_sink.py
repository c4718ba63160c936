"""The sink against a broker that goes away, with either Kafka client: a bounded close; and an aiokafka producer
that cannot come back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from conftest import wait_until

from bridge.config import KafkaClient, KafkaSettings
from bridge.delivery.clients import make_sink
from bridge.delivery.kafka import KafkaSink, ProducerUnavailable
from bridge.errors import NotReady, PublishFailed
from bridge.ops.embedded import EmbeddedBroker
from bridge.ops.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, to kill (tansu: the sink runs without idempotence here)."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["aiokafka", "librdkafka"])
def sink_client(request: pytest.FixtureRequest) -> KafkaClient:
    """The Kafka client behind the sink (``BRIDGE_KAFKA_CLIENT``): tests taking it run once with each."""
    client: KafkaClient = request.param
    return client


def settings_for(broker: EmbeddedBroker, **overrides: object) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers,
        topic="sink-test",
        enable_idempotence=False,
        publish_timeout_s=5.0,
        **overrides,  # type: ignore[arg-type]
    )


async def test_close_gives_up_on_undeliverable_records_within_its_bound(
    own_broker: EmbeddedBroker, sink_client: KafkaClient
) -> None:
    sink = make_sink(settings_for(own_broker, client=sink_client), Metrics())
    await asyncio.wait_for(sink.connect(), timeout=15)
    await sink.send("sink-test", b"k", b"before", [])
    own_broker.kill()
    sent_at = time.monotonic()
    with pytest.raises(PublishFailed) as failed:
        # Answered (503) after its own timeout; the record stays in the producer, retried.
        await sink.send("sink-test", b"k", b"stranded", [], timeout_s=0.5)
    assert failed.value.cause == "timeout" and "within 0.5s" in failed.value.message
    # Its own timeout, not the publish timeout (5 s) nor librdkafka's message.timeout.ms.
    assert time.monotonic() - sent_at < 0.5 + 2.0
    started = time.monotonic()
    abandoned = await sink.close(flush_timeout_s=1.0)
    elapsed_s = time.monotonic() - started
    assert elapsed_s < 1.0 + 5.0, f"close took {elapsed_s:.1f}s"
    assert abandoned == sink.abandoned == 1, "the record Kafka never acknowledged is counted, not hidden"


async def test_close_with_nothing_pending_abandons_nothing(
    own_broker: EmbeddedBroker, sink_client: KafkaClient
) -> None:
    sink = make_sink(settings_for(own_broker, client=sink_client), Metrics())
    await asyncio.wait_for(sink.connect(), timeout=15)
    await sink.send("sink-test", b"k", b"acked", [])
    assert await sink.close(flush_timeout_s=5.0) == 0 and sink.abandoned == 0


async def test_a_producer_that_cannot_be_replaced_is_fatal(own_broker: EmbeddedBroker) -> None:
    """aiokafka only: librdkafka has no sender task to die (its fatal errors: test_librdkafka.py)."""
    fatal: list[BaseException] = []
    sink = KafkaSink(settings_for(own_broker, replace_max_attempts=2), Metrics(), on_fatal=fatal.append)
    await asyncio.wait_for(sink.connect(), timeout=15)
    broken = sink._producer
    assert broken is not None
    own_broker.kill()
    broken._sender.sender_task.cancel()  # the end state of aiokafka's sender dying on an unexpected error
    await wait_until(broken._sender.sender_task.done, timeout_s=5)
    with pytest.raises(NotReady):
        await sink.send("sink-test", b"k", b"v", [])  # notices the dead sender and starts replacing it
    # Two attempts, 0.5 s and ~1 s of back-off apart: well within 15 s.
    await wait_until(lambda: bool(fatal), timeout_s=15)
    (exc,) = fatal
    assert isinstance(exc, ProducerUnavailable) and "after 2 attempts" in str(exc)
    assert not sink.ready
    assert await sink.close(flush_timeout_s=1.0) == 0
