"""Shared pieces of the process-level tests: the real `vod-bridge` process, a retrying load generator (as
VOD retries), a witness consumer that records every key that ever reached Kafka, and a broker whose acks a test
can hold back (:class:`AckHoldingBroker`)."""

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
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IncompatibleBrokerVersion, TopicAlreadyExistsError
from conftest import read_records, sample_event
from mockcluster import MockCluster
from prometheus_client.parser import text_string_to_metric_families
from tcpproxy import TcpProxy

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

    async def metric(self, name: str) -> float:
        """The value of an unlabelled metric of the bridge's ``/metrics`` (see :func:`metric_value`)."""
        return await metric_value(self.port, name)


async def metric_value(port: int, name: str) -> float:
    """The value of the sample ``name`` (an unlabelled gauge, e.g. ``vod_bridge_publish_in_flight``) on the
    ``/metrics`` of the bridge listening on ``port``."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise LookupError(f"no metric {name!r} on port {port}")


async def keys_in_kafka(bootstrap_servers: str, topic: str, *, at_least: int, timeout_s: float = 10.0) -> list[str]:
    """The keys of every record of ``topic``, in (partition, offset) order: once ``at_least`` records are there
    (and a little longer, to catch extras); if they never are, whatever there is after ``timeout_s``, so that the
    test's own assertion names what is missing."""
    try:
        records = await read_records(bootstrap_servers, topic, count=at_least, timeout_s=timeout_s)
    except TimeoutError:
        records = await read_records(bootstrap_servers, topic, count=0, settle_s=2.0)
    return [record.key.decode() for record in records]


def connected_ports(pid: int, *, remote_port: int | None = None) -> set[int]:
    """The local ports of the TCP connections process ``pid`` has open (to ``remote_port`` only, if given), read
    from ``/proc``: which of a proxy's clients are that process (``TcpProxy.hold(clients=...)``)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):  # the process is gone: no connections
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and (remote_port is None or int(remote.rsplit(":", 1)[1], 16) == remote_port):
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


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
    rate_per_s: float | None = None,
) -> None:
    """Post one event per key, retrying 503s and connection errors (as VOD would) for up to
    ``retry_for_s``; every 200 lands in ``report.acked``. ``url_of()`` may change the target mid-run.
    ``rate_per_s``: start at most that many new keys a second, so that the load lasts (a fault comes mid-load)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    report.sent += len(keys)
    timeout = aiohttp.ClientTimeout(total=10)
    started, taken = time.monotonic(), 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal taken
        while not queue.empty():
            key = queue.get_nowait()
            if rate_per_s is not None:
                taken += 1
                # Pacing the load's shape, not waiting for anything: key n starts no earlier than n / rate.
                await asyncio.sleep(max(0.0, started + taken / rate_per_s - time.monotonic()))
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

    def __init__(self, bootstrap_servers: str, topic: str, **consumer_options: Any) -> None:
        """``consumer_options`` go to the AIOKafkaConsumer (e.g. a shorter ``request_timeout_ms``)."""
        self.seen: set[str] = set()
        #: Per key, the (partition, offset) of every copy read: more than one is a duplicate (a rewind re-reads
        #: the same offsets, which count once).
        self.copies: dict[str, set[tuple[int, int]]] = {}
        #: Per partition, the offset after the last record read (see :meth:`catch_up`).
        self.next_offsets: dict[TopicPartition, int] = {}
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=1000,
            **consumer_options,
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
                for partition, records in (await self._consumer.getmany(timeout_ms=200)).items():
                    self.seen.update(r.key.decode() for r in records)
                    for r in records:
                        self.copies.setdefault(r.key.decode(), set()).add((r.partition, r.offset))
                    if records:
                        self.next_offsets[partition] = max(self.next_offsets.get(partition, 0), records[-1].offset + 1)
            await asyncio.sleep(0)

    @property
    def duplicates(self) -> int:
        """Extra copies of keys read: records, not keys (a key read three times counts two)."""
        return sum(len(offsets) - 1 for offsets in self.copies.values())

    async def catch_up(self, timeout_s: float = 10) -> dict[TopicPartition, int]:
        """Wait until the witness read every record the broker holds now: up to the end offsets of the topic's
        partitions, asked for when called (returned). Meant for before a broker is killed: a restarted in-memory
        broker counts offsets from 0 again."""
        partitions = self._consumer.assignment()
        assert partitions, "the witness has no partitions yet"
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(list(partitions))
        try:
            async with asyncio.timeout(timeout_s):
                while any(self.next_offsets.get(partition, 0) < end for partition, end in ends.items()):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"the witness read up to {self.next_offsets}, not {ends}") from None
        return ends

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


class AckHoldingBroker:
    """An embedded broker (``tansu`` or ``mock``) whose answers to its clients a test can hold back, and then
    release: publishes stay in flight, their acks waiting, for as long as the test wants.

    - tansu sits behind a :class:`TcpProxy` it advertises; :meth:`hold` holds the broker-to-client direction,
      so produce requests reach the broker and are appended, and their acks wait in the proxy
      (:attr:`held_bytes`);
    - the mock cluster advertises its own ports (no proxy possible), so it is frozen (SIGSTOP): requests wait
      unanswered in its sockets; :meth:`release` thaws it and it answers them, in order.

    Either way nothing is lost: the acks come once released. ``bootstrap_servers`` is what clients use.
    """

    def __init__(self, name: str) -> None:
        if name not in ("tansu", "mock"):
            raise ValueError(f"unknown embedded broker {name!r}")
        self.name = name
        self.proxy: TcpProxy | None = None
        self._tansu: EmbeddedBroker | None = None
        self._mock: MockCluster | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self.proxy is not None:
            return self.proxy.address
        assert self._mock is not None
        return self._mock.bootstrap_servers

    @property
    def supports_idempotence(self) -> bool:
        return self.name == "mock"

    @property
    def held_bytes(self) -> int | None:
        """Bytes of the broker's answers held in the proxy now (tansu); ``None`` for the frozen mock cluster,
        which has not answered yet."""
        return self.proxy.held_bytes if self.proxy is not None else None

    def hold(self) -> None:
        if self.proxy is not None:
            self.proxy.hold("downstream")
        else:
            assert self._mock is not None
            self._mock.pause()

    def release(self) -> None:
        if self.proxy is not None:
            self.proxy.release()
        else:
            assert self._mock is not None
            self._mock.resume()

    async def __aenter__(self) -> AckHoldingBroker:
        if self.name == "mock":
            self._mock = MockCluster()
            self._mock.start()
            return self
        proxy_port = free_port()
        self._tansu = EmbeddedBroker(advertised_port=proxy_port)
        self._tansu.start()
        self.proxy = TcpProxy("127.0.0.1", self._tansu.port, listen_port=proxy_port)
        await self.proxy.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.proxy is not None:
            self.proxy.release()
            await self.proxy.close()
        if self._tansu is not None:
            self._tansu.stop()
        if self._mock is not None:
            self._mock.stop()


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
