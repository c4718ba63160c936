"""The librdkafka sink (``BRIDGE_KAFKA_CLIENT=librdkafka``): the same records on the same partitions as the aiokafka
sink, the same errors, a bounded close, and librdkafka's fatal errors surfaced. The surface both sinks share (close
with Kafka gone, the delivery pipeline) is tested for both clients in test_kafka_sink.py and test_pipeline.py."""

from __future__ import annotations

import asyncio
import ctypes
import glob
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import confluent_kafka
import msgspec
import pytest
from confluent_kafka import KafkaError
from conftest import Kafka, headers_of, read_records, sample_event, wait_until

from bridge.app import COMPONENTS
from bridge.config import KafkaSettings
from bridge.delivery.clients import check_client, make_sink
from bridge.delivery.kafka import KafkaSink, ProducerUnavailable
from bridge.delivery.librdkafka import LibrdkafkaSink, ProducerFatalError, producer_config
from bridge.delivery.partitioner import partition_for
from bridge.delivery.records import dead_letter_headers
from bridge.errors import ConfigError, NotReady, Overloaded, PublishFailed, RecordTooLarge
from bridge.ops.embedded import EmbeddedBroker, free_port
from bridge.ops.metrics import Metrics
from bridge.ops.redrive import FromBeginning, redrive_dead_letters

pytestmark = pytest.mark.integration


def settings_on(kafka: Kafka, topic: str, **overrides: Any) -> KafkaSettings:
    fields: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic": topic,
        "enable_idempotence": kafka.supports_idempotence,
        "publish_timeout_s": 5.0,
        "client": "librdkafka",
        **overrides,
    }
    return KafkaSettings(**fields)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """Factory: a connected sink (either client) for these settings; closed at the end of the test."""
    sinks: list[Any] = []

    async def make(settings: KafkaSettings, **options: Any) -> Any:
        sink = make_sink(settings, Metrics(), **options)
        sinks.append(sink)
        await asyncio.wait_for(sink.connect(), timeout=15)
        return sink

    yield make
    for sink in sinks:
        await sink.close(flush_timeout_s=2.0)


# ---- no broker needed ------------------------------------------------------------------------------------------


def test_settings_map_to_the_librdkafka_configuration() -> None:
    settings = KafkaSettings(
        bootstrap_servers="a:9092,b:9092",
        client_id="bridge-1",
        enable_idempotence=False,
        publish_timeout_s=7.5,
        linger_ms=3,
        max_batch_bytes=32768,
        compression="gzip",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="user",
        sasl_password="secret",
        ssl_cafile="/etc/ca.pem",
        max_in_flight=50,
    )
    assert producer_config(settings, max_record_bytes=1_000_000) == {
        "bootstrap.servers": "a:9092,b:9092",
        "client.id": "bridge-1",
        "acks": "all",
        "enable.idempotence": False,
        "partitioner": "murmur2_random",
        "linger.ms": 3,
        "batch.size": 32768,
        "compression.type": "gzip",
        "message.max.bytes": 1_000_000 + 65536,
        "message.timeout.ms": 7500,
        "request.timeout.ms": 7500,
        "queue.buffering.max.messages": 50,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "user",
        "sasl.password": "secret",
        "ssl.ca.location": "/etc/ca.pem",
    }
    # Plain defaults: no SASL keys, and no CA path (librdkafka then uses the system's CAs).
    plain = producer_config(KafkaSettings(), max_record_bytes=1024)
    assert plain["compression.type"] == "none" and plain["enable.idempotence"] is True
    assert not {key for key in plain if key.startswith(("sasl.", "ssl."))}


async def test_a_configuration_librdkafka_refuses_is_a_config_error() -> None:
    """Caught at start-up (``check_client``, exit code 2), and by ``connect`` for whoever skips that."""
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}", linger_ms=10_000, publish_timeout_s=5.0, client="librdkafka"
    )
    with pytest.raises(ConfigError, match="BRIDGE_KAFKA_LINGER_MS"):
        check_client(settings)
    sink = LibrdkafkaSink(settings, Metrics())
    with pytest.raises(ConfigError, match=r"message\.timeout\.ms"):
        await sink.connect()
    assert not sink.ready and await sink.close() == 0


