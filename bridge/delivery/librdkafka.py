"""The librdkafka sink (confluent-kafka): the contract of :class:`bridge.delivery.kafka.KafkaSink` — ``send``
returns only after the broker ack (acks=all), a key lands on the same partition — with librdkafka's C producer
doing the batching, compression, retries and socket I/O on its own threads.

Threads. librdkafka runs its broker threads; a delivery report only reaches Python when some thread calls
``poll``. One thread of ours, ``librdkafka-poll``, blocks in ``Producer.poll`` for the producer's lifetime and so
serves delivery reports, statistics and librdkafka's log lines; it hands each batch of delivery reports to the
event loop with one ``call_soon_threadsafe``, where they resolve the futures ``send`` awaits. The calls that
block for a while (``list_topics`` while connecting, the bounded flush and the destroy at close) run on
short-lived daemon threads, so that neither the event loop nor the interpreter's exit ever waits on librdkafka.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer, libversion

from bridge.backoff import Backoff
from bridge.config import KafkaSettings
from bridge.delivery.kafka import IdempotenceUnsupported, ProducerUnavailable
from bridge.delivery.progress import PROBE_INTERVAL_S, PROBE_TIMEOUT_S, REPLACEMENT_CAUSES, ProgressWatch
from bridge.delivery.records import Headers
from bridge.delivery.sink import Ack
from bridge.errors import ConfigError, NotReady, Overloaded, PublishFailed, RecordTooLarge
from bridge.ops.metrics import Metrics
from bridge.threads import DaemonCalls

logger = logging.getLogger(__name__)
#: librdkafka's own log lines (connection failures, broker state), like aiokafka's under ``aiokafka``.
client_logger = logging.getLogger("librdkafka")


#: How long one ``poll`` blocks when nothing happens: the poll thread notices a stop within this. A delivery
#: report ends the wait at once, so this costs no latency; idle, it is 10 wake-ups a second.
POLL_TIMEOUT_S: Final = 0.1
#: With idempotence on, librdkafka's statistics (``eos.idemp_state``) are the one place that says whether the
#: producer holds its producer id; every 200 ms costs about 0.5 ms of CPU a second (measured) and delays
#: readiness by at most that.
STATS_INTERVAL_MS: Final = 200
#: Bound on one metadata request while connecting: short, since librdkafka keeps connecting between attempts
#: (a slow TLS or SASL handshake still completes), and close() waits for a running one before destroying.
CONNECT_ATTEMPT_TIMEOUT_S: Final = 2.0
#: What ``close`` may take beyond its flush bound: the end of a connect attempt, stopping the poll thread,
#: purging, destroying the handle.
DESTROY_TIMEOUT_S: Final = CONNECT_ATTEMPT_TIMEOUT_S + 1.0

#: produce() raises MSG_SIZE_TOO_LARGE itself for a record above message.max.bytes; a broker refusal is the same.
_TOO_LARGE: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
#: Refusals that no later attempt can turn into an ack (aiokafka's matching errors are not retriable either):
#: a spooled record refused so is dead-lettered instead of blocking the spool. librdkafka sets no retriable
#: flag on delivery reports, so everything else — local timeouts, unreachable brokers, a missing topic, records
#: purged at close — counts as retriable: librdkafka already retried what it could until message.timeout.ms.
_REFUSED_FOR_GOOD: Final = _TOO_LARGE | {
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_TIMESTAMP,
    KafkaError.INVALID_REQUIRED_ACKS,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
}
_TIMED_OUT: Final = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT})


class ProducerFatalError(ProducerUnavailable):
    """librdkafka raised a fatal error (idempotent producer only: e.g. the broker lost the producer's sequence
    state); this producer never delivers again, so the process should be restarted."""


class Delivered(NamedTuple):
    """The broker ack of one record (satisfies :class:`bridge.delivery.sink.Ack`)."""

    topic: str
    partition: int
    offset: int


class _Stats(msgspec.Struct):
    eos: dict[str, Any] | None = None


_stats_decoder: Final = msgspec.json.Decoder(_Stats)


def producer_config(settings: KafkaSettings, *, max_record_bytes: int) -> dict[str, Any]:
    """The librdkafka configuration equivalent to :class:`KafkaSink`'s aiokafka options (README "Kafka client")."""
    s = settings
    publish_timeout_ms = max(1000, int(s.publish_timeout_s * 1000))
    config: dict[str, Any] = {
        "bootstrap.servers": s.bootstrap_servers,
        "client.id": s.client_id,
        "acks": "all",
        "enable.idempotence": s.enable_idempotence,
        # Java's and aiokafka's default partitioner (bridge.delivery.partitioner): murmur2 of the key; a record
        # without key goes to a random partition. librdkafka's default (consistent_random) would use CRC32.
        "partitioner": "murmur2_random",
        "linger.ms": s.linger_ms,
        "batch.size": s.max_batch_bytes,
        "compression.type": s.compression,
        # Room for the largest accepted callback plus headers, as aiokafka's max_request_size; the broker's
        # message.max.bytes must allow it too (README "Kafka requirements").
        "message.max.bytes": max_record_bytes + 64 * 1024,
        # librdkafka gives a record up (delivery report _MSG_TIMED_OUT) once the publish timeout has passed
        # since produce(), queueing and retries included, so nothing lingers in the producer for long. A send
        # that stopped waiting earlier (its own timeout_s, e.g. the spool budget) was answered 503 or spooled,
        # yet its record may still be acknowledged afterwards: delivery is at least once, and a late ack is
        # a duplicate with the same key, never a loss.
        "message.timeout.ms": publish_timeout_ms,
        "request.timeout.ms": publish_timeout_ms,
        # The queue holds sends awaiting their ack plus records whose sender stopped waiting; bounding it like
        # the sends keeps memory bounded during an outage: beyond it produce() fails and the caller gets 503.
        "queue.buffering.max.messages": s.max_in_flight,
        "security.protocol": s.security_protocol,
    }
    if s.sasl_mechanism is not None:
        config |= {
            "sasl.mechanism": s.sasl_mechanism,
            "sasl.username": s.sasl_username,
            "sasl.password": s.sasl_password,
        }
    if s.security_protocol in ("SSL", "SASL_SSL") and s.ssl_cafile is not None:
        # Unset, the wheel's statically linked OpenSSL probes the system's usual CA paths (the system CAs).
        config["ssl.ca.location"] = s.ssl_cafile
    return config


