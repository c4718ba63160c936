"""Every accepted HTTP connection, tracked: a deadline for its request heads, and a bound on how many are open.

aiohttp has neither: its keep-alive timer (``BRIDGE_HTTP_IDLE_TIMEOUT_S``) is the only limit on a client that
drips header bytes, and nothing limits the number of connections below the process's file limit. Clients that
hold connections with unfinished heads can then take every file descriptor, and VOD's callbacks get refused.

- **Header deadline** (``BRIDGE_HTTP_HEADER_TIMEOUT_S``, like Go's ``ReadHeaderTimeout``): from accept, or from
  the first byte of a request on a keep-alive connection, to the end of its headers. One loop timer for all
  connections, armed for the oldest unfinished head. An idle keep-alive connection has no head in progress and
  is left to aiohttp's idle timer; a request being handled (body, Kafka) is left to the body timeout.
- **Connection bound** (``BRIDGE_HTTP_MAX_CONNECTIONS``, derived from ``RLIMIT_NOFILE`` by default): at the
  bound, a new connection makes room by closing the one that has waited longest for its headers, else an idle
  keep-alive connection; when every connection is in a request, the new one is closed.
- **Accept failures** (EMFILE, ENFILE, ENOBUFS, ENOMEM): logged once when accepting starts failing and once when
  it works again, and counted. asyncio reports each failed accept() to the loop's exception handler (and pauses
  accepting for a second). uvloop reports nothing: on EMFILE/ENFILE libuv frees a reserved descriptor, accepts
  the waiting connections and closes them at once (``uv__emfile_trick``), so their clients see a reset. For it,
  a probe every second duplicates a descriptor: when that fails, accept() fails too.

Not covered: a partial head pipelined behind a request in progress, or arriving in the instant between an answer
and aiohttp's wait for the next request, is left to the idle timer; a TLS handshake has the header deadline as
its own timeout but counts towards the bound only once it completed.

The tracking reads two fields of aiohttp's ``RequestHandler`` (``_request_count``: heads parsed; ``_waiter``:
pending while it waits for the next request), pinned by ``constraints.txt`` and covered by
tests/sources/test_connections.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Gauge

from bridge.ops.metrics import Metrics

logger = logging.getLogger(__name__)

#: File descriptors kept out of the connection bound: Kafka connections (a few per broker, librdkafka's
#: internal pipes), the spool's segment files, the VOD API client's pool, log files, the loop itself.
MIN_RESERVED_FDS: Final = 64
#: ... or this share of the limit, whichever is larger.
RESERVED_FDS_SHARE: Final = 0.1
#: The listen backlog (``web.run_app``'s). An event loop accepts up to this many sockets in one go before any of
#: them reaches the guard (asyncio: then another burst while the first is being set up), so the bound keeps room
#: for two such bursts on top of the reserve.
BACKLOG: Final = 128
_ACCEPT_BURSTS: Final = 2
#: How often the descriptor probe runs (the only accept-failure signal under uvloop).
_PROBE_INTERVAL_S: Final = 1.0
#: asyncio retries a failed accept() after this long (``asyncio.constants.ACCEPT_RETRY_DELAY``): a connection
#: admitted sooner after a failure was accepted before it, in the same burst.
_ACCEPT_RETRY_DELAY_S: Final = 1.0

#: The message asyncio's selector loop passes to the exception handler when ``accept()`` fails for lack of
#: resources (``BaseSelectorEventLoop._accept_connection``).
_ACCEPT_OUT_OF_RESOURCES: Final = "socket.accept() out of system resource"
_ACCEPT_ERRNOS: Final = {
    code: errno.errorcode[code] for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
}


def connection_bound(configured: int) -> int:
    """``configured`` when set (> 0), else the soft ``RLIMIT_NOFILE`` minus a reserve of
    ``max(MIN_RESERVED_FDS, RESERVED_FDS_SHARE * limit) + 2 * BACKLOG``: 4096 -> 3431, 1024 -> 666, 512 -> 192
    (at least 16). A configured bound above the derived one is logged as too high."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    derived = max(16, soft - max(MIN_RESERVED_FDS, int(soft * RESERVED_FDS_SHARE)) - _ACCEPT_BURSTS * BACKLOG)
    if configured <= 0:
        return derived
    if configured > derived:
        logger.warning(
            "BRIDGE_HTTP_MAX_CONNECTIONS=%d is above %d, the file limit (RLIMIT_NOFILE %d) minus what Kafka, the "
            "spool, logs and a burst of accepts need: accept() may fail; raise the limit or lower the setting",
            configured,
            derived,
            soft,
        )
    return configured


