"""`vod-bridge redrive`: move dead letters that the current model can read back to their main topics.

The dead-letter topic holds JSON objects the bridge could not key (header ``error-reason``: ``missing_key``,
``ambiguous_payload``, ...) and spooled records Kafka refused for good (``kafka_refused``). After an upgrade (a
new EventType row, a more tolerant reader) some of them decode. The command reads the dead-letter topic, every
partition, from a start (the beginning, ``--offset``, or ``--since`` a time) up to the end offsets captured when
it starts, so it always ends: it is a batch job, not a daemon.

Contract:

- **Moved** means: the record's value now decodes (:func:`bridge.vod.decode.read_event`) to a
  :class:`~bridge.vod.model.VodEvent`, and Kafka acknowledged it on the event's main topic with the key and
  headers a fresh event gets (``source`` and ``received-at`` taken from the dead letter, its ``event-handle``
  kept) plus ``redriven-from: <dead-letter topic>:<partition>:<offset>``.
- Everything else **stays**, counted by reason: the current decode reason (``missing_key``, ...; the
  not-a-JSON-object reasons such as ``not_an_object``), ``invalid_headers`` (no usable ``source`` or
  ``received-at`` header), or the cause of a publish Kafka refused for good (e.g. ``MessageSizeTooLargeError``).
- The dead-letter topic is only read, never written to or deleted from: moved records stay there too.
  Records are not marked, and the command commits no consumer offsets, so **re-running publishes the same
  records again**. Resume with ``--offset P:N`` (printed when a run stops early) or ``--since``; consumers
  de-duplicate by key, as for any at-least-once delivery.
- A retriable Kafka failure (no ack in time, broker unreachable, a stalled fetch) stops the run after the
  publishes already under way: nothing is lost, and the summary says where to resume. Every Kafka wait
  (connecting, each fetch, each ack) is bounded by ``timeout_s``.
- Nothing prints record values; the summary and the ``--verbose`` lines carry partitions, offsets, topics and
  reason labels only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, UnsupportedVersionError

from bridge.config import KafkaSettings, Settings
from bridge.delivery import records
from bridge.delivery.clients import ProducerSink, make_sink
from bridge.delivery.kafka import connection_options
from bridge.delivery.records import Headers, Source
from bridge.delivery.sink import Sink
from bridge.errors import ConfigError, InvalidPayload, KafkaUnavailable, PublishFailed
from bridge.ops.metrics import Metrics
from bridge.vod.decode import read_event
from bridge.vod.model import Undecodable

logger = logging.getLogger(__name__)

#: Records published concurrently; each batch is awaited (every ack) before the next one starts.
BATCH_SIZE: Final = 100
DEFAULT_TIMEOUT_S: Final = 30.0
#: Stay reason of a dead letter without a usable ``source`` or ``received-at`` header.
INVALID_HEADERS: Final = "invalid_headers"
#: A time no record carries: a broker that finds an offset for it does not look offsets up by time.
_FAR_FUTURE_MS: Final = 253402300799000  # 9999-12-31T23:59:59Z
_SOURCES: Final[Mapping[str, Source]] = {"callback": "callback", "pull": "pull"}


class SinceUnsupported(ConfigError):
    """The broker cannot look offsets up by time (``--since``); use ``--offset`` instead."""


class TopicNotFound(ConfigError):
    """The dead-letter topic does not exist on the cluster."""


class FromBeginning(msgspec.Struct, frozen=True):
    """Every partition from its first retained record."""


class FromOffset(msgspec.Struct, frozen=True):
    """``offset`` on every partition, or ``per_partition`` (partition -> offset; other partitions are not read)."""

    offset: int | None = None
    per_partition: dict[int, int] = {}


class Since(msgspec.Struct, frozen=True):
    """Every partition from its first record whose Kafka timestamp is at or after ``moment``."""

    moment: datetime


StartAt = FromBeginning | FromOffset | Since


def parse_offsets(text: str) -> FromOffset:
    """``--offset``: ``N`` (every partition) or ``P:N[,P:N...]`` (those partitions only). Raises ``ValueError``."""
    text = text.strip()
    if ":" not in text:
        return FromOffset(offset=_non_negative(text, "offset"))
    per_partition: dict[int, int] = {}
    for item in text.split(","):
        partition, sep, offset = item.strip().partition(":")
        if not sep:
            raise ValueError(f"--offset: {item.strip()!r} is not PARTITION:OFFSET")
        number = _non_negative(partition, "partition")
        if number in per_partition:
            raise ValueError(f"--offset: partition {number} is given twice")
        per_partition[number] = _non_negative(offset, "offset")
    return FromOffset(per_partition=per_partition)


def parse_since(text: str) -> Since:
    """``--since``: an ISO 8601 time with its zone, e.g. ``2026-11-27T10:00:00Z``. Raises ``ValueError``."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: {text!r} is not an ISO 8601 time such as 2026-11-27T10:00:00Z") from None
    if moment.tzinfo is None:
        # Local time would silently depend on the operator's machine.
        raise ValueError(f"--since: {text!r} has no time zone; add Z for UTC or an offset such as +08:00")
    return Since(moment)


