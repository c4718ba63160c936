"""``create_app``: the one wiring point. Every component is built here and handed its collaborators; resources
with a lifetime (the producer, the spool, the poller) live in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bridge.config import Settings, parse_networks
from bridge.delivery.clients import ProducerSink, make_sink
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.pipeline import Delivery
from bridge.delivery.spool import AsyncSpool, Spool
from bridge.errors import BridgeError, ConfigError
from bridge.ops.logs import RedactingAccessLogger
from bridge.ops.metrics import GAUGE_REFRESH_INTERVAL_S, Metrics
from bridge.ops.tracing import make_tracer
from bridge.sources.access import SourceFilter
from bridge.sources.callback import CallbackReceiver, callback_paths
from bridge.sources.http import error_middleware
from bridge.sources.poller import Poller
from bridge.sources.tls import ServerTls
from bridge.vod.api import Credentials, VodClient

logger = logging.getLogger(__name__)

FatalHandler = Callable[[BaseException], None]


@dataclass
class Components:
    """What ``create_app`` built, for its own health/metrics handlers and for tests and embedders to inspect.

    Sources and delivery never read this: they are handed their collaborators explicitly.
    """

    settings: Settings
    metrics: Metrics
    sink: ProducerSink
    delivery: Delivery
    #: Set once the spool is open (start-up), when ``BRIDGE_SPOOL_DIR`` is set.
    forwarder: SpoolForwarder | None = None
    #: One PullEvents loop per configured VOD application (``BRIDGE_VOD_SUB_APP_IDS``), when the poller is on.
    pollers: list[Poller] = field(default_factory=list)
    #: The server's TLS context and its certificate files, when ``BRIDGE_HTTP_TLS_CERT_FILE`` is set.
    tls: ServerTls | None = None
    #: Loop time by which the poller and the forwarder must have finished, set when shutdown begins: they
    #: stop alongside the draining HTTP handlers, and the producer's bounded flush comes after.
    shutdown_deadline: float | None = None

    @property
    def ready(self) -> bool:
        """What ``/readyz`` and the ``vod_bridge_ready`` gauge report: a callback can be acknowledged now.

        Without a spool: the producer is connected. With one: the spool accepts events (a callback Kafka does not
        ack in time is spooled), or it is empty and the producer connected (callbacks go to Kafka directly). A
        spool that refuses for lack of room while it holds events is not ready: every callback would queue behind
        them and get 503 ``spool_full``.
        """
        forwarder = self.forwarder
        if forwarder is None:
            return self.sink.ready
        return forwarder.accepting or (forwarder.depth == 0 and self.sink.ready)

    def time_left_s(self) -> float:
        """Seconds until ``shutdown_deadline`` (the whole shutdown timeout before shutdown began)."""
        if self.shutdown_deadline is None:
            return self.settings.http.shutdown_timeout_s
        return max(0.0, self.shutdown_deadline - asyncio.get_running_loop().time())


COMPONENTS = web.AppKey("components", Components)


def _log_fatal(exc: BaseException) -> None:
    logger.critical("fatal: %s", exc)


def check_poller_credentials(settings: Settings, credentials: Credentials | None) -> None:
    """Raise :class:`ConfigError` when the poller is on without Tencent Cloud credentials."""
    if settings.poller.enabled and credentials is None:
        raise ConfigError(
            "BRIDGE_PULL_ENABLED needs TENCENTCLOUD_SECRET_ID and TENCENTCLOUD_SECRET_KEY (or their _FILE variants)"
        )


def create_app(
    settings: Settings,
    *,
    credentials: Credentials | None = None,
    metrics: Metrics | None = None,
    on_fatal: FatalHandler = _log_fatal,
) -> web.Application:
    """Build the application. ``on_fatal`` is called when a background resource fails for good (the CLI
    uses it to stop the process with a non-zero exit); tests keep the default, which only logs.

    Cleanup contexts are registered sink first, spool second, poller third, so on shutdown the poller finishes
    its batch and the forwarder stops before the producer flushes and closes. In multiprocess mode
    (``metrics.multiprocess_dir``) a gauge refresh comes before them all, so it runs until the producer closed.

    With ``BRIDGE_HTTP_TLS_CERT_FILE`` set, the certificate files are loaded here (:class:`ConfigError` when they
    cannot serve); whoever binds the socket passes ``app[COMPONENTS].tls.context`` to it.
    """
    check_poller_credentials(settings, credentials)
    metrics = metrics or Metrics()
    http, delivery_settings = settings.http, settings.delivery
    sink = make_sink(settings.kafka, metrics, max_record_bytes=http.max_body_bytes, on_fatal=on_fatal)
    dedup = (
        DedupWindow(delivery_settings.dedup_window_s, delivery_settings.dedup_max_entries)
        if delivery_settings.dedup_window_s > 0
        else None
    )
    delivery = Delivery(
        sink,
        metrics,
        topic_for=settings.kafka.topic_for,
        dead_letter_topic=delivery_settings.dead_letter_topic,
        invalid_callbacks=delivery_settings.callback_invalid,
        dedup=dedup,
        spool_budget_s=settings.spool.publish_budget_s,
    )
    tls = ServerTls.load(http, metrics) if http.tls_enabled else None
    components = Components(settings, metrics, sink, delivery, tls=tls)
    metrics.feed(metrics.ready, lambda: float(components.ready))
    tracer = make_tracer(settings.otel_enabled)

    app = web.Application(client_max_size=http.max_body_bytes, middlewares=[error_middleware])
    app[COMPONENTS] = components
    if metrics.multiprocess_dir is not None:
        app.cleanup_ctx.append(_background_ctx("metrics-gauge-refresh", lambda: _refresh_gauges(metrics)))
    app.cleanup_ctx.append(_kafka_sink_ctx(components, on_fatal))
    if settings.spool.dir is not None:
        app.cleanup_ctx.append(_spool_ctx(components, Path(settings.spool.dir), on_fatal))
    if settings.poller.enabled:
        assert credentials is not None
        app.cleanup_ctx.append(_poller_ctx(components, credentials, tracer, on_fatal))
    if tls is not None and http.tls_reload_interval_s > 0:
        interval_s = http.tls_reload_interval_s
        app.cleanup_ctx.append(_background_ctx("tls-watch", lambda: tls.watch(interval_s)))
    app.on_shutdown.append(_stop_background)
    if settings.callback_enabled:
        source_filter = SourceFilter(parse_networks(http.allowed_cidrs), parse_networks(http.trusted_proxies))
        receiver = CallbackReceiver(delivery, http, metrics, tracer, source_filter=source_filter)
        for path in callback_paths(http.callback_path, with_token=http.token is not None):
            app.router.add_post(path, receiver.handle, expect_handler=receiver.expect_continue)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def runner_options(settings: Settings) -> dict[str, Any]:
    """Options for ``web.run_app``/``AppRunner``: access lines at DEBUG only, with secrets redacted; idle
    connections closed after ``idle_timeout_s`` (unfinished request heads after ``header_timeout_s``, by
    bridge.sources.connections, which ``serve`` puts in front of every connection); request bodies never inflated
    (a ``Content-Encoding`` is refused instead, so a compression bomb costs nothing, not even while lingering)."""
    return {
        "access_log_class": RedactingAccessLogger,
        "access_log": logging.getLogger("bridge.access"),
        "keepalive_timeout": settings.http.idle_timeout_s,
        "auto_decompress": False,
        # After refusing a body, read (and drop) what is still coming for at most this long, so the client
        # sees the answer rather than a reset; aiohttp's 10 s default let stalled clients hold sockets.
        "lingering_time": 0.5,
    }


def _background_ctx(
    name: str, run: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``run()`` as a task for the app's lifetime and cancels it at cleanup."""

    async def background(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return background


async def _refresh_gauges(metrics: Metrics) -> None:
    while True:
        metrics.refresh_gauges()
        await asyncio.sleep(GAUGE_REFRESH_INTERVAL_S)


def _kafka_sink_ctx(c: Components, on_fatal: FatalHandler) -> Callable[[web.Application], AsyncIterator[None]]:
    async def kafka_sink(app: web.Application) -> AsyncIterator[None]:
        # Connect in the background so /healthz and /readyz answer while Kafka is still unreachable.
        connecting = asyncio.create_task(c.sink.connect(), name="kafka-connect")
        connecting.add_done_callback(lambda task: _report_failure(task, on_fatal))
        yield
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, BridgeError):
            await connecting
        # Bounded by the publish timeout whatever Kafka does; what it gives up on was never acknowledged to anyone:
        # logged, counted, and a clean exit all the same (bridge.cli).
        if abandoned := await c.sink.close():
            c.metrics.abandoned.inc(abandoned)

    return kafka_sink


