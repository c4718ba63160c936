"""The reliable-callback source: ``PullEvents`` → publish each event → ``ConfirmEvents`` for exactly the acked.

Invariant: an event handle is confirmed only after the delivery path acknowledged its record (on its topic,
or, for a body without a usable key, on the dead-letter topic), or found it an exact repeat of one Kafka
already acknowledged. Everything else is left unconfirmed, so VOD hands it out again
after its 30-second window: delivery is at least once, and duplicates keep their key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

import msgspec

from bridge.backoff import Backoff
from bridge.config import PollerSettings
from bridge.delivery.pipeline import DeadLettered, Delivery, Published, delivered
from bridge.errors import InvalidPayload, UpstreamError
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import EventTracer, NoTracer
from bridge.vod.decode import read_event
from bridge.vod.model import Undecodable, VodEvent

VodEventOrBody = VodEvent | Undecodable

logger = logging.getLogger(__name__)

#: ConfirmEvents takes at most 16 handles per call (VOD API).
CONFIRM_BATCH: Final = 16
#: VOD makes an unconfirmed event available again this long after handing it out.
VISIBILITY_WINDOW_S: Final = 30.0


class EventsApi(Protocol):
    """The two VOD API calls the poller needs (``bridge.vodapi.VodClient`` implements it)."""

    async def pull_events(self) -> list[bytes]: ...
    async def confirm_events(self, handles: Sequence[str]) -> None: ...


class _HandleOnly(msgspec.Struct):
    EventHandle: str | None = None


_handle_decoder: Final = msgspec.json.Decoder(_HandleOnly)


def event_handle_of(raw: bytes) -> str | None:
    """The ``EventHandle`` of an event that failed full decoding, when it can still be read."""
    try:
        return _handle_decoder.decode(raw).EventHandle
    except msgspec.DecodeError:
        return None


@dataclass
class PollerStats:
    """Counters for logs and tests (Prometheus has the same figures by label)."""

    pulls: int = 0
    events: int = 0
    published: int = 0
    dead_lettered: int = 0
    confirmed: int = 0
    not_confirmed: int = 0
    #: Largest time from PullEvents answer to ConfirmEvents success seen so far.
    max_confirm_age_s: float = 0.0
    confirm_ages_s: list[float] = field(default_factory=list)


class Poller:
    """Loops PullEvents → publish → ConfirmEvents until :meth:`stop`.

    A batch already pulled is always finished (published and confirmed as far as acks allow) before the
    loop exits; a pull in progress is abandoned at once, which is safe: VOD re-delivers whatever it handed
    out and was not confirmed.
    """

    def __init__(
        self,
        api: EventsApi,
        delivery: Delivery,
        settings: PollerSettings,
        metrics: Metrics,
        *,
        ready: Callable[[], bool],
        tracer: EventTracer | None = None,
    ) -> None:
        self._api = api
        self._delivery = delivery
        self._settings = settings
        self._metrics = metrics
        #: Whether Kafka can take records now: pulling while it cannot would only churn the 30 s window.
        self._ready = ready
        self._stopping = asyncio.Event()
        self._tracer = tracer or NoTracer()
        self.stats = PollerStats()

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Pull and process batches until :meth:`stop`.

        Pipelined: while up to ``max_batches_in_flight`` pulled batches are being published and confirmed,
        the next PullEvents is already under way. Each batch still confirms only its own acked handles.
        """
        logger.info("poller started: PullEvents -> kafka -> ConfirmEvents")
        backoff = Backoff(self._settings.backoff_initial_s, self._settings.backoff_max_s)
        in_flight: set[asyncio.Task[bool]] = set()
        try:
            while not self._stopping.is_set():
                if not self._ready():
                    # Pulling before Kafka answers would only hand events out to let their window expire.
                    await self._pause(0.2)
                    continue
                while len(in_flight) >= self._settings.max_batches_in_flight:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    await self._after_batches(done, backoff)
                started = time.monotonic()
                try:
                    raw_events = await self._until_stopped(self._api.pull_events())
                except UpstreamError as exc:
                    self._metrics.pulls.labels("error").inc()
                    delay_s = backoff.next_delay_s()
                    log = logger.warning if exc.retriable else logger.error
                    log("PullEvents failed (%s); retrying in %.2fs", exc.message, delay_s)
                    await self._pause(delay_s)
                    continue
                if raw_events is None:  # stopped while waiting for the long poll
                    break
                self.stats.pulls += 1
                self._metrics.pulls.labels("events" if raw_events else "empty").inc()
                if not raw_events:
                    # A long poll already waited server-side; an instant empty answer means pace ourselves.
                    if time.monotonic() - started < self._settings.idle_interval_s:
                        await self._pause(self._settings.idle_interval_s)
                    continue
                batch = asyncio.create_task(self.process_batch(raw_events, pulled_at=time.monotonic()))
                in_flight.add(batch)
                done = {task for task in in_flight if task.done()}
                in_flight -= done
                await self._after_batches(done, backoff)
        finally:
            # Batches already pulled are always finished: their acked events get confirmed.
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        logger.info(
            "poller stopped: %d pulls, %d events, %d confirmed, %d left for re-delivery, max confirm age %.3fs",
            self.stats.pulls,
            self.stats.events,
            self.stats.confirmed,
            self.stats.not_confirmed,
            self.stats.max_confirm_age_s,
        )

    async def _after_batches(self, done: set[asyncio.Task[bool]], backoff: Backoff) -> None:
        if not done:
            return
        if all(task.result() for task in done):
            backoff.reset()
            return
        # Kafka is refusing records: pulling more would only churn the visibility window.
        delay_s = backoff.next_delay_s()
        logger.warning("kafka did not ack every event; next pull in %.2fs", delay_s)
        await self._pause(delay_s)

    async def process_batch(self, raw_events: Sequence[bytes], *, pulled_at: float) -> bool:
        """Publish one pulled batch concurrently, then confirm exactly the acked handles.

        Returns True when every event with a handle was acked (and so offered for confirmation).
        """
        self.stats.events += len(raw_events)
        self._metrics.pulled_events.inc(len(raw_events))
        received_at = datetime.now(UTC)
        outcomes = await asyncio.gather(*(self._deliver_one(raw, received_at) for raw in raw_events))
        acked = [handle for handle, ok in outcomes if ok and handle is not None]
        failed = sum(1 for handle, ok in outcomes if not ok)
        self.stats.not_confirmed += failed
        await self._confirm(acked, pulled_at=pulled_at)
        return failed == 0

    async def _deliver_one(self, raw: bytes, received_at: datetime) -> tuple[str | None, bool]:
        """(handle, confirmable). Never raises for a single event: one bad event must not stop the batch."""
        with self._tracer.span("vod.pull") as span:
            try:
                item: VodEventOrBody = read_event(raw)
            except InvalidPayload as exc:
                # An EventSet item that is not a JSON object: still kept, on the dead-letter topic.
                item = Undecodable(reason=exc.reason, message=exc.message, value=raw, event_handle=event_handle_of(raw))
            span.annotate(item)
            if item.event_handle is None:
                logger.warning("pulled %s without EventHandle; delivering it anyway", item.event_type or "event")
            outcome = await self._delivery.deliver(
                item, source="pull", received_at=received_at, trace_headers=span.kafka_headers()
            )
        if isinstance(outcome, Published):
            self.stats.published += 1
        elif isinstance(outcome, DeadLettered):
            self.stats.dead_lettered += 1
        elif not delivered(outcome):
            logger.warning("pulled %s not acknowledged, left for re-delivery", item.event_type or "event")
        return item.event_handle, delivered(outcome)

    async def _confirm(self, handles: Sequence[str], *, pulled_at: float) -> None:
        """ConfirmEvents in calls of at most 16, retried while the 30-second window allows."""
        for start in range(0, len(handles), CONFIRM_BATCH):
            chunk = handles[start : start + CONFIRM_BATCH]
            if await self._confirm_chunk(chunk, pulled_at=pulled_at):
                age_s = time.monotonic() - pulled_at
                self.stats.confirmed += len(chunk)
                self.stats.max_confirm_age_s = max(self.stats.max_confirm_age_s, age_s)
                self.stats.confirm_ages_s.append(age_s)
                self._metrics.confirmed_events.inc(len(chunk))
                self._metrics.confirm_age.observe(age_s)
                log = logger.warning if age_s > self._settings.confirm_warn_after_s else logger.debug
                log(
                    "confirmed %d events %.3fs after the pull (window %.0fs)",
                    len(chunk),
                    age_s,
                    VISIBILITY_WINDOW_S,
                )
            else:
                self.stats.not_confirmed += len(chunk)

    async def _confirm_chunk(self, chunk: Sequence[str], *, pulled_at: float) -> bool:
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                await self._api.confirm_events(chunk)
                return True
            except UpstreamError as exc:
                self._metrics.confirm_errors.labels(exc.api_code or exc.code).inc()
                delay_s = backoff.next_delay_s()
                remaining_s = VISIBILITY_WINDOW_S - (time.monotonic() - pulled_at)
                if not exc.retriable or remaining_s < delay_s + 1.0:
                    # Re-delivery will bring these events back; Kafka already has them (a duplicate).
                    logger.warning(
                        "ConfirmEvents failed for %d handles (%s); VOD will re-deliver them",
                        len(chunk),
                        exc.message,
                    )
                    return False
                logger.info("ConfirmEvents failed (%s); retrying in %.2fs", exc.message, delay_s)
                await asyncio.sleep(delay_s)

    async def _until_stopped(self, call: Awaitable[list[bytes]]) -> list[bytes] | None:
        """Await ``call`` unless stop() comes first, in which case it is cancelled and None returned."""
        task = asyncio.ensure_future(call)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _pause(self, delay_s: float) -> None:
        """Sleep, but wake at once on stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