class ConnectionGuard:
    """The header deadline and the connection bound for every connection of one server process.

    ``start()`` in the serving loop before the first connection, ``stop()`` when serving ends;
    ``protocol_factory(server)`` is what the listening sockets get instead of aiohttp's ``Server``, and
    ``watch_listener(sock)`` starts the descriptor probe.
    """

    def __init__(
        self,
        *,
        header_timeout_s: float,
        max_connections: int,
        metrics: Metrics,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._metrics = metrics
        #: Every open connection, in accept order.
        self._open: dict[TrackedConnection, None] = {}
        #: Connections whose request head is unfinished, in the order their heads started (so oldest first).
        self._heads: dict[TrackedConnection, None] = {}
        #: Those of them that sent part of their head, in the order they did.
        self._slow: dict[TrackedConnection, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        #: A descriptor to duplicate in the probe (a listening socket), and the probe's timer.
        self._probe_fd: int | None = None
        self._probe: asyncio.TimerHandle | None = None
        #: The errno name while accept() fails, None while it works; and the loop time of the last failure.
        self._accept_failing: str | None = None
        self._accept_failed_at = 0.0
        self._closed = metrics.connections_closed
        self._closed_by_reason = {
            reason: self._closed.labels(reason) for reason in ("header_timeout", "evicted", "over_limit")
        }
        for name in (*_ACCEPT_ERRNOS.values(), "other"):  # every series in the first scrape, at 0
            metrics.accept_failures.labels(name)
        # With --workers, counted at each change rather than refreshed every second: a scrape answered by one
        # worker then sees every worker's count as it is. A single process reads it at the scrape (no lock taken
        # per connection).
        self._open_gauge: Gauge | None = None
        if metrics.multiprocess_dir is None:
            metrics.feed(metrics.connections_open, lambda: float(len(self._open)))
        else:
            self._open_gauge = metrics.connections_open

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """For ``loop.create_server``: aiohttp's protocol for each connection, wrapped for tracking."""

        def tracked() -> asyncio.Protocol:
            return TrackedConnection(self, server())

        return tracked

    def start(self) -> None:
        """Hook into the running loop: its exception handler (asyncio's accept failures)."""
        loop = self._loop = asyncio.get_running_loop()
        previous = self._previous_handler = loop.get_exception_handler()

        def on_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if context.get("message") == _ACCEPT_OUT_OF_RESOURCES and isinstance(exc, OSError):
                self.accept_failed(exc)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(on_exception)

    def stop(self) -> None:
        """Undo :meth:`start`; the connections still open are left to aiohttp's shutdown."""
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous_handler)
        for handle in (self._timer, self._probe):
            if handle is not None:
                handle.cancel()
        self._timer = self._probe = None
        self._probe_fd = None

    def watch_listener(self, sock: socket.socket) -> None:
        """Probe every second whether the process could accept a connection on ``sock`` (a free descriptor)."""
        if self._probe_fd is None and self._loop is not None:
            self._probe_fd = sock.fileno()
            self._probe = self._loop.call_later(_PROBE_INTERVAL_S, self._probe_descriptors)

    def accept_failed(self, exc: OSError) -> None:
        """Count an accept() (or a probe) that failed for lack of resources; log it when accepting starts failing."""
        name = _ACCEPT_ERRNOS.get(exc.errno or 0, "other")
        self._metrics.accept_failures.labels(name).inc()
        if self._accept_failing is None:
            logger.error(
                "accepting connections fails (%s: %s) with %d connections open; retrying",
                name,
                exc.strerror,
                len(self._open),
            )
        self._accept_failing = name
        if self._loop is not None:
            self._accept_failed_at = self._loop.time()

    # ---- called by TrackedConnection --------------------------------------------------------------------

    def _admit(self, connection: TrackedConnection, now: float) -> bool:
        """Make room for ``connection`` under the bound; False when there is none (it is then closed)."""
        self._accepting_again(now)
        if len(self._open) >= self.max_connections:
            victim = next(iter(self._slow), None)
            if victim is None and len(self._open) < self.max_connections + BACKLOG:
                # Nothing has shown itself slow yet: this is a burst of connections not read yet (an event loop
                # accepts many before it reads any). Let it in, over the bound by at most one backlog (the reserve
                # has room for it); whoever then sends a partial head is evicted (_head_partial).
                pass
            else:
                victim = victim or next(iter(self._heads), None) or self._idle_connection()
                if victim is None:
                    self._closed_by_reason["over_limit"].inc()
                    return False
                victim.abort()
                self._closed_by_reason["evicted"].inc()
        self._open[connection] = None
        if self._open_gauge is not None:
            self._open_gauge.inc()
        self._head_started(connection, now)
        return True

    def _idle_connection(self) -> TrackedConnection | None:
        for connection in self._open:
            if connection.head_started_at is None and connection.awaits_request():
                return connection
        return None

    def _head_started(self, connection: TrackedConnection, now: float) -> None:
        connection.head_started_at = now
        self._heads[connection] = None
        if self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_at(now + self.header_timeout_s, self._expire_heads)

    def _head_done(self, connection: TrackedConnection) -> None:
        connection.head_started_at = None
        # No timer to cancel: the one timer finds the next unfinished head when it fires.
        self._heads.pop(connection, None)
        self._slow.pop(connection, None)

    def _head_partial(self, connection: TrackedConnection) -> None:
        """Bytes of an unfinished head arrived: the connection is a slow one, the first victim at the bound.

        Over the bound (after a burst), the slow one that has been so the longest is closed at once.
        """
        if connection not in self._slow:
            self._slow[connection] = None
        if len(self._open) > self.max_connections:
            next(iter(self._slow)).abort()
            self._closed_by_reason["evicted"].inc()

    def _forget(self, connection: TrackedConnection) -> None:
        if connection in self._open:
            del self._open[connection]
            if self._open_gauge is not None:
                self._open_gauge.dec()
        self._heads.pop(connection, None)
        self._slow.pop(connection, None)

    def _expire_heads(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time()
        while self._heads:
            connection = next(iter(self._heads))
            started_at = connection.head_started_at
            assert started_at is not None
            if now < started_at + self.header_timeout_s:
                self._timer = self._loop.call_at(started_at + self.header_timeout_s, self._expire_heads)
                return
            connection.abort()
            self._closed_by_reason["header_timeout"].inc()

    def _probe_descriptors(self) -> None:
        assert self._loop is not None and self._probe_fd is not None
        try:
            os.close(os.dup(self._probe_fd))
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRNOS:
                self.accept_failed(exc)
        else:
            self._accepting_again(self._loop.time())
        self._probe = self._loop.call_later(_PROBE_INTERVAL_S, self._probe_descriptors)

    def _accepting_again(self, now: float) -> None:
        if self._accept_failing is not None and now - self._accept_failed_at >= _ACCEPT_RETRY_DELAY_S:
            logger.warning("accepting connections works again (%d open)", len(self._open))
            self._accept_failing = None


class TrackedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the guard: every call is passed on unchanged."""

    __slots__ = ("_guard", "_transport", "handler", "head_started_at")

    def __init__(self, guard: ConnectionGuard, handler: RequestHandler) -> None:
        self._guard = guard
        self.handler = handler
        self._transport: asyncio.BaseTransport | None = None
        #: Loop time the unfinished request head started (accept, or its first byte); None without one.
        self.head_started_at: float | None = None

    def awaits_request(self) -> bool:
        """True while aiohttp waits for the next request on this connection (nothing in progress)."""
        waiter = self.handler._waiter
        return waiter is not None and not waiter.done()

    def abort(self) -> None:
        """Close at once (no TLS close_notify exchange a client that stalls would never answer)."""
        self._guard._forget(self)
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        assert self._guard._loop is not None
        admitted = self._guard._admit(self, self._guard._loop.time())
        self.handler.connection_made(transport)
        if not admitted:
            self.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard._forget(self)
        self._transport = None
        self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if self.head_started_at is None:
            if not self.awaits_request():
                # A body, or requests pipelined behind one in progress.
                handler.data_received(data)
                return
            heads = handler._request_count
            handler.data_received(data)
            if handler._request_count == heads and data and self._transport is not None:
                assert self._guard._loop is not None
                self._guard._head_started(self, self._guard._loop.time())
                self._guard._head_partial(self)
            return
        heads = handler._request_count
        handler.data_received(data)
        if handler._request_count != heads:
            self._guard._head_done(self)
        elif data and self._transport is not None:
            self._guard._head_partial(self)

    def eof_received(self) -> bool | None:
        # aiohttp's returns None: the transport closes itself on a client's EOF.
        self.handler.eof_received()
        return None

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()
