"""The harness the fault scenarios share: a librdkafka mock cluster of three brokers, a real `python -m bridge serve`
with the idempotent producer and the spool on, a witness consumer, and an iptables :class:`netns.Firewall` that cuts
every broker port; plus the one result line each scenario prints and the bounded polls it waits with.

A scenario's result line (``name: acked=N in_kafka=N lost=N duplicates=N (durations)``) is printed and collected in
:data:`RESULT_LINES`; tests/faults/conftest.py repeats them all at the end of the run, so ``make faults`` shows them
whether pytest captures output or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from faultkit import BridgeProcess, LoadReport, Witness, bridge_env
from mockcluster import MockCluster
from netns import Firewall
from prometheus_client.parser import text_string_to_metric_families

#: How many times the repeated scenarios run (``FAULT_TRIALS=20 make faults`` to hunt a rare failure).
TRIALS: Final = int(os.environ.get("FAULT_TRIALS", "5"))

#: Every scenario's result line, in the order they ran (printed again at the end of the session).
RESULT_LINES: list[str] = []


def broker_ports(bootstrap_servers: str) -> list[int]:
    """The port of every broker of a ``host:port,...`` list: what the firewall cuts."""
    return [int(address.rpartition(":")[2]) for address in bootstrap_servers.split(",")]


@dataclass
class Rig:
    """One scenario's world: the cluster, the bridge (restartable), the witness, the firewall, the load."""

    cluster: MockCluster
    bridge: BridgeProcess
    witness: Witness
    firewall: Firewall
    spool_dir: Path
    topic: str
    report: LoadReport = field(default_factory=LoadReport)
    started: float = field(default_factory=time.monotonic)

    @property
    def ports(self) -> list[int]:
        return broker_ports(self.cluster.bootstrap_servers)

    def log_tail(self, lines: int = 8) -> str:
        text = self.bridge.logfile.read_text(errors="replace") if self.bridge.logfile.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.bridge.process is not None and self.bridge.process.poll() is None

    def assert_alive(self, when: str) -> None:
        """Fail, with the exit code and the end of the bridge's log, if the bridge process has exited."""
        if not self.alive():
            assert self.bridge.process is not None
            raise AssertionError(
                f"the bridge exited (code {self.bridge.process.returncode}) {when}; its log ends:\n{self.log_tail()}"
            )

    async def diagnose(self) -> str:
        """What a failed scenario needs to tell a wedged bridge from a dead broker: whether the cluster runs and
        its ports accept connections, what the firewall still cuts, the bridge's state and the end of its log."""
        accepting = {}
        for port in self.ports:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=1)
                writer.close()
                accepting[port] = True
            except (OSError, TimeoutError):
                accepting[port] = False
        state = "running" if self.alive() else f"exited {self.bridge.process and self.bridge.process.returncode}"
        readyz: object = "-"
        if self.alive():
            with contextlib.suppress(OSError, TimeoutError):
                readyz = await asyncio.wait_for(self.bridge.readyz(), timeout=2)
        return (
            f"mock cluster running: {self.cluster.running}; broker ports accepting: {accepting}; "
            f"firewall still cutting: {sorted(self.firewall.cut_ports)}; bridge {state}, /readyz {readyz}; "
            f"its log ends:\n{self.log_tail()}"
        )

    async def spool_depth(self) -> int:
        return int((await self.bridge.readyz())["spool_depth"])

    async def wait_drained(self, timeout_s: float) -> float:
        """Wait until the spool is empty (``/readyz`` ``spool_depth`` 0), failing at once if the bridge exits;
        return how long it took."""
        start = time.monotonic()
        depth = -1
        while time.monotonic() - start < timeout_s:
            self.assert_alive("while its spool should drain")
            with contextlib.suppress(OSError):  # aiohttp's errors are OSErrors: the process may just have died
                depth = await self.spool_depth()
                if depth == 0:
                    return time.monotonic() - start
            await asyncio.sleep(0.1)
        self.assert_alive("while its spool should drain")
        raise AssertionError(
            f"spool depth still {depth} after {timeout_s:g}s; the bridge's log ends:\n{self.log_tail()}"
        )

    async def in_flight(self) -> float:
        return await self.bridge.metric("vod_bridge_publish_in_flight")

    async def published(self) -> float:
        """Events Kafka acknowledged so far (callbacks' own and the spool's), over every label."""
        return await metric_sum(self.bridge.port, "vod_bridge_events_published_total")


async def metric_sum(port: int, name: str) -> float:
    """The sum of every sample ``name`` (all its labels) on the ``/metrics`` of the bridge listening on ``port``."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def bridge_settings(bootstrap_servers: str, topic: str, spool_dir: Path, **extra: str) -> dict[str, str]:
    """The scenarios' bridge: the production defaults (idempotent producer), the spool on, a 2 s publish timeout."""
    return bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE="true",
        BRIDGE_KAFKA_PUBLISH_TIMEOUT_S="2",
        BRIDGE_SPOOL_DIR=str(spool_dir),
        **extra,
    )


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *, spool_dir: Path | None = None, **extra_env: str) -> AsyncIterator[Rig]:
    """Start the cluster, the bridge and the witness; on the way out heal the firewall and stop them all."""
    # The witness sees every cut too: its connection errors are expected, and would bury the bridge's own log
    # in a failure report (tests/conftest.py restores the level after the test).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    topic = f"faults.{uuid.uuid4().hex[:12]}"
    spool = spool_dir if spool_dir is not None else tmp_path / "spool"
    with MockCluster(brokers=3) as cluster, Firewall() as firewall:
        env = bridge_settings(cluster.bootstrap_servers, topic, spool, **extra_env)
        bridge = BridgeProcess(env, tmp_path / "bridge.log")
        try:
            await bridge.start()
            # A reset can leave the witness's fetch half-open (the broker's answer met the cut, the consumer never
            # heard): a short request timeout lets it notice in seconds, not aiokafka's default 40.
            async with Witness(cluster.bootstrap_servers, topic, request_timeout_ms=5000) as witness:
                yield Rig(cluster, bridge, witness, firewall, spool, topic)
        finally:
            firewall.heal()
            bridge.ensure_dead()


async def poll(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.02, what: str
) -> float:
    """Wait until the async ``condition`` holds, bounded by ``timeout_s``; return the time it took."""
    start = time.monotonic()
    while not await condition():
        if time.monotonic() - start >= timeout_s:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        await asyncio.sleep(interval_s)
    return time.monotonic() - start


def result(name: str, rig: Rig, lost: set[str], **durations_s: float) -> str:
    """Print and collect the scenario's line: acked, in Kafka, lost, duplicates (records), then its durations."""
    report, witness = rig.report, rig.witness
    timings = ", ".join(f"{label} {seconds:.1f}s" for label, seconds in durations_s.items())
    line = (
        f"{name}: acked={len(report.acked)} in_kafka={len(report.acked & witness.seen)} lost={len(lost)} "
        f"duplicates={witness.duplicates} ({timings}; answers {report.statuses})"
    )
    print(line)
    RESULT_LINES.append(line)
    return line