class LibrdkafkaSink:
    """A :class:`bridge.delivery.sink.Sink` on librdkafka, with :class:`KafkaSink`'s surface and guarantees.

    :meth:`connect` creates the producer and returns once the cluster answered a metadata request and, with
    idempotence on, librdkafka holds a producer id: ``ready`` then means a send can be acknowledged. ``send`` fails
    fast with :class:`NotReady` before that (or after a fatal error), with :class:`Overloaded` when
    ``max_in_flight`` sends already wait or librdkafka's queue is full, and with :class:`PublishFailed` when no
    ack arrives within its timeout. :meth:`close` flushes within a bound and counts what it abandons.

    Once connected, a watchdog replaces the ``Producer`` handle (``vod_bridge_producer_replacements_total{reason}``)
    when the poll thread ended or the producer stalled (:mod:`bridge.delivery.progress`: records waited for more
    than ``stall_timeout_s`` without any settling while the cluster answered), and asks the cluster for the topic's
    metadata when nothing was acknowledged for a second, so that ``reachable`` stays current. librdkafka's fatal
    errors still stop the process (``on_fatal``). ``watchdog=False`` turns it off.
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
        self._settings = settings
        self._max_record_bytes = max_record_bytes
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Producer | None = None
        self._ready = False
        self._in_flight = 0
        #: Delivery reports served by a librdkafka thread, waiting for the event loop: (future, generation of the
        #: producer handle that sent it, error, message).
        self._reports: collections.deque[tuple[asyncio.Future[Ack], int, KafkaError | None, Message]] = (
            collections.deque()
        )
        self._polling: threading.Thread | None = None
        self._stop_polling = threading.Event()
        #: Blocking librdkafka calls (list_topics, flush): the handle is not destroyed under them.
        self._calls = DaemonCalls()
        #: Set once librdkafka holds a producer id (idempotence), or has failed for good (one per producer).
        self._pid_settled = asyncio.Event()
        #: Which producer handle is the current one: callbacks of a replaced one are ignored.
        self._generation = 0
        self._watchdog = watchdog
        self._watching: asyncio.Task[None] | None = None
        self._replacing: asyncio.Task[None] | None = None
        self._watch = ProgressWatch(settings.stall_timeout_s)
        #: Records the current handle was given and has not reported on yet (acked, refused, given up or purged),
        #: and since when it has held records without any of them settling at the broker (None: none held).
        self._held = 0
        self._waiting_since: float | None = None
        self._fatal: ProducerFatalError | None = None
        #: The last error librdkafka reported (error_cb), to say why connecting does not succeed.
        self._last_error: str | None = None
        #: Records the producer still held, unacknowledged, when :meth:`close` gave up waiting for them.
        self.abandoned = 0
        metrics.feed(metrics.in_flight, lambda: self._in_flight)
        metrics.feed(metrics.kafka_connected, lambda: float(self.ready and self.reachable))

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reachable(self) -> bool:
        """True while the cluster answered (an ack or a metadata probe) within the last few seconds."""
        return self._watch.reachable

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def connect(
        self, *, retry_delay_s: float = 0.5, max_retry_delay_s: float = 10.0, max_attempts: int | None = None
    ) -> None:
        """Start the producer and wait until the cluster answers (and, with idempotence, until librdkafka got
        its producer id), retrying with jittered back-off (for ever by default).

        Raises :class:`ConfigError` for a configuration librdkafka refuses, :class:`IdempotenceUnsupported` if
        the idempotent producer fails fatally before it got a producer id, and :class:`ProducerUnavailable`
        after ``max_attempts`` failed attempts. Cancelling it is safe; :meth:`close` releases what it started.
        """
        producer = self._producer or self._start()
        attempt_timeout_s = min(max(1.0, self._settings.publish_timeout_s), CONNECT_ATTEMPT_TIMEOUT_S)
        backoff = Backoff(retry_delay_s, max_retry_delay_s)
        attempt = 0
        while True:
            attempt += 1
            problem = await self._probe(producer, attempt_timeout_s)
            if self._producer is not producer:
                raise NotReady("kafka producer closed while connecting")
            if self._fatal is not None:
                if not self._settings.enable_idempotence:
                    raise self._fatal
                # librdkafka's fatal errors come from the idempotent producer only.
                raise IdempotenceUnsupported(
                    f"the idempotent producer failed before it got a producer id ({self._fatal.message}); set "
                    "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false for brokers without support, or grant IdempotentWrite"
                ) from None
            if problem is None:
                break
            if max_attempts is not None and attempt >= max_attempts:
                raise ProducerUnavailable(
                    f"kafka not reachable at {self._settings.bootstrap_servers} after {attempt} attempts: {problem}"
                )
            delay_s = backoff.next_delay_s()
            logger.warning(
                "kafka not reachable at %s (attempt %d): %s; retrying in %.1fs",
                self._settings.bootstrap_servers,
                attempt,
                problem,
                delay_s,
            )
            await asyncio.sleep(delay_s)
        self._ready = True
        self._watch.answered()  # the metadata request of the last attempt
        if self._watchdog and self._watching is None:
            self._watching = asyncio.create_task(self._watch_producer(), name="librdkafka-watchdog")
        logger.info(
            "kafka producer (librdkafka %s) connected to %s (acks=all, idempotence=%s)",
            libversion()[0],
            self._settings.bootstrap_servers,
            self._settings.enable_idempotence,
        )

    def _start(self) -> Producer:
        self._loop = asyncio.get_running_loop()
        config = producer_config(self._settings, max_record_bytes=self._max_record_bytes)
        self._generation += 1
        self._held, self._waiting_since = 0, None
        self._pid_settled = asyncio.Event()
        config |= {
            "error_cb": functools.partial(self._on_error, self._generation),
            "logger": client_logger,
            "log_level": _syslog_level(client_logger),
        }
        if self._settings.enable_idempotence:
            config |= {
                "stats_cb": functools.partial(self._on_stats, self._pid_settled),
                "statistics.interval.ms": STATS_INTERVAL_MS,
            }
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise ConfigError(f"librdkafka refused the producer configuration: {exc.args[0].str()}") from None
        self._producer = producer
        self._stop_polling = threading.Event()
        self._polling = threading.Thread(
            target=self._poll,
            args=(producer, self._stop_polling, self._generation),
            name="librdkafka-poll",
            daemon=True,
        )
        self._polling.start()
        return producer

    async def _probe(self, producer: Producer, timeout_s: float) -> str | None:
        """None once the cluster answered a metadata request (and the producer id is there), else why not."""
        try:
            await self._calls.run(functools.partial(producer.list_topics, timeout=timeout_s), name="librdkafka-connect")
        except KafkaException as exc:
            return self._last_error or exc.args[0].str()
        if not self._settings.enable_idempotence:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._pid_settled.wait()
                return None  # or failed for good: connect() looks
        return "no producer id from the cluster yet (InitProducerId)"

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, *, timeout_s: float | None = None
    ) -> Ack:
        """Send one record and wait for the broker ack, at most ``timeout_s`` (default: the publish timeout).

        Raises :class:`NotReady`, :class:`Overloaded`, :class:`RecordTooLarge` (not retriable) or
        :class:`PublishFailed`.
        """
        producer = self._producer
        if producer is None or not self._ready:
            raise NotReady(
                "kafka producer is not connected yet" if self._fatal is None else "kafka producer failed for good"
            )
        if self._in_flight >= self._settings.max_in_flight:
            raise Overloaded(f"{self._in_flight} publishes already awaiting a Kafka ack", retry_after_s=1)
        timeout_s = timeout_s or self._settings.publish_timeout_s
        assert self._loop is not None
        delivery: asyncio.Future[Ack] = self._loop.create_future()
        # confluent-kafka's stub wants list[tuple[str, str | bytes | None]]; a list of (str, bytes) is one.
        record_headers: Any = headers
        started = time.perf_counter()
        try:
            producer.produce(
                topic,
                value,
                key,
                headers=record_headers,
                on_delivery=functools.partial(self._delivered, delivery, self._generation),
            )
        except BufferError:
            raise Overloaded(f"librdkafka's queue is full ({len(producer)} records)", retry_after_s=1) from None
        except KafkaException as exc:
            raise _publish_error(exc.args[0], topic, len(value)) from None
        self._held += 1
        if self._waiting_since is None:
            self._waiting_since = self._watch.clock()
        self._in_flight += 1
        # produce() never blocks, so the only wait is for the report: one timer handle on the future, not
        # asyncio.timeout's context (a third of the sink's own cost per send). Expiry fails only our wait: the
        # record stays with librdkafka, which may still deliver it (at-least-once, same key) or gives it up at
        # message.timeout.ms; close() counts it if still held.
        expiry = self._loop.call_later(timeout_s, _expire, delivery, topic, timeout_s)
        try:
            ack = await delivery
        finally:
            expiry.cancel()
            self._in_flight -= 1
        self._metrics.publish_latency.observe(time.perf_counter() - started)
        return ack

    async def close(self, *, flush_timeout_s: float | None = None) -> int:
        """Flush queued records and destroy the producer, within ``flush_timeout_s`` (default: the publish
        timeout) plus a few seconds whatever Kafka does. Returns how many records were abandoned unacknowledged
        (also kept in ``abandoned``); no caller was told any of them was delivered."""
        for task in (self._watching, self._replacing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watching = None
        producer, self._producer = self._producer, None
        self._ready = False
        if producer is None:
            return 0
        timeout_s = self._settings.publish_timeout_s if flush_timeout_s is None else flush_timeout_s
        held: list[int] = []
        shutting_down = self._calls.run(
            functools.partial(self._shut_down, producer, timeout_s, held, self._stop_polling, self._polling),
            name="librdkafka-close",
        )
        try:
            async with asyncio.timeout(timeout_s + DESTROY_TIMEOUT_S):
                await shutting_down
        except TimeoutError:
            logger.warning("librdkafka producer not destroyed within %gs; its threads end with the process", timeout_s)
        # Counted right after the bounded flush, so known even when the destroy did not finish.
        left = held[0] if held else 0
        if not left:
            logger.info("kafka producer flushed and closed")
            return 0
        self.abandoned = left
        logger.warning(
            "kafka producer not flushed within %gs: abandoned %d unacknowledged records (none was answered 200 "
            "or confirmed; spooled ones stay in the spool)",
            timeout_s,
            left,
            extra={"reason": "flush_timeout"},
        )
        return left

    def _shut_down(
        self,
        producer: Producer,
        timeout_s: float,
        held: list[int],
        stop_polling: threading.Event,
        polling: threading.Thread | None,
    ) -> None:
        """On a thread of its own: flush within ``timeout_s``, count in ``held`` what the producer still holds,
        stop its poll thread, purge it, destroy the handle."""
        # A connect attempt or a probe may be in list_topics: it returns within CONNECT_ATTEMPT_TIMEOUT_S of now.
        joined_by = time.monotonic() + CONNECT_ATTEMPT_TIMEOUT_S + 0.5
        producer.flush(timeout_s)
        held.append(len(producer))
        stop_polling.set()
        others = [t for t in (polling, *self._calls.running()) if t is not None and t is not threading.current_thread()]
        for thread in others:
            thread.join(max(0.0, joined_by - time.monotonic()))
        # Purged records get a delivery report (_PURGE_QUEUE/_PURGE_INFLIGHT), so no send waits for ever.
        producer.purge(in_queue=True, in_flight=True, blocking=True)
        producer.poll(0)
        self._schedule_settle()
        if any(thread.is_alive() for thread in others):
            # Destroying a handle another thread still uses would crash the process; leave it to the exit.
            logger.warning("a librdkafka call is still running; the producer is left to the process exit")
        else:
            # Producer.close() (confluent-kafka >= 2.13) flushes, now at once, and destroys the handle here; on
            # older versions the handle is destroyed when its last reference goes, on this thread too.
            close = getattr(producer, "close", None)
            if close is not None:
                close()

    async def _watch_producer(self) -> None:
        """The watchdog: once a second, replace a producer whose poll thread ended or that stalled, else probe
        the cluster if it said nothing for a second."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            producer = self._producer
            if producer is None or not self._ready:  # being replaced, closing, or failed for good
                continue
            reason = None
            if self._polling is None or not self._polling.is_alive():
                reason = "poll_thread_died"
            elif self._watch.stalled(self._waiting_since):
                reason = "stalled"
            if reason is not None:
                self._replace(producer, reason)
            elif self._watch.quiet_for_s() >= PROBE_INTERVAL_S:
                try:
                    await self._probe_metadata(producer)
                except Exception:  # an unexpected error must not end the watchdog (a probe is only a probe)
                    logger.exception("kafka metadata probe failed unexpectedly")

    async def _probe_metadata(self, producer: Producer) -> None:
        """Ask the cluster for the default topic's metadata (a topic the producer already knows: nothing to
        create); an answer is reachability."""
        probe = functools.partial(producer.list_topics, topic=self._settings.topic, timeout=PROBE_TIMEOUT_S)
        try:
            await self._calls.run(probe, name="librdkafka-probe")
        except KafkaException:
            return  # not answering: ``reachable`` turns False once the window passed
        self._watch.answered()

    def _replace(self, broken: Producer, reason: str) -> None:
        """Swap the ``Producer`` handle for a new one, in the background; publishes get :class:`NotReady` (503)
        until it connects. The old handle's records are purged: their sends fail (503, or they stay spooled)
        and are sent again, at least once; with idempotence the new handle gets a new producer id."""
        if self._producer is not broken or self._replacing is not None:
            return
        stop_polling, polling = self._stop_polling, self._polling
        self._producer, self._ready = None, False
        self._metrics.producer_replacements.labels(reason).inc()
        if reason == "stalled":
            self._watch.replaced()
        logger.error(
            "kafka producer %s; replacing the producer (%d records unacknowledged)",
            REPLACEMENT_CAUSES[reason],
            self._held,
            extra={"reason": reason},
        )
        self._replacing = asyncio.create_task(
            self._reconnect(broken, stop_polling, polling), name="librdkafka-reconnect"
        )

    async def _reconnect(
        self, broken: Producer, stop_polling: threading.Event, polling: threading.Thread | None
    ) -> None:
        try:
            retiring = self._calls.run(
                functools.partial(self._shut_down, broken, 0.0, [], stop_polling, polling), name="librdkafka-retire"
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DESTROY_TIMEOUT_S):
                    await retiring
            await self.connect(max_attempts=self._settings.replace_max_attempts)
        except Exception as exc:
            logger.critical("could not replace the kafka producer (%s); stopping so that it can be restarted", exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)
        finally:
            self._replacing = None

    # ---- librdkafka's threads ----------------------------------------------------------------------------------

    def _poll(self, producer: Producer, stop: threading.Event, generation: int) -> None:
        """The poll thread: serve delivery reports, statistics and logs until :meth:`close` stops it."""
        while not stop.is_set():
            try:
                producer.poll(POLL_TIMEOUT_S)
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.fatal() and generation == self._generation:
                    # confluent-kafka raises librdkafka's fatal errors from poll() instead of calling error_cb.
                    self._call_soon(self._failed, error)
                else:
                    logger.exception("librdkafka poll failed; polling on")
            except Exception:
                logger.exception("librdkafka poll failed; polling on")
            if self._reports:
                self._schedule_settle()

    def _delivered(
        self, delivery: asyncio.Future[Ack], generation: int, error: KafkaError | None, message: Message
    ) -> None:
        # On a librdkafka-serving thread: only queue the report; the loop resolves the future (_settle).
        self._reports.append((delivery, generation, error, message))

    def _schedule_settle(self) -> None:
        # One wake-up of the loop per batch of reports, not per record.
        self._call_soon(self._settle)

    def _on_error(self, generation: int, error: KafkaError) -> None:
        """librdkafka's error_cb: informational (it retries on its own) unless fatal."""
        if generation != self._generation:
            return  # a replaced producer's
        if error.fatal():
            self._call_soon(self._failed, error)
            return
        self._last_error = error.str()
        # Each connection failure is also one of librdkafka's own log lines (logger "librdkafka"): only the
        # state of the whole cluster is worth a line of ours.
        level = logging.WARNING if error.code() == KafkaError._ALL_BROKERS_DOWN else logging.DEBUG
        logger.log(level, "librdkafka: %s (%s)", error.str(), error.name())

    def _on_stats(self, pid_settled: asyncio.Event, stats: str) -> None:
        if pid_settled.is_set():
            return
        try:
            eos = _stats_decoder.decode(stats).eos or {}
        except msgspec.DecodeError:
            return
        if eos.get("idemp_state") == "Assigned":
            self._call_soon(pid_settled.set)

    def _call_soon(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(callback, *args)

    # ---- on the event loop -------------------------------------------------------------------------------------

    def _settle(self) -> None:
        reports = self._reports
        while reports:
            delivery, generation, error, message = reports.popleft()
            if generation == self._generation:  # a replaced handle's records count no more
                self._held -= 1
                if error is None or error.code() >= 0:  # the broker's outcome, not librdkafka's (timeout, purge)
                    self._watch.answered()
                    self._waiting_since = self._watch.clock() if self._held else None
                elif not self._held:
                    self._waiting_since = None
            if delivery.done():  # the sender stopped waiting (timeout, cancellation)
                continue
            if error is None:
                delivery.set_result(_ack(message))
            else:
                delivery.set_exception(_publish_error(error, message.topic() or "?", len(message)))

    def _failed(self, error: KafkaError) -> None:
        if self._fatal is not None:
            return
        self._fatal = ProducerFatalError(f"librdkafka fatal error {error.name()}: {error.str()}")
        was_ready, self._ready = self._ready, False
        self._pid_settled.set()
        logger.critical("%s; the producer cannot deliver any more", self._fatal.message)
        # Before connect() returned, connect() raises it; after, the process is told to stop (and restart).
        if was_ready and self._on_fatal is not None:
            self._on_fatal(self._fatal)


def _ack(message: Message) -> Delivered:
    partition, offset = message.partition(), message.offset()
    return Delivered(message.topic() or "", -1 if partition is None else partition, -1 if offset is None else offset)


def _publish_error(error: KafkaError, topic: str, size: int) -> PublishFailed:
    code = error.code()
    if code in _TOO_LARGE:
        return RecordTooLarge(
            f"kafka refuses a record of {size} bytes for topic {topic}", retriable=False, cause=error.name()
        )
    if code in _TIMED_OUT:
        return PublishFailed(f"librdkafka gave up on a record for topic {topic}: {error.str()}", cause="timeout")
    return PublishFailed(
        f"kafka error for topic {topic}: {error.name()} ({error.str()})",
        retriable=code not in _REFUSED_FOR_GOOD,
        cause=error.name(),
    )


def _syslog_level(target: logging.Logger) -> int:
    """librdkafka's log_level: warnings and errors, as for aiokafka (bridge.ops.logs), everything at DEBUG.
    Lines below it are not even produced, so they cost nothing."""
    level = target.getEffectiveLevel()
    return 7 if level <= logging.DEBUG else 4 if level <= logging.WARNING else 3


def _expire(delivery: asyncio.Future[Ack], topic: str, timeout_s: float) -> None:
    if not delivery.done():  # else the report came first (or the sender was cancelled): nothing to fail
        delivery.set_exception(PublishFailed(f"no Kafka ack within {timeout_s:g}s for topic {topic}", cause="timeout"))
