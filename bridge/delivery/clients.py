"""The Kafka client behind the sink (``BRIDGE_KAFKA_CLIENT``): one factory, so that the callback and poller path,
the spool forwarder, dead letters and ``redrive`` all publish through the configured one."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

from bridge.config import KafkaSettings
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.sink import Sink
from bridge.errors import ConfigError
from bridge.ops.metrics import Metrics


class ProducerSink(Sink, Protocol):
    """A :class:`Sink` with a lifetime, as the app and ``redrive`` drive it (both Kafka clients are one)."""

    @property
    def in_flight(self) -> int:
        """Sends waiting for their ack now."""

    @property
    def reachable(self) -> bool:
        """True while the cluster answered (an ack, or the sink's metadata probe while idle) within a few seconds;
        False within a few seconds of every broker becoming unreachable. Cheap: no I/O."""

    @property
    def abandoned(self) -> int:
        """Records the producer still held, unacknowledged, when :meth:`close` gave up on them."""

    async def connect(
        self, *, retry_delay_s: float = 0.5, max_retry_delay_s: float = 10.0, max_attempts: int | None = None
    ) -> None:
        """Return once the producer can publish (``ready``); retry with back-off, for ever by default."""

    async def close(self, *, flush_timeout_s: float | None = None) -> int:
        """Flush and close within a bound; return how many records were abandoned unacknowledged."""


def check_client(settings: KafkaSettings) -> None:
    """Raise :class:`ConfigError` at start-up when the configured client is not installed, or would refuse the
    settings when it connects."""
    if settings.client != "librdkafka":
        return
    if importlib.util.find_spec("confluent_kafka") is None:
        raise ConfigError(
            "BRIDGE_KAFKA_CLIENT=librdkafka needs the 'librdkafka' extra: pip install 'vod-kafka-bridge[librdkafka]'"
        )
    if settings.linger_ms >= settings.publish_timeout_s * 1000:
        # librdkafka gives records up after the publish timeout (message.timeout.ms), which must exceed linger.ms.
        raise ConfigError("BRIDGE_KAFKA_LINGER_MS: must be below BRIDGE_KAFKA_PUBLISH_TIMEOUT_S with librdkafka")


def make_sink(
    settings: KafkaSettings,
    metrics: Metrics,
    *,
    max_record_bytes: int = 1024 * 1024,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> ProducerSink:
    """The sink of ``settings.client``, not yet connected. Raises :class:`ConfigError` when it is not installed."""
    if settings.client == "librdkafka":
        check_client(settings)
        from bridge.delivery.librdkafka import LibrdkafkaSink  # imports confluent_kafka: the optional extra

        return LibrdkafkaSink(settings, metrics, max_record_bytes=max_record_bytes, on_fatal=on_fatal)
    return KafkaSink(settings, metrics, max_record_bytes=max_record_bytes, on_fatal=on_fatal)
