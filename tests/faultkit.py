"""Shared pieces of the process-level tests: the real `vod-bridge` process, a retrying load generator (as
VOD retries), and a witness consumer that records every key that ever reached Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IncompatibleBrokerVersion, TopicAlreadyExistsError
from conftest import sample_event
from mockcluster import MockCluster

from bridge.ops.embedded import EmbeddedBroker, broker_binary, free_port


def bridge_env(**extra: str) -> dict[str, str]:
    """The test's environment minus any BRIDGE_/TENCENTCLOUD_ settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "TENCENTCLOUD_"))}
    env.update({"BRIDGE_LOG_FORMAT": "text", "BRIDGE_LOG_LEVEL": "INFO", **extra})
    return env


def spawn(args: list[str], env: dict[str, str], logfile: Path) -> subprocess.Popen[bytes]:
    with logfile.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "bridge", *args], env=env, stdout=out, stderr=out)


async def wait_ready(port: int, process: subprocess.Popen[bytes], *, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the bridge exited during start-up"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("bridge not ready in time")


class BridgeProcess:
    """`python -m bridge serve` on its own port; restartable with the same settings."""

    def __init__(self, env: dict[str, str], logfile: Path) -> None:
        self.port = free_port()
        self.env = env
        self.logfile = logfile
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/vod/callback"

    async def start(self) -> None:
        self.process = spawn(["serve", "--host", "127.0.0.1", "--port", str(self.port)], self.env, self.logfile)
        await wait_ready(self.port, self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 20)

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def readyz(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.port}/readyz") as r:
            return dict(await r.json())


@dataclass
class LoadReport:
    sent: int = 0
    attempts: int = 0
    in_flight: int = 0
    acked: set[str] = field(default_factory=set)
    statuses: dict[int | str, int] = field(default_factory=dict)
    #: Cleared, new requests wait (in-flight ones finish); set again, the load goes on.
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def pause(self) -> None:
        """Stop sending and wait until no request is in flight."""
        self.gate.clear()
        while self.in_flight:
            await asyncio.sleep(0.01)

    def count(self, status: int | str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def drive(
    url: str,
    keys: list[str],
    *,
    concurrency: int,
    report: LoadReport,
    retry_for_s: float = 30.0,
    url_of: Any = None,
) -> None:
    """Post one event per key, retrying 503s and connection errors (as VOD would) for up to
    ``retry_for_s``; every 200 lands in ``report.acked``. ``url_of()`` may change the target mid-run."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    report.sent += len(keys)
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            key = queue.get_nowait()
            deadline = time.monotonic() + retry_for_s
            while time.monotonic() < deadline:
                await report.gate.wait()
                report.attempts += 1
                report.in_flight += 1
                try:
                    async with session.post(url_of() if url_of else url, json=sample_event(key)) as response:
                        report.count(response.status)
                        if response.status == 200:
                            report.acked.add(key)
                            break
                except (aiohttp.ClientError, TimeoutError) as exc:
                    report.count(type(exc).__name__)
                finally:
                    report.in_flight -= 1
                await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


class Witness:
    """A consumer reading the topic from the start for the whole test, remembering every key it saw —
    also records that an in-memory broker forgets when it is killed."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.seen: set[str] = set()
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=1000,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Witness:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                for records in (await self._consumer.getmany(timeout_ms=200)).values():
                    self.seen.update(r.key.decode() for r in records)
            await asyncio.sleep(0)

    async def wait_for(self, keys: set[str], timeout_s: float = 30) -> set[str]:
        """Wait until every key was seen; return the ones that never were.

        Re-reads from the beginning every second while keys are missing: a restarted in-memory broker starts
        its offsets again from 0, below the position the consumer had reached (and tansu does not answer
        OffsetOutOfRange for that).
        """
        deadline = time.monotonic() + timeout_s
        next_rewind = time.monotonic() + 1.0
        while time.monotonic() < deadline and not keys <= self.seen:
            if time.monotonic() >= next_rewind:
                with contextlib.suppress(Exception):
                    await self._consumer.seek_to_beginning()
                next_rewind = time.monotonic() + 1.0
            await asyncio.sleep(0.1)
        return keys - self.seen


async def create_topic(bootstrap_servers: str, topic: str, partitions: int = 4) -> None:
    """Create the topic, if the broker has the admin API; otherwise it creates topics on first use by itself.

    tansu is in memory: after a restart the topic must be created again (a real Kafka keeps it). librdkafka's
    mock cluster has no CreateTopics and names no controller in its metadata (admin requests go to the
    controller); it creates a topic on first use, with 4 partitions whatever ``partitions`` says.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        if cluster["controller_id"] not in {broker["node_id"] for broker in cluster["brokers"]}:
            return
        with contextlib.suppress(TopicAlreadyExistsError, IncompatibleBrokerVersion):
            await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


class OwnBroker:
    """An embedded broker one test owns (``tansu`` or ``mock``), which it may take away and bring back.

    :meth:`take_away` makes Kafka unavailable at the same address, :meth:`bring_back` available again:

    - tansu is stopped (its port refuses connections) and started again on that port; it keeps nothing in
      memory, so the records are gone (``keeps_records`` is false) and ``bring_back`` creates the topics again;
    - the mock cluster cannot listen on a chosen port, so it is paused (SIGSTOP: connections stay open and
      nothing answers, as behind a firewall that drops packets) and resumed with every record; it then handles
      the requests it was sent meanwhile, so a publish that timed out (503) may still be appended.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.broker: EmbeddedBroker | MockCluster
        if name == "tansu":
            self.broker = EmbeddedBroker()
        elif name == "mock":
            self.broker = MockCluster()
        else:
            raise ValueError(f"unknown embedded broker {name!r}")

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers

    @property
    def supports_idempotence(self) -> bool:
        """tansu refuses the idempotent producer's InitProducerId; the mock cluster accepts it."""
        return isinstance(self.broker, MockCluster)

    @property
    def keeps_records(self) -> bool:
        """Whether records acked before :meth:`take_away` are still there after :meth:`bring_back`."""
        return isinstance(self.broker, MockCluster)

    def start(self) -> None:
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()

    def take_away(self) -> None:
        if isinstance(self.broker, MockCluster):
            self.broker.pause()
        else:
            self.broker.stop()

    async def bring_back(self, *topics: str) -> None:
        """Kafka answers again at the same address, with ``topics`` (tansu forgot them; see :func:`create_topic_on`
        for the race a client reaching tansu before its topic exists runs into)."""
        if isinstance(self.broker, MockCluster):
            self.broker.resume()
            return
        self.broker.start()
        for topic in topics:
            await create_topic(self.broker.bootstrap_servers, topic)


def create_topic_on(broker: EmbeddedBroker, topic: str, partitions: int = 4) -> None:
    """Create the topic by talking to the broker's own port, even while it advertises an unreachable proxy.

    Needed because a restarted tansu acknowledges produce requests for a topic it no longer has, and then
    loses those records: the topic must exist before any producer can reach the broker again.
    """
    subprocess.run(
        [
            broker_binary(),
            "topic",
            "create",
            "--broker",
            f"tcp://127.0.0.1:{broker.port}",
            topic,
            "--partitions",
            str(partitions),
        ],
        check=True,
        capture_output=True,
        timeout=10,
    )


def summary(name: str, report: LoadReport, witness: Witness, lost: set[str]) -> str:
    acked = len(report.acked)
    in_kafka = len(report.acked & witness.seen)
    line = (
        f"[{name}] sent={report.sent} acked={acked} in_kafka={in_kafka} lost={len(lost)} "
        f"attempts={report.attempts} answers={report.statuses}"
    )
    print(line)
    return line
