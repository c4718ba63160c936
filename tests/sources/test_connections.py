"""Slow clients cannot starve VOD: the header deadline, the connection bound, accept failures reported
(bridge.sources.connections), in the test's loop and in a real ``vod-bridge serve`` with a lowered file limit."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Kafka, sample_bytes, sample_event, wait_until
from faultkit import bridge_env
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import RawConnection, raw_connection, raw_request
from servekit import serve_like_cli

from bridge.ops.embedded import free_port
from bridge.sources.connections import BACKLOG

pytestmark = pytest.mark.integration

CALLBACK = "/vod/callback"
#: A request line and one header line: a head that is never finished.
PARTIAL_HEAD = b"POST /vod/callback HTTP/1.1\r\nHost: x\r\n"


def full_request(task_id: str) -> bytes:
    body = sample_bytes().replace(b"125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8", task_id.encode())
    return raw_request("POST", CALLBACK, headers={"Content-Length": str(len(body))}, body=body)


async def drip(connection: RawConnection, *, interval_s: float) -> None:
    """Header bytes, one at a time, never ending the head (pacing, not synchronisation)."""
    with contextlib.suppress(ConnectionError):
        await connection.send(PARTIAL_HEAD)
        while True:
            await connection.send(b"X")
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def running(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """The coroutines as tasks while inside; cancelled on the way out."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_header_deadline_closes_unfinished_heads_but_not_idle_keepalive(make_settings) -> None:
    header_timeout_s, idle_timeout_s = 1.0, 4.0
    settings = make_settings(http_header_timeout_s=header_timeout_s, http_idle_timeout_s=idle_timeout_s)
    async with serve_like_cli(settings) as served:
        silent = await RawConnection.open(served.host, served.port)
        dripping = await RawConnection.open(served.host, served.port)
        keepalive_idle = await RawConnection.open(served.host, served.port)
        keepalive_dripping = await RawConnection.open(served.host, served.port)
        try:
            started = time.monotonic()
            for connection in (keepalive_idle, keepalive_dripping):
                await connection.send(full_request(f"t-{uuid.uuid4().hex}"))
                assert (await connection.response(timeout_s=5)).status == 200
            # The second request on this keep-alive connection: its head starts now and never ends.
            async with running(drip(dripping, interval_s=0.1), drip(keepalive_dripping, interval_s=0.1)):
                second_head_at = time.monotonic()
                for connection in (silent, dripping, keepalive_dripping):
                    assert await connection.closed_by_server(within_s=header_timeout_s + 2.0)
                closed_after_s = time.monotonic() - started
                assert closed_after_s >= header_timeout_s, "closed before the header deadline"
                assert time.monotonic() - second_head_at >= header_timeout_s * 0.9
            assert served.closed("header_timeout") == 3
            # Idle between requests is not a head in progress: aiohttp's idle timer closes it, not the deadline.
            assert not await keepalive_idle.closed_by_server(within_s=idle_timeout_s - (time.monotonic() - started) - 1)
            assert await keepalive_idle.closed_by_server(within_s=3.0)
            assert served.closed("header_timeout") == 3
            print(f"unfinished heads closed after {closed_after_s:.2f}s (header timeout {header_timeout_s:g}s)")
        finally:
            for connection in (silent, dripping, keepalive_idle, keepalive_dripping):
                connection.close()


async def test_at_the_bound_the_oldest_unfinished_head_makes_room(make_settings) -> None:
    bound = 12
    async with serve_like_cli(make_settings(http_max_connections=bound, http_header_timeout_s=60)) as served:
        stalled = [await RawConnection.open(served.host, served.port) for _ in range(bound + 8)]
        try:
            for connection in stalled:
                await connection.send(PARTIAL_HEAD)
            # The oldest 8 made room for the newest; the bound holds.
            for connection in stalled[:8]:
                assert await connection.closed_by_server(within_s=2.0)
            await wait_until(lambda: served.closed("evicted") == 8, timeout_s=5)
            assert served.guard.open_connections == bound
            # Each callback, on its own connection kept open after its answer, evicts one more stalled head:
            # heads first, idle keep-alive connections only when no head is left.
            callers = [await RawConnection.open(served.host, served.port) for _ in range(3)]
            stalled += callers
            for caller in callers:
                await caller.send(full_request(f"t-{uuid.uuid4().hex}"))
                assert (await caller.response(timeout_s=5)).status == 200
            assert served.closed("evicted") == 11
            for connection in (*stalled[11 : bound + 8], *callers):
                assert not await connection.closed_by_server(within_s=0.01)
            gauge = served.metrics.registry.get_sample_value("vod_bridge_http_connections_open")
            assert gauge == served.guard.open_connections <= bound
        finally:
            for connection in stalled:
                connection.close()


