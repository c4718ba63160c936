"""Scenario (b), the Kafka ceiling: a bare aiokafka producer sending the bridge's records, no HTTP at all.

``--concurrency`` loops (as many as the HTTP load generator has connections) each send one record and await
its ack before sending the next, exactly like one bridge callback: key = TaskId, value = the seed payload
with that TaskId, the four headers of the record contract, acks=all, and the bridge's producer settings
(linger, batch size, request timeout). Idempotent unless ``--enable-idempotence false`` (tansu refuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import PayloadMaker, Window, percentiles_ms, report, run

HEADERS = [
    ("event-type", b"PullComplete"),
    ("source", b"callback"),
    ("received-at", b"2026-01-01T00:00:00.000Z"),
    ("content-type", b"application/json"),
]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_servers,
        client_id="vod-bridge-bench",
        acks="all",
        enable_idempotence=args.enable_idempotence == "true",
        linger_ms=args.linger_ms,
        max_batch_size=args.max_batch_bytes,
        request_timeout_ms=10_000,
    )
    await producer.start()
    payload = PayloadMaker()
    window = Window(args.warmup, args.duration)
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    stopping = False

    async def sender() -> None:
        while not stopping:
            key, value = payload.next()
            started = time.perf_counter()
            try:
                delivery = await producer.send(args.topic, value, key=key, headers=HEADERS)
                await delivery
            except Exception:
                counts["errors"] += 1
                continue
            now = time.perf_counter()
            if window.start <= now < window.end:
                counts["ok"] += 1
                latencies.append(now - started)

    try:
        tasks = [asyncio.create_task(sender()) for _ in range(args.concurrency)]
        await window.run()
        stopping = True
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    return {
        "mode": "closed",
        "connections": args.concurrency,
        "duration_s": window.elapsed_s,
        "ok": counts["ok"],
        "rps": counts["ok"] / window.elapsed_s,
        "non_2xx": counts["errors"],
        "conn_errors": 0,
        "latency_ms": percentiles_ms(latencies),
        "loadgen_core_fraction": None,
        "record_bytes": payload.size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--enable-idempotence", choices=["true", "false"], default="true")
    parser.add_argument("--linger-ms", type=int, default=0)
    parser.add_argument("--max-batch-bytes", type=int, default=65536)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    args = parser.parse_args(argv)
    result = run(bench(args), args.loop)
    result["server_loop"] = args.loop
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
