"""The aiokafka sink: one long-lived producer; ``send`` returns only after the broker ack (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import BrokerResponseError, KafkaConnectionError, KafkaError, MessageSizeTooLargeError

from bridge.backoff import Backoff
from bridge.config import KafkaSettings
from bridge.delivery.partitioner import partition_for
from bridge.delivery.records import Headers
from bridge.delivery.sink import Ack
from bridge.errors import BridgeError, ConfigError, NotReady, Overloaded, PublishFailed, RecordTooLarge
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


def _sender_died(producer: AIOKafkaProducer) -> bool:
    """True when the producer's background sender has ended: it will never deliver again."""
    sender = getattr(producer, "_sender", None)  # aiokafka keeps no public handle on it
    task = getattr(sender, "sender_task", None)
    return task is not None and task.done()


class KafkaSink:
    """The default :class:`bridge.delivery.sink.Sink`: aiokafka, acks=all, idempotent unless configured off.

    :meth:`connect` retries until the broker answers (``ready`` turns true); :meth:`send` fails fast with
    :class:`NotReady` before that, with :class:`Overloaded` when ``max_in_flight`` publishes already wait,
    and with :class:`PublishFailed` when no ack arrives within ``publish_timeout_s``.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        metrics: Metrics,
        *,
        max_record_bytes: int = 1024 * 1024,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._settings = settings
        self._max_request_bytes = max_record_bytes + 64 * 1024
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._replacing: asyncio.Task[None] | None = None
        self._in_flight = 0
        #: Delivery futures of records handed to the producer and not yet acknowledged or failed; what is left
        #: of them when a bounded close gives up is counted in ``abandoned``.
        self._unacked: set[asyncio.Future[Any]] = set()
        #: Records the producer still held, unacknowledged, when :meth:`close` gave up waiting for them.
        self.abandoned = 0
        self._on_fatal = on_fatal
        metrics.feed(metrics.in_flight, lambda: self._in_flight)

    @property
    def ready(self) -> bool:
        return self._producer is not None

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
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(producer.stop()), timeout=1.0)
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
            self._metrics.kafka_connected.set(1)
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
        if self._replacing is not None:
            self._replacing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replacing
        producer, self._producer = self._producer, None
        self._metrics.kafka_connected.set(0)
        if producer is None:
            return 0
        timeout_s = self._settings.publish_timeout_s if flush_timeout_s is None else flush_timeout_s
        stopping = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
        if done:
            with contextlib.suppress(Exception):
                stopping.result()
            logger.info("kafka producer flushed and closed")
            return 0
        # An idempotent producer retries an undeliverable batch for ever: stop waiting, and say what is lost.
        self.abandoned = sum(1 for delivery in self._unacked if not delivery.done())
        stopping.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await stopping
        await _force_close(producer)
        logger.error(
            "kafka producer not flushed within %gs: abandoned %d unacknowledged records (none was answered 200 "
            "or confirmed; spooled ones stay in the spool)",
            timeout_s,
            self.abandoned,
            extra={"reason": "flush_timeout"},
        )
        return self.abandoned

    def _replace(self, broken: AIOKafkaProducer) -> None:
        """Swap a producer whose sender routine died for a new one, in the background.

        aiokafka's sender task can end on an unexpected error (seen: uvloop refusing a write to a transport a
        network reset had closed); the producer then fails every send for good. Until the replacement
        connects, publishes get :class:`NotReady` (503), so nothing is acknowledged without Kafka.
        """
        if self._producer is not broken or self._replacing is not None:
            return
        self._producer = None
        self._metrics.kafka_connected.set(0)
        self._metrics.producer_replacements.inc()
        logger.error("kafka producer's sender stopped unexpectedly; replacing the producer")
        self._replacing = asyncio.create_task(self._reconnect(broken), name="kafka-reconnect")

    async def _reconnect(self, broken: AIOKafkaProducer) -> None:
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broken.stop(), timeout=self._settings.publish_timeout_s)
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
        if _sender_died(producer):
            self._replace(producer)
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
                self._unacked.add(delivery)
                delivery.add_done_callback(self._unacked.discard)
                # Shielded: our timeout must not cancel the delivery future, which tracks the record in the
                # producer until the broker acknowledges or refuses it (counted at close if never).
                ack: Ack = await asyncio.shield(delivery)
        except TimeoutError:
            if _sender_died(producer):
                self._replace(producer)
            raise PublishFailed(f"no Kafka ack within {timeout_s:g}s for topic {topic}", cause="timeout") from None
        except MessageSizeTooLargeError as exc:
            raise RecordTooLarge(
                f"kafka refuses a record of {len(value)} bytes for topic {topic}",
                retriable=False,
                cause=type(exc).__name__,
            ) from exc
        except KafkaError as exc:
            if _sender_died(producer):
                self._replace(producer)
            raise PublishFailed(
                f"kafka error for topic {topic}: {type(exc).__name__}",
                retriable=bool(exc.retriable),
                cause=type(exc).__name__,
            ) from exc
        finally:
            self._in_flight -= 1
        self._metrics.publish_latency.observe(time.perf_counter() - started)
        return ack


async def _force_close(producer: AIOKafkaProducer, *, timeout_s: float = 2.0) -> None:
    """Close a producer whose ``stop()`` would wait for ever: end its sender routine and its connections."""
    sender = getattr(producer, "_sender", None)  # aiokafka keeps no public handle on it
    for closing in (getattr(sender, "close", None), producer.client.close):
        if closing is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(closing(), timeout=timeout_s)
