"""`vod-bridge serve --workers N` and the event-loop choice, as real processes against a real broker."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
from conftest import Kafka, read_records, sample_event, wait_until
from faultkit import BridgeProcess, bridge_env

from bridge.config import load_settings
from bridge.delivery.spool import Spool
from bridge.ops.workers import EXIT_CONFIG, run_workers, worker_env


def test_worker_env_splits_spool_and_poller() -> None:
    settings = load_settings({"BRIDGE_WORKERS": "3", "BRIDGE_SPOOL_DIR": "/var/spool/b", "BRIDGE_PULL_ENABLED": "true"})
    envs = [worker_env({"BRIDGE_PULL_ENABLED": "true"}, settings, i) for i in range(3)]
    assert [e["BRIDGE_SPOOL_DIR"] for e in envs] == [f"/var/spool/b/worker-{i}" for i in range(3)]
    assert [e["BRIDGE_PULL_ENABLED"] for e in envs] == ["true", "false", "false"]
    assert all(e["BRIDGE_WORKERS"] == "1" and e["BRIDGE_HTTP_REUSE_PORT"] == "true" for e in envs)


def test_run_workers_refuses_to_strand_spooled_events_before_starting_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool.open(tmp_path / "worker-2", fsync=False) as spool:  # left behind by BRIDGE_WORKERS=3
        spool.append([b"a", b"b"])

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(subprocess, "Popen", no_workers)
    settings = load_settings({"BRIDGE_WORKERS": "2", "BRIDGE_SPOOL_DIR": str(tmp_path), "BRIDGE_HTTP_PORT": "8080"})
    with caplog.at_level(logging.CRITICAL, logger="bridge.ops.workers"):
        assert run_workers(settings, {}) == EXIT_CONFIG == 2
    (record,) = [r for r in caplog.records if r.name == "bridge.ops.workers"]
    assert record.name == "bridge.ops.workers"
    assert f"{tmp_path}/worker-2: 2 undelivered events" in record.getMessage()
    assert "Start once with BRIDGE_WORKERS=3 until vod_bridge_spool_depth is 0" in record.getMessage()


@pytest.mark.integration
async def test_two_workers_share_the_port_and_stop_cleanly(kafka: Kafka, topic: str, tmp_path: Path) -> None:
    env = bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
        BRIDGE_WORKERS="2",
        BRIDGE_EVENT_LOOP="uvloop",
        BRIDGE_LOG_LEVEL="DEBUG",
    )
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    await bridge.start()
    try:
        keys = [f"w-{i}" for i in range(60)]
        # One connection per request, so the kernel spreads them over both listening processes.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

            async def post(key: str) -> int:
                async with session.post(bridge.url, json=sample_event(key)) as response:
                    return response.status

            assert await asyncio.gather(*(post(k) for k in keys)) == [200] * len(keys)
        records = await read_records(kafka.bootstrap_servers, topic, count=len(keys))
        assert sorted(r.key.decode() for r in records) == sorted(keys)
        # SIGHUP reaches every worker (a TLS certificate reload; without TLS only a log line) and stops none.
        assert bridge.process is not None
        bridge.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: bridge.logfile.read_text().count("SIGHUP: no TLS certificate") == 2, timeout_s=10)
    finally:
        assert await bridge.stop() == 0
    log = bridge.logfile.read_text()
    assert "started 2 workers" in log
    assert log.count("kafka producer connected") == 2
    assert log.count("vod-bridge stopped cleanly") == 2
    assert "using uvloop" in log
