"""The spool path of the receiver: store callbacks durably when Kafka cannot take them, forward them later.

With ``BRIDGE_SPOOL_DIR`` set, a callback that Kafka does not acknowledge within the publish budget (or any
callback while older ones still wait in the spool, to keep their order) is appended to the fsync'ed spool
and answered 200. :meth:`SpoolForwarder.run` drains the spool to Kafka in sequence order, now and after a
restart, and commits (forgets) only what Kafka acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import datetime
from typing import Final

import msgspec

from bridge.delivery.kafka import Sink, Source
from bridge.delivery.spool import AsyncSpool, SpoolError
from bridge.errors import PublishFailed
from bridge.ops.metrics import Metrics
from bridge.vod.model import VodEvent

logger = logging.getLogger(__name__)

#: Records read and published per forwarding round.
FORWARD_BATCH: Final = 256


class SpooledEvent(msgspec.Struct, array_like=True, frozen=True):
    """One event as stored in the spool (version 1): everything needed to rebuild its Kafka record."""

    version: int
    event_type: str
    key: str
    value: bytes
    source: str
    received_at: datetime
    event_handle: str | None = None


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(SpooledEvent)


def encode_spooled(event: VodEvent, *, source: Source, received_at: datetime) -> bytes:
    return _encoder.encode(
        SpooledEvent(1, event.event_type, event.key, event.value, source, received_at, event.event_handle)
    )


def decode_spooled(payload: bytes) -> tuple[VodEvent, Source, datetime]:
    stored = _decoder.decode(payload)
    source: Source = "pull" if stored.source == "pull" else "callback"
    event = VodEvent(
        event_type=stored.event_type,
        key=stored.key,
        value=stored.value,
        payload=None,
        event_handle=stored.event_handle,
    )
    return event, source, stored.received_at


class SpoolForwarder:
    """Owns the spool: :meth:`store` returns once an event is on disk; :meth:`run` forwards it to Kafka."""

    def __init__(self, spool: AsyncSpool, sink: Sink, metrics: Metrics, *, dead_letter_topic: str) -> None:
        self._spool = spool
        self._sink = sink
        self._metrics = metrics
        self._dead_letter_topic = dead_letter_topic
        self._stopping = asyncio.Event()
        self.forwarded = 0
        self._metrics.spool_depth.set(spool.depth)

    @property
    def depth(self) -> int:
        """Events stored but not yet acknowledged by Kafka."""
        return self._spool.depth

    async def store(self, event: VodEvent, *, source: Source, received_at: datetime) -> int:
        """Append the event durably (fsync'ed) and return its sequence number.

        Raises :class:`PublishFailed` (503) when the spool is full or unusable.
        """
        try:
            seq = await self._spool.append(encode_spooled(event, source=source, received_at=received_at))
        except SpoolError as exc:
            self._metrics.publish_failed.labels(source, "spool").inc()
            raise PublishFailed(f"kafka unavailable and the spool refused the event: {exc.message}") from exc
        self._metrics.spooled.labels(source).inc()
        self._metrics.spool_depth.set(self._spool.depth)
        return seq

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Forward stored events in order until :meth:`stop`; finishes the batch in progress."""
        position = self._spool.committed_seq
        if self._spool.depth:
            logger.info("spool holds %d events from before; forwarding them to kafka", self._spool.depth)
        delay_s = 0.2
        while not self._stopping.is_set():
            if not await self._spool.wait_for_data(position, timeout_s=0.5):
                continue
            if not self._sink.ready:
                await self._pause(0.2)
                continue
            batch = await self._spool.read(position, FORWARD_BATCH)
            acked_through = await self._forward(batch)
            if acked_through > position:
                await self._spool.commit(acked_through)
                self.forwarded += acked_through - position
                position = acked_through
                self._metrics.spool_depth.set(self._spool.depth)
            if batch and acked_through < batch[-1][0]:
                logger.warning("kafka refused spooled events; %d still spooled, retrying in %.1fs", self.depth, delay_s)
                await self._pause(delay_s * random.uniform(0.8, 1.2))
                delay_s = min(delay_s * 2, 10.0)
            else:
                delay_s = 0.2
        logger.info("spool forwarder stopped; %d events left in the spool for the next start", self.depth)

    async def _forward(self, batch: list[tuple[int, bytes]]) -> int:
        """Publish a batch concurrently; return the highest seq up to which *every* record was acked."""
        if not batch:
            return self._spool.committed_seq
        results = await asyncio.gather(*(self._publish(payload) for _, payload in batch))
        acked_through = batch[0][0] - 1
        for (seq, _), ok in zip(batch, results, strict=True):
            if not ok:
                break
            acked_through = seq
        return acked_through

    async def _publish(self, payload: bytes) -> bool:
        try:
            event, source, received_at = decode_spooled(payload)
        except msgspec.DecodeError as exc:
            return await self._dead_letter(payload, str(exc))
        try:
            await self._sink.publish(event, source=source, received_at=received_at)
        except PublishFailed:
            return False
        self._metrics.published_from_spool.inc()
        return True

    async def _dead_letter(self, payload: bytes, error: str) -> bool:
        # CRC-checked, so this is a format the running version cannot read: keep it, visibly, in the DLQ.
        logger.error("spooled record unreadable (%s); sending it to %s", error, self._dead_letter_topic)
        try:
            await self._sink.publish_dead_letter(
                payload,
                topic=self._dead_letter_topic,
                reason="spool_format",
                error=error,
                event_handle=None,
                received_at=datetime.now().astimezone(),
                source="callback",
            )
        except PublishFailed:
            return False
        return True

    async def _pause(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