async def test_connect_gives_up_after_max_attempts_and_close_ends_every_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody listens: ``connect`` says why and stops after its attempts; a connect cancelled in the middle of
    an attempt (as the app does at shutdown) leaves nothing behind once ``close`` returned."""
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", publish_timeout_s=1.0, client="librdkafka")
    sink = LibrdkafkaSink(settings, Metrics())
    with pytest.raises(ProducerUnavailable, match="after 2 attempts"):
        await sink.connect(max_attempts=2, retry_delay_s=0.05)
    assert any("kafka not reachable" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    connecting = asyncio.create_task(sink.connect())
    await asyncio.sleep(0.2)  # inside librdkafka's list_topics, on a thread of its own
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sink.close(flush_timeout_s=0.5) == 0
    assert loop.time() - started < 0.5 + 3.0 and not sink.ready
    await wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("librdkafka-")], timeout_s=2)


def test_the_factory_builds_the_configured_client() -> None:
    assert isinstance(make_sink(KafkaSettings(), Metrics()), KafkaSink)
    assert isinstance(make_sink(KafkaSettings(client="librdkafka"), Metrics()), LibrdkafkaSink)
    check_client(KafkaSettings(client="librdkafka"))  # installed here: no error


# ---- against a broker ------------------------------------------------------------------------------------------


@pytest.mark.producer
async def test_keys_land_on_the_partitions_of_partition_for(kafka: Kafka, topic: str, connect: Any) -> None:
    """The same key on the same partition with either client: Kafka's murmur2, as ``partition_for`` computes it."""
    rng = random.Random(11)
    keys = [b"", b"k", b"125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8"]
    keys += [rng.randbytes(rng.randrange(1, 80)) for _ in range(300)]
    librdkafka = await connect(settings_on(kafka, topic))
    aiokafka = await connect(settings_on(kafka, topic, client="aiokafka"))
    via_librdkafka = await asyncio.gather(*(librdkafka.send(topic, key, b"1", []) for key in keys))
    via_aiokafka = await asyncio.gather(*(aiokafka.send(topic, key, b"2", []) for key in keys))
    metadata = await asyncio.to_thread(librdkafka._producer.list_topics, topic, 5)
    partitions = sorted(metadata.topics[topic].partitions)
    assert len(partitions) > 1, "a one-partition topic would prove nothing"
    expected = [partition_for(key, partitions, partitions) for key in keys]
    assert [ack.partition for ack in via_librdkafka] == expected
    assert [ack.partition for ack in via_aiokafka] == expected
    assert len(set(expected)) == len(partitions), "every partition was used"


@pytest.mark.producer
async def test_key_value_and_headers_reach_kafka_as_sent(kafka: Kafka, topic: str, connect: Any) -> None:
    sink = await connect(settings_on(kafka, topic))
    value = b'{"EventType":"PullComplete"}'
    headers = [("event-type", b"PullComplete"), ("source", b"callback"), ("empty", b""), ("event-type", b"again")]
    ack = await sink.send(topic, b"task-1", value, headers)
    dead_letter = await sink.send(topic, None, b"no key", [("error-reason", b"missing_key")])
    assert ack.topic == dead_letter.topic == topic and ack.offset >= 0

    records = await read_records(kafka.bootstrap_servers, topic, count=2)
    by_key = {record.key: record for record in records}
    keyed = by_key[b"task-1"]
    assert keyed.value == value and (keyed.partition, keyed.offset) == (ack.partition, ack.offset)
    assert list(keyed.headers) == headers, "names, order, repeats and empty values are kept"
    assert by_key[None].value == b"no key" and headers_of(by_key[None]) == {"error-reason": "missing_key"}


