"""The aiokafka sink: one long-lived producer; ``send`` returns only after the broker ack (acks=all)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerClosed,
)
from aiokafka.protocol.metadata import MetadataRequest

from bridge.backoff import Backoff
from bridge.config import KafkaSettings
from bridge.delivery import aiokafka_patch
from bridge.delivery.partitioner import partition_for
from bridge.delivery.progress import PROBE_INTERVAL_S, PROBE_TIMEOUT_S, REPLACEMENT_CAUSES, ProgressWatch
from bridge.delivery.records import Headers
from bridge.delivery.sink import Ack
from bridge.errors import (
    PRODUCER_REPLACED,
    BridgeError,
    ConfigError,
    NotReady,
    Overloaded,
    PublishFailed,
    RecordTooLarge,
)
from bridge.ops.metrics import Metrics

logger = logging.getLogger(__name__)


def connection_options(settings: KafkaSettings) -> dict[str, Any]:
    """The aiokafka options that reach the cluster (bootstrap, SASL, TLS), shared by every client we create."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism is not None:
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password,
        }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(cafile=settings.ssl_cafile)
    return options


class IdempotenceUnsupported(ConfigError):
    """The broker rejected the idempotent producer's InitProducerId request."""


class ProducerUnavailable(BridgeError):
    """A producer whose sender died could not be replaced within the configured attempts: the process should
    be restarted (by its orchestrator) rather than answer 503 for ever."""


#: How long a replaced producer's ``stop()`` may try before it is closed by force: a producer replaced because it
#: stopped making progress cannot flush anything.
RETIRE_TIMEOUT_S: Final = 1.0


def _broken(producer: AIOKafkaProducer, *, metadata_task: bool = True) -> str | None:
    """Why the producer will never deliver again (a ``reason`` label), or None: one of the background tasks it
    depends on has ended — the sender, or (``metadata_task``) the client's metadata task (aiokafka issue #1038:
    without it, every produce request that met a connection error waits for ever for a metadata update)."""
    sender = getattr(producer, "_sender", None)  # aiokafka keeps no public handle on either task
    task = getattr(sender, "sender_task", None)
    if task is not None and task.done():
        return "sender_died"
    if not metadata_task:
        return None
    sync_task = getattr(producer.client, "_sync_task", None)
    if sync_task is not None and sync_task.done():
        return "metadata_task_died"
    return None