def _poller_ctx(
    c: Components, credentials: Credentials, tracer: Any, on_fatal: FatalHandler
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def vod_poller(app: web.Application) -> AsyncIterator[None]:
        settings = c.settings.poller
        # The one HTTP client session of the process, reused by every VOD API call of every loop.
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.request_timeout_s))
        sink = c.sink
        tasks: list[tuple[asyncio.Task[None], str]] = []
        # One loop per VOD application, each with its own client: what a loop pulls, it confirms under the same
        # SubAppId. A loop's API errors only back it off; an unexpected crash is fatal, as for a single loop.
        for sub_app_id in settings.loop_sub_app_ids():
            client = VodClient(
                session,
                credentials,
                endpoint=settings.endpoint,
                region=settings.region,
                sub_app_id=sub_app_id,
                request_timeout_s=settings.request_timeout_s,
            )
            poller = Poller(client, c.delivery, settings, c.metrics, ready=lambda: sink.ready, tracer=tracer)
            c.pollers.append(poller)
            name = "vod-poller" if sub_app_id is None else f"vod-poller-{sub_app_id}"
            task = asyncio.create_task(poller.run(), name=name)
            task.add_done_callback(lambda task: _report_failure(task, on_fatal))
            tasks.append((task, name))
        yield
        for poller in c.pollers:
            poller.stop()
        try:
            # Each loop's current batch is published and confirmed before the producer closes (it closes after
            # us); the loops drain side by side, all within the one shutdown deadline, and the session stays open
            # until the last of them is done, even when another one failed.
            results = await asyncio.gather(
                *(_finish(task, name, c.time_left_s()) for task, name in tasks), return_exceptions=True
            )
        finally:
            await session.close()
        if failure := next((r for r in results if isinstance(r, BaseException)), None):
            raise failure

    return vod_poller


