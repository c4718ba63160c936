"""`vod-bridge redrive` against a real broker: what moves, what stays, where it starts, and how it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from conftest import Kafka, headers_of, read_records, sample_event
from faultkit import bridge_env, create_topic
from tcpproxy import TcpProxy

from bridge import cli
from bridge.config import Settings
from bridge.delivery import records
from bridge.delivery.kafka import KafkaSink
from bridge.ops.embedded import EmbeddedBroker, free_port
from bridge.ops.metrics import Metrics
from bridge.ops.redrive import (
    DeadLetterReader,
    FromBeginning,
    FromOffset,
    KafkaUnavailable,
    RecordOutcome,
    Since,
    SinceUnsupported,
    format_report,
    parse_offsets,
    parse_since,
    redrive,
    redrive_dead_letters,
)
from bridge.timefmt import rfc3339_utc

pytestmark = pytest.mark.integration

RECEIVED_AT = datetime(2026, 11, 27, 9, 30, 1, 123000, tzinfo=UTC)
PULL_COMPLETE = msgspec.json.encode(sample_event("redrive-task-1"))
LEGACY = b'{"version":"4.0","eventType":"PullComplete","data":{"vodTaskId":"redrive-legacy-1","status":0}}'
STILL_MISSING_KEY = b'{"EventType":"PullComplete","PullCompleteEvent":{"ErrCode":0}}'
AMBIGUOUS = b'{"EventType":"SomethingNew","A":{"TaskId":"x"},"B":{"TaskId":"y"}}'
NOT_AN_OBJECT = b'["not", "an", "object"]'


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    value: bytes
    headers: records.Headers


def _dead_letter(value: bytes, reason: str, **fields: Any) -> tuple[bytes, records.Headers]:
    headers = records.dead_letter_headers(
        source=fields.pop("source", "callback"),
        received_at=RECEIVED_AT,
        reason=reason,
        error=f"dead-lettered as {reason} by an older version",
        **fields,
    )
    return value, headers


#: The dead-letter topic as an older version left it: (partition, value, headers), in produce order.
DEAD_LETTERS = [
    # Dead-lettered by a version whose table did not know PullComplete yet; decodes now.
    (0, *_dead_letter(PULL_COMPLETE, "missing_key", event_type="PullComplete")),
    (0, *_dead_letter(STILL_MISSING_KEY, "missing_key", event_type="PullComplete")),
    # A legacy v2.0 envelope from the reliable callback, before the tolerant reader read that envelope.
    (0, *_dead_letter(LEGACY, "unrecognised", source="pull", event_handle="handle-legacy-1", sub_app_id=1500001)),
    (1, *_dead_letter(NOT_AN_OBJECT, "spool_format")),
    (1, *_dead_letter(AMBIGUOUS, "ambiguous_payload", event_type="SomethingNew")),
]


async def produce(kafka: Kafka, topic: str, letters: list[tuple[int, bytes, records.Headers]], **extra: Any) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, enable_idempotence=kafka.supports_idempotence, acks="all"
    )
    await producer.start()
    try:
        for partition, value, headers in letters:
            await producer.send_and_wait(topic, value, partition=partition, headers=headers, **extra)
    finally:
        await producer.stop()


def lettered(ranges: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """The ranges of the partitions the tests write to (the mock cluster gives every topic 4 partitions)."""
    return {partition: bounds for partition, bounds in ranges.items() if partition in (0, 1)}


async def fill_dead_letters(kafka: Kafka, dlq: str) -> list[Letter]:
    await create_topic(kafka.bootstrap_servers, dlq, partitions=2)
    await produce(kafka, dlq, DEAD_LETTERS)
    next_offset = {0: 0, 1: 0}
    letters = []
    for partition, value, headers in DEAD_LETTERS:
        letters.append(Letter(partition, next_offset[partition], value, headers))
        next_offset[partition] += 1
    return letters


@pytest.fixture
async def dead_letters(kafka: Kafka, topic: str) -> list[Letter]:
    return await fill_dead_letters(kafka, f"{topic}.dlq")


async def assert_dead_letters_unchanged(kafka: Kafka, dlq: str, letters: list[Letter]) -> None:
    found = await read_records(kafka.bootstrap_servers, dlq, count=len(letters))
    assert [(r.partition, r.offset, r.value, list(r.headers)) for r in found] == [
        (letter.partition, letter.offset, letter.value, letter.headers) for letter in letters
    ]


def expected_headers(dlq: str, partition: int, offset: int, *, source: str, fmt: str) -> dict[str, str]:
    return {
        records.EVENT_TYPE: "PullComplete",
        records.SOURCE: source,
        records.RECEIVED_AT: rfc3339_utc(RECEIVED_AT),
        records.CONTENT_TYPE: "application/json",
        records.EVENT_FORMAT: fmt,
        records.REDRIVEN_FROM: f"{dlq}:{partition}:{offset}",
    }


async def test_moves_what_now_decodes_and_leaves_the_rest(
    kafka: Kafka, topic: str, make_settings: Callable[..., Settings], dead_letters: list[Letter]
) -> None:
    dlq = f"{topic}.dlq"
    outcomes: list[RecordOutcome] = []
    report = await redrive_dead_letters(make_settings(), FromBeginning(), timeout_s=15, on_record=outcomes.append)

    moved = await read_records(kafka.bootstrap_servers, topic, count=2)
    by_key = {r.key: r for r in moved}
    assert sorted(by_key) == [b"redrive-legacy-1", b"redrive-task-1"]
    fresh = by_key[b"redrive-task-1"]
    assert fresh.value == PULL_COMPLETE
    assert headers_of(fresh) == expected_headers(dlq, 0, 0, source="callback", fmt="eventcontent")
    legacy = by_key[b"redrive-legacy-1"]
    assert legacy.value == LEGACY
    assert headers_of(legacy) == {
        **expected_headers(dlq, 0, 2, source="pull", fmt="legacy-v2"),
        records.EVENT_HANDLE: "handle-legacy-1",
        records.SUB_APP_ID: "1500001",
    }

    await assert_dead_letters_unchanged(kafka, dlq, dead_letters)
    assert (report.read, report.moved, dict(report.stayed)) == (
        5,
        2,
        {"missing_key": 1, "not_an_object": 1, "ambiguous_payload": 1},
    )
    assert report.interrupted is None and report.resume_at == {}
    assert lettered(lettered(report.ranges)) == {0: (0, 3), 1: (0, 2)}
    assert sorted((o.partition, o.offset, o.moved, o.reason) for o in outcomes) == [
        (0, 0, True, "missing_key"),
        (0, 1, False, "missing_key"),
        (0, 2, True, "unrecognised"),
        (1, 0, False, "not_an_object"),
        (1, 1, False, "ambiguous_payload"),
    ]
    assert format_report(report) == (
        f"redrive {dlq}: 5 read, 2 moved, 3 stayed (ambiguous_payload 1, missing_key 1, not_an_object 1)"
    )


async def test_offset_starts_every_partition_there_or_only_the_named_ones(
    kafka: Kafka, topic: str, make_settings: Callable[..., Settings], dead_letters: list[Letter]
) -> None:
    settings = make_settings()
    # From offset 1 everywhere: the first PullComplete (0:0) is skipped, the legacy one (0:2) moves.
    report = await redrive_dead_letters(settings, FromOffset(offset=1), timeout_s=15)
    assert (report.read, report.moved, lettered(report.ranges)) == (3, 1, {0: (1, 3), 1: (1, 2)})
    assert dict(report.stayed) == {"missing_key": 1, "ambiguous_payload": 1}
    # Only partition 0, from its last record: partition 1 is not read at all.
    report = await redrive_dead_letters(settings, parse_offsets("0:2"), timeout_s=15)
    assert (report.read, report.moved, lettered(report.ranges)) == (1, 1, {0: (2, 3)})
    # Past the end: nothing to read, and the run still ends.
    report = await redrive_dead_letters(settings, FromOffset(offset=99), timeout_s=15)
    assert (report.read, lettered(report.ranges)) == (0, {0: (3, 3), 1: (2, 2)})

    moved = await read_records(kafka.bootstrap_servers, topic, count=2)
    assert [(r.key, headers_of(r)[records.REDRIVEN_FROM]) for r in moved] == [
        (b"redrive-legacy-1", f"{topic}.dlq:0:2"),
        (b"redrive-legacy-1", f"{topic}.dlq:0:2"),
    ]


async def test_dry_run_publishes_nothing(
    kafka: Kafka, topic: str, make_settings: Callable[..., Settings], dead_letters: list[Letter]
) -> None:
    report = await redrive_dead_letters(make_settings(), FromBeginning(), dry_run=True, timeout_s=15)
    assert (report.dry_run, report.read, report.moved) == (True, 5, 2)
    assert format_report(report).startswith(f"redrive {topic}.dlq: 5 read, 2 would move (dry run: nothing published)")
    assert await read_records(kafka.bootstrap_servers, topic, count=0, settle_s=1.0) == []
    await assert_dead_letters_unchanged(kafka, f"{topic}.dlq", dead_letters)


async def test_retriable_publish_failure_stops_the_run_and_says_where_to_resume(
    kafka: Kafka, topic: str, make_settings: Callable[..., Settings], dead_letters: list[Letter]
) -> None:
    # A real sink that takes one publish at a time: the second of two concurrent publishes is refused as
    # Overloaded, a retriable failure (as a Kafka outage would be).
    settings = make_settings(max_in_flight=1)
    letters = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=5)

    async def batches() -> AsyncIterator[list[Any]]:
        yield letters  # 0:0 (moves), 0:1, 0:2 (moves), 1:0, 1:1
        raise AssertionError("the run must stop before asking for more")

    sink = KafkaSink(settings.kafka, Metrics())
    await sink.connect()
    try:
        report = await redrive(
            batches(), sink, topic_for=settings.kafka.topic_for, dead_letter_topic=f"{topic}.dlq", batch_size=3
        )
    finally:
        await sink.close()

    assert (report.read, report.moved, dict(report.stayed)) == (3, 1, {"missing_key": 1, "overloaded": 1})
    assert report.interrupted is not None and "publishes already awaiting" in report.interrupted
    # 0:2 failed, and 1:0 onwards were read but never attempted.
    assert report.resume_at == {0: 2, 1: 0}
    assert format_report(report).splitlines()[-1] == "resume with: vod-bridge redrive --offset 0:2,1:0"
    moved = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert [r.key for r in moved] == [b"redrive-task-1"]


async def test_since_reads_from_that_time_or_refuses_clearly(
    kafka: Kafka, topic: str, make_settings: Callable[..., Settings]
) -> None:
    dlq = f"{topic}.dlq"
    await create_topic(kafka.bootstrap_servers, dlq, partitions=1)
    now = datetime.now(UTC).replace(microsecond=0)
    for age_h, task in ((3, "since-old"), (1, "since-new")):
        value, headers = _dead_letter(msgspec.json.encode(sample_event(task)), "missing_key")
        timestamp_ms = int((now - timedelta(hours=age_h)).timestamp() * 1000)
        await produce(kafka, dlq, [(0, value, headers)], timestamp_ms=timestamp_ms)
    since = Since(now - timedelta(hours=2))

    if kafka.embedded:
        # tansu answers a lookup by time with offset 0 whatever the time, the mock cluster with none: refused,
        # not a silent full re-read or a silent empty one.
        with pytest.raises(SinceUnsupported, match="does not look offsets up by time"):
            await redrive_dead_letters(make_settings(), since, timeout_s=15)
        assert await read_records(kafka.bootstrap_servers, topic, count=0, settle_s=0.5) == []
        return
    report = await redrive_dead_letters(make_settings(), since, timeout_s=15)
    assert (report.read, report.moved, lettered(report.ranges)) == (1, 1, {0: (1, 2)})
    assert [r.key for r in await read_records(kafka.bootstrap_servers, topic, count=1)] == [b"since-new"]


async def test_unreachable_broker_ends_within_the_bound(make_settings: Callable[..., Settings]) -> None:
    # A blackhole: connections are accepted and then nothing ever answers, as behind a dropping firewall.
    async with TcpProxy("127.0.0.1", free_port()) as proxy:
        proxy.cut(mode="blackhole")
        started = time.monotonic()
        with pytest.raises(KafkaUnavailable, match=rf"kafka at {proxy.address} did not answer within 1.5s"):
            await redrive_dead_letters(make_settings(bootstrap_servers=proxy.address), FromBeginning(), timeout_s=1.5)
        assert time.monotonic() - started < 5


async def test_a_fetch_that_stalls_stops_the_run_within_the_bound(
    topic: str, make_settings: Callable[..., Settings]
) -> None:
    dlq = f"{topic}.dlq"
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        async with TcpProxy("127.0.0.1", broker.port, listen_port=proxy_port) as proxy:
            own = Kafka(proxy.address, "embedded", supports_idempotence=False)
            await fill_dead_letters(own, dlq)
            settings = make_settings(bootstrap_servers=own.bootstrap_servers, enable_idempotence=False)
            async with DeadLetterReader(settings.kafka, dlq, FromBeginning(), timeout_s=1.5) as reader:
                # Planned (end offsets known), nothing fetched yet: the network goes silent now.
                proxy.cut(mode="blackhole")
                started = time.monotonic()
                report = await redrive(
                    reader.batches(), None, topic_for=settings.kafka.topic_for, dead_letter_topic=dlq, timeout_s=1.5
                )
                assert time.monotonic() - started < 5
                unread = reader.unread()

    assert report.interrupted == f"no records from {dlq} for 1.5s although 5 are still due"
    assert report.read == 0
    assert unread == {0: 0, 1: 0}


def test_cli_redrive(kafka: Kafka, topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    dlq = f"{topic}.dlq"
    asyncio.run(fill_dead_letters(kafka, dlq))
    env = bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_DEAD_LETTER_TOPIC=dlq,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
    )

    assert cli.main(["redrive", "--dry-run", "--verbose", "--offset", "1"], environ=env) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:3]) == [
        "partition 0 offset 1: stayed (missing_key)",
        f"partition 0 offset 2: would move to {topic} (was unrecognised)",
        "partition 1 offset 1: stayed (ambiguous_payload)",
    ]
    assert out[3] == (
        f"redrive {dlq}: 3 read, 1 would move (dry run: nothing published), 2 stayed "
        "(ambiguous_payload 1, missing_key 1)"
    )
    # Partitions without letters (the mock cluster makes 4) follow as empty ranges.
    assert out[4].startswith("offsets read (partition [start, end)): 0 [1, 3), 1 [1, 2)") and len(out) == 5

    assert cli.main(["redrive", "--verbose"], environ=env) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-2] == (
        f"redrive {dlq}: 5 read, 2 moved, 3 stayed (ambiguous_payload 1, missing_key 1, not_an_object 1)"
    )
    keys = [r.key for r in asyncio.run(read_records(kafka.bootstrap_servers, topic, count=2))]
    assert sorted(keys) == [b"redrive-legacy-1", b"redrive-task-1"]
    # Record values are never printed, not even in verbose mode.
    for fragment in ("PullCompleteEvent", "vodTaskId", "redrive-task-1", 'not", "an'):
        assert fragment not in printed.out + printed.err

    # Configuration errors: exit 2 with the reason.
    assert cli.main(["redrive", "--offset", "0:x"], environ=env) == 2
    assert "--offset: offset 'x' is not a whole number" in capsys.readouterr().err
    assert cli.main(["redrive", "--since", "2026-11-27T10:00:00"], environ=env) == 2
    assert "has no time zone" in capsys.readouterr().err
    assert cli.main(["redrive", "--offset", "7:0"], environ=env) == 2
    assert "partition(s) [7]" in capsys.readouterr().err
    assert cli.main(["redrive"], environ={**env, "BRIDGE_KAFKA_DEAD_LETTER_TOPIC": f"{topic}.nope"}) == 2
    assert f"dead-letter topic '{topic}.nope' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: the start flags exclude each other
        cli.main(["redrive", "--offset", "1", "--since", "2026-11-27T10:00:00Z"], environ=env)
    assert exited.value.code == 2

    # Kafka unreachable: exit 1 within the bound, with a message.
    started = time.monotonic()
    unreachable = {**env, "BRIDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    assert cli.main(["redrive", "--timeout-s", "2"], environ=unreachable) == 1
    assert time.monotonic() - started < 10
    assert "vod-bridge: redrive: cannot read" in capsys.readouterr().err


def test_parse_start_flags() -> None:
    assert parse_offsets("12") == FromOffset(offset=12)
    assert parse_offsets("0:5, 3:0") == FromOffset(per_partition={0: 5, 3: 0})
    for bad, message in (("-1", "negative"), ("0:1,0:2", "given twice"), ("1:2,3", "not PARTITION:OFFSET")):
        with pytest.raises(ValueError, match=message):
            parse_offsets(bad)
    assert parse_since("2026-11-27T10:00:00Z") == Since(datetime(2026, 11, 27, 10, tzinfo=UTC))
    assert parse_since("2026-11-27T18:00+08:00").moment == datetime(2026, 11, 27, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        parse_since("yesterday")
