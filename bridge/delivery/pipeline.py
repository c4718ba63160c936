"""The delivery path both sources share: de-duplicate, publish (or spool), dead-letter; return a typed outcome.

A source hands over what it decoded (:class:`VodEvent`, or :class:`Undecodable` for a JSON object without a
findable key) and turns the :data:`Outcome` into its transport's answer: an HTTP status for the callback, a
ConfirmEvents (or not) for the poller. Every rule about spooling, de-duplication and dead letters lives here.

The contract: an outcome for which :func:`delivered` is true means the record was acknowledged by Kafka (or,
for callbacks with a spool, fsync'ed to it); only then may a source answer 2xx or confirm.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Final, Protocol

import msgspec

from bridge.config import InvalidPolicy
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.records import Headers, Source, event_headers, undecodable_headers
from bridge.delivery.sink import Ack, Sink
from bridge.errors import InvalidPayload, PublishFailed
from bridge.ops.metrics import Metrics
from bridge.vod.model import Undecodable, VodEvent

logger = logging.getLogger(__name__)

#: What to do with a callback body that is a JSON object but not a publishable event (no key found):
#: publish it to the dead-letter topic (and answer 200), or refuse it with a 400 as earlier versions did.


class Published(msgspec.Struct, frozen=True):
    """Kafka acknowledged the event on its topic."""

    topic: str
    partition: int
    offset: int


class Spooled(msgspec.Struct, frozen=True):
    """The record is fsync'ed in the local spool; the forwarder will publish it."""

    seq: int


class Duplicate(msgspec.Struct, frozen=True):
    """An identical event was already acknowledged within the de-duplication window; nothing was sent."""


