"""Reading records back: the record printer of `vod-bridge dev` and `vod-bridge tail`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import IO, Any

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from bridge.config import KafkaSettings
from bridge.delivery import records
from bridge.delivery.kafka import connection_options
from bridge.errors import KafkaUnavailable


def format_record(record: Any, *, pretty: bool = True) -> str:
    """One record as text: a summary line, then its value (indented JSON when ``pretty``)."""
    headers = {name: value.decode(errors="replace") for name, value in record.headers or ()}
    key = record.key.decode(errors="replace") if record.key is not None else "-"
    summary = (
        f"{headers.get(records.RECEIVED_AT, '-')} {record.topic}[{record.partition}]@{record.offset} "
        f"key={key} type={headers.get(records.EVENT_TYPE, '-')} source={headers.get(records.SOURCE, '-')}"
    )
    if (reason := headers.get(records.ERROR_REASON)) is not None:
        summary += f" dead-letter={reason}"
    value = record.value or b""
    if pretty:
        with contextlib.suppress(msgspec.DecodeError):
            value = msgspec.json.format(value, indent=2)
    return summary + "\n" + value.decode(errors="replace")


def matches(record: Any, *, event_type: str | None, key: str | None) -> bool:
    headers = dict(record.headers or ())
    if event_type is not None and headers.get(records.EVENT_TYPE, b"").decode(errors="replace") != event_type:
        return False
    return key is None or (record.key or b"").decode(errors="replace") == key


async def tail(
    kafka: KafkaSettings,
    topics: Iterable[str],
    *,
    out: IO[str],
    event_type: str | None = None,
    key: str | None = None,
    from_beginning: bool = False,
    pretty: bool = True,
    max_records: int | None = None,
) -> int:
    """Print matching records as they arrive until cancelled (or ``max_records``); returns how many. Connects as
    the producer does (``kafka``'s bootstrap servers, SASL and TLS)."""
    consumer = AIOKafkaConsumer(
        *sorted(set(topics)),
        **connection_options(kafka),
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise KafkaUnavailable(f"kafka not reachable at {kafka.bootstrap_servers}: {exc}") from None
    shown = 0
    try:
        while max_records is None or shown < max_records:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    if matches(record, event_type=event_type, key=key):
                        print(format_record(record, pretty=pretty), file=out, flush=True)
                        shown += 1
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return shown