def _spool_ctx(
    c: Components, directory: Path, on_fatal: FatalHandler
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def spool(app: web.Application) -> AsyncIterator[None]:
        settings = c.settings
        store = await asyncio.to_thread(
            Spool.open, directory, max_bytes=settings.spool.max_bytes, min_free_bytes=settings.spool.min_free_bytes
        )
        # Spool.open already logged each recovery problem (file, offset, reason) at WARNING.
        async_spool = AsyncSpool(store)
        forwarder = SpoolForwarder(
            async_spool,
            c.sink,
            c.metrics,
            topic_for=settings.kafka.topic_for,
            dead_letter_topic=settings.delivery.dead_letter_topic,
        )
        c.forwarder = forwarder
        c.delivery.use_spool(forwarder)
        logger.info("spool open at %s with %d events waiting", directory, forwarder.depth)
        task = asyncio.create_task(forwarder.run(), name="spool-forwarder")
        task.add_done_callback(lambda task: _report_failure(task, on_fatal))
        yield
        forwarder.stop()
        # What it has not forwarded stays in the spool, committed only after Kafka's ack: safe to cut short.
        await _finish(task, "spool forwarder", c.time_left_s())
        c.delivery.use_spool(None)
        await async_spool.close()

    return spool


async def reload_on_sighup(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context for the serving process (like :func:`freeze_gc`, not for embedded apps): SIGHUP
    reloads the TLS certificate; without TLS it is logged and otherwise ignored. ``--workers`` forwards it."""
    tls = app[COMPONENTS].tls

    def on_sighup() -> None:
        if tls is None:
            logger.info("SIGHUP: no TLS certificate configured, nothing to reload")
        else:
            tls.reload("SIGHUP")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    yield
    loop.remove_signal_handler(signal.SIGHUP)
    # The producer still flushes after this: a late SIGHUP must not kill the process (SIG_DFL would).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _finish(task: asyncio.Task[None], name: str, timeout_s: float) -> None:
    """Wait for a stopping background task at most ``timeout_s``, then cancel it."""
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=timeout_s)
    except TimeoutError:
        logger.warning("%s did not finish within the shutdown timeout; cancelling it", name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _stop_background(app: web.Application) -> None:
    # on_shutdown runs before in-flight handlers finish: whatever they still spool stays on disk (the spool
    # closes only in cleanup) and is forwarded at the next start. The poller finishes its current batch.
    c = app[COMPONENTS]
    c.shutdown_deadline = asyncio.get_running_loop().time() + c.settings.http.shutdown_timeout_s
    if c.forwarder is not None:
        c.forwarder.stop()
    for poller in c.pollers:
        poller.stop()


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
    c = request.app[COMPONENTS]
    # "connected" only while the cluster answers now (bridge.delivery.progress), not since the producer connected.
    kafka = "connected" if c.sink.ready and c.sink.reachable else "unreachable"
    body: dict[str, Any] = {"status": "ready" if c.ready else "not_ready", "kafka": kafka}
    if c.forwarder is not None:
        body["spool"] = "accepting" if c.forwarder.accepting else "full"
        body["spool_depth"] = c.forwarder.depth
    if c.ready:
        return web.json_response(body)
    body["reason"] = "kafka producer not connected" if c.forwarder is None else "spool full and kafka not taking events"
    return web.json_response(body, status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[COMPONENTS].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