def _non_negative(text: str, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"--offset: {what} {text.strip()!r} is not a whole number") from None
    if number < 0:
        raise ValueError(f"--offset: {what} {number} is negative")
    return number


class DeadLetter(Protocol):
    """One consumed dead-letter record (aiokafka's ``ConsumerRecord`` satisfies this)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class RecordOutcome(msgspec.Struct, frozen=True):
    """What happened to one dead letter. ``topic`` is where it moved (``None`` when it stayed); ``reason`` is
    why it stayed, or for a moved record the ``error-reason`` it had been dead-lettered with."""

    partition: int
    offset: int
    moved: bool
    reason: str
    topic: str | None = None


@dataclass
class RedriveReport:
    """Counts of one run. ``interrupted`` says why it stopped before the end offsets (exit 1: re-run), and
    ``resume_at`` then holds, per partition, the first offset not known to be done."""

    dead_letter_topic: str
    dry_run: bool
    #: Partition -> [start, end) offsets the run was to read (filled by :func:`redrive_dead_letters`).
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    read: int = 0
    moved: int = 0
    stayed: Counter[str] = field(default_factory=Counter)
    interrupted: str | None = None
    resume_at: dict[int, int] = field(default_factory=dict)

    def note_unfinished(self, partition: int, offset: int) -> None:
        """Record that ``offset`` of ``partition`` is not done: a re-run must start there or earlier."""
        self.resume_at[partition] = min(offset, self.resume_at.get(partition, offset))


class _Move(msgspec.Struct, frozen=True):
    record: DeadLetter
    topic: str
    key: bytes
    value: bytes
    headers: Headers
    was: str


class _Stay(msgspec.Struct, frozen=True):
    record: DeadLetter
    reason: str


async def redrive(
    batches: AsyncIterable[Sequence[DeadLetter]],
    sink: Sink | None,
    *,
    topic_for: Callable[[str], str],
    dead_letter_topic: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_size: int = BATCH_SIZE,
    on_record: Callable[[RecordOutcome], None] | None = None,
) -> RedriveReport:
    """Re-decode every dead letter from ``batches`` and publish those that now decode through ``sink``, up to
    ``batch_size`` at a time, each batch fully acknowledged (or failed) before the next one starts.

    ``sink`` ``None`` is a dry run: decode and count, publish nothing. ``on_record`` sees each record's outcome,
    in order. The run stops early (``report.interrupted``) after a batch in which a publish failed retriably,
    or when ``batches`` raises :class:`KafkaUnavailable`; a publish Kafka refuses for good only keeps that
    record where it is. Never writes to the dead-letter topic.
    """
    report = RedriveReport(dead_letter_topic, dry_run=sink is None)
    iterator = aiter(batches)
    while report.interrupted is None:
        try:
            batch = await anext(iterator)
        except StopAsyncIteration:
            break
        except KafkaUnavailable as exc:
            report.interrupted = exc.message
            break
        for start in range(0, len(batch), batch_size):
            chunk = batch[start : start + batch_size]
            if report.interrupted is not None:
                # Read but not attempted: a re-run must start no later than these.
                for record in chunk:
                    report.note_unfinished(record.partition, record.offset)
                continue
            await _redrive_chunk(
                chunk, sink, topic_for=topic_for, timeout_s=timeout_s, report=report, on_record=on_record
            )
    return report


async def _redrive_chunk(
    chunk: Sequence[DeadLetter],
    sink: Sink | None,
    *,
    topic_for: Callable[[str], str],
    timeout_s: float,
    report: RedriveReport,
    on_record: Callable[[RecordOutcome], None] | None,
) -> None:
    plans = [_plan(record, topic_for) for record in chunk]
    moves = [plan for plan in plans if isinstance(plan, _Move)]
    errors: dict[tuple[int, int], PublishFailed] = {}
    if sink is not None and moves:
        # Concurrent sends: the producer batches them, and each result is its own broker ack.
        results = await asyncio.gather(*(_publish(sink, move, timeout_s) for move in moves))
        errors = {_at(move.record): error for move, error in zip(moves, results, strict=True) if error is not None}
    for plan in plans:
        record = plan.record
        report.read += 1
        error = errors.get(_at(record))
        if isinstance(plan, _Move) and error is None:
            report.moved += 1
            outcome = RecordOutcome(record.partition, record.offset, True, plan.was, plan.topic)
        elif error is not None:
            report.stayed[error.cause] += 1
            outcome = RecordOutcome(record.partition, record.offset, False, error.cause)
            if error.retriable:
                report.interrupted = f"kafka did not take a record ({error.message})"
                report.note_unfinished(record.partition, record.offset)
        else:
            assert isinstance(plan, _Stay)
            report.stayed[plan.reason] += 1
            outcome = RecordOutcome(record.partition, record.offset, False, plan.reason)
        if on_record is not None:
            on_record(outcome)


def _at(record: DeadLetter) -> tuple[int, int]:
    return record.partition, record.offset


async def _publish(sink: Sink, move: _Move, timeout_s: float) -> PublishFailed | None:
    try:
        await sink.send(move.topic, move.key, move.value, move.headers, timeout_s=timeout_s)
    except PublishFailed as exc:
        logger.warning(
            "dead letter %s:%d:%d not moved to %s: %s",
            move.record.topic,
            move.record.partition,
            move.record.offset,
            move.topic,
            exc.message,
        )
        return exc
    return None


def _plan(record: DeadLetter, topic_for: Callable[[str], str]) -> _Move | _Stay:
    try:
        result = read_event(record.value or b"")
    except InvalidPayload as exc:
        return _Stay(record, exc.reason)
    if isinstance(result, Undecodable):
        return _Stay(record, result.reason)
    source = _SOURCES.get(records.header(record.headers, records.SOURCE) or "")
    received_at = _parse_received_at(records.header(record.headers, records.RECEIVED_AT))
    if source is None or received_at is None:
        return _Stay(record, INVALID_HEADERS)
    event = result
    # The value carries no EventHandle (a transport field); the dead letter kept it as a header.
    handle = event.event_handle or records.header(record.headers, records.EVENT_HANDLE)
    if handle != event.event_handle:
        event = msgspec.structs.replace(event, event_handle=handle)
    origin = f"{record.topic}:{record.partition}:{record.offset}".encode()
    # The VOD application is kept as the dead letter has it (decimal text); it is not part of the value.
    sub_app = [(name, value) for name, value in record.headers if name == records.SUB_APP_ID][:1]
    headers = records.event_headers(
        event, source=source, received_at=received_at, extra=[*sub_app, (records.REDRIVEN_FROM, origin)]
    )
    was = records.header(record.headers, records.ERROR_REASON) or "-"
    return _Move(record, topic_for(event.event_type), event.key.encode(), event.value, headers, was)


def _parse_received_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _consumer_options(settings: KafkaSettings) -> dict[str, Any]:
    """The producer's connection settings (SASL, TLS) for a consumer that joins no group and commits nothing."""
    return {
        **connection_options(settings),
        "client_id": f"{settings.client_id}-redrive",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }


