"""``--workers N``: N `vod-bridge serve` processes sharing one port through SO_REUSEPORT.

Each worker is a complete bridge with its own Kafka producer. The supervisor forwards SIGTERM/SIGINT to all
of them (each drains and flushes on its own) and exits with the first non-zero worker exit code; it forwards
SIGHUP too (each worker reloads its TLS certificate). Per worker: the spool, when configured, lives in
``<BRIDGE_SPOOL_DIR>/worker-<i>`` (a spool belongs to one process) and only worker 0 runs the PullEvents
poller. Because of that split, the supervisor refuses to start when the worker count would leave another
count's spool with undelivered events unopened (``check_no_stranded``).

Metrics: the workers run in prometheus_client's multiprocess mode over a private directory the supervisor creates
empty at start (``vod-bridge-metrics-*`` under ``$TMPDIR``) and removes at exit, so that one ``/metrics`` scrape,
whichever worker answers it, covers them all. The counters of a worker that exited keep counting (its files stay);
its ``live*`` gauges are dropped (``mark_process_dead``).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from bridge.config import Settings
from bridge.delivery.spool import check_no_stranded, worker_spool_dir
from bridge.errors import ConfigError
from bridge.ops.metrics import MULTIPROCESS_DIR_ENV

logger = logging.getLogger(__name__)

#: The exit code of ``bridge.cli`` for an invalid configuration (not imported: the CLI imports this module).
EXIT_CONFIG = 2


def worker_env(base: Mapping[str, str], settings: Settings, index: int, metrics_dir: Path) -> dict[str, str]:
    env = dict(base)
    env["BRIDGE_WORKERS"] = "1"
    env["BRIDGE_HTTP_REUSE_PORT"] = "true"
    # Replaces any directory of the caller's: only these workers may write there, and only from empty.
    env[MULTIPROCESS_DIR_ENV] = str(metrics_dir)
    if settings.spool.dir is not None:
        env["BRIDGE_SPOOL_DIR"] = str(worker_spool_dir(Path(settings.spool.dir), index))
    if index > 0:
        env["BRIDGE_PULL_ENABLED"] = "false"
    return env


def run_workers(settings: Settings, env: Mapping[str, str]) -> int:
    """Start ``settings.workers`` workers and supervise them until they all exit; return the exit code.

    Returns ``EXIT_CONFIG`` without starting any worker if that would strand spooled events, or if the metrics
    directory cannot be created.
    """
    try:
        check_no_stranded(settings.spool.dir, settings.workers)
    except ConfigError as exc:
        logger.critical("%s", exc.message)
        return EXIT_CONFIG
    # Fresh and private (0700): no stale file of an earlier run (a pid reused) can add to this run's counts.
    try:
        metrics_dir = Path(tempfile.mkdtemp(prefix="vod-bridge-metrics-"))
    except OSError as exc:
        logger.critical("cannot create the workers' metrics directory (set TMPDIR to a writable one): %s", exc)
        return EXIT_CONFIG
    try:
        return _supervise(settings, env, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, env: Mapping[str, str], metrics_dir: Path) -> int:
    # An ignored signal stays ignored across exec: a SIGHUP cannot kill a worker that is still starting (it
    # reloads once its app handles SIGHUP).
    previous_sighup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    children = [
        subprocess.Popen([sys.executable, "-m", "bridge", "serve"], env=worker_env(env, settings, i, metrics_dir))
        for i in range(settings.workers)
    ]
    logger.info("started %d workers on port %d: pids %s", len(children), settings.http.port, [c.pid for c in children])
    exited: set[int] = set()
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    previous[signal.SIGHUP] = previous_sighup
    exit_code = 0
    try:
        while any(child.poll() is None for child in children):
            for child in children:
                code = child.poll()
                if code is not None and child.pid not in exited:
                    exited.add(child.pid)
                    mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                if code is not None and code != 0 and not stopping:
                    # One worker failed: stop the rest so the orchestrator restarts the pod as a whole.
                    logger.error("worker %d exited with %d; stopping the others", child.pid, code)
                    exit_code = code
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for child in children:
        code = child.returncode
        if code is not None and code != 0 and exit_code == 0:
            exit_code = code
    logger.info("all workers stopped (exit code %d)", exit_code)
    return exit_code
