"""Poller throughput: events/s from ``PullEvents`` to confirmed, against the fake VOD API (tests/fakevod.py).

Two processes, so their CPU is counted apart:

* ``fakevod``: the fake VOD API (real HTTP server, TC3 signature check on every call, 16 events per pull),
  preloaded with ``--events`` PullComplete events of distinct TaskIds; prints its endpoint, runs until stdin
  closes.
* ``poller``: the real :class:`bridge.sources.poller.Poller` with :class:`bridge.vod.api.VodClient` and the sink
  of ``--client`` (:class:`bridge.delivery.kafka.KafkaSink` on aiokafka, or
  :class:`bridge.delivery.librdkafka.LibrdkafkaSink`; acks=all) — the same wiring as ``bridge.app`` — timed from
  its start until every event is confirmed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import MARK_END, MARK_START, PayloadMaker, cpu_self_s, mark, percentiles_ms, report, run

SECRET_ID = "AKIDbenchBENCHbench00"
SECRET_KEY = "bench-secret-key-0000"
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


async def serve_fakevod(events: int) -> None:
    sys.path.insert(0, str(TESTS_DIR))
    from fakevod import FakeVod

    payload = PayloadMaker(start=10**9)
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, visibility_timeout_s=30.0) as vod:
        for _ in range(events):
            vod.add_event(json.loads(payload.next()[1]))
        print(json.dumps({"endpoint": vod.endpoint}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


def make_sink(kafka: Any, metrics: Any, client: str) -> Any:
    """The sink ``bridge.app`` builds for ``BRIDGE_KAFKA_CLIENT=client``: its factory when this bridge has one."""
    try:
        from bridge.delivery.clients import make_sink as factory
    except ImportError:
        pass
    else:
        return factory(kafka, metrics)
    if client == "librdkafka":
        from bridge.delivery.librdkafka import LibrdkafkaSink

        return LibrdkafkaSink(kafka, metrics)
    from bridge.delivery.kafka import KafkaSink

    return KafkaSink(kafka, metrics)


async def run_poller(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.config import KafkaSettings, PollerSettings
    from bridge.delivery.pipeline import Delivery
    from bridge.delivery.records import event_headers
    from bridge.ops.metrics import Metrics
    from bridge.sources.poller import Poller
    from bridge.vod.api import Credentials, VodClient
    from bridge.vod.decode import decode_event

    metrics = Metrics()
    options: dict[str, Any] = {"client": args.client} if "client" in KafkaSettings.__struct_fields__ else {}
    kafka = KafkaSettings(
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        enable_idempotence=args.enable_idempotence == "true",
        linger_ms=args.linger_ms,
        max_batch_bytes=args.max_batch_bytes,
        **options,
    )
    sink = make_sink(kafka, metrics, args.client)
    await asyncio.wait_for(sink.connect(), timeout=30)
    # Warm the topic metadata, as the warm-up of the HTTP scenarios does.
    warm = decode_event(PayloadMaker(start=2 * 10**9).next()[1])
    headers = event_headers(warm, source="pull", received_at=datetime.now(UTC))
    await sink.send(args.topic, warm.key.encode(), warm.value, headers)
    settings = PollerSettings(enabled=True, endpoint=args.endpoint)
    delivery = Delivery(sink, metrics, topic_for=kafka.topic_for, dead_letter_topic=f"{args.topic}.dlq")
    try:
        async with aiohttp.ClientSession() as session:
            client = VodClient(session, Credentials(SECRET_ID, SECRET_KEY), endpoint=args.endpoint)
            poller = Poller(client, delivery, settings, metrics, ready=lambda: sink.ready)
            cpu_start = cpu_self_s()
            mark(MARK_START)
            started = time.perf_counter()
            task = asyncio.create_task(poller.run())
            deadline = started + args.timeout
            # Polling a counter of the poller is the measurement itself (2 ms resolution on a multi-second run).
            while poller.stats.confirmed < args.events and time.perf_counter() < deadline and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - started
            cpu = cpu_self_s() - cpu_start
            mark(MARK_END)
            poller.stop()
            await asyncio.wait_for(task, timeout=15)
    finally:
        await sink.close()
    stats = poller.stats
    return {
        "mode": "poller",
        "events": args.events,
        "confirmed": stats.confirmed,
        "duration_s": elapsed,
        "ok": stats.confirmed,
        "rps": stats.confirmed / elapsed,
        "pulls": stats.pulls,
        "published": stats.published,
        "not_confirmed": stats.not_confirmed,
        "non_2xx": stats.not_confirmed,
        "conn_errors": 0,
        "confirm_age_ms": percentiles_ms(stats.confirm_ages_s),
        "latency_ms": percentiles_ms(stats.confirm_ages_s),
        "loadgen_core_fraction": None,
        "poller_core_fraction": cpu / elapsed,
        "linger_ms": args.linger_ms,
        "client": args.client,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.poller_bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fake = commands.add_parser("fakevod")
    fake.add_argument("--events", type=int, required=True)
    poll = commands.add_parser("poller")
    poll.add_argument("--endpoint", required=True)
    poll.add_argument("--bootstrap-servers", required=True)
    poll.add_argument("--topic", required=True)
    poll.add_argument("--events", type=int, required=True)
    poll.add_argument("--client", choices=["aiokafka", "librdkafka"], default="aiokafka")
    poll.add_argument("--enable-idempotence", choices=["true", "false"], default="true")
    poll.add_argument("--linger-ms", type=int, default=0)
    poll.add_argument("--max-batch-bytes", type=int, default=65536)
    poll.add_argument("--timeout", type=float, default=60.0)
    for sub in (fake, poll):
        sub.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    args = parser.parse_args(argv)
    if args.command == "fakevod":
        run(serve_fakevod(args.events), args.loop)
        return 0
    result = run(run_poller(args), args.loop)
    result["server_loop"] = args.loop
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
