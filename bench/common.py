"""Pieces shared by the benchmark processes: the seed payload, the event loop choice, the measurement window."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from typing import Any, Final

#: The TaskId of the seed payload is replaced by one of the same length, unique per request.
TASK_ID_PREFIX: Final = "125676836723-Pull-"
TASK_ID_DIGITS: Final = 30

#: Lines a measured child process prints on stdout for the orchestrator (which samples /proc at each marker).
MARK_START: Final = "BENCH WINDOW_START"
MARK_END: Final = "BENCH WINDOW_END"
MARK_RESULT: Final = "BENCH RESULT "


def seed_payload() -> bytes:
    """``bridge/samples/pull-complete.json``, the payload of every benchmark request and record."""
    return (resources.files("bridge") / "samples" / "pull-complete.json").read_bytes()


class PayloadMaker:
    """The seed payload with a distinct TaskId per call (same length, so the same Content-Length)."""

    def __init__(self, seed: bytes | None = None, *, start: int = 0) -> None:
        raw = seed if seed is not None else seed_payload()
        task_id = json.loads(raw)["PullCompleteEvent"]["TaskId"].encode()
        prefix, sep, suffix = raw.partition(task_id)
        if not sep or task_id in suffix:
            raise ValueError("the seed payload must contain its TaskId exactly once")
        self.prefix = prefix + TASK_ID_PREFIX.encode()
        self.suffix = suffix
        self.counter = start
        self.size = len(self.prefix) + TASK_ID_DIGITS + len(self.suffix)

    def next(self) -> tuple[bytes, bytes]:
        """(TaskId, body)."""
        self.counter += 1
        digits = b"%030d" % self.counter
        return TASK_ID_PREFIX.encode() + digits, b"".join((self.prefix, digits, self.suffix))


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, Any], loop: str) -> Any:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mark(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report(result: dict[str, Any]) -> None:
    mark(MARK_RESULT + json.dumps(result))


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean in milliseconds (nearest rank); None when there are no samples."""
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "mean": None}
    ordered = sorted(latencies_s)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q * n + 0.5) - 1))] * 1000

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": ordered[-1] * 1000,
        "mean": sum(ordered) / n * 1000,
    }


class Window:
    """Warm-up, then a measured window of ``duration_s``; prints the markers and tracks own CPU time."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self.start = float("inf")
        self.end = float("inf")
        self.cpu_start = 0.0
        self.cpu_end = 0.0

    async def run(self) -> None:
        """Sleep through the warm-up, open the window, sleep through it, close it."""
        await asyncio.sleep(self.warmup_s)
        self.cpu_start = cpu_self_s()
        self.start = time.perf_counter()
        self.end = self.start + self.duration_s
        mark(MARK_START)
        await asyncio.sleep(max(0.0, self.end - time.perf_counter()))
        self.cpu_end = cpu_self_s()
        mark(MARK_END)

    @property
    def elapsed_s(self) -> float:
        return self.end - self.start

    @property
    def core_fraction(self) -> float:
        """CPU time of this process during the window / the window's wall time (1.0 = one full core)."""
        return (self.cpu_end - self.cpu_start) / self.elapsed_s if self.elapsed_s > 0 else 0.0
