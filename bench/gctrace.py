"""Run ``vod-bridge`` in this process and log every garbage-collector pause (for hunting latency stalls).

    python -m bench.gctrace --out /tmp/gc.txt [--freeze-after 1.5] -- serve --bootstrap-servers ... --port 8080

Each line of ``--out``: ``perf_counter_s generation pause_ms collected`` (written at exit, SIGTERM included).
``--freeze-after S`` calls :func:`gc.freeze` S seconds after start, i.e. once the app's long-lived objects exist,
so that later full collections no longer scan them (the experiment of docs/performance.md).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gctrace", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--freeze-after", type=float, help="gc.freeze() this many seconds after start")
    parser.add_argument("bridge_args", nargs=argparse.REMAINDER, help="-- then the vod-bridge arguments")
    args = parser.parse_args()
    bridge_args = args.bridge_args[1:] if args.bridge_args[:1] == ["--"] else args.bridge_args

    pauses: list[tuple[float, int, float, int]] = []
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            started[0] = now
        else:
            pauses.append((now, info["generation"], (now - started[0]) * 1000, info["collected"]))

    def dump() -> None:
        args.out.write_text("".join(f"{t:.3f} {gen} {ms:.2f} {n}\n" for t, gen, ms, n in pauses))

    def on_term(signum: int, frame: object) -> None:
        dump()
        sys.exit(0)

    gc.callbacks.append(on_gc)
    atexit.register(dump)
    signal.signal(signal.SIGTERM, on_term)
    if args.freeze_after is not None:
        threading.Timer(args.freeze_after, gc.freeze).start()

    from bridge.cli import main as bridge_main

    return bridge_main(bridge_args)


if __name__ == "__main__":
    sys.exit(main())
