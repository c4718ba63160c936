"""`vod-bridge serve --workers N` (spool and poller split, one metrics scrape for all workers) and the event-loop
choice, as real processes against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest
from conftest import Kafka, read_records, sample_event, selected_brokers, wait_until
from faultkit import AckHoldingBroker, BridgeProcess, bridge_env
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_settings
from bridge.delivery.spool import Spool
from bridge.ops.workers import EXIT_CONFIG, run_workers, worker_env


def test_worker_env_splits_spool_and_poller_and_shares_the_metrics_dir() -> None:
    settings = load_settings({"BRIDGE_WORKERS": "3", "BRIDGE_SPOOL_DIR": "/var/spool/b", "BRIDGE_PULL_ENABLED": "true"})
    base = {"BRIDGE_PULL_ENABLED": "true", "PROMETHEUS_MULTIPROC_DIR": "/somebody/elses"}
    envs = [worker_env(base, settings, i, Path("/tmp/m")) for i in range(3)]
    assert [e["BRIDGE_SPOOL_DIR"] for e in envs] == [f"/var/spool/b/worker-{i}" for i in range(3)]
    assert [e["BRIDGE_PULL_ENABLED"] for e in envs] == ["true", "false", "false"]
    assert all(e["BRIDGE_WORKERS"] == "1" and e["BRIDGE_HTTP_REUSE_PORT"] == "true" for e in envs)
    assert [e["PROMETHEUS_MULTIPROC_DIR"] for e in envs] == ["/tmp/m"] * 3


#: A stand-in worker: counts and sets a live gauge in the shared directory. Worker 0 then exits; worker 1 waits
#: until one collection over the directory shows worker 0's count kept and its gauge dropped (by the supervisor's
#: mark_process_dead), and exits 0 only then.
FAKE_WORKER = """
import sys, time
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

index = int(sys.argv[1])
Gauge("g", "live", multiprocess_mode="livesum").set(index + 1)
Counter("c", "count").inc(index + 1)
if index == 1:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    deadline = time.monotonic() + 10
    while {s.name: s.value for m in registry.collect() for s in m.samples} != {"c_total": 3.0, "g": 2.0}:
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.01)
"""


def test_run_workers_gives_them_a_fresh_metrics_dir_marks_the_dead_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    popen = subprocess.Popen
    dirs: list[str] = []

    def fake_worker(args: list[str], *, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert args[1:] == ["-m", "bridge", "serve"]
        if not dirs:
            assert list(Path(env["PROMETHEUS_MULTIPROC_DIR"]).iterdir()) == [], "a fresh, empty directory"
        dirs.append(env["PROMETHEUS_MULTIPROC_DIR"])
        return popen([sys.executable, "-c", FAKE_WORKER, str(len(dirs) - 1)], env=env)

    monkeypatch.setattr(subprocess, "Popen", fake_worker)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = load_settings({"BRIDGE_WORKERS": "2"})
    assert run_workers(settings, {"PROMETHEUS_MULTIPROC_DIR": "/somebody/elses"}) == 0
    (metrics_dir,) = set(dirs)
    assert Path(metrics_dir).parent == tmp_path and Path(metrics_dir).name.startswith("vod-bridge-metrics-")
    assert list(tmp_path.iterdir()) == [], "removed at exit"


def test_every_sub_app_loop_runs_in_worker_zero() -> None:
    env = {"BRIDGE_WORKERS": "2", "BRIDGE_PULL_ENABLED": "true", "BRIDGE_VOD_SUB_APP_IDS": "1500001,1500002"}
    first, second = (load_settings(worker_env(env, load_settings(env), i, Path("/tmp/m"))).poller for i in range(2))
    assert first.enabled and first.loop_sub_app_ids() == (1500001, 1500002)
    assert not second.enabled


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


async def scrape(port: int, session: aiohttp.ClientSession | None = None) -> dict[str, float]:
    """One ``/metrics`` scrape, each sample summed over its labels: on a new connection (any worker may answer),
    or on ``session``'s kept-alive one (the same worker answers)."""
    totals: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            )
        response = await stack.enter_async_context(session.get(f"http://127.0.0.1:{port}/metrics"))
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert "pid" not in sample.labels, f"one series per metric, not per worker: {sample}"
            totals[sample.name] = totals.get(sample.name, 0) + sample.value
    return totals


def by_worker(metrics_dir: Path, files: str, name: str) -> list[float]:
    """Sample ``name`` in each worker's own file of kind ``files`` (``counter``, ``gauge_livesum``, ...), summed
    over its labels: what each worker wrote, before a scrape combines them."""
    return [
        sum(s.value for m in MultiProcessCollector.merge([str(f)]) for s in m.samples if s.name == name)
        for f in sorted(metrics_dir.glob(f"{files}_*.db"))
    ]


async def wait_workers_ready(tmp_dir: Path, count: int) -> Path:
    """Wait until ``count`` workers each say they are ready (so each listens: /readyz on the shared port may be
    answered by the first one alone); returns the workers' metrics directory."""

    found: list[Path] = []

    def all_ready() -> bool:
        found[:] = tmp_dir.glob("vod-bridge-metrics-*")
        return len(found) == 1 and by_worker(found[0], "gauge_livemin", "vod_bridge_ready").count(1.0) == count

    await wait_until(all_ready, timeout_s=20)
    return found[0]