class KafkaSink:
    """The default :class:`bridge.delivery.sink.Sink`: aiokafka, acks=all, idempotent unless configured off.

    :meth:`connect` retries until the broker answers (``ready`` turns true); :meth:`send` fails fast with
    :class:`NotReady` before that, with :class:`Overloaded` when ``max_in_flight`` publishes already wait,
    and with :class:`PublishFailed` when no ack arrives within ``publish_timeout_s``.

    Once connected, a watchdog replaces the producer (``vod_bridge_producer_replacements_total{reason}``) when a
    task it depends on died, or when it is stalled (:mod:`bridge.delivery.progress`: records wait for more than
    ``stall_timeout_s`` while the cluster answers), and probes the cluster when nothing was acknowledged for a
    second, so that ``reachable`` stays current. ``watchdog=False`` turns both off, and leaves only a dead sender
    noticed by :meth:`send`, as before (tests show what the watchdog prevents).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        metrics: Metrics,
        *,
        max_record_bytes: int = 1024 * 1024,
        on_fatal: Callable[[BaseException], None] | None = None,
        watchdog: bool = True,
    ) -> None:
        aiokafka_patch.apply()  # aiokafka issue #1038; once per process
        self._settings = settings
        self._max_request_bytes = max_record_bytes + 64 * 1024
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._replacing: asyncio.Task[None] | None = None
        #: The producer being replaced, until it is closed.
        self._retiring: AIOKafkaProducer | None = None
        self._watching: asyncio.Task[None] | None = None
        self._watchdog = watchdog
        self._watch = ProgressWatch(settings.stall_timeout_s)
        self._in_flight = 0
        #: Delivery futures of records handed to the producer and not yet acknowledged or failed, with the
        #: monotonic time each was sent (oldest first: a dict keeps insertion order); what is left of them when a
        #: bounded close gives up is counted in ``abandoned``.
        self._unacked: dict[asyncio.Future[Any], float] = {}
        #: Records the producer still held, unacknowledged, when :meth:`close` gave up waiting for them.
        self.abandoned = 0
        self._on_fatal = on_fatal
        metrics.feed(metrics.in_flight, lambda: self._in_flight)
        metrics.feed(metrics.kafka_connected, lambda: float(self.ready and self.reachable))

    @property
    def ready(self) -> bool:
        return self._producer is not None

    @property
    def reachable(self) -> bool:
        """True while the cluster answered (an ack or a metadata probe) within the last few seconds."""
        return self._watch.reachable

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _make_producer(self) -> AIOKafkaProducer:
        s = self._settings
        kwargs: dict[str, Any] = {
            "client_id": s.client_id,
            "acks": "all",
            "enable_idempotence": s.enable_idempotence,
            "linger_ms": s.linger_ms,
            "max_batch_size": s.max_batch_bytes,
            "compression_type": None if s.compression == "none" else s.compression,
            "request_timeout_ms": max(1000, int(s.publish_timeout_s * 1000)),
            # Room for the largest accepted callback plus headers; the broker's message.max.bytes must allow
            # it too (README "Kafka requirements").
            "max_request_size": self._max_request_bytes,
            "partitioner": partition_for,
            **connection_options(s),
        }
        return AIOKafkaProducer(**kwargs)

    async def connect(
        self, *, retry_delay_s: float = 0.5, max_retry_delay_s: float = 10.0, max_attempts: int | None = None
    ) -> None:
        """Start the producer, retrying connection errors with jittered backoff (for ever by default).

        Raises :class:`IdempotenceUnsupported` at once if the broker refuses the idempotent producer, since
        retrying cannot help there, and :class:`ProducerUnavailable` after ``max_attempts`` failed attempts.
        Cancelling it closes the producer being started, within a bound.
        """
        attempt = 0
        backoff = Backoff(retry_delay_s, max_retry_delay_s)
        while True:
            attempt += 1
            producer = self._make_producer()
            try:
                await producer.start()
            except asyncio.CancelledError:
                # Shutdown while connecting: do not leave its connections and tasks behind, nor wait for them.
                await _bounded(producer.stop(), 1.0)
                raise
            except KafkaConnectionError as exc:
                await producer.stop()
                if max_attempts is not None and attempt >= max_attempts:
                    raise ProducerUnavailable(
                        f"kafka not reachable at {self._settings.bootstrap_servers} after {attempt} attempts: {exc}"
                    ) from None
                delay_s = backoff.next_delay_s()
                logger.warning(
                    "kafka not reachable at %s (attempt %d): %s; retrying in %.1fs",
                    self._settings.bootstrap_servers,
                    attempt,
                    exc,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                continue
            except BrokerResponseError as exc:
                await producer.stop()
                if self._settings.enable_idempotence:
                    raise IdempotenceUnsupported(
                        f"the broker refused the idempotent producer (InitProducerId: {exc}); set "
                        "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false for brokers without support, e.g. tansu"
                    ) from None
                raise
            self._producer = producer
            self._watch.answered()  # start() fetched the cluster's metadata
            if self._watchdog and self._watching is None:
                self._watching = asyncio.create_task(self._watch_producer(), name="kafka-watchdog")
            logger.info(
                "kafka producer connected to %s (acks=all, idempotence=%s)",
                self._settings.bootstrap_servers,
                self._settings.enable_idempotence,
            )
            return

    async def close(self, *, flush_timeout_s: float | None = None) -> int:
        """Flush buffered records and close the producer, within ``flush_timeout_s`` (default: the publish
        timeout) whatever Kafka does. Returns how many records were abandoned unacknowledged (also kept in
        ``abandoned``); no caller was told any of them was delivered."""
        for task in (self._watching, self._replacing):
            if task is not None:
                task.cancel()
                await _bounded(task, RETIRE_TIMEOUT_S)
        self._watching = None
        if self._retiring is not None:  # a replacement was cut short before the old producer was closed
            await _force_close(self._retiring, KafkaConnectionError("the producer was closed while being replaced"))
            self._retiring = None
        producer, self._producer = self._producer, None
        if producer is None:
            return 0
        timeout_s = self._settings.publish_timeout_s if flush_timeout_s is None else flush_timeout_s
        if await _bounded(producer.stop(), timeout_s):
            logger.info("kafka producer flushed and closed")
            return 0
        # An idempotent producer retries an undeliverable batch for ever: stop waiting, and say what is lost.
        self.abandoned = sum(1 for delivery in self._unacked if not delivery.done())
        await _force_close(producer, KafkaConnectionError("the producer was closed before the broker acknowledged"))
        logger.warning(
            "kafka producer not flushed within %gs: abandoned %d unacknowledged records (none was answered 200 "
            "or confirmed; spooled ones stay in the spool)",
            timeout_s,
            self.abandoned,
            extra={"reason": "flush_timeout"},
        )
        return self.abandoned

    async def _watch_producer(self) -> None:
        """The watchdog: once a second, replace a producer that is broken or stalled, else probe the cluster if
        it said nothing for a second."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            producer = self._producer
            if producer is None:  # being replaced, or closing
                continue
            reason = _broken(producer)
            if reason is None and self._watch.stalled(next(iter(self._unacked.values()), None)):
                reason = "stalled"
            if reason is not None:
                self._replace(producer, reason)
            elif self._watch.quiet_for_s() >= PROBE_INTERVAL_S:
                try:
                    await self._probe(producer)
                except Exception:  # an unexpected error must not end the watchdog (a probe is only a probe)
                    logger.exception("kafka metadata probe failed unexpectedly")

    async def _probe(self, producer: AIOKafkaProducer) -> None:
        """Ask one broker for metadata (no topics: the smallest request there is); an answer is reachability."""
        client = producer.client
        node_id = client.get_random_node()
        if node_id is None:
            return
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await client.send(node_id, MetadataRequest([]))
        except (KafkaError, TimeoutError, OSError):
            return  # not answering: ``reachable`` turns False once the window passed
        self._watch.answered()

    def _replace(self, broken: AIOKafkaProducer, reason: str) -> None:
        """Swap a producer that will not deliver again for a new one, in the background.

        ``reason``: ``sender_died`` (aiokafka's sender task ended on an unexpected error), ``metadata_task_died``
        (issue #1038), ``stalled`` (records waited for ``stall_timeout_s`` while the cluster answered). Until the
        replacement connects, publishes get :class:`NotReady` (503), so nothing is acknowledged without Kafka.
        The new producer gets a new producer id; what the old one held was never acknowledged to anyone: its
        sends fail (503, or they stay spooled) and are sent again, at least once.
        """
        if self._producer is not broken or self._replacing is not None:
            return
        self._producer = None
        self._metrics.producer_replacements.labels(reason).inc()
        if reason == "stalled":
            self._watch.replaced()
        logger.error(
            "kafka producer %s; replacing the producer (%d records unacknowledged)",
            REPLACEMENT_CAUSES[reason],
            len(self._unacked),
            extra={"reason": reason},
        )
        self._retiring = broken
        self._replacing = asyncio.create_task(self._reconnect(broken), name="kafka-reconnect")

    async def _reconnect(self, broken: AIOKafkaProducer) -> None:
        try:
            # A stalled producer's stop() waits for batches that cannot be delivered: closed by force after 1 s.
            await _bounded(broken.stop(), RETIRE_TIMEOUT_S)
            await _force_close(broken, KafkaConnectionError("the producer was replaced before the broker acknowledged"))
            self._retiring = None
            await self.connect(max_attempts=self._settings.replace_max_attempts)
        except Exception as exc:
            logger.critical("could not replace the kafka producer (%s); stopping so that it can be restarted", exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)
        finally:
            self._replacing = None

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, *, timeout_s: float | None = None
    ) -> Ack:
        """Send one record and wait for the broker ack, at most ``timeout_s`` (default: the publish timeout).

        Raises :class:`NotReady`, :class:`Overloaded`, :class:`RecordTooLarge` (not retriable) or
        :class:`PublishFailed`.
        """
        producer = self._producer
        if producer is None:
            raise NotReady("kafka producer is not connected yet")
        if (reason := _broken(producer, metadata_task=self._watchdog)) is not None:
            self._replace(producer, reason)
            raise NotReady("kafka producer failed and is being replaced")
        if self._in_flight >= self._settings.max_in_flight:
            raise Overloaded(f"{self._in_flight} publishes already awaiting a Kafka ack", retry_after_s=1)
        timeout_s = timeout_s or self._settings.publish_timeout_s
        self._in_flight += 1
        started = time.perf_counter()
        try:
            # Bounds both the wait for buffer space/metadata in send() and the wait for the ack; a record
            # already handed to the producer may still be delivered later (at-least-once, same key).
            async with asyncio.timeout(timeout_s):
                delivery = await producer.send(topic, value, key=key, headers=headers)
                self._unacked[delivery] = time.monotonic()
                delivery.add_done_callback(self._settled)
                # Shielded: our timeout must not cancel the delivery future, which tracks the record in the
                # producer until the broker acknowledges or refuses it (counted at close if never).
                ack: Ack = await asyncio.shield(delivery)
        except TimeoutError:
            if (reason := _broken(producer, metadata_task=self._watchdog)) is not None:
                self._replace(producer, reason)
            raise PublishFailed(f"no Kafka ack within {timeout_s:g}s for topic {topic}", cause="timeout") from None
        except MessageSizeTooLargeError as exc:
            raise RecordTooLarge(
                f"kafka refuses a record of {len(value)} bytes for topic {topic}",
                retriable=False,
                cause=type(exc).__name__,
            ) from exc
        except RuntimeError as exc:  # KafkaError, or what killed the sender: its records fail with that error
            if (reason := _broken(producer, metadata_task=self._watchdog)) is not None:
                self._replace(producer, reason)
            if reason is not None or self._producer is not producer or isinstance(exc, ProducerClosed):
                # The producer failed or was replaced, not the record: another producer (or the spool) can take it.
                raise PublishFailed(
                    f"kafka producer failed or was replaced while sending to {topic} ({type(exc).__name__})",
                    cause=PRODUCER_REPLACED,
                ) from exc
            if not isinstance(exc, KafkaError):
                raise
            raise PublishFailed(
                f"kafka error for topic {topic}: {type(exc).__name__}",
                retriable=bool(exc.retriable),
                cause=type(exc).__name__,
            ) from exc
        finally:
            self._in_flight -= 1
        self._metrics.publish_latency.observe(time.perf_counter() - started)
        return ack

    def _settled(self, delivery: asyncio.Future[Any]) -> None:
        self._unacked.pop(delivery, None)
        if not delivery.cancelled() and delivery.exception() is None:
            self._watch.answered()


