"""``python -m bench.broker [--port 9092]``: an embedded tansu broker for manual runs; stops on Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

from bridge.ops.embedded import EmbeddedBroker


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9092)
    args = parser.parse_args()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    broker = EmbeddedBroker(port=args.port)
    broker.start()  # before blocking the signals: the broker process must not inherit the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        print(f"embedded broker on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
