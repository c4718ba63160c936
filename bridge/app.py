"""``create_app``: the one wiring point. Resources live in cleanup contexts, shared through typed AppKeys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .config import Settings
from .errors import BridgeError
from .keys import METRICS_KEY, SETTINGS_KEY, SINK_KEY
from .metrics import Metrics
from .receiver import error_middleware, handle_callback
from .sink import KafkaSink

logger = logging.getLogger("bridge.app")

FatalHandler = Callable[[BaseException], None]


def _log_fatal(exc: BaseException) -> None:
    logger.critical("fatal: %s", exc)


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    on_fatal: FatalHandler = _log_fatal,
) -> web.Application:
    """Build the application. ``on_fatal`` is called when a background resource fails for good (the CLI
    uses it to stop the process with a non-zero exit); tests keep the default, which only logs."""
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics or Metrics()
    app.cleanup_ctx.append(_kafka_sink_ctx(on_fatal))
    app.router.add_post(settings.http.callback_path, handle_callback)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def _kafka_sink_ctx(
    on_fatal: FatalHandler,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def kafka_sink(app: web.Application) -> AsyncIterator[None]:
        sink = KafkaSink(app[SETTINGS_KEY].kafka, app[METRICS_KEY])
        app[SINK_KEY] = sink
        # Connect in the background so /healthz and /readyz answer while Kafka is still unreachable.
        connecting = asyncio.create_task(sink.connect(), name="kafka-connect")
        connecting.add_done_callback(lambda task: _report_failure(task, on_fatal))
        yield
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, BridgeError):
            await connecting
        await sink.close()

    return kafka_sink


def _report_failure(task: asyncio.Task[None], on_fatal: FatalHandler) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        on_fatal(exc)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[SINK_KEY].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not_ready", "reason": "kafka producer not connected"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
