"""The listening sockets and the serving loop of ``vod-bridge serve``.

The sockets are bound (and listening) before anything announces the address: a busy port is a configuration
error (:class:`ConfigError`, exit code 2) reported before any "listening" line. The serving loop is
``web.run_app``'s, with one difference: each accepted connection goes through a
:class:`~bridge.sources.connections.ConnectionGuard` (header deadline, connection bound), which ``run_app`` has
no way to plug in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from bridge.errors import ConfigError
from bridge.sources.connections import BACKLOG, ConnectionGuard

logger = logging.getLogger(__name__)

#: Which settings name the listening address, for the error message.
_WHERE = "BRIDGE_HTTP_HOST / --host and BRIDGE_HTTP_PORT / --port"


def bind_listeners(host: str, port: int, *, reuse_port: bool, backlog: int = BACKLOG) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to, as asyncio's ``create_server`` would (SO_REUSEADDR,
    IPv6 sockets IPv6-only, SO_REUSEPORT when asked). Returns only once every socket listens; raises
    :class:`ConfigError` naming the address, the port and their settings (nothing stays bound then)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} ({_WHERE})") from None
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio: "::" and "0.0.0.0" both resolve for a wildcard host, each gets its own socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                what = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                shown = address[0] if isinstance(address[0], str) else host
                raise ConfigError(f"cannot listen on {shown} port {port}: {what} ({_WHERE})") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def listening_urls(listeners: Sequence[socket.socket], *, scheme: str) -> list[str]:
    """``http://0.0.0.0:8080`` for each socket: the port actually bound (``BRIDGE_HTTP_PORT=0`` picks one)."""
    urls = []
    for sock in listeners:
        host, port = sock.getsockname()[:2]
        urls.append(f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}")
    return urls


class GuardedSite(web.BaseSite):
    """A site on an already listening socket whose connections go through ``guard``."""

    __slots__ = ("_guard", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = BACKLOG,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._guard = guard

    @property
    def name(self) -> str:
        return listening_urls([self._sock], scheme="https" if self._ssl_context else "http")[0]

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            # A handshake is part of the request head: the same deadline (asyncio's default is 60 s).
            extra["ssl_handshake_timeout"] = self._guard.header_timeout_s
        self._server = await loop.create_server(
            self._guard.protocol_factory(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            **extra,
        )
        self._guard.watch_listener(self._sock)


def run(
    app: web.Application,
    listeners: Sequence[socket.socket],
    guard: ConnectionGuard,
    *,
    loop: asyncio.AbstractEventLoop,
    ssl_context: ssl.SSLContext | None,
    shutdown_timeout_s: float,
    on_serving: Callable[[], None] = lambda: None,
    **runner_options: Any,
) -> None:
    """``web.run_app`` on ``listeners`` with ``guard``: until SIGTERM/SIGINT, then aiohttp's graceful shutdown
    (stop accepting, let handlers finish within ``shutdown_timeout_s``, run the app's cleanup). ``on_serving``
    is called once every listener accepts connections."""

    async def main() -> None:
        # handle_signals: SIGTERM/SIGINT raise GracefulExit out of the loop, as in web.run_app.
        runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout_s, **runner_options)
        await runner.setup()
        try:
            guard.start()
            for sock in listeners:
                await GuardedSite(runner, sock, guard, ssl_context=ssl_context).start()
            on_serving()
            await asyncio.Event().wait()
        finally:
            guard.stop()
            await runner.cleanup()

    main_task = loop.create_task(main())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main_task.done():
                main_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main_task)
        finally:
            _cancel_tasks(asyncio.all_tasks(loop), loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_tasks(tasks: set[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop) -> None:
    """What is still running after the app's cleanup, cancelled and reported as ``web.run_app`` does."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception during shutdown", "exception": exc, "task": task}
            )