async def test_when_every_connection_is_in_a_request_a_new_one_is_refused(make_settings) -> None:
    """Requests in progress are never evicted. Past the bound, connections not read yet are let in (an event
    loop accepts a burst before reading any), up to one backlog more; past that, with nothing to evict, the new
    connection is closed."""
    bound = 4
    settings = make_settings(http_max_connections=bound, http_body_timeout_s=60)
    async with serve_like_cli(settings) as served:
        busy: list[RawConnection] = []
        try:
            for _ in range(bound + BACKLOG):  # heads complete, bodies stalled: requests in progress, not idle
                busy.append(await RawConnection.open(served.host, served.port))
                await busy[-1].send(raw_request("POST", CALLBACK, headers={"Content-Length": "2000"}) + b"{")
                await wait_until(lambda: served.server.requests_count >= len(busy), timeout_s=5)
            assert served.guard.open_connections == bound + BACKLOG
            async with raw_connection(served.host, served.port) as newcomer:
                assert await newcomer.closed_by_server(within_s=2.0)
            assert served.closed("over_limit") == 1 and served.closed("evicted") == 0
            for connection in busy:
                assert not await connection.closed_by_server(within_s=0.01)
        finally:
            for connection in busy:
                connection.close()


# ---- a real process with a lowered file limit ---------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples_named(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], prefix: str) -> dict[str, float]:
    return {
        f"{name}{dict(labels) or ''}": value for (name, labels), value in samples.items() if name.startswith(prefix)
    }


class LimitedBridge:
    """``vod-bridge serve`` with RLIMIT_NOFILE lowered to ``nofile`` (soft and hard) before it starts."""

    def __init__(self, kafka: Kafka, topic: str, log: Path, *, nofile: int, **env: str) -> None:
        self.port = free_port()
        self.log = log
        environment = bridge_env(
            BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
            BRIDGE_KAFKA_TOPIC=topic,
            BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
            **env,
        )

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=environment,
                stdout=out,
                stderr=out,
                preexec_fn=limit,  # noqa: PLW1509 - only setrlimit, in the child
            )

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process.poll() is None, self.log.read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.port}/metrics") as r:
            return metric_samples(await r.text())

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return await asyncio.to_thread(self.process.wait, 30)


