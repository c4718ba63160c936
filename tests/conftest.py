"""Shared fixtures. The broker is real: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else testcontainers' Kafka when a
Docker engine answers, else the embedded brokers named by ``BRIDGE_TEST_BROKERS`` (no Docker needed).

Embedded brokers: ``tansu`` (bridge/ops/embedded.py; refuses the idempotent producer) and ``mock``
(librdkafka's mock cluster, tests/mockcluster.py; accepts it, so the production default is exercised).
``BRIDGE_TEST_BROKERS`` is a comma list of them, default ``tansu,mock``. A test marked
``@pytest.mark.producer`` runs once on each selected embedded broker (ids ``[tansu]``, ``[mock]``), through
the ``kafka`` fixture or a broker of its own (``own_broker``); every other test talks to the first one only.
Each shared broker is started on first use, once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer
from mockcluster import MockCluster

from bridge.app import COMPONENTS, create_app, runner_options
from bridge.config import DeliverySettings, HttpSettings, KafkaSettings, Settings
from bridge.ops.embedded import EmbeddedBroker

if TYPE_CHECKING:
    from faultkit import OwnBroker

    from bridge.testing import KafkaEndpoint

# The plugin consumer teams load (README "Testing your consumer"): the project's own tests use its fixtures too.
pytest_plugins = ["bridge.testing"]

SAMPLES = Path(__file__).resolve().parent.parent / "bridge" / "samples"

#: The embedded brokers BRIDGE_TEST_BROKERS may name, in their default order.
EMBEDDED_BROKERS = ("tansu", "mock")


@dataclass(frozen=True)
class Kafka:
    bootstrap_servers: str
    #: "external", "testcontainers" or "embedded"
    kind: str
    #: tansu refuses aiokafka's InitProducerId, so idempotence is off against it; on everywhere else.
    supports_idempotence: bool
    #: Which embedded broker ("tansu" or "mock"); "" for a real Kafka.
    embedded: str = ""


def selected_brokers() -> list[str]:
    """The embedded brokers of ``BRIDGE_TEST_BROKERS`` (default: all), in the order given, first = default."""
    raw = os.environ.get("BRIDGE_TEST_BROKERS", ",".join(EMBEDDED_BROKERS))
    names = list(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    unknown = [name for name in names if name not in EMBEDDED_BROKERS]
    if unknown or not names:
        raise pytest.UsageError(f"BRIDGE_TEST_BROKERS={raw!r}: expected a comma list of {', '.join(EMBEDDED_BROKERS)}")
    return names


@functools.cache
def kafka_source() -> str:
    """Where the shared broker comes from: "external", "testcontainers" or "embedded" (decided once)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return "external"
    if _docker_answers():
        return "testcontainers"
    return "embedded"


