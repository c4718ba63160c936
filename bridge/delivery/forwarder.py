"""The spool path of the delivery: store records durably when Kafka cannot take them, forward them later.

With ``BRIDGE_SPOOL_DIR`` set, a callback that Kafka does not acknowledge within the publish budget (or any
callback while older ones still wait in the spool, to keep their order) is appended to the fsync'ed spool
and answered 200. :meth:`SpoolForwarder.run` drains the spool to Kafka in sequence order, now and after a
restart, and commits (forgets) only what Kafka acknowledged. A record Kafka refuses for good (too large, an
invalid or unauthorized topic) goes to the dead-letter topic; one that the dead-letter topic refuses too is
copied to ``<spool>/refused/`` and logged: the queue behind it never wedges and nothing vanishes. If even that
copy fails (a full disk), the record stays in the spool and is retried later.

A full spool (its bound, or the disk's free-space floor) answers 503 ``spool_full``; a cursor that cannot be
written is counted and logged, never fatal: forwarding goes on and a restart may re-send (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from bridge.backoff import Backoff
from bridge.delivery.records import (
    ERROR_REASON,
    SUB_APP_ID,
    Headers,
    Source,
    dead_letter_headers,
    event_headers,
    header,
    undecodable_headers,
)
from bridge.delivery.sink import Sink
from bridge.delivery.spool import AsyncSpool, SpoolError, SpoolFull
from bridge.delivery.spool.store import sync_directory, write_file_durably
from bridge.errors import PublishFailed, SpoolNoRoom
from bridge.ops.metrics import Metrics
from bridge.vod.model import Undecodable, VodEvent

logger = logging.getLogger(__name__)

#: Records, and payload bytes, read and published per forwarding round.
FORWARD_BATCH: Final = 256
FORWARD_BATCH_BYTES: Final = 8 * 1024 * 1024


class SpooledEvent(msgspec.Struct, array_like=True, frozen=True):
    """One record as stored in the spool: everything needed to rebuild it.

    Fields after ``event_handle`` were added later with defaults, so records written by earlier versions
    still decode (they are rebuilt as event records with the headers of the record contract).
    """

    version: int
    event_type: str
    key: str
    value: bytes
    source: str
    received_at: datetime
    event_handle: str | None = None
    #: The record's headers as built at receipt (trace context and format included).
    headers: list[tuple[str, bytes]] | None = None
    #: A body without a usable key: it goes to the dead-letter topic, keyed by its event handle if any.
    dead_letter: bool = False


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(SpooledEvent)


def _source(stored: SpooledEvent) -> Source:
    return "pull" if stored.source == "pull" else "callback"


def _sub_app_of(stored: SpooledEvent) -> bytes | None:
    return next((value for name, value in stored.headers or () if name == SUB_APP_ID), None)


class SpoolForwarder:
    """Owns the spool: :meth:`store` returns once a record is on disk; :meth:`run` forwards it to Kafka."""

    def __init__(
        self,
        spool: AsyncSpool,
        sink: Sink,
        metrics: Metrics,
        *,
        topic_for: Callable[[str], str],
        dead_letter_topic: str,
    ) -> None:
        self._spool = spool
        self._sink = sink
        self._metrics = metrics
        self._topic_for = topic_for
        self._dead_letter_topic = dead_letter_topic
        self._stopping = asyncio.Event()
        #: Records acked after an earlier record of their batch failed: not re-sent when the batch is retried.
        self._acked_ahead: set[int] = set()
        self._accepting = True
        #: Cursor write failures of the spool already added to the metric.
        self._cursor_failures_counted = 0
        self._metrics.spool_depth.set(spool.depth)
        self._count_cursor_failures()

    @property
    def depth(self) -> int:
        """Records stored but not yet acknowledged by Kafka."""
        return self._spool.depth

    @property
    def accepting(self) -> bool:
        """False from an append the spool refused for lack of room (its bound, the free-space floor, or
        ENOSPC) until an append succeeds or a commit frees room; True otherwise. Never waits for the disk.

        A readiness probe may use it: while False, callbacks Kafka does not take at once get 503 ``spool_full``.
        """
        return self._accepting

    async def store(
        self, event: VodEvent, *, source: Source, received_at: datetime, sub_app_id: int | None = None
    ) -> int:
        """Append an event durably (fsync'ed) and return its sequence number.

        Raises :class:`SpoolNoRoom` (503 ``spool_full``) when the spool has no room for it, and
        :class:`PublishFailed` (503) when it is unusable.
        """
        headers = event_headers(event, source=source, received_at=received_at, sub_app_id=sub_app_id)
        stored = SpooledEvent(
            1, event.event_type, event.key, event.value, source, received_at, event.event_handle, headers
        )
        return await self._append(stored, source)

    async def store_dead_letter(
        self, item: Undecodable, *, source: Source, received_at: datetime, topic: str, sub_app_id: int | None = None
    ) -> int:
        """Append a body without a usable key, for the dead-letter topic; like :meth:`store`."""
        headers = undecodable_headers(item, source=source, received_at=received_at, sub_app_id=sub_app_id)
        stored = SpooledEvent(
            1,
            item.event_type or "",
            item.event_handle or "",
            item.value,
            source,
            received_at,
            item.event_handle,
            headers,
            dead_letter=True,
        )
        return await self._append(stored, source)

    async def _append(self, stored: SpooledEvent, source: Source) -> int:
        try:
            seq = await self._spool.append(_encoder.encode(stored))
        except SpoolFull as exc:
            if self._accepting:
                logger.warning("spool refuses events for lack of room (%s); answering 503 spool_full", exc.message)
            self._accepting = False
            raise SpoolNoRoom(f"kafka unavailable and no room in the spool: {exc.message}") from exc
        except SpoolError as exc:
            raise PublishFailed(
                f"kafka unavailable and the spool refused the event: {exc.message}", cause="spool"
            ) from exc
        self._accepting = True
        self._metrics.spooled.labels(source).inc()
        self._metrics.spool_depth.set(self._spool.depth)
        return seq

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Forward stored records in order until :meth:`stop`; finishes the batch in progress."""
        position = self._spool.committed_seq
        if self._spool.depth:
            logger.info("spool holds %d events from before; forwarding them to kafka", self._spool.depth)
        backoff = Backoff(0.2, 10.0)
        while not self._stopping.is_set():
            if not await self._spool.wait_for_data(position, timeout_s=0.5):
                continue
            if not self._sink.ready:
                await self._pause(0.2)
                continue
            batch = await self._spool.read(position, FORWARD_BATCH, max_bytes=FORWARD_BATCH_BYTES)
            acked_through = await self._forward(batch, position)
            if acked_through > position:
                await self._spool.commit(acked_through)
                self._count_cursor_failures()
                if not self._accepting:
                    logger.info("spool has room again after forwarding to seq %d", acked_through)
                self._accepting = True
                self._acked_ahead = {seq for seq in self._acked_ahead if seq > acked_through}
                position = acked_through
                self._metrics.spool_depth.set(self._spool.depth)
            if batch and acked_through < batch[-1][0]:
                delay_s = backoff.next_delay_s()
                logger.warning("kafka refused spooled events; %d still spooled, retrying in %.1fs", self.depth, delay_s)
                await self._pause(delay_s)
            else:
                backoff.reset()
        logger.info("spool forwarder stopped; %d events left in the spool for the next start", self.depth)

    async def _forward(self, batch: list[tuple[int, bytes]], position: int) -> int:
        """Publish a batch concurrently; return the highest seq up to which *every* record was acked."""
        pending = [(seq, payload) for seq, payload in batch if seq not in self._acked_ahead]
        results = await asyncio.gather(*(self._publish(seq, payload) for seq, payload in pending))
        self._acked_ahead.update(seq for (seq, _), ok in zip(pending, results, strict=True) if ok)
        acked_through = position
        for seq, _ in batch:
            if seq not in self._acked_ahead:
                break
            acked_through = seq
        return acked_through

    async def _publish(self, seq: int, payload: bytes) -> bool:
        try:
            stored = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            # CRC-checked, so this is a format the running version cannot read: keep it, visibly, in the DLQ.
            logger.error("spooled record %d unreadable (%s); sending it to %s", seq, exc, self._dead_letter_topic)
            return await self._dead_letter(seq, payload, None, reason="spool_format", error=str(exc))
        source = _source(stored)
        topic = self._dead_letter_topic if stored.dead_letter else self._topic_for(stored.event_type)
        key = stored.key.encode() if stored.key else None
        try:
            await self._sink.send(topic, key, stored.value, self._headers(stored))
        except PublishFailed as exc:
            self._metrics.publish_failed.labels(source, exc.cause).inc()
            if exc.retriable:
                return False
            # Kafka will never take this record: retrying it would wedge everything queued behind it.
            logger.error("kafka refuses spooled record %d for good (%s); dead-lettering it", seq, exc.message)
            return await self._dead_letter(seq, stored.value, stored, reason="kafka_refused", error=exc.message)
        self._metrics.published_from_spool.inc()
        if stored.dead_letter:
            self._metrics.dead_lettered.labels(source, header(stored.headers, ERROR_REASON) or "-").inc()
        else:
            self._metrics.count_published(source, stored.event_type)
        return True

    def _headers(self, stored: SpooledEvent) -> Headers:
        if stored.headers is not None:
            return list(stored.headers)
        # Written before headers were stored: rebuild them as the record contract has them.
        event = VodEvent(
            event_type=stored.event_type,
            key=stored.key,
            value=stored.value,
            payload=None,
            event_handle=stored.event_handle,
        )
        return event_headers(event, source=_source(stored), received_at=stored.received_at)

    async def _dead_letter(
        self, seq: int, value: bytes, stored: SpooledEvent | None, *, reason: str, error: str
    ) -> bool:
        source: Source = "callback" if stored is None else _source(stored)
        headers = dead_letter_headers(
            source=source,
            received_at=datetime.now(UTC) if stored is None else stored.received_at,
            reason=reason,
            error=error,
            event_type=None if stored is None else stored.event_type or None,
            event_handle=None if stored is None else stored.event_handle,
            # Kept as stored (already decimal text), so the dead letter still names its VOD application.
            extra=[(SUB_APP_ID, sub_app)] if stored is not None and (sub_app := _sub_app_of(stored)) else [],
        )
        try:
            await self._sink.send(self._dead_letter_topic, None, value, headers)
        except PublishFailed as exc:
            if exc.retriable:
                return False
            # If even the copy fails the record stays in the spool: retried later, never dropped.
            return await asyncio.to_thread(
                self._set_aside, seq, value, error=f"{error}; dead-letter topic: {exc.message}"
            )
        self._metrics.dead_lettered.labels(source, reason).inc()
        return True

    def _set_aside(self, seq: int, value: bytes, *, error: str) -> bool:
        """Last resort for a record neither its topic nor the dead-letter topic will take: keep it on disk.

        Returns True once the copy is fsync'ed (the record may be committed), False if it could not be made
        (counted and logged; the record stays in the spool and is tried again later).
        """
        path = Path(self._spool.spool.directory) / "refused" / f"{seq:020d}.record"
        try:
            _write_refused(path, value)
        except OSError as exc:
            self._metrics.spool_set_aside_failures.inc()
            logger.error(
                "spooled record %d refused by kafka and the dead-letter topic (%s), and it cannot be copied to %s"
                " (%s); it stays in the spool and is retried later",
                seq,
                error,
                path.parent,
                exc,
            )
            return False
        self._metrics.spool_set_aside.inc()
        logger.error("spooled record %d refused by kafka and the dead-letter topic (%s); kept in %s", seq, error, path)
        return True

    def _count_cursor_failures(self) -> None:
        failures = self._spool.spool.cursor_write_failures
        if failures > self._cursor_failures_counted:
            self._metrics.spool_cursor_write_failures.inc(failures - self._cursor_failures_counted)
            self._cursor_failures_counted = failures

    async def _pause(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)


def _write_refused(path: Path, value: bytes) -> None:
    """Write ``value`` to ``path`` (creating its directory); returns only after the fsync. Raises ``OSError``.

    A module function so tests can substitute a failing one. A partial file is removed: a retry writes it anew.
    The name is durable too: the record is committed (and leaves the spool) once this returns.
    """
    if not path.parent.is_dir():
        path.parent.mkdir(exist_ok=True)
        sync_directory(path.parent.parent)
    write_file_durably(path, value)
