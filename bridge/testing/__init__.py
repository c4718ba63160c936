"""Test the services that consume ``vod.events`` against a real bridge: a pytest plugin and a testcontainers
module (README "Testing your consumer").

The plugin is opt-in; installing the package does not load it. Load it with ``pytest_plugins =
["bridge.testing"]`` in a conftest, or ``pytest -p bridge.testing``. Its fixtures:

- ``vod_bridge``: a running bridge (:class:`VodBridge`) with topics of its own, one per test; settings per
  test with ``@pytest.mark.vod_bridge(http_sign_key="k", ...)`` (names: :func:`bridge_settings`);
- ``vod_bridge_factory``: ``vod_bridge_factory(**settings)`` starts another one, stopped after the test;
- ``vod_bridge_session``: one bridge with default settings for the whole session (its records are shared by
  every test that uses it);
- ``vod_event``: :func:`build_event`, ``vod_event("PullComplete", TaskId="t-1", ErrCode=70000) -> dict``;
- ``vod_bridge_kafka`` (session): the Kafka they publish to: ``KAFKA_BOOTSTRAP_SERVERS`` when set (with the
  idempotent producer unless ``VOD_BRIDGE_TEST_IDEMPOTENCE=false``), else an embedded broker started once
  per session (the ``embedded`` extra; no Docker). Override it in a conftest to hand out your own.

``VodBridgeContainer`` (the bridge's Docker image, for CI with Docker) is imported on first use only, so
loading the plugin never imports testcontainers or docker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import pytest

from bridge.testing.events import ENVELOPE_FIELDS, OMIT, build_event, event_key
from bridge.testing.harness import (
    SETTING_NAMES,
    Answer,
    BridgeStartError,
    BridgeStopError,
    KafkaEndpoint,
    KafkaRecord,
    RecordsTimeout,
    UnexpectedRecords,
    VodBridge,
    bridge_settings,
    read_records,
)

if TYPE_CHECKING:
    from bridge.testing.container import VodBridgeContainer

__all__ = [
    "ENVELOPE_FIELDS",
    "OMIT",
    "SETTING_NAMES",
    "Answer",
    "BridgeStartError",
    "BridgeStopError",
    "KafkaEndpoint",
    "KafkaRecord",
    "RecordsTimeout",
    "UnexpectedRecords",
    "VodBridge",
    "VodBridgeContainer",
    "bridge_settings",
    "build_event",
    "event_key",
    "read_records",
]

#: The Kafka of ``vod_bridge_kafka``; unset starts the embedded broker.
BOOTSTRAP_SERVERS_ENV: Final = "KAFKA_BOOTSTRAP_SERVERS"
#: ``false`` when that Kafka refuses aiokafka's idempotent producer (the embedded tansu broker does).
IDEMPOTENCE_ENV: Final = "VOD_BRIDGE_TEST_IDEMPOTENCE"

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def __getattr__(name: str) -> Any:
    # Lazy: testcontainers (and docker) are imported by those who use the container, not by the plugin.
    if name == "VodBridgeContainer":
        from bridge.testing.container import VodBridgeContainer

        return VodBridgeContainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vod_bridge(**settings): settings of the vod_bridge fixture, e.g. http_sign_key='k', "
        "delivery_dedup_window_s=60 (bridge.testing.bridge_settings)",
    )


@pytest.fixture(scope="session")
def vod_bridge_kafka() -> Iterator[KafkaEndpoint]:
    """The Kafka every bridge of the session publishes to (see the module docstring)."""
    servers = os.environ.get(BOOTSTRAP_SERVERS_ENV, "").strip()
    if servers:
        yield KafkaEndpoint(servers, supports_idempotence=_idempotence_from_env())
        return
    from bridge.ops.embedded import EmbeddedBroker

    # tansu refuses aiokafka's InitProducerId: the producer runs with acks=all only (README "Idempotence").
    with EmbeddedBroker() as broker:
        yield KafkaEndpoint(broker.bootstrap_servers, supports_idempotence=False)


@pytest.fixture
def vod_bridge_factory(vod_bridge_kafka: KafkaEndpoint) -> Iterator[Callable[..., VodBridge]]:
    """``vod_bridge_factory(**settings) -> VodBridge``: a started bridge with topics of its own; every bridge
    it made is stopped after the test."""
    started: list[VodBridge] = []

    def make(**settings: Any) -> VodBridge:
        bridge = VodBridge(bridge_settings(vod_bridge_kafka, **settings)).start()
        started.append(bridge)
        return bridge

    yield make
    failures: list[Exception] = []
    for bridge in reversed(started):
        try:
            bridge.stop()
        except Exception as exc:  # every bridge is stopped; the first failure is reported
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def vod_bridge(request: pytest.FixtureRequest, vod_bridge_factory: Callable[..., VodBridge]) -> VodBridge:
    """A running bridge for this test; ``@pytest.mark.vod_bridge(**settings)`` (on the test, its class or its
    module; the closest wins per setting) sets its settings."""
    settings: dict[str, Any] = {}
    for marker in request.node.iter_markers("vod_bridge"):  # closest first
        if marker.args:
            raise pytest.UsageError("@pytest.mark.vod_bridge takes settings as keywords only")
        settings = {**marker.kwargs, **settings}
    return vod_bridge_factory(**settings)


@pytest.fixture(scope="session")
def vod_bridge_session(vod_bridge_kafka: KafkaEndpoint) -> Iterator[VodBridge]:
    """One bridge with default settings for the session. Its topics are shared: ``records()`` continues where
    the previous test stopped reading."""
    with VodBridge(bridge_settings(vod_bridge_kafka)) as bridge:
        yield bridge


@pytest.fixture
def vod_event() -> Callable[..., dict[str, Any]]:
    """:func:`build_event`: ``vod_event("PullComplete", TaskId="t-1", ErrCode=70000) -> dict``."""
    return build_event


def _idempotence_from_env() -> bool:
    raw = os.environ.get(IDEMPOTENCE_ENV, "true").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise pytest.UsageError(f"{IDEMPOTENCE_ENV}={raw!r}: expected true or false")
