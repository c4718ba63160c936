"""librdkafka's mock Kafka cluster as an embedded test broker: the one that accepts the idempotent producer.

A confluent-kafka client created with ``test.mock.num.brokers`` starts an in-process mock cluster and replaces its
own ``bootstrap.servers`` with it (librdkafka ``src/rdkafka.c``, "Mock cluster enabled: ... replaced with ...").
Running this file is that process: it prints the cluster's bootstrap address on stdout and keeps the cluster up
until its stdin closes or it gets SIGTERM. :class:`MockCluster` runs it for the tests::

    with MockCluster() as cluster:
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, enable_idempotence=True)

What the mock cluster is (librdkafka ``src/rdkafka_mock.c``, ``rdkafka_mock_handlers.c``):

- every broker listens on 127.0.0.1 (``INADDR_LOOPBACK``) on a port the kernel picks, and advertises exactly
  that: a restarted cluster has new ports, and a proxy in front of it is bypassed after bootstrap;
- it keeps everything in memory, and a topic is created on first use (Metadata or Produce) with 4 partitions;
- it has no CreateTopics (and no controller in its metadata): :func:`faultkit.create_topic` treats it as
  auto-creating;
- it answers ListOffsets by timestamp with no offset, and reports LogAppendTime 1234 in every produce ack;
- it checks producer sequence numbers for transactional producers only: the idempotent producer's retry of a
  batch the cluster already appended is appended again (a real Kafka drops it as a duplicate).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import IO


class MockClusterError(RuntimeError):
    """The mock cluster process did not start, or reported an address it must not use."""


class MockCluster:
    """librdkafka's mock cluster in a helper process, for one test or for the whole session.

    :meth:`start` returns once the helper printed the bootstrap address (bounded by ``timeout_s``). Each start
    is a new, empty cluster on new ports. :meth:`pause` freezes the process (SIGSTOP): connections stay open
    and nothing answers, as behind a firewall that drops packets; :meth:`resume` thaws it with every record.
    """

    #: The idempotent producer's InitProducerId is implemented (unlike tansu's).
    supports_idempotence = True

    def __init__(self, brokers: int = 3) -> None:
        self.brokers = brokers
        self._process: subprocess.Popen[bytes] | None = None
        self._bootstrap_servers: str | None = None
        self._paused = False

    @property
    def bootstrap_servers(self) -> str:
        if self._bootstrap_servers is None:
            raise MockClusterError("the mock cluster is not running")
        return self._bootstrap_servers

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout_s: float = 15.0) -> None:
        if self.running:
            raise MockClusterError("the mock cluster is already running")
        # librdkafka writes its own log lines to stderr; a file, not a pipe, so that nobody has to drain it.
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                [sys.executable, __file__, "--brokers", str(self.brokers)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
            self._process = process
            try:
                line = _read_line(process, timeout_s)
                self._bootstrap_servers = _checked_bootstrap(line, self.brokers)
            except MockClusterError as exc:
                self.kill()
                stderr.seek(0)
                raise MockClusterError(f"{exc}; its stderr: {stderr.read().decode(errors='replace')!r}") from None

    def pause(self) -> None:
        """Freeze the whole cluster (SIGSTOP): clients connect and send, nothing is answered."""
        assert self._process is not None and self.running
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused cluster: it answers every request it was sent meanwhile, in order."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Close the helper's stdin, so that it ends; kill it if it does not within ``timeout_s``."""
        process, self._process, self._bootstrap_servers = self._process, None, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)  # a stopped process never reads the end of its stdin
            self._paused = False
        assert process.stdin is not None and process.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    def kill(self) -> None:
        """SIGKILL the cluster, as a crash would: every record and topic is gone."""
        process, self._process, self._bootstrap_servers = self._process, None, None
        self._paused = False
        if process is None:
            return
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()

    def __enter__(self) -> MockCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _read_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The helper's first stdout line, waiting at most ``timeout_s`` (a plain readline could block for ever)."""
    stdout = process.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout_s
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MockClusterError(f"the mock cluster reported no address within {timeout_s:g}s")
            if not selector.select(remaining):
                continue
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                raise MockClusterError(f"the mock cluster process ended with code {process.wait()}")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def _checked_bootstrap(line: str, brokers: int) -> str:
    """``host:port,...`` with one address per broker, each on 127.0.0.1 (and so reachable from this host only)."""
    addresses = [address for address in line.strip().split(",") if address]
    if len(addresses) != brokers:
        raise MockClusterError(f"expected {brokers} broker addresses, got {line!r}")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            raise MockClusterError(f"the mock cluster must listen on 127.0.0.1 only, got {address!r}")
    return ",".join(addresses)


# ---- the helper process ----------------------------------------------------------------------------------------


def serve(brokers: int, out: IO[str]) -> None:
    """Start the mock cluster, print its bootstrap address, and keep it up until stdin closes."""
    from confluent_kafka import Producer

    # The producer exists only to own the mock cluster; its own bootstrap.servers is replaced by the cluster's.
    # log_level 3: errors only (the "Mock cluster enabled" notice is level 5).
    owner = Producer({"test.mock.num.brokers": brokers, "client.id": "mockcluster", "log_level": 3})
    # The brokers' advertised addresses, from the cluster's own metadata: what every client connects to.
    metadata = owner.list_topics(timeout=10)
    addresses = [f"{b.host}:{b.port}" for b in sorted(metadata.brokers.values(), key=lambda b: b.id)]
    print(",".join(addresses), file=out, flush=True)
    sys.stdin.buffer.read()  # returns at EOF: the test closed our stdin, or died
    # Skip the client's orderly destroy (it may wait for its own connections): the cluster goes with the process.
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--brokers", type=int, default=3, help="how many brokers (1 or more)")
    args = parser.parse_args(argv)
    if args.brokers < 1:
        # With 0 librdkafka makes no mock cluster, and the metadata request would wait for a broker that never comes.
        parser.error("--brokers must be 1 or more")
    serve(args.brokers, sys.stdout)


if __name__ == "__main__":
    main()
