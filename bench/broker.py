"""The benchmark's embedded broker: librdkafka's mock cluster (default) or tansu; also ``python -m bench.broker``.

* ``mock``: librdkafka's in-memory mock cluster (``tests/mockcluster.py``, a helper process that prints its
  bootstrap address), 3 brokers. It accepts the idempotent producer, so every producer of the benchmark runs with
  idempotence on, as in production. It has no CreateTopics: a topic is created on first use with 4 partitions
  (``--partitions`` does not apply).
* ``tansu``: the embedded tansu broker of ``vod-bridge dev`` (``bridge/ops/embedded.py``), one broker. It refuses
  aiokafka's InitProducerId, so idempotence is off everywhere against it; topics get ``--partitions``.

``python -m bench.broker [--broker mock|tansu] [--port 9092]`` runs one for manual runs until Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ("mock", "tansu")
#: Partitions librdkafka's mock cluster gives a topic it creates on first use.
MOCK_PARTITIONS = 4


def _mockcluster() -> ModuleType:
    """``tests/mockcluster.py``, imported by path (the tests and the benchmark share one launcher)."""
    path = ROOT / "tests" / "mockcluster.py"
    spec = importlib.util.spec_from_file_location("bench_mockcluster", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Broker:
    """One embedded broker: its address, its process (for CPU sampling), whether it takes idempotence."""

    def __init__(self, kind: str, *, port: int | None = None, mock_brokers: int = 3) -> None:
        if kind not in BROKERS:
            raise ValueError(f"unknown broker {kind!r}: expected one of {', '.join(BROKERS)}")
        self.kind = kind
        self._port = port
        self._mock_brokers = mock_brokers
        self._impl: Any = None
        self.pid: int | None = None

    @property
    def idempotence(self) -> bool:
        """Whether the producers run idempotent (the bridge's default) against this broker."""
        return self.kind == "mock"

    @property
    def bootstrap_servers(self) -> str:
        return str(self._impl.bootstrap_servers)

    @property
    def description(self) -> str:
        if self.kind == "mock":
            return f"librdkafka mock cluster, {self._mock_brokers} brokers, idempotent producers"
        return "tansu (embedded), 1 broker, idempotence off"

    def start(self) -> None:
        if self.kind == "mock":
            if self._port is not None:
                raise ValueError("the mock cluster picks its own ports; --port applies to tansu only")
            cluster = _mockcluster().MockCluster(brokers=self._mock_brokers)
            cluster.start()
            self._impl, self.pid = cluster, cluster.pid
            return
        from bench import procstat
        from bridge.ops.embedded import EmbeddedBroker, broker_binary

        broker = EmbeddedBroker(port=self._port) if self._port is not None else EmbeddedBroker()
        broker.start()
        self._impl = broker
        binary = os.path.realpath(broker_binary())
        self.pid = next(
            (
                pid
                for pid in procstat.tree(os.getpid())
                if pid != os.getpid() and os.path.realpath(f"/proc/{pid}/exe") == binary
            ),
            None,
        )
        if self.pid is None:
            self.stop()
            raise RuntimeError("cannot find the embedded broker's process")

    def stop(self) -> None:
        if self._impl is not None:
            self._impl.stop()
            self._impl = None

    def create_topic(self, name: str, partitions: int) -> int:
        """Create ``name``; returns its partition count (the mock cluster's own, whatever was asked)."""
        if self.kind == "mock":
            # A metadata request for the topic creates it; wait until every partition has a leader.
            from confluent_kafka import Producer

            probe = Producer({"bootstrap.servers": self.bootstrap_servers, "log_level": 3})
            metadata = probe.list_topics(topic=name, timeout=10)
            topic = metadata.topics[name]
            if topic.error is not None:
                raise RuntimeError(f"mock cluster: topic {name}: {topic.error}")
            return len(topic.partitions)

        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
            finally:
                await admin.close()

        asyncio.run(create())
        return partitions


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker", description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=BROKERS, default="mock")
    parser.add_argument("--port", type=int, help="tansu only (default 9092); the mock cluster picks its ports")
    args = parser.parse_args()
    if args.broker == "mock" and args.port is not None:
        parser.error("--port applies to tansu only: the mock cluster picks its own ports (and prints them)")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    port = args.port if args.port is not None or args.broker == "mock" else 9092
    broker = Broker(args.broker, port=port)
    broker.start()  # before blocking the signals: the broker process must not inherit the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        print(f"{broker.description} on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
