"""``python -m bench.path_bench [--src DIR]``: the bridge's per-event Python path, in-process, no HTTP, no Kafka.

Times ``read_event`` + ``Delivery.deliver`` (record headers, counters, a sink that acknowledges at once) + the
callback's answer, and each of those pieces, in µs per event (best of 7 rounds). ``--src DIR`` imports the
``bridge`` package of another tree (an older checkout) instead, to compare the two.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class _Ack:
    topic = "vod.events"
    partition = 1
    offset = 123456


class _Sink:
    ready = True

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Any, **kwargs: Any) -> _Ack:
        return _Ack()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never suspends (the null sink does not) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.path_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="import the bridge package from this tree")
    parser.add_argument("--events", type=int, default=1000, help="distinct bodies per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=100, help="passes over them per measurement (default 100)")
    args = parser.parse_args(argv)
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    import bridge
    from bench.common import PayloadMaker
    from bridge.delivery.pipeline import Delivery
    from bridge.delivery.records import event_headers
    from bridge.ops.metrics import Metrics
    from bridge.sources import http
    from bridge.vod.decode import read_event

    if hasattr(http, "published_answer"):
        answer: Callable[[Any], Any] = lambda out: http.published_answer(out.topic, out.partition, out.offset)  # noqa: E731
    else:
        answer = lambda out: http.json_answer(  # noqa: E731
            {"status": "published", "topic": out.topic, "partition": out.partition, "offset": out.offset}
        )
    metrics = Metrics()
    delivery = Delivery(_Sink(), metrics, topic_for=lambda event_type: "vod.events", dead_letter_topic="dlq")  # type: ignore[arg-type]
    maker = PayloadMaker()
    bodies = [maker.next()[1] for _ in range(args.events)]
    item = read_event(bodies[0])
    now = datetime.now(UTC)

    def path() -> None:
        for body in bodies:
            event = read_event(body)
            outcome = _run(delivery.deliver(event, source="callback", received_at=datetime.now(UTC)))
            answer(outcome)

    def per_event(fn: Callable[[], object], number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

    started = time.perf_counter()
    whole = min(timeit.repeat(path, number=args.rounds, repeat=7)) / (args.rounds * len(bodies)) * 1e6
    print(f"bridge from {Path(bridge.__file__).parent}")
    print(f"  {whole:6.2f} µs  read_event + deliver + answer (null sink)")
    pieces: list[tuple[str, Callable[[], object]]] = [
        ("read_event", lambda: read_event(bodies[0])),
        (
            "deliver (headers, counters, null sink)",
            lambda: _run(delivery.deliver(item, source="callback", received_at=now)),
        ),
        ("event_headers", lambda: event_headers(item, source="callback", received_at=now)),
        ("metrics.count_received", lambda: metrics.count_received("callback", item.event_type)),
        ("answer", lambda: answer(_Ack())),
    ]
    for name, fn in pieces:
        print(f"  {per_event(fn, 50_000):6.2f} µs  {name}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
