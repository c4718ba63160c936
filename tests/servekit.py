"""Serve ``create_app`` in the test's loop the way ``vod-bridge serve`` does: sockets bound first
(``bind_listeners``), each connection through a ``ConnectionGuard``, aiohttp's runner with the CLI's options."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from conftest import wait_until

from bridge.app import COMPONENTS, create_app, runner_options
from bridge.config import Settings
from bridge.ops.metrics import Metrics
from bridge.sources.connections import ConnectionGuard, connection_bound
from bridge.sources.listen import GuardedSite, bind_listeners


@dataclass
class Served:
    app: web.Application
    host: str
    port: int
    session: aiohttp.ClientSession
    server: web.Server
    guard: ConnectionGuard

    @property
    def metrics(self) -> Metrics:
        return self.app[COMPONENTS].metrics

    def url(self, path: str) -> str:
        scheme = "https" if self.app[COMPONENTS].tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def closed(self, reason: str) -> float:
        """``vod_bridge_http_connections_closed_total{reason}``."""
        value = self.metrics.registry.get_sample_value("vod_bridge_http_connections_closed_total", {"reason": reason})
        return value or 0.0


@contextlib.asynccontextmanager
async def serve_like_cli(settings: Settings) -> AsyncIterator[Served]:
    """On 127.0.0.1 and an ephemeral port (HTTPS when the settings have a certificate), once the producer is
    connected. ``web.run_app``'s runner defaults: no handler cancellation on client disconnect."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=2, **runner_options(settings))
    await runner.setup()
    guard = ConnectionGuard(
        header_timeout_s=settings.http.header_timeout_s,
        max_connections=connection_bound(settings.http.max_connections),
        metrics=app[COMPONENTS].metrics,
    )
    guard.start()
    listeners = bind_listeners("127.0.0.1", 0, reuse_port=False)
    tls = app[COMPONENTS].tls
    try:
        for sock in listeners:
            await GuardedSite(runner, sock, guard, ssl_context=tls.context if tls is not None else None).start()
        await wait_until(lambda: app[COMPONENTS].sink.ready, timeout_s=15)
        host, port = listeners[0].getsockname()[:2]
        assert runner.server is not None
        async with aiohttp.ClientSession() as session:
            yield Served(app, host, port, session, runner.server, guard)
    finally:
        guard.stop()
        await runner.cleanup()
        for sock in listeners:
            sock.close()