class DeadLettered(msgspec.Struct, frozen=True):
    """Kafka acknowledged the body on the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    reason: str


class Refused(msgspec.Struct, frozen=True):
    """Not delivered on purpose (``BRIDGE_CALLBACK_INVALID=reject``): the sender gets the error."""

    error: InvalidPayload


class Failed(msgspec.Struct, frozen=True):
    """Neither Kafka nor the spool acknowledged the record; the sender must retry (or VOD re-delivers)."""

    error: PublishFailed


Outcome = Published | Spooled | Duplicate | DeadLettered | Refused | Failed

_DELIVERED: Final = (Published, Spooled, Duplicate, DeadLettered)


def delivered(outcome: Outcome) -> bool:
    """True when the record is durable (Kafka, or the spool): a source may now answer 2xx or confirm."""
    return isinstance(outcome, _DELIVERED)


class Spool(Protocol):
    """The spool front the pipeline needs (:class:`bridge.delivery.forwarder.SpoolForwarder`)."""

    @property
    def depth(self) -> int: ...

    async def store(
        self, event: VodEvent, *, source: Source, received_at: datetime, sub_app_id: int | None = None
    ) -> int: ...

    async def store_dead_letter(
        self, item: Undecodable, *, source: Source, received_at: datetime, topic: str, sub_app_id: int | None = None
    ) -> int: ...


class Delivery:
    """One delivery path for both sources.

    ``topic_for`` maps an EventType to its topic. ``spool`` (optional, attached at start-up with
    :meth:`use_spool`) takes callbacks that Kafka cannot acknowledge within ``spool_budget_s``; events from
    the poller are never spooled, since VOD keeps unconfirmed events for four days and re-delivers them.
    """

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        topic_for: Callable[[str], str],
        dead_letter_topic: str,
        invalid_callbacks: InvalidPolicy = "dead-letter",
        dedup: DedupWindow | None = None,
        spool_budget_s: float = 2.0,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._topic_for = topic_for
        self._dead_letter_topic = dead_letter_topic
        self._invalid_callbacks = invalid_callbacks
        self._dedup = dedup
        self._spool_budget_s = spool_budget_s
        self._spool: Spool | None = None

    @property
    def dead_letter_topic(self) -> str:
        return self._dead_letter_topic

    def use_spool(self, spool: Spool | None) -> None:
        """Attach (or detach) the spool; called by the app's start-up before any source runs."""
        self._spool = spool

    async def deliver(
        self,
        item: VodEvent | Undecodable,
        *,
        source: Source,
        received_at: datetime,
        sub_app_id: int | None = None,
        trace_headers: Sequence[tuple[str, bytes]] = (),
    ) -> Outcome:
        """Deliver one decoded body. Never raises for a delivery problem: failures are a :class:`Failed`.

        ``sub_app_id`` is the VOD application the source got it from (header ``vod-sub-app-id``), if it knows one.
        De-duplication ignores it: a copy of one event from the callback and from the poller is still a repeat.
        """
        if isinstance(item, Undecodable):
            return await self._deliver_undecodable(item, source, received_at, sub_app_id, trace_headers)
        metrics = self._metrics
        metrics.count_received(source, item.event_type)
        for fallback in item.fallbacks:
            metrics.fallbacks.labels(source, fallback).inc()
        dedup = self._dedup
        if dedup is not None:
            earlier = dedup.lookup(item)
            # A copy only spooled may still be lost with this disk; the poller must not let VOD forget it.
            if earlier is not None and (earlier.in_kafka or source == "callback"):
                metrics.duplicates.labels(source).inc()
                return Duplicate()
        outcome = await self._publish_or_spool(item, source, received_at, sub_app_id, trace_headers)
        if dedup is not None and isinstance(outcome, Published | Spooled):
            dedup.record(item, in_kafka=isinstance(outcome, Published))
        return outcome

    async def _publish_or_spool(
        self,
        event: VodEvent,
        source: Source,
        received_at: datetime,
        sub_app_id: int | None,
        trace_headers: Sequence[tuple[str, bytes]],
    ) -> Outcome:
        """An event to its topic, or to the spool."""
        result = await self._send_or_spool(
            source,
            self._topic_for(event.event_type),
            key=event.key.encode(),
            value=event.value,
            headers=event_headers(
                event, source=source, received_at=received_at, sub_app_id=sub_app_id, extra=trace_headers
            ),
            store=lambda spool: spool.store(event, source=source, received_at=received_at, sub_app_id=sub_app_id),
            event_type=event.event_type,
            log_key=event.key,
        )
        if isinstance(result, Spooled | Failed):
            return result
        self._metrics.count_published(source, event.event_type)
        return Published(result.topic, result.partition, result.offset)

    async def _deliver_undecodable(
        self,
        item: Undecodable,
        source: Source,
        received_at: datetime,
        sub_app_id: int | None,
        trace_headers: Sequence[tuple[str, bytes]],
    ) -> Outcome:
        """A body without a usable key to the dead-letter topic, or to the spool (or refused, by policy)."""
        metrics = self._metrics
        metrics.count_received(source, item.event_type or "")
        if source == "callback" and self._invalid_callbacks == "reject":
            # The source answers the refusal and counts it with its other rejections.
            return Refused(InvalidPayload(item.message, reason=item.reason))
        dead_letter_topic = self._dead_letter_topic
        result = await self._send_or_spool(
            source,
            dead_letter_topic,
            key=item.event_handle.encode() if item.event_handle is not None else None,
            value=item.value,
            headers=undecodable_headers(
                item, source=source, received_at=received_at, sub_app_id=sub_app_id, extra=trace_headers
            ),
            store=lambda spool: spool.store_dead_letter(
                item, source=source, received_at=received_at, topic=dead_letter_topic, sub_app_id=sub_app_id
            ),
            event_type=item.event_type or "-",
            log_key="-",
        )
        if isinstance(result, Spooled | Failed):
            return result
        metrics.dead_lettered.labels(source, item.reason).inc()
        logger.warning(
            "%s body without a usable key (%s: %s) sent to %s",
            source,
            item.reason,
            item.message,
            dead_letter_topic,
            extra={"reason": item.reason},
        )
        return DeadLettered(result.topic, result.partition, result.offset, item.reason)

    async def _send_or_spool(
        self,
        source: Source,
        topic: str,
        *,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        store: Callable[[Spool], Awaitable[int]],
        event_type: str,
        log_key: str,
    ) -> Ack | Spooled | Failed:
        """Kafka first (within the spool budget when there is a spool); the spool when Kafka cannot ack in time.

        While older records wait in the spool, new ones queue behind them, so forwarding keeps arrival order.
        Only callbacks are spooled.
        """
        spool = self._spool if source == "callback" else None
        if spool is None or (spool.depth == 0 and self._sink.ready):
            try:
                return await self._sink.send(
                    topic, key, value, headers, timeout_s=None if spool is None else self._spool_budget_s
                )
            except PublishFailed as exc:
                self._count_failure(source, exc, event_type, log_key)
                if spool is None or not exc.retriable:
                    # Kafka will never take it (e.g. too large): spooling would only block the queue.
                    return Failed(exc)
                logger.info("kafka did not ack %s key=%s in time (%s); spooling it", event_type, log_key, exc)
        try:
            return Spooled(await store(spool))
        except PublishFailed as exc:
            self._count_failure(source, exc, event_type, log_key)
            return Failed(exc)

    def _count_failure(self, source: Source, exc: PublishFailed, event_type: str, key: str) -> None:
        self._metrics.publish_failed.labels(source, exc.cause).inc()
        logger.warning(
            "%s %s key=%s not acked: %s",
            source,
            event_type,
            key,
            exc.message,
            extra={"reason": exc.code, "key": key, "event_type": event_type},
        )
