"""``VodBridgeContainer``: the bridge's Docker image as a testcontainers module, for CI that has Docker.

Needs the ``testing`` extra (testcontainers 4.15 or later) and the image, built from the repository's
``Dockerfile``: ``docker build -t vod-kafka-bridge:<version> .``.
"""

from __future__ import annotations

from typing import Any, Final, Self

from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import HttpWaitStrategy

from bridge import __version__
from bridge.config import HttpSettings

#: The tag this package's Dockerfile is built and deployed as (deploy/kubernetes uses the same).
DEFAULT_IMAGE: Final = f"vod-kafka-bridge:{__version__}"
#: The port the image serves on (``EXPOSE 8080``; ``BRIDGE_HTTP_PORT``'s default).
HTTP_PORT: Final = HttpSettings().port
#: The listener testcontainers' ``KafkaContainer`` offers other containers on its network.
KAFKA_NETWORK_PORT: Final = 9092


class VodBridgeContainer(DockerContainer):
    """The bridge in a container, started with ``vod-bridge serve``; :meth:`start` returns once ``GET
    /readyz`` answers 200 (the producer is connected), within ``startup_timeout_s``.

    Settings are the image's environment variables (README "Configuration"); set any other with
    ``with_env``. Kafka must be reachable from inside the container: :meth:`with_kafka` wires in a Kafka
    container on a shared network::

        with Network() as network, \\
                KafkaContainer().with_network(network).with_network_aliases("kafka") as kafka, \\
                VodBridgeContainer().with_kafka(kafka) as bridge:
            requests.post(bridge.get_callback_url(), json=event)

    Records go to ``topic`` (default ``vod.events``), dead letters to ``<topic>.dlq``; consumers outside
    Docker read them at ``kafka.get_bootstrap_server()``.
    """

    def __init__(
        self, image: str = DEFAULT_IMAGE, *, topic: str = "vod.events", startup_timeout_s: int = 60, **kwargs: Any
    ) -> None:
        super().__init__(image, **kwargs)
        self.topic = topic
        self.with_exposed_ports(HTTP_PORT)
        self.with_envs(
            BRIDGE_HTTP_PORT=str(HTTP_PORT),
            BRIDGE_KAFKA_TOPIC=topic,
            BRIDGE_KAFKA_DEAD_LETTER_TOPIC=self.dead_letter_topic,
        )
        self.waiting_for(
            HttpWaitStrategy(HTTP_PORT, "/readyz").for_status_code(200).with_startup_timeout(startup_timeout_s)
        )

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic}.dlq"

    def with_kafka(self, kafka: DockerContainer, *, port: int = KAFKA_NETWORK_PORT) -> Self:
        """Join ``kafka``'s network and publish to it by its first network alias, at ``port`` (the
        in-network listener; 9092 for testcontainers' ``KafkaContainer``). Call it before :meth:`start`.

        Raises :class:`ValueError` when ``kafka`` has no network or no alias: the bridge cannot reach it then.
        """
        # testcontainers keeps no public accessor for these; its own KafkaContainer reads them the same way.
        network, aliases = kafka._network, kafka._network_aliases
        if network is None or not aliases:
            raise ValueError(
                "put the Kafka container on a network with an alias before wiring it in: "
                "KafkaContainer().with_network(network).with_network_aliases('kafka')"
            )
        self.with_network(network)
        return self.with_env("BRIDGE_KAFKA_BOOTSTRAP_SERVERS", f"{aliases[0]}:{port}")

    def get_callback_url(self) -> str:
        """Where to post callbacks from the host: ``http://<host>:<mapped port>/vod/callback``."""
        path = self.env.get("BRIDGE_CALLBACK_PATH", HttpSettings().callback_path)
        return f"{self.get_base_url()}{path}"

    def get_base_url(self) -> str:
        """``http://<host>:<mapped port>``, for ``/readyz``, ``/metrics``, ..."""
        return f"http://{self.get_container_host_ip()}:{self.get_exposed_port(HTTP_PORT)}"
