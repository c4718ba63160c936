"""The minimal peer: the smallest honest aiohttp + confluent-kafka callback handler, as the bridge's yardstick.

What issue 11's author measured: decode the key with msgspec, ``produce`` with key and headers (acks=all, the
bridge's producer settings), a poll thread that resolves each request's future through
``loop.call_soon_threadsafe``, and the 200 only after the delivery report. Nothing else: no authentication, no
size or body-time limits, no metrics, no spool, no dead letters, no error bodies beyond a bare 503/400.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any

import msgspec
from aiohttp import web
from confluent_kafka import Producer

from bench.common import loop_factory


class _Task(msgspec.Struct):
    TaskId: str


class _Event(msgspec.Struct):
    EventType: str
    PullCompleteEvent: _Task


HEADERS = [("event-type", b"PullComplete"), ("source", b"callback"), ("content-type", b"application/json")]


def app(producer: Producer, topic: str) -> web.Application:
    decode = msgspec.json.Decoder(_Event).decode
    stop = threading.Event()

    def resolve(future: asyncio.Future[int], error: Any, offset: int) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(offset)
        else:
            future.set_exception(RuntimeError(str(error)))

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            key = decode(body).PullCompleteEvent.TaskId.encode()
        except msgspec.DecodeError:
            return web.Response(status=400)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def on_delivery(error: Any, message: Any) -> None:  # on the poll thread
            loop.call_soon_threadsafe(resolve, future, error, message.offset())

        try:
            producer.produce(topic, body, key, headers=HEADERS, on_delivery=on_delivery)
            offset = await future
        except (BufferError, RuntimeError):
            return web.Response(status=503)
        return web.Response(body=b'{"status":"published","offset":%d}' % offset, content_type="application/json")

    def poll() -> None:
        while not stop.is_set():
            producer.poll(0.1)

    async def polling(app: web.Application) -> Any:
        thread = threading.Thread(target=poll, name="poll", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join()
        producer.flush(5)

    application = web.Application(client_max_size=1024 * 1024)
    application.router.add_post("/vod/callback", handle)
    application.cleanup_ctx.append(polling)
    return application


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minimal_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--enable-idempotence", choices=["true", "false"], default="true")
    parser.add_argument("--linger-ms", type=int, default=0)
    parser.add_argument("--max-batch-bytes", type=int, default=65536)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    args = parser.parse_args(argv)
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": args.enable_idempotence == "true",
            "partitioner": "murmur2_random",
            "linger.ms": args.linger_ms,
            "batch.size": args.max_batch_bytes,
            "log_level": 3,
        }
    )
    producer.list_topics(args.topic, timeout=10)  # metadata (and the producer id) before the first request
    web.run_app(
        app(producer, args.topic),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=loop_factory(args.loop)(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