async def attackers(port: int, count: int, stop: asyncio.Event, opened: list[int]) -> None:
    """``count`` clients that each drip a head that never ends; one that is closed comes back 0.2 to 1 s later (as
    slowloris tools re-open the sockets they lost; independent clients, not one wave: see README "Slow clients and
    connection limits" on bursts larger than the bound)."""
    rng = random.Random(17)

    async def one() -> None:
        while not stop.is_set():
            try:
                connection = await RawConnection.open("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # the backlog is full: try again, as an attacker would
                continue
            opened[0] += 1
            try:
                await drip(connection, interval_s=0.5)
            finally:
                connection.close()
            await asyncio.sleep(rng.uniform(0.2, 1.0))

    await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("event_loop_name", ["uvloop", "asyncio"])
async def test_drip_feeding_clients_beyond_the_file_limit_do_not_starve_callbacks(
    kafka: Kafka, topic: str, tmp_path: Path, event_loop_name: str
) -> None:
    """RLIMIT_NOFILE 512, 700 clients that drip header bytes and come back when closed, and 40 well-formed
    callbacks meanwhile, each on a new connection: every callback gets its 200, and the bound shows in the
    metrics (evictions, no accept failure)."""
    nofile, clients, callbacks = 512, 700, 40
    bound = nofile - 64 - 2 * 128  # the default: RLIMIT_NOFILE minus a reserve of 64 and two accept bursts
    bridge = LimitedBridge(kafka, topic, tmp_path / "bridge.log", nofile=nofile, BRIDGE_EVENT_LOOP=event_loop_name)
    try:
        await bridge.ready()
        stop = asyncio.Event()
        opened = [0]
        attack = asyncio.create_task(attackers(bridge.port, clients, stop, opened))
        try:
            await wait_until(lambda: opened[0] >= clients, timeout_s=30)
            statuses: list[int | str] = []
            started = time.monotonic()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for _ in range(callbacks):
                    # Spread over about two seconds of the attackers' churn (pacing, not synchronisation).
                    await asyncio.sleep(0.05)
                    body = sample_event(f"t-{uuid.uuid4().hex}")
                    try:
                        async with session.post(f"http://127.0.0.1:{bridge.port}{CALLBACK}", json=body) as response:
                            statuses.append(response.status)
                    except aiohttp.ClientError as exc:  # what VOD would see: a lost event
                        statuses.append(type(exc).__name__)
            elapsed_s = time.monotonic() - started
            samples = await bridge.metrics()
        finally:
            stop.set()
            attack.cancel()
            await asyncio.gather(attack, return_exceptions=True)
        evicted = samples[("vod_bridge_http_connections_closed_total", (("reason", "evicted"),))]
        accept_failures = sum(v for (name, _), v in samples.items() if name == "vod_bridge_http_accept_failures_total")
        open_now = samples[("vod_bridge_http_connections_open", ())]
        print(
            f"{event_loop_name}: {callbacks} callbacks in {elapsed_s:.2f}s among {clients} dripping clients "
            f"({opened[0]} connections opened); evicted {evicted:.0f}, open {open_now:.0f}, accept failures "
            f"{accept_failures:.0f}"
        )
        print(samples_named(samples, "vod_bridge_http_"))
        assert statuses == [200] * callbacks
        assert evicted >= clients - bound, "the bound made room"
        assert open_now <= bound
        if event_loop_name == "uvloop":
            # uvloop closes the listening socket on EMFILE (test below): the bound must keep it from happening.
            assert accept_failures == 0
    finally:
        assert await bridge.stop() == 0, bridge.log.read_text()[-3000:]


@pytest.mark.parametrize("event_loop_name", ["uvloop", "asyncio"])
async def test_accept_failures_are_reported_not_silent(
    kafka: Kafka, topic: str, tmp_path: Path, event_loop_name: str
) -> None:
    """A bound set above the file limit (the setting is logged as too high) lets accept() fail with EMFILE while
    the connections are held: logged once when accepting starts failing and once when it works again, counted,
    and a callback gets through afterwards. asyncio reports each failed accept(); uvloop reports none (libuv
    accepts and closes the waiting connections), so the descriptor probe is what notices it there."""
    nofile = 128
    log = tmp_path / "bridge.log"
    bridge = LimitedBridge(
        kafka, topic, log, nofile=nofile, BRIDGE_EVENT_LOOP=event_loop_name, BRIDGE_HTTP_MAX_CONNECTIONS="1000"
    )
    try:
        await bridge.ready()
        assert "BRIDGE_HTTP_MAX_CONNECTIONS=1000 is above 16, the file limit (RLIMIT_NOFILE 128)" in log.read_text()
        held: list[RawConnection] = []
        try:
            # More connections than file descriptors, kept open until the failure is logged.
            for _ in range(nofile + 20):
                with contextlib.suppress(OSError, TimeoutError):
                    held.append(await asyncio.wait_for(RawConnection.open("127.0.0.1", bridge.port), 1.0))
            await wait_until(lambda: "accepting connections fails (EMFILE" in log.read_text(), timeout_s=10)
        finally:
            for connection in held:
                connection.close()
        await wait_until(lambda: "accepting connections works again" in log.read_text(), timeout_s=10)
        async with aiohttp.ClientSession() as session:
            body = sample_event(f"t-{uuid.uuid4().hex}")
            async with session.post(f"http://127.0.0.1:{bridge.port}{CALLBACK}", json=body) as response:
                assert response.status == 200
        samples = await bridge.metrics()
        assert samples[("vod_bridge_http_accept_failures_total", (("error", "EMFILE"),))] >= 1
        output = log.read_text()
        assert output.count("accepting connections fails (EMFILE") == 1, output
        assert output.count("accepting connections works again") == 1, output
        assert "socket.accept() out of system resource" not in output, "asyncio's own line, once per failure"
    finally:
        assert await bridge.stop() == 0, log.read_text()[-3000:]
