"""The reliable-callback source: ``PullEvents`` → publish each event → ``ConfirmEvents`` for exactly the acked.

Invariant: an event handle is confirmed only after the delivery path acknowledged its record (on its topic,
or, for a body without a usable key, on the dead-letter topic), or found it an exact repeat of one Kafka
already acknowledged. Everything else is left unconfirmed, so VOD hands it out again
after its 30-second window: delivery is at least once, and duplicates keep their key.

The window is counted from when the PullEvents *request* was sent: VOD hands the events out somewhere between
the request and its answer (a long poll holds it up to 5 s), so that is the earliest the window can start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec

from bridge.backoff import Backoff
from bridge.config import PollerSettings
from bridge.delivery.pipeline import DeadLettered, Delivery, Outcome, Published, delivered
from bridge.errors import ConfigError, InvalidPayload, UpstreamError
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
#: A ConfirmEvents retry is only sent when at least its back-off plus this much is left of the window, so that
#: it can still reach VOD in time.
CONFIRM_RETRY_MARGIN_S: Final = 1.0
#: How many recent confirm ages ``PollerStats.confirm_ages_s`` keeps (one per ConfirmEvents call).
CONFIRM_AGE_SAMPLES: Final = 4096
#: The ``publish_failed`` code counted for an event whose processing raised unexpectedly (a bug).
UNEXPECTED_ERROR: Final = "internal_error"


def check_window(publish_timeout_s: float, request_timeout_s: float, *, window_s: float = VISIBILITY_WINDOW_S) -> None:
    """Raise :class:`ConfigError` when a pulled event could be acked by Kafka and still miss its confirm window.

    The worst case from the PullEvents request to VOD receiving the ConfirmEvents is the pull itself (under
    ``request_timeout_s``: a slower answer is a failed pull), the Kafka acks (under ``publish_timeout_s``: a
    slower ack leaves the event unconfirmed anyway) and one ConfirmEvents (under ``request_timeout_s``). Each is
    a strict bound, so a sum equal to the window still lands inside it.
    """
    worst_s = request_timeout_s + publish_timeout_s + request_timeout_s
    if worst_s > window_s:
        raise ConfigError(
            f"BRIDGE_VOD_REQUEST_TIMEOUT_S ({request_timeout_s:g}s, once for PullEvents and once for ConfirmEvents)"
            f" + BRIDGE_KAFKA_PUBLISH_TIMEOUT_S ({publish_timeout_s:g}s) = {worst_s:g}s exceeds the {window_s:g}s"
            " in which VOD accepts a confirm: events Kafka acked could be re-delivered; lower one of them"
        )


class EventsApi(Protocol):
    """The two VOD API calls the poller needs, for one VOD application (``bridge.vod.api.VodClient``)."""

    @property
    def sub_app_id(self) -> int | None:
        """The SubAppId both calls carry: what the poller pulls is confirmed under the same one."""
        ...

    async def pull_events(self) -> list[bytes]: ...
    async def confirm_events(self, handles: Sequence[str]) -> None: ...


class _Envelope(msgspec.Struct):
    EventHandle: str | None = None
    #: Any JSON value: a malformed EventType must not hide a readable EventHandle.
    EventType: Any = None


_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)


def _envelope_of(raw: bytes) -> _Envelope:
    try:
        return _envelope_decoder.decode(raw)
    except msgspec.DecodeError:
        return _Envelope()


def event_handle_of(raw: bytes) -> str | None:
    """The ``EventHandle`` of an event that failed full decoding, when it can still be read."""
    return _envelope_of(raw).EventHandle


@dataclass
class PollerStats:
    """Counters for logs and tests (Prometheus has the same figures by label)."""

    pulls: int = 0
    events: int = 0
    published: int = 0
    dead_lettered: int = 0
    confirmed: int = 0
    not_confirmed: int = 0
    #: Largest time from PullEvents request to ConfirmEvents success seen so far.
    max_confirm_age_s: float = 0.0
    #: The same age for the last ``CONFIRM_AGE_SAMPLES`` ConfirmEvents calls (bounded: the poller runs for months).
    confirm_ages_s: deque[float] = field(default_factory=lambda: deque(maxlen=CONFIRM_AGE_SAMPLES))


class Poller:
    """Loops PullEvents → publish → ConfirmEvents until :meth:`stop`, for the one VOD application of ``api``.

    A batch already pulled is always finished (published and confirmed as far as acks allow) before the
    loop exits; a pull in progress is abandoned at once, which is safe: VOD re-delivers whatever it handed
    out and was not confirmed.

    Several applications run one Poller each (over one session and one delivery path); each has its own
    back-off, its records carry its SubAppId (header ``vod-sub-app-id``), and it logs as
    ``bridge.sources.poller.<SubAppId>``, so one failing application is told apart from the others.
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
        window_s: float = VISIBILITY_WINDOW_S,
    ) -> None:
        """``window_s`` is VOD's confirm window; only tests shorten it."""
        self._api = api
        self._sub_app_id = sub_app_id = api.sub_app_id
        #: How logs name this loop's application; its own logger keeps one loop's repeating failure from hiding
        #: another's (the log gate groups by logger and message).
        self._app = "default app" if sub_app_id is None else f"SubAppId {sub_app_id}"
        self._log = logger if sub_app_id is None else logger.getChild(str(sub_app_id))
        label = "" if sub_app_id is None else str(sub_app_id)
        self._pulls = {outcome: metrics.pulls.labels(outcome, label) for outcome in ("events", "empty", "error")}
        self._confirmed_events = metrics.confirmed_events.labels(label)
        self._delivery = delivery
        self._settings = settings
        self._metrics = metrics
        #: Whether Kafka can take records now: pulling while it cannot would only churn the 30 s window.
        self._ready = ready
        self._stopping = asyncio.Event()
        self._tracer = tracer or NoTracer()
        self._window_s = window_s
        self.stats = PollerStats()

    @property
    def sub_app_id(self) -> int | None:
        """The VOD application this loop pulls from and confirms to (None: the default one)."""
        return self._sub_app_id

    def stop(self) -> None:
        """Ask the loop to finish its current batch and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Pull and process batches until :meth:`stop`.

        Pipelined: while up to ``max_batches_in_flight`` pulled batches are being published and confirmed,
        the next PullEvents is already under way. Each batch still confirms only its own acked handles.
        """
        self._log.info("poller started for the %s: PullEvents -> kafka -> ConfirmEvents", self._app)
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
                # Taken before the request: VOD may start an event's window as soon as the request reaches it.
                started = time.monotonic()
                try:
                    raw_events = await self._until_stopped(self._api.pull_events())
                except UpstreamError as exc:
                    self._pulls["error"].inc()
                    delay_s = backoff.next_delay_s()
                    log = self._log.warning if exc.retriable else self._log.error
                    log("PullEvents for the %s failed (%s); retrying in %.2fs", self._app, exc.message, delay_s)
                    await self._pause(delay_s)
                    continue
                if raw_events is None:  # stopped while waiting for the long poll
                    break
                self.stats.pulls += 1
                self._pulls["events" if raw_events else "empty"].inc()
                if not raw_events:
                    # A long poll already waited server-side; an instant empty answer means pace ourselves.
                    if time.monotonic() - started < self._settings.idle_interval_s:
                        await self._pause(self._settings.idle_interval_s)
                    continue
                batch = asyncio.create_task(self.process_batch(raw_events, pulled_at=started))
                in_flight.add(batch)
                done = {task for task in in_flight if task.done()}
                in_flight -= done
                await self._after_batches(done, backoff)
        finally:
            # Batches already pulled are always finished: their acked events get confirmed.
            if in_flight:
                for result in await asyncio.gather(*in_flight, return_exceptions=True):
                    if isinstance(result, Exception):
                        self._log.error("a pulled batch failed unexpectedly while stopping", exc_info=result)
        self._log.info(
            "poller stopped for the %s: %d pulls, %d events, %d confirmed, %d left for re-delivery,"
            " max confirm age %.3fs",
            self._app,
            self.stats.pulls,
            self.stats.events,
            self.stats.confirmed,
            self.stats.not_confirmed,
            self.stats.max_confirm_age_s,
        )

    async def _after_batches(self, done: set[asyncio.Task[bool]], backoff: Backoff) -> None:
        if not done:
            return
        all_acked = True
        for task in done:
            if (exc := task.exception()) is not None:
                # A bug outside the per-event handling (e.g. in confirming): VOD re-delivers what was not confirmed.
                self._log.error(
                    "a pulled batch failed unexpectedly; VOD will re-deliver what it did not confirm", exc_info=exc
                )
                self._metrics.publish_failed.labels("pull", UNEXPECTED_ERROR).inc()
                all_acked = False
            elif not task.result():
                all_acked = False
        if all_acked:
            backoff.reset()
            return
        # Kafka is refusing records: pulling more would only churn the visibility window.
        delay_s = backoff.next_delay_s()
        self._log.warning("kafka did not ack every event; next pull in %.2fs", delay_s)
        await self._pause(delay_s)

    async def process_batch(self, raw_events: Sequence[bytes], *, pulled_at: float) -> bool:
        """Publish one pulled batch concurrently, then confirm exactly the acked handles.

        ``pulled_at`` is the ``time.monotonic()`` at which the PullEvents request was sent: the confirm window is
        counted from there. Returns True when every event with a handle was acked (and so offered for
        confirmation).
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
        try:
            item, outcome = await self._deliver(raw, received_at)
        except Exception:
            # A bug, not a delivery failure (those are outcomes): leave this event to VOD's re-delivery and let
            # the rest of the batch be confirmed.
            envelope = _envelope_of(raw)
            event_type = envelope.EventType if isinstance(envelope.EventType, str) and envelope.EventType else "event"
            self._log.exception(
                "pulled %s (handle %s) failed unexpectedly; left for re-delivery", event_type, envelope.EventHandle
            )
            self._metrics.publish_failed.labels("pull", UNEXPECTED_ERROR).inc()
            return envelope.EventHandle, False
        if isinstance(outcome, Published):
            self.stats.published += 1
        elif isinstance(outcome, DeadLettered):
            self.stats.dead_lettered += 1
        elif not delivered(outcome):
            self._log.warning("pulled %s not acknowledged, left for re-delivery", item.event_type or "event")
        return item.event_handle, delivered(outcome)

    async def _deliver(self, raw: bytes, received_at: datetime) -> tuple[VodEventOrBody, Outcome]:
        with self._tracer.span("vod.pull") as span:
            try:
                item: VodEventOrBody = read_event(raw)
            except InvalidPayload as exc:
                # An EventSet item that is not a JSON object: still kept, on the dead-letter topic.
                item = Undecodable(reason=exc.reason, message=exc.message, value=raw, event_handle=event_handle_of(raw))
            span.annotate(item)
            if item.event_handle is None:
                self._log.warning("pulled %s without EventHandle; delivering it anyway", item.event_type or "event")
            outcome = await self._delivery.deliver(
                item,
                source="pull",
                received_at=received_at,
                sub_app_id=self._sub_app_id,
                trace_headers=span.kafka_headers(),
            )
        return item, outcome

    async def _confirm(self, handles: Sequence[str], *, pulled_at: float) -> None:
        """ConfirmEvents in calls of at most 16, retried while the 30-second window allows."""
        for start in range(0, len(handles), CONFIRM_BATCH):
            chunk = handles[start : start + CONFIRM_BATCH]
            if await self._confirm_chunk(chunk, pulled_at=pulled_at):
                age_s = time.monotonic() - pulled_at
                self.stats.confirmed += len(chunk)
                self.stats.max_confirm_age_s = max(self.stats.max_confirm_age_s, age_s)
                self.stats.confirm_ages_s.append(age_s)
                self._confirmed_events.inc(len(chunk))
                self._metrics.confirm_age.observe(age_s)
                log = self._log.warning if age_s > self._settings.confirm_warn_after_s else self._log.debug
                log(
                    "confirmed %d events %.3fs after the PullEvents request (window %.0fs)",
                    len(chunk),
                    age_s,
                    self._window_s,
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
                remaining_s = self._window_s - (time.monotonic() - pulled_at)
                if not exc.retriable or remaining_s < delay_s + CONFIRM_RETRY_MARGIN_S:
                    # Re-delivery will bring these events back; Kafka already has them (a duplicate).
                    self._log.warning(
                        "ConfirmEvents failed for %d handles (%s); VOD will re-deliver them",
                        len(chunk),
                        exc.message,
                    )
                    return False
                self._log.info("ConfirmEvents failed (%s); retrying in %.2fs", exc.message, delay_s)
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
