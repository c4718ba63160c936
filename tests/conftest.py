"""Shared fixtures. The broker is real: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else testcontainers' Kafka when a
Docker engine answers, else the embedded tansu broker (no Docker needed)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer

from bridge.app import COMPONENTS, create_app, runner_options
from bridge.config import DeliverySettings, HttpSettings, KafkaSettings, Settings
from bridge.ops.embedded import EmbeddedBroker

SAMPLES = Path(__file__).resolve().parent.parent / "bridge" / "samples"


@dataclass(frozen=True)
class Kafka:
    bootstrap_servers: str
    #: "external", "testcontainers" or "embedded"
    kind: str
    #: tansu refuses aiokafka's InitProducerId, so idempotence is only used against real Kafka.
    supports_idempotence: bool


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


@pytest.fixture(scope="session")
def kafka() -> Iterator[Kafka]:
    if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield Kafka(servers, "external", supports_idempotence=True)
    elif _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield Kafka(container.get_bootstrap_server(), "testcontainers", supports_idempotence=True)
    else:
        with EmbeddedBroker() as broker:
            yield Kafka(broker.bootstrap_servers, "embedded", supports_idempotence=False)


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
