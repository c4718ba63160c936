"""The mock cluster test broker (tests/mockcluster.py) does what the broker-level tests rely on: loopback only,
aiokafka's idempotent producer and its consumer, topics made on first use, stop/kill/pause that mean it."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from conftest import headers_of, read_records
from faultkit import create_topic
from mockcluster import MockCluster, MockClusterError, _read_line

from bridge.config import KafkaSettings
from bridge.delivery.kafka import KafkaSink
from bridge.ops.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as cluster:
        yield cluster


def ports(bootstrap_servers: str) -> list[int]:
    return [int(address.rpartition(":")[2]) for address in bootstrap_servers.split(",")]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def listening_on(port: int) -> set[str]:
    """The local addresses of the listening TCP sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_three_brokers_listen_on_loopback_only(cluster: MockCluster) -> None:
    addresses = cluster.bootstrap_servers.split(",")
    assert len(addresses) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    for port in ports(cluster.bootstrap_servers):
        assert listening_on(port) == {"0100007F"}, "127.0.0.1 only, no IPv6, no wildcard"


async def test_idempotent_producer_and_consumer(cluster: MockCluster, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        acks = [
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode(), headers=[("n", b"%d" % i)])
            for i in range(8)
        ]
    finally:
        await producer.stop()
    records = await read_records(cluster.bootstrap_servers, topic, count=8)
    assert {(r.key, r.value, headers_of(r)["n"]) for r in records} == {
        (f"k{i}".encode(), f"v{i}".encode(), str(i)) for i in range(8)
    }
    assert {(a.partition, a.offset) for a in acks} == {(r.partition, r.offset) for r in records}


async def test_the_bridge_sink_with_the_production_default(cluster: MockCluster, topic: str, caplog) -> None:
    settings = KafkaSettings(bootstrap_servers=cluster.bootstrap_servers, topic=topic)
    assert settings.enable_idempotence, "the default this broker is here to exercise"
    caplog.set_level("INFO", logger="bridge")
    sink = KafkaSink(settings, Metrics())
    await asyncio.wait_for(sink.connect(), timeout=15)
    try:
        ack = await sink.send(topic, b"key", b"value", [("source", b"callback")])
    finally:
        await sink.close()
    assert "idempotence=True" in caplog.text
    (record,) = await read_records(cluster.bootstrap_servers, topic, count=1)
    assert (record.partition, record.offset, record.key) == (ack.partition, ack.offset, b"key")


async def test_topics_are_made_on_first_use_with_four_partitions(cluster: MockCluster, topic: str) -> None:
    await create_topic(cluster.bootstrap_servers, topic, partitions=1)  # no CreateTopics: a no-op, not an error
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await admin.start()
    try:
        assert topic not in await admin.list_topics()
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"first")
        finally:
            await producer.stop()
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 4


async def test_pause_holds_every_answer_until_resume(cluster: MockCluster, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before", key=b"k")
        cluster.pause()
        delivery = await producer.send(topic, b"while-paused", key=b"k")
        done, _ = await asyncio.wait([delivery], timeout=1.0)
        assert not done, "a paused cluster answers nothing"
        cluster.resume()
        ack = await asyncio.wait_for(delivery, timeout=10)
    finally:
        await producer.stop()
    assert ack.offset == 1
    assert [r.value for r in await read_records(cluster.bootstrap_servers, topic, count=2)] == [
        b"before",
        b"while-paused",
    ]


def test_stop_kill_and_restart() -> None:
    cluster = MockCluster()
    cluster.start()
    first = cluster.bootstrap_servers
    cluster.stop()
    assert not cluster.running and not any(accepts(port) for port in ports(first))
    with pytest.raises(MockClusterError, match="not running"):
        _ = cluster.bootstrap_servers

    cluster.start()
    second = cluster.bootstrap_servers
    assert second != first, "a new cluster, on new ports"
    cluster.kill()
    assert not any(accepts(port) for port in ports(second))

    cluster.start()
    cluster.pause()
    started = time.monotonic()
    cluster.stop()  # a paused helper is resumed first, so that it sees its stdin close
    assert time.monotonic() - started < 3


def test_sigterm_ends_the_helper(cluster: MockCluster) -> None:
    assert cluster.pid is not None
    addresses = cluster.bootstrap_servers
    subprocess.run(["kill", "-TERM", str(cluster.pid)], check=True)
    deadline = time.monotonic() + 5
    while cluster.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster.running
    assert not any(accepts(port) for port in ports(addresses))


def test_a_helper_that_fails_is_reported_with_its_stderr() -> None:
    with pytest.raises(MockClusterError, match=r"ended with code 2.*--brokers must be 1 or more"):
        MockCluster(brokers=0).start()


def test_waiting_for_the_address_is_bounded() -> None:
    silent = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        with pytest.raises(MockClusterError, match=r"no address within 0\.3s"):
            _read_line(silent, 0.3)
        assert time.monotonic() - started < 2
    finally:
        silent.send_signal(signal.SIGKILL)
        silent.wait()
        assert silent.stdout is not None
        silent.stdout.close()
