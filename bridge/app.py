"""``create_app``: the one wiring point. Resources live in cleanup contexts, shared through typed AppKeys."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge.config import Settings, parse_networks
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.kafka import KafkaSink
from bridge.delivery.spool import AsyncSpool, Spool
from bridge.errors import BridgeError, ConfigError
from bridge.keys import (
    DEDUP_KEY,
    FORWARDER_KEY,
    METRICS_KEY,
    POLLER_KEY,
    SETTINGS_KEY,
    SINK_KEY,
    SOURCE_FILTER_KEY,
    TRACER_KEY,
)
from bridge.ops.logs import RedactingAccessLogger
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import make_tracer
from bridge.sources.access import SourceFilter
from bridge.sources.callback import error_middleware, expect_continue, handle_callback
from bridge.sources.poller import Poller
from bridge.vod.api import Credentials, VodClient

logger = logging.getLogger("bridge.app")

FatalHandler = Callable[[BaseException], None]


def _log_fatal(exc: BaseException) -> None:
    logger.critical("fatal: %s", exc)


def create_app(
    settings: Settings,
    *,
    credentials: Credentials | None = None,
    metrics: Metrics | None = None,
    on_fatal: FatalHandler = _log_fatal,
) -> web.Application:
    """Build the application. ``on_fatal`` is called when a background resource fails for good (the CLI
    uses it to stop the process with a non-zero exit); tests keep the default, which only logs.

    Cleanup contexts are registered sink first, poller second, so on shutdown the poller finishes its
    batch before the producer flushes and closes.
    """
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics or Metrics()
    http = settings.http
    app[SOURCE_FILTER_KEY] = SourceFilter(parse_networks(http.allowed_cidrs), parse_networks(http.trusted_proxies))
    app[DEDUP_KEY] = DedupWindow(http.dedup_window_s, http.dedup_max_entries) if http.dedup_window_s > 0 else None
    app[FORWARDER_KEY] = None
    app[TRACER_KEY] = make_tracer(settings.otel_enabled)
    app.cleanup_ctx.append(_kafka_sink_ctx(on_fatal))
    if settings.spool.dir is not None:
        app.cleanup_ctx.append(_spool_ctx(settings.spool.dir, on_fatal))
        app.on_shutdown.append(_stop_forwarder)
    if settings.poller.enabled:
        if credentials is None:
            raise ConfigError(
                "BRIDGE_PULL_ENABLED needs TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY (or their _FILE)"
            )
        app.cleanup_ctx.append(_poller_ctx(credentials, on_fatal))
        app.on_shutdown.append(_stop_poller)
    if settings.callback_enabled:
        app.router.add_post(http.callback_path, handle_callback, expect_handler=expect_continue)
        if http.token is not None:
            path = http.callback_path.rstrip("/") + "/{token}"
            app.router.add_post(path, handle_callback, expect_handler=expect_continue)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def runner_options(settings: Settings) -> dict[str, Any]:
    """Options for ``web.run_app``/``AppRunner``: access lines at DEBUG only, with secrets redacted; idle and
    slow-header connections closed after ``idle_timeout_s``; request bodies never inflated (a
    ``Content-Encoding`` is refused instead, so a compression bomb costs nothing, not even while lingering)."""
    return {
        "access_log_class": RedactingAccessLogger,
        "access_log": logging.getLogger("bridge.access"),
        "keepalive_timeout": settings.http.idle_timeout_s,
        "auto_decompress": False,
        # After refusing a body, read (and drop) what is still coming for at most this long, so the client
        # sees the answer rather than a reset; aiohttp's 10 s default let stalled clients hold sockets.
        "lingering_time": 0.5,
    }


def _kafka_sink_ctx(
    on_fatal: FatalHandler,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def kafka_sink(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS_KEY]
        sink = KafkaSink(settings.kafka, app[METRICS_KEY], max_record_bytes=settings.http.max_body_bytes)
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


def _poller_ctx(credentials: Credentials, on_fatal: FatalHandler) -> Callable[[web.Application], AsyncIterator[None]]:
    async def vod_poller(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS_KEY]
        # The one HTTP client session of the process, reused by every VOD API call.
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.poller.request_timeout_s))
        client = VodClient(
            session,
            credentials,
            endpoint=settings.poller.endpoint,
            region=settings.poller.region,
            sub_app_id=settings.poller.sub_app_id,
            request_timeout_s=settings.poller.request_timeout_s,
        )
        poller = Poller(
            client, app[SINK_KEY], settings.poller, app[METRICS_KEY], dedup=app[DEDUP_KEY], tracer=app[TRACER_KEY]
        )
        app[POLLER_KEY] = poller
        task = asyncio.create_task(poller.run(), name="vod-poller")
        task.add_done_callback(lambda task: _report_failure(task, on_fatal))
        yield
        poller.stop()
        try:
            # The current batch is published and confirmed before the producer closes (it closes after us).
            await asyncio.wait_for(asyncio.shield(task), timeout=settings.http.shutdown_timeout_s)
        except TimeoutError:
            logger.warning("poller did not finish within %.0fs; cancelling it", settings.http.shutdown_timeout_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await session.close()

    return vod_poller


def _spool_ctx(directory: str, on_fatal: FatalHandler) -> Callable[[web.Application], AsyncIterator[None]]:
    async def spool(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS_KEY]
        store = await asyncio.to_thread(Spool.open, Path(directory), max_bytes=settings.spool.max_bytes)
        # Spool.open already logged each recovery problem (file, offset, reason) at WARNING.
        async_spool = AsyncSpool(store)
        forwarder = SpoolForwarder(
            async_spool, app[SINK_KEY], app[METRICS_KEY], dead_letter_topic=settings.poller.dead_letter_topic
        )
        app[FORWARDER_KEY] = forwarder
        logger.info("spool open at %s with %d events waiting", directory, forwarder.depth)
        task = asyncio.create_task(forwarder.run(), name="spool-forwarder")
        task.add_done_callback(lambda task: _report_failure(task, on_fatal))
        yield
        forwarder.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await async_spool.close()

    return spool


async def _stop_forwarder(app: web.Application) -> None:
    # on_shutdown runs before in-flight handlers finish: whatever they still spool stays on disk (the spool
    # closes only in cleanup) and is forwarded at the next start.
    forwarder = app[FORWARDER_KEY]
    if forwarder is not None:
        forwarder.stop()


async def _stop_poller(app: web.Application) -> None:
    if POLLER_KEY in app:
        app[POLLER_KEY].stop()


def _report_failure(task: asyncio.Task[None], on_fatal: FatalHandler) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        on_fatal(exc)


async def freeze_gc(app: web.Application) -> None:
    """A startup hook for the serving process (not for apps embedded in tests or other programs).

    Runs after the cleanup contexts started: what exists now lives as long as the process, so moving it out of
    the collector's view keeps full collections short (docs/performance.md: closed-loop p99.9 53 -> 28 ms).
    """
    gc.collect()
    gc.freeze()


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    kafka_ready = request.app[SINK_KEY].ready
    forwarder = request.app[FORWARDER_KEY]
    if kafka_ready or forwarder is not None:
        # With a spool, callbacks are accepted (spooled) even while Kafka is unreachable.
        body: dict[str, Any] = {"status": "ready", "kafka": "connected" if kafka_ready else "unavailable"}
        if forwarder is not None:
            body["spool_depth"] = forwarder.depth
        return web.json_response(body)
    return web.json_response({"status": "not_ready", "reason": "kafka producer not connected"}, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