@pytest.mark.integration
async def test_two_workers_share_the_port_and_one_scrape_counts_them_all(
    kafka: Kafka, topic: str, tmp_path: Path
) -> None:
    (tmp_path / "tmp").mkdir()
    env = bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
        BRIDGE_WORKERS="2",
        BRIDGE_EVENT_LOOP="uvloop",
        BRIDGE_LOG_LEVEL="DEBUG",
        TMPDIR=str(tmp_path / "tmp"),  # where the supervisor makes the workers' metrics directory
    )
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    await bridge.start()
    try:
        metrics_dir = await wait_workers_ready(tmp_path / "tmp", 2)
        keys = [f"w-{i}" for i in range(60)]
        # One connection per request, so the kernel spreads them over both listening processes.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

            async def post(key: str) -> int:
                async with session.post(bridge.url, json=sample_event(key)) as response:
                    return response.status

            assert await asyncio.gather(*(post(k) for k in keys)) == [200] * len(keys)
        records = await read_records(kafka.bootstrap_servers, topic, count=len(keys))
        assert sorted(r.key.decode() for r in records) == sorted(keys)

        per_worker = by_worker(metrics_dir, "counter", "vod_bridge_events_received_total")
        assert len(per_worker) == 2 and all(per_worker) and sum(per_worker) == len(keys), per_worker
        # The gauges of the worker not answering are refreshed every second: wait for in-flight to settle at 0
        # and readiness at 1 (each worker's first refresh may predate its producer's connection).
        async with asyncio.timeout(5):
            while (settled := await scrape(bridge.port))["vod_bridge_publish_in_flight"] != 0 or not settled.get(
                "vod_bridge_ready"
            ):
                await asyncio.sleep(0.1)
        assert settled["vod_bridge_events_received_total"] == len(keys)
        assert settled["vod_bridge_events_published_total"] == len(keys)
        assert settled["vod_bridge_publish_latency_seconds_count"] == len(keys)
        assert settled["vod_bridge_kafka_connected"] == 1, "every worker's producer is connected"
        assert settled["vod_bridge_spool_depth"] == 0
        # At rest, whichever worker answers, every scrape says the same.
        assert [await scrape(bridge.port) for _ in range(6)] == [settled] * 6
        # SIGHUP reaches every worker (a TLS certificate reload; without TLS only a log line) and stops none.
        assert bridge.process is not None
        bridge.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: bridge.logfile.read_text().count("SIGHUP: no TLS certificate") == 2, timeout_s=10)
    finally:
        assert await bridge.stop() == 0
    assert list((tmp_path / "tmp").iterdir()) == [], "the metrics directory is removed at exit"
    log = bridge.logfile.read_text()
    assert "started 2 workers" in log
    assert log.count("kafka producer connected") == 2
    assert log.count("vod-bridge stopped cleanly") == 2
    assert "using uvloop" in log


@pytest.mark.integration
async def test_publishes_in_flight_on_every_worker_add_up_in_one_scrape(topic: str, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    async with AckHoldingBroker(selected_brokers()[0]) as broker:
        env = bridge_env(
            BRIDGE_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            BRIDGE_KAFKA_TOPIC=topic,
            BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(broker.supports_idempotence).lower(),
            BRIDGE_WORKERS="2",
            TMPDIR=str(tmp_path / "tmp"),
        )
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        await bridge.start()
        try:
            metrics_dir = await wait_workers_ready(tmp_path / "tmp", 2)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

                async def post(key: str) -> int:
                    async with session.post(bridge.url, json=sample_event(key)) as response:
                        return response.status

                # Both producers connected and holding the topic's metadata before the acks are held.
                warm_up = 0
                received = "vod_bridge_events_received_total"
                while len(counts := by_worker(metrics_dir, "counter", received)) < 2 or not all(counts):
                    assert await post(f"warm-{warm_up}") == 200
                    warm_up += 1
                    assert warm_up < 50, "the kernel never spread the connections over both workers"
                broker.hold()
                callbacks = [asyncio.create_task(post(f"held-{i}")) for i in range(20)]
                # Scrapes on one kept-alive connection: one worker answers them, so the other's in-flight
                # publishes reach them only through that worker's periodic refresh.
                async with asyncio.timeout(10), aiohttp.ClientSession() as scraper:
                    while (await scrape(bridge.port, scraper))["vod_bridge_publish_in_flight"] < len(callbacks):
                        await asyncio.sleep(0.05)
                    assert (await scrape(bridge.port, scraper))["vod_bridge_publish_in_flight"] == len(callbacks)
                per_worker = by_worker(metrics_dir, "gauge_livesum", "vod_bridge_publish_in_flight")
                assert all(per_worker) and sum(per_worker) == len(callbacks), per_worker
                assert not any(callback.done() for callback in callbacks)
                broker.release()
                async with asyncio.timeout(10):
                    assert await asyncio.gather(*callbacks) == [200] * len(callbacks)
                    while (await scrape(bridge.port))["vod_bridge_publish_in_flight"] != 0:
                        await asyncio.sleep(0.05)
        finally:
            broker.release()
            assert await bridge.stop() == 0
