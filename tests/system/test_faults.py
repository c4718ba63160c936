"""Faults against a real broker and the real `vod-bridge serve` process; each test prints
``sent / acked / in_kafka / lost`` and requires lost == 0: every event answered 200 reached Kafka.

The broker is always an embedded one owned by the test (it must be taken away and brought back): once per
embedded broker of BRIDGE_TEST_BROKERS (``own_broker``, ``[tansu]``/``[mock]``) where the fault allows, tansu only
where a proxy must stand in front of the broker or the broker must restart on its port, and the mock cluster only
for its counterpart of those (frozen, then thawed). tansu keeps data in memory, so a killed tansu loses records
it had acknowledged — which a replicated Kafka with acks=all does not. So "reached Kafka" means "seen by the
witness consumer" (before the crash, or after the restart), and before killing the broker the test holds the
broker's answers to the bridge (the proxy holds that direction for the bridge's connections only) and lets the
witness read everything the broker holds: the kill then comes with produce requests in flight, their records
appended and their acks held, and no record acknowledged to the bridge is unknown to the witness.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import sample_event, wait_until
from faultkit import (
    BridgeProcess,
    LoadReport,
    OwnBroker,
    Witness,
    bridge_env,
    connected_ports,
    create_topic,
    create_topic_on,
    drive,
    keys_in_kafka,
    summary,
)
from mockcluster import MockCluster
from tcpproxy import TcpProxy

from bridge.ops.embedded import EmbeddedBroker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.producer]


@pytest.fixture
def bridges() -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        bridge.ensure_dead()


def env_for(bootstrap: str, topic: str, *, idempotence: bool, **extra: str) -> dict[str, str]:
    return bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(idempotence).lower(),
        BRIDGE_KAFKA_PUBLISH_TIMEOUT_S="2",
        **extra,
    )


async def publishes_in_flight(bridge: BridgeProcess, *, timeout_s: float) -> float:
    """The bridge's publishes awaiting a Kafka ack, once there are any (0 if none within ``timeout_s``)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (count := await bridge.metric("vod_bridge_publish_in_flight")) == 0:
        if asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.02)
    return count


@contextlib.asynccontextmanager
async def behind_a_proxy(
    topic: str, tmp_path: Path, bridges: list[BridgeProcess]
) -> AsyncIterator[tuple[EmbeddedBroker, TcpProxy, BridgeProcess, Witness]]:
    """A broker advertising a TCP proxy in front of it, the topic, a running bridge and a witness, all
    reaching Kafka through the proxy, so the test can cut the network or swap the broker behind it.

    tansu only: the mock cluster advertises its own ports (clients bypass a proxy after bootstrap) and cannot
    restart on a chosen port; :func:`test_mock_cluster_frozen_mid_load_then_thawed` is its counterpart."""
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        async with TcpProxy("127.0.0.1", broker.port, listen_port=proxy_port) as proxy:
            await create_topic(proxy.address, topic)
            bridge = BridgeProcess(env_for(proxy.address, topic, idempotence=False), tmp_path / "bridge.log")
            bridges.append(bridge)
            await bridge.start()
            async with Witness(proxy.address, topic) as witness:
                yield broker, proxy, bridge, witness


