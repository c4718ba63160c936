"""Bounded shutdown and quiet outages, as real `vod-bridge serve` processes against librdkafka's mock cluster,
which takes aiokafka's idempotent producer: the production default, and the case where ``producer.stop()``
waits for ever for records it can never deliver."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import sample_event
from faultkit import BridgeProcess, bridge_env, spawn
from mockcluster import MockCluster

from bridge.ops.embedded import free_port

pytestmark = pytest.mark.integration

SHUTDOWN_S = 2
PUBLISH_S = 2
#: Process start-up/exit, event loop teardown: "a few seconds" on a loaded 2-core machine.
SLACK_S = 5


def env_for(cluster: MockCluster, topic: str, **extra: str) -> dict[str, str]:
    return bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE="true",
        BRIDGE_KAFKA_PUBLISH_TIMEOUT_S=str(PUBLISH_S),
        BRIDGE_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
        **extra,
    )


async def sigterm_and_wait(process: BridgeProcess) -> tuple[int, float]:
    assert process.process is not None
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.process.wait, 60)
    return code, time.monotonic() - started


async def test_sigterm_with_kafka_gone_ends_within_the_bound_and_reports_the_abandoned(
    topic: str, tmp_path: Path
) -> None:
    cluster = MockCluster()
    cluster.start()
    bridge = BridgeProcess(env_for(cluster, topic), tmp_path / "bridge.log")
    try:
        await bridge.start()
        async with aiohttp.ClientSession() as session:
            async with session.post(bridge.url, json=sample_event("acked")) as response:
                assert response.status == 200
            cluster.kill()
            async with session.post(bridge.url, json=sample_event("never-acked")) as response:
                assert response.status == 503, "no ack within the publish timeout"
        code, elapsed_s = await sigterm_and_wait(bridge)
    finally:
        bridge.ensure_dead()
        cluster.kill()
    log = bridge.logfile.read_text()
    assert elapsed_s < SHUTDOWN_S + PUBLISH_S + SLACK_S, f"exit took {elapsed_s:.1f}s\n{log[-3000:]}"
    # The abandoned record's sender was answered 503: nothing acknowledged was lost, so the stop is not a failure.
    assert code == 0, f"a clean stop, abandoned records and all\n{log[-3000:]}"
    assert "abandoned 1 unacknowledged records" in log
    assert re.search(r"WARNING .*stopped with 1 records Kafka never acknowledged; none was answered 200", log), log


async def test_sigterm_while_the_producer_is_still_connecting(topic: str, tmp_path: Path) -> None:
    cluster = MockCluster()
    cluster.start()
    cluster.pause()  # accepts connections, answers nothing: the producer's start never completes
    port = free_port()
    env = env_for(cluster, topic)
    try:
        process = spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "bridge.log")
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        bridge.process, bridge.port = process, port

        async def alive() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/readyz") as response,
                ):
                    return response.status == 503  # serving, not connected
            except aiohttp.ClientError:
                return False

        deadline = time.monotonic() + 20
        while not await alive():
            assert process.poll() is None and time.monotonic() < deadline, "the bridge did not come up"
            await asyncio.sleep(0.1)
        code, elapsed_s = await sigterm_and_wait(bridge)
    finally:
        cluster.kill()
    assert elapsed_s < SHUTDOWN_S + PUBLISH_S + SLACK_S, f"exit took {elapsed_s:.1f}s"
    assert code == 0, "nothing was accepted, nothing is lost"


async def test_an_outage_is_a_few_log_lines_not_a_flood(topic: str, tmp_path: Path) -> None:
    cluster = MockCluster()
    cluster.start()
    bridge = BridgeProcess(env_for(cluster, topic, BRIDGE_LOG_LEVEL="INFO"), tmp_path / "bridge.log")
    try:
        await bridge.start()
        async with aiohttp.ClientSession() as session, session.post(bridge.url, json=sample_event("up")) as r:
            assert r.status == 200
        before = len(bridge.logfile.read_text().splitlines())
        cluster.kill()
        started = time.monotonic()
        # Kafka stays down for 8 s while callbacks keep coming (each a 503 after the publish timeout).
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < 8:
                async with session.post(bridge.url, json=sample_event("down")) as response:
                    assert response.status == 503
        lines = bridge.logfile.read_text().splitlines()[before:]
    finally:
        assert await bridge.stop() in (0, 3)
        cluster.kill()
    per_second = len(lines) / 8
    repeated = [line for line in lines if "repeated" in line]
    print(f"{len(lines)} log lines in 8 s of outage ({per_second:.1f}/s); summaries: {len(repeated)}")
    # Unfiltered, this was ~120 lines/s ("Unable connect to node ..." for each broker, sender warnings).
    assert per_second < 3, "\n".join(lines[:40])
    assert any(re.search(r"Unable connect to node|Connect call failed|connection", line) for line in lines), (
        "the outage itself is still logged once"
    )
