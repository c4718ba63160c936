"""bridge.testing.VodBridgeContainer: what it would run (image, environment, port, network, wait strategy) checked
without Docker, its wait strategy against a real bridge, and a real start where a Docker engine answers."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import _docker_answers
from readme import consumer_examples
from testcontainers.community.kafka import KafkaContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import HttpWaitStrategy

from bridge.ops.embedded import free_port
from bridge.testing import VodBridge, VodBridgeContainer
from bridge.testing.container import DEFAULT_IMAGE

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

#: A pinned API version: the Docker client then asks no engine for its version, so nothing here needs one.
NO_ENGINE: dict[str, Any] = {"docker_client_kw": {"version": "1.44"}}


def kafka_on_a_network(alias: str = "kafka") -> KafkaContainer:
    return KafkaContainer(**NO_ENGINE).with_network(Network(**NO_ENGINE)).with_network_aliases(alias)


def test_the_default_image_is_the_one_dockerfile_builds_and_deploy_runs() -> None:
    manifest = (ROOT / "deploy/kubernetes/deployment.yaml").read_text()
    deployed = set(re.findall(r"image: (vod-kafka-bridge:\S+)", manifest))
    assert deployed == {DEFAULT_IMAGE} == {VodBridgeContainer(**NO_ENGINE).image}
    assert VodBridgeContainer("registry.example/vod-bridge:dev", **NO_ENGINE).image == "registry.example/vod-bridge:dev"


def test_configuration_with_kafka_on_its_network() -> None:
    kafka = kafka_on_a_network("broker")
    bridge = VodBridgeContainer(topic="vod.test", **NO_ENGINE).with_kafka(kafka)
    assert bridge.env == {
        "BRIDGE_HTTP_PORT": "8080",
        "BRIDGE_KAFKA_TOPIC": "vod.test",
        "BRIDGE_KAFKA_DEAD_LETTER_TOPIC": "vod.test.dlq",
        # testcontainers' KafkaContainer listens for its network's containers on 9092 ("BROKER").
        "BRIDGE_KAFKA_BOOTSTRAP_SERVERS": "broker:9092",
    }
    assert (bridge.topic, bridge.dead_letter_topic) == ("vod.test", "vod.test.dlq")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8080$", dockerfile, flags=re.MULTILINE)
    assert bridge.ports == {"8080": None}, "exposed and mapped to a free host port"
    assert bridge._network is kafka._network


def test_start_waits_for_readyz_200() -> None:
    strategy = VodBridgeContainer(startup_timeout_s=90, **NO_ENGINE)._wait_strategy
    assert isinstance(strategy, HttpWaitStrategy)
    assert (strategy._port, strategy._path, strategy._status_codes) == (8080, "/readyz", {200})
    assert strategy._startup_timeout == 90


def test_kafka_must_be_reachable_by_name() -> None:
    bridge = VodBridgeContainer(**NO_ENGINE)
    with pytest.raises(ValueError, match="with_network_aliases"):
        bridge.with_kafka(KafkaContainer(**NO_ENGINE))
    with pytest.raises(ValueError, match="with_network_aliases"):
        bridge.with_kafka(KafkaContainer(**NO_ENGINE).with_network(Network(**NO_ENGINE)))


class _PortOnThisHost:
    """A wait-strategy target whose "container port" is a port on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get_container_host_ip(self) -> str:
        return "127.0.0.1"

    def get_exposed_port(self, port: int) -> int:
        assert port == 8080
        return self.port


def test_the_wait_strategy_passes_on_a_ready_bridge_and_times_out_without_one(vod_bridge: VodBridge) -> None:
    strategy = VodBridgeContainer(startup_timeout_s=1, **NO_ENGINE)._wait_strategy
    assert strategy is not None
    strategy.with_poll_interval(0.1)
    port = int(vod_bridge.base_url.rpartition(":")[2])
    strategy.wait_until_ready(_PortOnThisHost(port))  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="/readyz"):
        strategy.wait_until_ready(_PortOnThisHost(free_port()))  # type: ignore[arg-type]
    assert time.monotonic() - started < 5


@pytest.mark.timeout(900)
@pytest.mark.skipif(not _docker_answers(), reason="no Docker engine answers on DOCKER_HOST: cannot start the image")
def test_readme_example_starts_the_image(pytester: pytest.Pytester) -> None:
    from testcontainers.core.image import DockerImage

    with DockerImage(path=ROOT, tag=DEFAULT_IMAGE, clean_up=False):
        pytester.makepyfile(test_readme_container_example=consumer_examples()[1])
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio", timeout=600)
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1)