async def test_broker_killed_mid_load_and_restarted(topic, tmp_path: Path, bridges) -> None:
    """tansu only: restarted on its port behind a proxy (see :func:`behind_a_proxy`).

    The broker is SIGKILLed under load, with produce requests in flight: the proxy holds the broker's answers on
    the bridge's connections, so the bridge's requests reach the broker and are appended while their acks wait;
    the witness, not held, reads everything the broker holds, and then the broker dies with those acks. Every
    key answered 200 must be in Kafka: seen by the witness before the crash, or written again after it.
    """
    report = LoadReport()
    # Enough that the load still runs when the fault comes: the mock cluster takes 50 callbacks in ~20 ms here.
    keys = [f"bk-{i}" for i in range(600)]
    async with behind_a_proxy(topic, tmp_path, bridges) as (broker, proxy, bridge, witness):
        load = asyncio.create_task(drive(bridge.url, keys, concurrency=8, report=report))
        await wait_until(lambda: len(report.acked) >= 100, timeout_s=30, interval_s=0.005)
        assert bridge.process is not None
        pid = bridge.process.pid
        proxy.hold("downstream", clients=lambda client: client[1] in connected_ports(pid, remote_port=proxy.port))
        # Acks of records the broker appended wait in the proxy, and callbacks wait for them.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: proxy.held_bytes > 0 and report.in_flight > 0, timeout_s=5)
        publishing = await publishes_in_flight(bridge, timeout_s=2)
        # Up to the broker's end offsets now: every record whose ack reached the bridge, before the hold.
        await witness.catch_up()
        assert report.acked <= witness.seen, "every 200 so far is in Kafka"
        in_flight, held = report.in_flight, proxy.held_bytes  # no await between this and the kill
        broker.kill()
        print(f"at the kill: {in_flight} callbacks and {publishing:g} publishes in flight, {held} bytes of acks held")
        assert in_flight > 0 and publishing > 0, "the kill comes with callbacks waiting for Kafka acks"
        assert held > 0, "...and with acks of records the broker appended, which the kill takes with it"
        proxy.cut("reset")  # the held acks go with the connections; clients stay away until the topic exists again
        proxy.release()
        # The load goes on against a bridge without Kafka: the callbacks in flight, and the next ones, get 503s
        # once the 2 s publish timeout passes.
        await wait_until(lambda: report.statuses.get(503, 0) > 0, timeout_s=10)
        broker.start()
        create_topic_on(broker, topic)
        proxy.restore()
        await load
        lost = await witness.wait_for(set(report.acked))
    summary("broker killed", report, witness, lost)
    assert report.statuses.get(503, 0) > 0, "the outage was seen as 503s"
    assert len(report.acked) == len(keys), "every event got its 200 after VOD-like retries"
    assert not lost, "every key answered 200 is in Kafka"


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_network_cut_between_bridge_and_kafka(mode, topic, tmp_path: Path, bridges) -> None:
    """tansu only: the cut needs a proxy the broker advertises (see :func:`behind_a_proxy`)."""
    report = LoadReport()
    keys = [f"cut-{mode}-{i}" for i in range(600)]
    async with behind_a_proxy(topic, tmp_path, bridges) as (_, proxy, bridge, witness):
        load = asyncio.create_task(drive(bridge.url, keys, concurrency=8, report=report))
        await wait_until(lambda: len(report.acked) >= 50 and report.in_flight > 0, timeout_s=30, interval_s=0.005)
        in_flight = report.in_flight  # no await between this and the cut: the count at the cut
        proxy.cut(mode)
        assert in_flight > 0, "the cut comes with callbacks in flight"
        # Callbacks get 503s once the 2 s publish timeout passes without Kafka.
        await wait_until(lambda: report.statuses.get(503, 0) > 0, timeout_s=10)
        proxy.restore()
        await load
        lost = await witness.wait_for(set(report.acked))
    summary(f"network cut ({mode})", report, witness, lost)
    assert report.statuses.get(503, 0) > 0
    assert len(report.acked) == len(keys)
    assert not lost


async def test_mock_cluster_frozen_mid_load_then_thawed(topic, tmp_path: Path, bridges) -> None:
    """The mock cluster's counterpart of the two tests above, with the production default (the idempotent
    producer): the whole cluster freezes mid-load (SIGSTOP), as behind a firewall that drops packets, for longer
    than the publish timeout, then thaws."""
    report = LoadReport()
    keys = [f"frozen-{i}" for i in range(600)]
    with MockCluster() as cluster:
        env = env_for(cluster.bootstrap_servers, topic, idempotence=MockCluster.supports_idempotence)
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridges.append(bridge)
        await bridge.start()
        async with Witness(cluster.bootstrap_servers, topic) as witness:
            load = asyncio.create_task(drive(bridge.url, keys, concurrency=8, report=report))
            await wait_until(lambda: len(report.acked) >= 50 and report.in_flight > 0, timeout_s=30, interval_s=0.005)
            in_flight = report.in_flight  # no await between this and the freeze: the count at the freeze
            cluster.pause()
            # Publishes wait for acks the frozen cluster does not send (those sent before the freeze included).
            publishing = await publishes_in_flight(bridge, timeout_s=2)
            assert in_flight > 0 and publishing > 0, "the freeze comes with callbacks waiting for Kafka acks"
            # Longer than the 2 s publish timeout: callers see 503s.
            await wait_until(lambda: report.statuses.get(503, 0) > 0, timeout_s=10)
            cluster.resume()
            await load
            lost = await witness.wait_for(set(report.acked))
    summary("mock cluster frozen", report, witness, lost)
    assert report.statuses.get(503, 0) > 0, "the outage was seen as 503s"
    assert len(report.acked) == len(keys), "every event got its 200 after VOD-like retries"
    assert not lost