async def _bounded(awaitable: Awaitable[Any], timeout_s: float) -> bool:
    """Await ``awaitable`` for at most ``timeout_s``, ignoring how it ends; True when it ended in time. Past the
    bound it is cancelled and not waited for (``wait_for`` would wait for its cancellation, unbounded if it
    ignores it). A cancellation of the caller propagates, and cancels it too."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        return False
    if not task.cancelled():
        task.exception()  # retrieved: how a close ends is not a caller's error
    return True


async def _force_close(producer: AIOKafkaProducer, error: KafkaError, *, timeout_s: float = 2.0) -> None:
    """Close a producer whose ``stop()`` would wait for ever, leaving none of its tasks or connections behind:
    close its client (metadata task, connections), let the produce tasks that wait for a metadata update that
    will never come go on, end its sender routine, and fail every record it still holds with ``error``."""
    client = producer.client
    await _bounded(client.close(), timeout_s)
    # With the metadata task gone (closed now, or dead: issue #1038) nobody resolves the metadata update future,
    # and the sender's produce tasks wait on it (a failed request asks for a new one), while the sender's close
    # waits for them: a resolved one, left in place, lets them go on at once.
    waiting_for_metadata = getattr(client, "_md_update_fut", None)  # aiokafka keeps no public handle on it
    if waiting_for_metadata is None:
        waiting_for_metadata = client._md_update_fut = asyncio.get_running_loop().create_future()
    if not waiting_for_metadata.done():
        waiting_for_metadata.set_result(False)
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        await _bounded(sender.close(), timeout_s)
    # Fails the delivery futures (the sends awaiting them get PublishFailed) and ends stop()'s flush, if any.
    accumulator = producer._message_accumulator
    queued = [batch for batches in accumulator._batches.values() for batch in batches]
    # A batch sent once and queued again for a retry is no longer in the pending set, but its future's callback
    # removes it from there when it fails (a KeyError logged by the loop): put it back for that.
    accumulator._pending_batches.update(queued)
    accumulator.fail_all(error)
    # Each failed batch also fails its drain waiter, which only a sender would have read: read it here, or asyncio
    # logs "Future exception was never retrieved" for each.
    for batch in accumulator._pending_batches:
        waiter = getattr(batch, "_drain_waiter", None)
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()
