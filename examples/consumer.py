"""A downstream service reading the bridge's topic: decode, de-duplicate, act, then commit.

    python examples/consumer.py --bootstrap-servers localhost:9092 --topic vod.events [--max-records N]

Defaults come from KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPIC and KAFKA_GROUP_ID (else localhost:9092, vod.events,
vod-consumer-example). Handled events go to stdout; skipped duplicates and bad records are logged to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections import OrderedDict

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from bridge.errors import InvalidPayload
from bridge.vod.decode import decode_event
from bridge.vod.model import MediaCastEvent, PullCompleteEvent, TaskEvent, VodEvent, VodStruct

logger = logging.getLogger("consumer")


class SeenCache:
    """The most recent (EventType, key, Status) triples, bounded: the oldest is forgotten first.

    Delivery is at least once: VOD retries callbacks, a publish that timed out may still land, and the poller
    re-publishes an event whose confirm was lost. Such copies carry the same key and value. (EventType is part
    of the identity because one FileId keys several types: NewFileUpload, PersistenceComplete, ...) This
    in-memory window drops the common case; it forgets on restart and is per process, so the real side effect
    (a database write, ...) must still be idempotent, e.g. an upsert by TaskId.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[str, str, str | None], None] = OrderedDict()

    def first_time(self, item: tuple[str, str, str | None]) -> bool:
        if item in self._seen:
            self._seen.move_to_end(item)
            return False
        self._seen[item] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True


def status_of(payload: VodStruct | None) -> str | None:
    match payload:
        case TaskEvent(Status=status) | MediaCastEvent(Status=status):
            return status
    return None


def emit(line: str) -> None:
    print(line, flush=True)  # at once, also when stdout is a pipe


def handle(event: VodEvent, headers: dict[str, str]) -> None:
    origin = f"source={headers.get('source', '?')} received-at={headers.get('received-at', '?')}"
    match event.payload:
        case PullCompleteEvent(Status="FINISH", ErrCode=int(code)) as pull if code != 0:
            emit(f"PullComplete FAILED TaskId={pull.TaskId} ErrCode={code} Message={pull.Message} {origin}")
        case PullCompleteEvent() as pull:
            emit(
                f"PullComplete TaskId={pull.TaskId} Status={pull.Status} ErrCode={pull.ErrCode} "
                f"FileId={pull.FileId} FileUrl={pull.FileUrl} {origin}"
            )
        case None:  # a type the bridge does not model: only the raw JSON in event.value
            emit(f"{event.event_type} (untyped) key={event.key} {origin}")
        case _:
            emit(f"{event.event_type} key={event.key} Status={status_of(event.payload)} {origin}")


def process(record: ConsumerRecord[bytes, bytes], seen: SeenCache) -> None:
    headers = {name: value.decode() for name, value in record.headers}
    try:
        event = decode_event(record.value or b"")  # a tombstone (None) is not an event either
    except InvalidPayload as exc:  # not the bridge's record contract: skip it (a real service would park it)
        logger.error("skipping %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc.message)
        return
    if headers.get("event-type") != event.event_type:
        logger.warning("event-type header %r differs from the value's EventType", headers.get("event-type"))
    if not seen.first_time((event.event_type, event.key, status_of(event.payload))):
        logger.info("duplicate %s key=%s skipped", event.event_type, event.key)
        return
    handle(event, headers)


async def consume(bootstrap_servers: str, topic: str, group_id: str, max_records: int | None) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,  # commit only what was processed
        auto_offset_reset="earliest",
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    seen, count = SeenCache(), 0
    await consumer.start()
    try:
        while not stop.is_set() and (max_records is None or count < max_records):
            remaining = None if max_records is None else max_records - count
            batches = await consumer.getmany(timeout_ms=1000, max_records=remaining)
            for records in batches.values():
                for record in records:
                    process(record, seen)
                count += len(records)
            if batches:  # after processing: a crash before this line means reprocessing, never a loss
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Read, de-duplicate and print the bridge's VOD events.")
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    parser.add_argument("--topic", default=os.environ.get("KAFKA_TOPIC", "vod.events"))
    parser.add_argument("--group-id", default=os.environ.get("KAFKA_GROUP_ID", "vod-consumer-example"))
    parser.add_argument("--max-records", type=int, help="exit after N records, duplicates included")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    asyncio.run(consume(args.bootstrap_servers, args.topic, args.group_id, args.max_records))


if __name__ == "__main__":
    main()