def _docker_answers(timeout_s: float = 2.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` on DOCKER_HOST (default: the local unix socket)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(1024)
    except (OSError, ValueError):
        return False


def pytest_configure(config: pytest.Config) -> None:
    selected_brokers()  # a wrong BRIDGE_TEST_BROKERS stops the run before any test, not at its first use


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.producer``: run the test once per selected embedded broker.

    The parameter goes to ``kafka`` (only when the shared broker is embedded: a real Kafka is one broker) and to
    ``own_broker``, whichever the test uses, directly or through another fixture (``make_settings``).
    """
    if metafunc.definition.get_closest_marker("producer") is None:
        return
    argnames = [
        name
        for name in ("kafka", "own_broker")
        if name in metafunc.fixturenames and (name == "own_broker" or kafka_source() == "embedded")
    ]
    if argnames:
        names = selected_brokers()
        metafunc.parametrize(argnames, [[name] * len(argnames) for name in names], indirect=True, ids=names)


class SessionBrokers:
    """The brokers the ``kafka`` fixture hands out: each started on first use, all stopped at session end."""

    def __init__(self) -> None:
        self._started: dict[str, Kafka] = {}
        self._stack = contextlib.ExitStack()

    def get(self, name: str) -> Kafka:
        if name not in self._started:
            self._started[name] = self._start(name)
        return self._started[name]

    def _start(self, name: str) -> Kafka:
        if name == "external":
            return Kafka(os.environ["KAFKA_BOOTSTRAP_SERVERS"], "external", supports_idempotence=True)
        if name == "testcontainers":
            from testcontainers.community.kafka import KafkaContainer

            container = self._stack.enter_context(KafkaContainer().with_kraft())
            return Kafka(container.get_bootstrap_server(), "testcontainers", supports_idempotence=True)
        if name == "tansu":
            tansu = self._stack.enter_context(EmbeddedBroker())
            return Kafka(tansu.bootstrap_servers, "embedded", supports_idempotence=False, embedded="tansu")
        if name == "mock":
            cluster = self._stack.enter_context(MockCluster())
            return Kafka(cluster.bootstrap_servers, "embedded", MockCluster.supports_idempotence, embedded="mock")
        raise ValueError(f"unknown broker {name!r}")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def session_brokers() -> Iterator[SessionBrokers]:
    brokers = SessionBrokers()
    yield brokers
    brokers.close()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``bridge.cli.main`` configures the root logger for its process; in-process CLI tests must not leave that
    handler (bound to a captured, later closed, stderr) or its level behind for the tests after them."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    kafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(kafka_level)


@pytest.fixture
def kafka(request: pytest.FixtureRequest, session_brokers: SessionBrokers) -> Kafka:
    """The shared broker: the real Kafka, or the embedded broker of this test's parameter
    (``@pytest.mark.producer``), else the first of ``BRIDGE_TEST_BROKERS``."""
    if (source := kafka_source()) != "embedded":
        return session_brokers.get(source)
    return session_brokers.get(getattr(request, "param", selected_brokers()[0]))


@pytest.fixture(scope="session")
def vod_bridge_kafka(session_brokers: SessionBrokers) -> KafkaEndpoint:
    """The plugin's Kafka (``bridge.testing``) is the session's shared broker: the real Kafka, else the first of
    ``BRIDGE_TEST_BROKERS``, so the plugin starts no broker of its own."""
    from bridge.testing import KafkaEndpoint  # after pytest_plugins registered it: imported first, not rewritten

    source = kafka_source()
    kafka = session_brokers.get(source if source != "embedded" else selected_brokers()[0])
    return KafkaEndpoint(kafka.bootstrap_servers, supports_idempotence=kafka.supports_idempotence)


@pytest.fixture
def own_broker(request: pytest.FixtureRequest) -> Iterator[OwnBroker]:
    """A started embedded broker of this test's own, which it may take away and bring back (``faultkit.OwnBroker``):
    the test's parameter (``@pytest.mark.producer``), else the first of ``BRIDGE_TEST_BROKERS``."""
    from faultkit import OwnBroker  # faultkit imports this module

    broker = OwnBroker(getattr(request, "param", selected_brokers()[0]))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topic() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_settings(kafka: Kafka, topic: str) -> Callable[..., Settings]:
    """Settings for a test: its own topic (dead letters to ``<topic>.dlq``), short timeouts; keyword args
    override KafkaSettings fields, ``http_<name>`` HttpSettings and ``delivery_<name>`` DeliverySettings."""

    def make(**overrides: Any) -> Settings:
        http = {k.removeprefix("http_"): v for k, v in overrides.items() if k.startswith("http_")}
        delivery = {k.removeprefix("delivery_"): v for k, v in overrides.items() if k.startswith("delivery_")}
        kafka_fields = {k: v for k, v in overrides.items() if not k.startswith(("http_", "delivery_"))}
        kafka_settings = KafkaSettings(
            **{
                "bootstrap_servers": kafka.bootstrap_servers,
                "topic": topic,
                "enable_idempotence": kafka.supports_idempotence,
                "publish_timeout_s": 5.0,
                "linger_ms": 0,
                **kafka_fields,
            }
        )
        delivery_settings = DeliverySettings(**{"dead_letter_topic": f"{topic}.dlq", **delivery})
        return Settings(kafka=kafka_settings, http=HttpSettings(**http), delivery=delivery_settings)

    return make


BridgeClient = TestClient[Any, Any]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Awaitable[BridgeClient]]]:
    """Factory: serve the real ``create_app(settings)`` on a local port; ``wait_ready`` waits for Kafka."""
    clients: list[BridgeClient] = []

    async def make(settings: Settings, *, wait_ready: bool = True) -> BridgeClient:
        server = TestServer(create_app(settings))
        # TestServer ignores runner options given to its constructor; start_server takes them.
        await server.start_server(**runner_options(settings))
        client: BridgeClient = TestClient(server)
        await client.start_server()
        clients.append(client)
        if wait_ready:
            await wait_until(lambda: client.server.app[COMPONENTS].sink.ready, timeout_s=15)
        return client

    yield make
    for client in clients:
        await client.close()


async def scraped(client: BridgeClient, series: str) -> float:
    """The value of one unlabelled series in the bridge's ``GET /metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get("/metrics")
    assert response.status == 200
    families = text_string_to_metric_families(await response.text())
    (value,) = [sample.value for family in families for sample in family.samples if sample.name == series]
    return value


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(interval_s)


async def read_records(
    bootstrap_servers: str, topic: str, *, count: int, timeout_s: float = 10.0, settle_s: float = 0.5
) -> list[Any]:
    """Read the topic from the beginning until ``count`` records arrived, then ``settle_s`` more to catch
    any extra record (so tests can assert exact counts)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def sample_bytes(name: str = "pull-complete.json") -> bytes:
    return (SAMPLES / name).read_bytes()


def sample_event(task_id: str | None = None, **payload_overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(sample_bytes())
    if task_id is not None:
        event["PullCompleteEvent"]["TaskId"] = task_id
    event["PullCompleteEvent"].update(payload_overrides)
    return event


def headers_of(record: Any) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


def value_of(record: Any) -> Any:
    return msgspec.json.decode(record.value)