class DeadLetterReader:
    """Reads ``topic`` (every partition, or those a :class:`FromOffset` names) from ``start`` up to the end
    offsets captured on entry, without a consumer group: it commits nothing and changes nothing.

    Entering raises :class:`KafkaUnavailable` when the broker does not answer within ``timeout_s``,
    :class:`TopicNotFound`, :class:`SinceUnsupported`, or ``ConfigError`` for a partition the topic lacks.
    :meth:`batches` raises :class:`KafkaUnavailable` when no record arrives for ``timeout_s`` while some are
    still due.
    """

    def __init__(
        self, settings: KafkaSettings, topic: str, start: StartAt, *, timeout_s: float, batch_size: int = BATCH_SIZE
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._start = start
        self._timeout_s = timeout_s
        self._batch_size = batch_size
        self._consumer: AIOKafkaConsumer | None = None
        #: Partition -> [next offset to read, end offset).
        self._next: dict[int, int] = {}
        self._end: dict[int, int] = {}
        #: Partition -> [start, end) as planned on entry.
        self._ranges: dict[int, tuple[int, int]] = {}
        self._since_ms: int | None = None
        #: Partitions whose first record must be at or after ``--since`` (checks the broker's answer).
        self._unchecked: set[int] = set()

    @property
    def ranges(self) -> dict[int, tuple[int, int]]:
        """Partition -> [start, end) as planned on entry."""
        return dict(self._ranges)

    def unread(self) -> dict[int, int]:
        """Partition -> next offset not yet read, for partitions that have not reached their end offset."""
        return {p: offset for p, offset in self._next.items() if offset < self._end[p]}

    async def __aenter__(self) -> DeadLetterReader:
        consumer = AIOKafkaConsumer(**_consumer_options(self._settings))
        self._consumer = consumer
        try:
            async with asyncio.timeout(self._timeout_s):
                await consumer.start()
                await self._plan(consumer)
        except TimeoutError:
            await self._stop()
            raise KafkaUnavailable(
                f"kafka at {self._settings.bootstrap_servers} did not answer within {self._timeout_s:g}s"
            ) from None
        except KafkaError as exc:
            await self._stop()
            raise KafkaUnavailable(
                f"cannot read {self._topic} from kafka at {self._settings.bootstrap_servers}: {exc}"
            ) from exc
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Closing a consumer whose start failed may raise again; there is nothing left to release then.
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()

    async def _plan(self, consumer: AIOKafkaConsumer) -> None:
        # A fresh metadata request for all topics, read from its own answer: consumer.topics() fills a throwaway
        # copy, and the consumer's own metadata tracks no topic yet (an empty topic list asks for none, which a
        # broker that follows the protocol answers with none).
        metadata = await consumer._client.fetch_all_metadata()
        partitions = sorted(metadata.partitions_for_topic(self._topic) or ())
        if not partitions:
            raise TopicNotFound(
                f"dead-letter topic {self._topic!r} does not exist on {self._settings.bootstrap_servers} "
                "(check BRIDGE_KAFKA_DEAD_LETTER_TOPIC)"
            )
        start = self._start
        if isinstance(start, FromOffset) and start.per_partition:
            unknown = sorted(set(start.per_partition) - set(partitions))
            if unknown:
                raise ConfigError(
                    f"--offset names partition(s) {unknown} that {self._topic} does not have "
                    f"(it has {partitions[0]}-{partitions[-1]})"
                )
            partitions = sorted(start.per_partition)
        tps = [TopicPartition(self._topic, p) for p in partitions]
        first = {tp.partition: offset for tp, offset in (await consumer.beginning_offsets(tps)).items()}
        end = {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
        wanted = await self._wanted(consumer, tps, first, end)
        self._end = end
        # Clamped: retention may have removed the wanted offset, and an offset past the end reads nothing.
        self._next = {p: min(max(wanted[p], first[p]), end[p]) for p in partitions}
        self._ranges = {p: (self._next[p], end[p]) for p in partitions}
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self._next[tp.partition])

    async def _wanted(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], first: dict[int, int], end: dict[int, int]
    ) -> dict[int, int]:
        start = self._start
        if isinstance(start, FromBeginning):
            return first
        if isinstance(start, FromOffset):
            if start.per_partition:
                return dict(start.per_partition)
            assert start.offset is not None
            return dict.fromkeys(first, start.offset)
        since_ms = int(start.moment.timestamp() * 1000)
        unsupported = SinceUnsupported(
            f"the broker at {self._settings.bootstrap_servers} does not look offsets up by time "
            "(ListOffsets by timestamp), so --since would re-read everything; use --offset instead"
        )
        try:
            # No record is that late, so a broker that honours the lookup answers "none" for every partition.
            probe = await consumer.offsets_for_times(dict.fromkeys(tps, _FAR_FUTURE_MS))
            # And every record is later than the epoch, so a partition holding records must answer something.
            epoch = await consumer.offsets_for_times(dict.fromkeys(tps, 0))
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        except UnsupportedVersionError:
            raise unsupported from None
        if any(answer is not None for answer in probe.values()):
            raise unsupported
        if any(epoch[tp] is None and first[tp.partition] < end[tp.partition] for tp in tps):
            raise unsupported
        self._since_ms = since_ms
        self._unchecked = {tp.partition for tp in tps}
        # None: no record at or after the time in that partition, so nothing to read there.
        return {tp.partition: end[tp.partition] if hit is None else hit.offset for tp, hit in found.items()}

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Records in offset order per partition, up to ``batch_size`` per batch, until every partition has
        reached the end offset captured on entry."""
        consumer = self._consumer
        assert consumer is not None, "use DeadLetterReader as an async context manager"
        last_progress = time.monotonic()
        while active := [TopicPartition(self._topic, p) for p in self.unread()]:
            try:
                fetched = await consumer.getmany(*active, timeout_ms=500, max_records=self._batch_size)
            except KafkaError as exc:
                raise KafkaUnavailable(f"reading {self._topic} failed: {exc}") from exc
            batch: list[Any] = []
            for tp, got in fetched.items():
                due = [record for record in got if record.offset < self._end[tp.partition]]
                if due:
                    self._check_since(tp.partition, due[0])
                    self._next[tp.partition] = due[-1].offset + 1
                    batch.extend(due)
            for tp in active:
                # Past a gap (retention, compaction) or records beyond the end offset: trust the position.
                position = await consumer.position(tp)
                self._next[tp.partition] = max(self._next[tp.partition], min(position, self._end[tp.partition]))
            if batch:
                last_progress = time.monotonic()
                yield batch
            elif time.monotonic() - last_progress > self._timeout_s:
                raise KafkaUnavailable(
                    f"no records from {self._topic} for {self._timeout_s:g}s although "
                    f"{sum(self._end[p] - o for p, o in self.unread().items())} are still due"
                )

    def _check_since(self, partition: int, record: Any) -> None:
        if self._since_ms is None or partition not in self._unchecked:
            return
        self._unchecked.discard(partition)
        if record.offset == self._ranges[partition][0] and record.timestamp < self._since_ms:
            raise SinceUnsupported(
                f"the broker's offset for --since on {self._topic}[{partition}] is {record.offset}, whose "
                "timestamp is earlier: it does not look offsets up by time. Use --offset instead"
            )


async def redrive_dead_letters(
    settings: Settings,
    start: StartAt,
    *,
    dry_run: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_record: Callable[[RecordOutcome], None] | None = None,
) -> RedriveReport:
    """The command: read ``settings.delivery.dead_letter_topic`` from ``start`` to the end offsets of now,
    publish what now decodes through the configured sink (none for ``dry_run``); see the module docstring.

    Raises :class:`KafkaUnavailable` when Kafka cannot be reached within ``timeout_s``, and ``ConfigError``
    (:class:`TopicNotFound`, :class:`SinceUnsupported`, ``IdempotenceUnsupported``) for what a re-run with the
    same settings cannot fix. A run that stopped early returns with ``report.interrupted`` set.
    """
    topic = settings.delivery.dead_letter_topic
    async with DeadLetterReader(settings.kafka, topic, start, timeout_s=timeout_s) as reader:
        sink = None if dry_run else make_sink(settings.kafka, Metrics())
        try:
            if sink is not None:
                try:
                    async with asyncio.timeout(timeout_s):
                        await sink.connect()
                except TimeoutError:
                    raise KafkaUnavailable(
                        f"the producer could not connect to {settings.kafka.bootstrap_servers} within {timeout_s:g}s"
                    ) from None
            report = await redrive(
                reader.batches(),
                sink,
                topic_for=settings.kafka.topic_for,
                dead_letter_topic=topic,
                timeout_s=timeout_s,
                on_record=on_record,
            )
        finally:
            if sink is not None:
                await _close(sink, timeout_s)
        report.ranges = reader.ranges
        if report.interrupted is not None:
            for partition, offset in reader.unread().items():
                report.note_unfinished(partition, offset)
    return report


async def _close(sink: ProducerSink, timeout_s: float) -> None:
    # Every send was awaited, so there is nothing to flush unless Kafka vanished; then do not wait forever.
    try:
        async with asyncio.timeout(timeout_s):
            await sink.close()
    except TimeoutError:
        logger.warning("kafka producer did not close within %gs", timeout_s)


def format_outcome(outcome: RecordOutcome, *, dry_run: bool = False) -> str:
    """One ``--verbose`` line: partition, offset, moved or stayed, and the reason (never the value)."""
    where = f"partition {outcome.partition} offset {outcome.offset}:"
    if outcome.moved:
        verb = "would move" if dry_run else "moved"
        return f"{where} {verb} to {outcome.topic} (was {outcome.reason})"
    return f"{where} stayed ({outcome.reason})"


def format_report(report: RedriveReport, *, verbose: bool = False) -> str:
    """The summary: how many moved, how many stayed per reason, and where to resume after a stop (``verbose``
    adds the offsets read)."""
    stayed = sum(report.stayed.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(report.stayed.items()))
    moved = f"{report.moved} would move (dry run: nothing published)" if report.dry_run else f"{report.moved} moved"
    lines = [
        f"redrive {report.dead_letter_topic}: {report.read} read, {moved}, {stayed} stayed"
        + (f" ({reasons})" if reasons else "")
    ]
    if verbose:
        ranges = ", ".join(f"{p} [{start}, {end})" for p, (start, end) in sorted(report.ranges.items()))
        lines.append(f"offsets read (partition [start, end)): {ranges or 'none'}")
    if report.interrupted is not None:
        lines.append(f"stopped early: {report.interrupted}. Nothing is lost; records not moved are still there.")
        if report.resume_at:
            resume = ",".join(f"{p}:{o}" for p, o in sorted(report.resume_at.items()))
            lines.append(f"resume with: vod-bridge redrive --offset {resume}")
    return "\n".join(lines)
