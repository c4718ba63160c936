"""HTTP/1.1 load generator: raw asyncio Protocols, keep-alive, one request in flight per connection.

No pipelining: each connection sends its next request only after the previous response was read in full.
Requests are assembled from prebuilt bytes (head + seed payload with a fresh, same-length TaskId), responses
are parsed just enough to find the status and the end of the body (``Content-Length``).

Modes:

* ``closed``: every connection sends again as soon as it has an answer; measures the maximum rate.
  Latency = send → complete response. Throughput and latencies count responses completed in the window.
* ``open``: requests are *scheduled* at a constant rate (t0 + k/rate) independently of the answers and
  handed to an idle connection, or queued until one is free. Latency is measured from the scheduled time, so
  queueing behind a slow answer is counted (no coordinated omission). Counts requests scheduled in the window;
  after the window it waits (``--drain-timeout``) for them to complete, and counts the ones still missing
  with their age at that moment as latency.

Output: the window markers and one ``BENCH RESULT {json}`` line (see :mod:`bench.common`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from bench.common import PayloadMaker, Window, percentiles_ms, report, run, uvloop_available


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "busy", "gen", "need", "sent_at", "start", "status", "transport")

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.start = 0.0
        self.sent_at = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    # Every answer of aiohttp here has a Content-Length; anything else is a bug worth seeing.
                    self.gen.protocol_errors += 1
                    assert self.transport is not None
                    self.transport.close()
                    return
                j = head.find(b"\r\n", i + 2)
                self.need = end + 4 + int(head[i + 17 : j if j >= 0 else len(head)])
            if len(buf) < self.need:
                return
            del buf[: self.need]
            self.need = -1
            self.gen.completed(self, self.status)
            if not buf:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class LoadGen:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        path: str,
        mode: str,
        connections: int,
        rate: float,
        window: Window,
        drain_timeout_s: float,
    ) -> None:
        self.host = host
        self.port = port
        self.mode = mode
        self.connections = connections
        self.rate = rate
        self.window = window
        self.drain_timeout_s = drain_timeout_s
        payload = PayloadMaker()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {payload.size}\r\n\r\n"
        ).encode()
        self.request_prefix = head + payload.prefix
        self.request_suffix = payload.suffix
        self.request_bytes = len(self.request_prefix) + 30 + len(self.request_suffix)
        self.counter = 0
        self.conns: list[Conn] = []
        self.idle: list[Conn] = []
        self.backlog: collections.deque[float] = collections.deque()
        self.stopping = False
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.ok = 0
        self.ok_in_window = 0  # open mode: 2xx answers that arrived inside the window, whenever scheduled
        self.sent = 0
        self.conn_errors = 0
        self.protocol_errors = 0
        self.reconnects = 0
        # open mode: requests scheduled inside the window and not answered yet
        self.offered = 0
        self.pending_window = 0
        self.in_flight_starts: dict[Conn, float] = {}
        self.max_backlog = 0
        self.drained = asyncio.Event()
        #: --trace: (start, latency, service time) of every 2xx answer in the window, for stall hunting.
        self.trace: list[tuple[float, float, float]] | None = None

    def next_request(self) -> bytes:
        self.counter += 1
        return b"".join((self.request_prefix, b"%030d" % self.counter, self.request_suffix))

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        self.conns.append(conn)
        return conn

    def send(self, conn: Conn, start: float) -> None:
        conn.start = start
        conn.sent_at = time.perf_counter()
        conn.busy = True
        self.sent += 1
        assert conn.transport is not None
        conn.transport.write(self.next_request())

    def completed(self, conn: Conn, status: int) -> None:
        now = time.perf_counter()
        conn.busy = False
        start = conn.start
        if self.mode == "closed":
            if self.window.start <= now < self.window.end:
                self.statuses[status] += 1
                if 200 <= status < 300:
                    self.ok += 1
                    self.latencies.append(now - start)
                    if self.trace is not None:
                        self.trace.append((start, now - start, now - start))
            if not self.stopping:
                self.send(conn, now)
            return
        if 200 <= status < 300 and self.window.start <= now < self.window.end:
            self.ok_in_window += 1
        if self.window.start <= start < self.window.end:
            self._window_done()
            self.statuses[status] += 1
            if 200 <= status < 300:
                self.ok += 1
                self.latencies.append(now - start)
                self.service.append(now - conn.sent_at)
                if self.trace is not None:
                    self.trace.append((start, now - start, now - conn.sent_at))
        self._next_open(conn)

    def _window_done(self) -> None:
        self.pending_window -= 1
        if self.pending_window == 0 and self.stopping:
            self.drained.set()

    def _next_open(self, conn: Conn) -> None:
        backlog = self.backlog
        while backlog:
            start = backlog.popleft()
            if not self.stopping or start < self.window.end:
                self.send(conn, start)
                return
        self.idle.append(conn)

    def lost(self, conn: Conn) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.stopping:
            return
        self.conn_errors += 1
        if conn.busy and self.mode == "open" and self.window.start <= conn.start < self.window.end:
            self._window_done()
        asyncio.get_running_loop().create_task(self._replace())

    async def _replace(self) -> None:
        await asyncio.sleep(0.05)
        if self.stopping:
            return
        self.reconnects += 1
        try:
            conn = await self.connect()
        except OSError:
            self.conn_errors += 1
            asyncio.get_running_loop().create_task(self._replace())
            return
        if self.mode == "closed":
            self.send(conn, time.perf_counter())
        else:
            self._next_open(conn)

    async def run(self) -> dict[str, Any]:
        await asyncio.gather(*(self.connect() for _ in range(self.connections)))
        window_task = asyncio.create_task(self.window.run())
        if self.mode == "closed":
            for conn in list(self.conns):
                self.send(conn, time.perf_counter())
            await window_task
        else:
            self.idle = list(self.conns)
            await self._dispatch(window_task)
        self.stopping = True
        censored = 0
        if self.mode == "open":
            if self.pending_window > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.drained.wait(), timeout=self.drain_timeout_s)
            # Still unanswered: count each with its age now (a lower bound of its latency).
            now = time.perf_counter()
            for conn in self.conns:
                if conn.busy and self.window.start <= conn.start < self.window.end:
                    self.latencies.append(now - conn.start)
                    censored += 1
            for start in self.backlog:
                if self.window.start <= start < self.window.end:
                    self.latencies.append(now - start)
                    censored += 1
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        elapsed = self.window.elapsed_s
        return {
            "mode": self.mode,
            "connections": self.connections,
            "target_rate": self.rate if self.mode == "open" else None,
            "duration_s": elapsed,
            # closed: 2xx answers inside the window; open: 2xx answers to the requests scheduled in the window
            "ok": self.ok,
            # answers per second inside the window (open mode: below the target rate when the server lags)
            "rps": (self.ok if self.mode == "closed" else self.ok_in_window) / elapsed if elapsed > 0 else 0.0,
            "offered": self.offered if self.mode == "open" else None,
            "unanswered": censored,
            "max_backlog": self.max_backlog,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "non_2xx": sum(v for k, v in self.statuses.items() if not 200 <= k < 300),
            "conn_errors": self.conn_errors,
            "protocol_errors": self.protocol_errors,
            "latency_ms": percentiles_ms(self.latencies),
            # open mode: from the actual send (without the wait for a free connection or the next tick)
            "service_ms": percentiles_ms(self.service) if self.mode == "open" else None,
            "loadgen_core_fraction": self.window.core_fraction,
            "request_bytes": self.request_bytes,
        }

    async def _dispatch(self, window_task: asyncio.Task[None]) -> None:
        """Open mode: schedule request k at t0 + k/rate, whatever the answers do."""
        interval = 1.0 / self.rate
        t0 = time.perf_counter()
        k = 0
        window = self.window
        while not window_task.done():
            now = time.perf_counter()
            due = int((now - t0) * self.rate) + 1
            while k < due:
                start = t0 + k * interval
                k += 1
                if window.start <= start < window.end:
                    self.offered += 1
                    self.pending_window += 1
                if self.idle:
                    self.send(self.idle.pop(), start)
                else:
                    self.backlog.append(start)
            self.max_backlog = max(self.max_backlog, len(self.backlog))
            # Timers have a 1 ms resolution (libuv rounds shorter ones down to a busy spin): at rates above
            # 1000/s requests go out in small bursts every millisecond; each is timed from its own schedule.
            await asyncio.sleep(max(0.001, t0 + k * interval - time.perf_counter()))
        await window_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/vod/callback")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0, help="open mode: requests per second")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the measured window")
    parser.add_argument("--duration", type=float, default=5.0, help="measured window, seconds")
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    parser.add_argument("--trace", type=Path, help="write start,latency_ms,service_ms of each answer (CSV)")
    args = parser.parse_args(argv)
    if args.mode == "open" and args.rate <= 0:
        parser.error("--mode open needs --rate")
    url = urlsplit(args.url)
    loop = ("uvloop" if uvloop_available() else "asyncio") if args.loop == "auto" else args.loop
    gen = LoadGen(
        host=url.hostname or "127.0.0.1",
        port=url.port or 80,
        path=url.path or "/",
        mode=args.mode,
        connections=args.connections,
        rate=args.rate,
        window=Window(args.warmup, args.duration),
        drain_timeout_s=args.drain_timeout,
    )
    if args.trace is not None:
        gen.trace = []
    result = run(gen.run(), loop)
    if gen.trace is not None:
        t0 = gen.window.start
        rows = (f"{s - t0:.6f},{lat * 1000:.3f},{svc * 1000:.3f}\n" for s, lat, svc in sorted(gen.trace))
        args.trace.write_text("start_s,latency_ms,service_ms\n" + "".join(rows))
    result["loadgen_loop"] = loop
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