@pytest.mark.producer
async def test_a_record_above_the_limit_is_too_large_not_retriable(kafka: Kafka, topic: str, connect: Any) -> None:
    sink = await connect(settings_on(kafka, topic), max_record_bytes=1024)
    await sink.send(topic, b"k", b"x" * 1024, [("h", b"v")])  # the limit itself, plus headers, fits
    with pytest.raises(RecordTooLarge) as refused:
        await sink.send(topic, b"k", b"x" * 100_000, [])
    assert refused.value.status == 413 and not refused.value.retriable
    assert refused.value.cause == "MSG_SIZE_TOO_LARGE" and sink.in_flight == 0


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, to kill (tansu; idempotence off, as for every tansu test)."""
    with EmbeddedBroker() as broker:
        yield broker


async def test_a_full_queue_is_overloaded_and_close_counts_what_kafka_never_took(own_broker: EmbeddedBroker) -> None:
    settings = KafkaSettings(
        bootstrap_servers=own_broker.bootstrap_servers,
        enable_idempotence=False,
        publish_timeout_s=5.0,
        max_in_flight=2,
        client="librdkafka",
    )
    metrics = Metrics()
    sink = LibrdkafkaSink(settings, metrics)
    await asyncio.wait_for(sink.connect(), timeout=15)
    await sink.send("q", b"k", b"acked", [])
    own_broker.kill()
    for n in range(2):
        with pytest.raises(PublishFailed) as late:
            await sink.send("q", b"k", b"stranded %d" % n, [], timeout_s=0.3)
        assert late.value.cause == "timeout" and late.value.retriable
    # Both records are still queued in librdkafka (until message.timeout.ms): its queue, bounded like the sends
    # waiting (max_in_flight), is full although no send waits any more.
    assert sink.in_flight == 0
    with pytest.raises(Overloaded) as overloaded:
        await sink.send("q", b"k", b"refused", [])
    assert overloaded.value.status == 503 and overloaded.value.retry_after_s == 1
    assert "queue is full" in overloaded.value.message

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sink.close(flush_timeout_s=0.5) == sink.abandoned == 2
    assert loop.time() - started < 0.5 + 2.0
    assert not sink.ready and "vod_bridge_kafka_connected 0.0" in metrics.render().decode()


def _librdkafka_handle(producer: Any) -> tuple[ctypes.CDLL, int] | None:
    """librdkafka's shared library and the producer's ``rd_kafka_t *`` (the first field after the Python object
    header of confluent-kafka's handle), checked by asking librdkafka for the handle's name."""
    package = os.path.dirname(confluent_kafka.__file__)
    libraries = glob.glob(os.path.join(package, os.pardir, "confluent_kafka.libs", "librdkafka*.so*"))
    if not libraries:
        return None
    library = ctypes.CDLL(libraries[0])
    library.rd_kafka_name.restype = ctypes.c_char_p
    library.rd_kafka_name.argtypes = [ctypes.c_void_p]
    library.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    handle = ctypes.c_void_p.from_address(id(producer) + object.__basicsize__).value
    if handle is None or not library.rd_kafka_name(handle).startswith(b"vod-kafka-bridge#producer-"):
        return None
    return library, handle


@pytest.mark.parametrize("raised_by", ["librdkafka", "error_cb"])
async def test_a_fatal_error_stops_the_sink_and_is_reported(
    raised_by: str, kafka: Kafka, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka raises fatal errors (idempotent producer only) through poll(); an error_cb with ``fatal()`` is
    handled the same. Either way: not ready, 503s, one critical line, ``on_fatal`` (the process then exits 3)."""
    fatal: list[BaseException] = []
    metrics = Metrics()
    sink = LibrdkafkaSink(settings_on(kafka, topic, enable_idempotence=True), metrics, on_fatal=fatal.append)
    await asyncio.wait_for(sink.connect(), timeout=15)
    await sink.send(topic, b"k", b"before", [])
    if raised_by == "librdkafka":
        found = _librdkafka_handle(sink._producer)
        if found is None:
            pytest.skip("librdkafka's shared library or handle not found in this confluent-kafka build")
        library, handle = found
        # librdkafka's own hook for exactly this: "no practical way to trigger real fatal errors" otherwise.
        library.rd_kafka_test_fatal_error(handle, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, b"provoked by the test")
    else:
        error = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "provoked by the test", fatal=True)
        # As from librdkafka's thread, for the current producer handle (a replaced handle's are ignored).
        threading.Thread(target=sink._on_error, args=(sink._generation, error)).start()
    await wait_until(lambda: bool(fatal), timeout_s=5)

    (exc,) = fatal
    assert isinstance(exc, ProducerFatalError) and "OUT_OF_ORDER_SEQUENCE_NUMBER" in exc.message
    assert not sink.ready and "vod_bridge_kafka_connected 0.0" in metrics.render().decode()
    with pytest.raises(NotReady, match="failed for good"):
        await sink.send(topic, b"k", b"after", [])
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL and r.name == "bridge.delivery.librdkafka"]
    assert len(critical) == 1 and "cannot deliver" in critical[0].getMessage()
    assert await sink.close(flush_timeout_s=1.0) == 0


@pytest.mark.producer
async def test_the_app_publishes_through_librdkafka(kafka: Kafka, make_settings, make_client, topic) -> None:
    """``BRIDGE_KAFKA_CLIENT=librdkafka`` end to end: a callback answered 200 after the ack, truthful readiness
    and metrics."""
    client = await make_client(make_settings(client="librdkafka"))
    components = client.server.app[COMPONENTS]
    assert isinstance(components.sink, LibrdkafkaSink)
    readyz = await client.get("/readyz")
    assert readyz.status == 200 and (await readyz.json())["kafka"] == "connected"

    response = await client.post("/vod/callback", json=sample_event("t-rdk"))
    assert response.status == 200
    body = await response.json()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"t-rdk" and (record.partition, record.offset) == (body["partition"], body["offset"])
    assert headers_of(record)["source"] == "callback"
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert "vod_bridge_kafka_connected 1.0" in metrics
    assert "vod_bridge_publish_latency_seconds_count 1.0" in metrics
    assert "vod_bridge_publish_in_flight 0.0" in metrics


async def test_redrive_publishes_through_librdkafka(
    kafka: Kafka, topic: str, make_settings, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``vod-bridge redrive`` builds its sink with the same factory: a dead letter that now decodes moves."""
    letter = msgspec.json.encode(sample_event("t-redriven"))
    headers = dead_letter_headers(
        source="callback", received_at=datetime.now(UTC), reason="missing_key", error="older version"
    )
    sink = await connect(settings_on(kafka, f"{topic}.dlq"))
    await sink.send(f"{topic}.dlq", None, letter, headers)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bridge.delivery.librdkafka"):
        report = await redrive_dead_letters(make_settings(client="librdkafka"), FromBeginning(), timeout_s=15)
    assert (report.read, report.moved) == (1, 1)
    assert any(r.getMessage().startswith("kafka producer (librdkafka") for r in caplog.records)
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"t-redriven" and record.value == letter
