"""The sink protocol: what the delivery path needs from a Kafka client, and nothing more."""

from __future__ import annotations

from typing import Protocol

from bridge.delivery.records import Headers


class Ack(Protocol):
    """What the broker acknowledged (aiokafka's ``RecordMetadata`` satisfies this)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


class Sink(Protocol):
    """A producer. ``send`` returns only after the broker acknowledged the record (acks=all)."""

    @property
    def ready(self) -> bool:
        """True while records can be sent (the producer is connected)."""

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, *, timeout_s: float | None = None
    ) -> Ack:
        """Send one record and wait for its ack, at most ``timeout_s`` (the sink's default when ``None``).

        Raises :class:`bridge.errors.PublishFailed` (``retriable`` False when Kafka will never take it).
        """