async def test_bridge_sigkilled_mid_load_without_spool(own_broker: OwnBroker, topic, tmp_path, bridges) -> None:
    await create_topic(own_broker.bootstrap_servers, topic)
    env = env_for(own_broker.bootstrap_servers, topic, idempotence=own_broker.supports_idempotence)
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    bridges.append(bridge)
    await bridge.start()
    report = LoadReport()
    keys = [f"kill-{i}" for i in range(400)]
    async with Witness(own_broker.bootstrap_servers, topic) as witness:
        load = asyncio.create_task(drive(bridge.url, keys, concurrency=16, report=report, retry_for_s=0.5))
        await wait_until(lambda: len(report.acked) >= 100, timeout_s=30, interval_s=0.005)
        bridge.kill()
        await load
        lost = await witness.wait_for(set(report.acked))
    summary("bridge SIGKILL, no spool", report, witness, lost)
    assert 100 <= len(report.acked) < len(keys), "the kill happened mid-load"
    assert not lost


async def test_bridge_sigkilled_with_spooled_events_loses_nothing(
    own_broker: OwnBroker, topic, tmp_path: Path, bridges
) -> None:
    spool_dir = tmp_path / "spool"
    env = env_for(
        own_broker.bootstrap_servers,
        topic,
        idempotence=own_broker.supports_idempotence,
        BRIDGE_SPOOL_DIR=str(spool_dir),
        BRIDGE_SPOOL_PUBLISH_BUDGET_S="0.5",
    )
    await create_topic(own_broker.bootstrap_servers, topic)
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    bridges.append(bridge)
    await bridge.start()
    report = LoadReport()
    async with Witness(own_broker.bootstrap_servers, topic) as witness:
        await drive(bridge.url, [f"direct-{i}" for i in range(100)], concurrency=8, report=report)
        assert not await witness.wait_for(set(report.acked), timeout_s=10)
        own_broker.take_away()  # Kafka is gone: from now on 200 means "fsync'ed in the spool"
        load = asyncio.create_task(
            drive(bridge.url, [f"spooled-{i}" for i in range(300)], concurrency=16, report=report, retry_for_s=1)
        )
        await wait_until(lambda: len(report.acked) >= 250, timeout_s=30, interval_s=0.005)
        bridge.kill()  # ...and the bridge crashes with events only in its spool
        await load
        spooled = {key for key in report.acked if key.startswith("spooled-")}
        assert spooled, "some events were answered 200 from the spool"

        await own_broker.bring_back(topic)
        restarted = BridgeProcess(env, tmp_path / "bridge-2.log")
        bridges.append(restarted)
        await restarted.start()
        lost = await witness.wait_for(set(report.acked), timeout_s=40)
        depth = (await restarted.readyz())["spool_depth"]
        assert await restarted.stop() == 0
    summary("bridge SIGKILL with spool", report, witness, lost)
    assert depth == 0
    assert not lost


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def test_burst_of_ten_times_the_bound_sheds_load_with_bounded_memory(
    own_broker: OwnBroker, topic, tmp_path: Path, bridges
) -> None:
    await create_topic(own_broker.bootstrap_servers, topic)
    bound = 50
    env = env_for(
        own_broker.bootstrap_servers,
        topic,
        idempotence=own_broker.supports_idempotence,
        BRIDGE_KAFKA_MAX_IN_FLIGHT=str(bound),
        BRIDGE_KAFKA_LINGER_MS="20",
    )
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    bridges.append(bridge)
    await bridge.start()
    assert bridge.process is not None
    pid = bridge.process.pid
    before_kib = rss_kib(pid, "VmRSS")
    statuses: dict[int | str, int] = {}
    retry_after: set[str] = set()
    acked: set[str] = set()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        key = f"burst-{i}"
        try:
            async with session.post(bridge.url, json=sample_event(key)) as response:
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 200:
                    acked.add(key)
                elif response.status == 503:
                    retry_after.add(response.headers.get("Retry-After", "-"))
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1

    concurrency = 10 * bound
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for wave in range(6):
            await asyncio.gather(*(one(session, wave * concurrency + i) for i in range(concurrency)))
    peak_kib = rss_kib(pid, "VmHWM")
    print(
        f"[burst x10] bound={bound} requests={6 * concurrency} answers={statuses} "
        f"rss_before={before_kib // 1024}MiB peak={peak_kib // 1024}MiB"
    )
    assert set(statuses) <= {200, 503}
    assert statuses.get(503, 0) > 0 and retry_after == {"1"}
    assert statuses.get(200, 0) > 0
    assert peak_kib - before_kib < 100 * 1024, "memory must stay bounded under a 10x burst"
    assert await bridge.stop() == 0
    # Every 200 is in Kafka; and only those: a 503 "overloaded" (Retry-After 1) is refused before the producer.
    in_kafka = set(await keys_in_kafka(own_broker.bootstrap_servers, topic, at_least=len(acked)))
    assert acked <= in_kafka, f"answered 200 but missing from Kafka: {sorted(acked - in_kafka)[:10]}"
    assert in_kafka <= acked, f"in Kafka but answered 503: {sorted(in_kafka - acked)[:10]}"
