"""Spool append throughput with real syncs: ``python -m bench.spool_bench`` prints appends/s and syncs/s.

Cases, each for ``--duration`` seconds in a fresh spool directory:

* ``batch=N``: one thread calling ``Spool.append`` with N payloads at a time (one data sync per call), the
  cost of a lone callback (N=1) and of a full group commit (N=64);
* ``async xC``: C concurrent ``AsyncSpool.append`` callers on one event loop, as concurrent callbacks spool
  while Kafka is away; the writer coalesces whoever is waiting into one sync.

Each case runs with the production sync step (``fdatasync`` for data, ``fsync`` for directories) and, with
``--sync both`` (the default), with ``fsync`` everywhere, to compare the two. Run it on the disk the spool will
use: the default directory is a temporary one under the current directory, because ``/tmp`` is often a tmpfs,
where a sync costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.delivery.spool.aio import AsyncSpool
from bridge.delivery.spool.store import Spool, SyncKind, SyncStep, sync_to_disk


def fsync_everything(fd: int, path: Path, kind: SyncKind) -> None:
    os.fsync(fd)


SYNC_STEPS: dict[str, SyncStep] = {"fdatasync": sync_to_disk, "fsync": fsync_everything}


def batch_case(directory: Path, sync: SyncStep, *, batch: int, payload: bytes, duration_s: float) -> dict[str, Any]:
    with Spool.open(directory, sync=sync) as spool:
        records, started = 0, time.perf_counter()
        while time.perf_counter() - started < duration_s:
            records += len(spool.append([payload] * batch))
        elapsed = time.perf_counter() - started
        syncs = spool.fsync_count
    return {"appends_per_s": records / elapsed, "syncs_per_s": syncs / elapsed, "records": records}


async def async_case(
    directory: Path, sync: SyncStep, *, concurrency: int, payload: bytes, duration_s: float
) -> dict[str, Any]:
    aspool = AsyncSpool(await asyncio.to_thread(Spool.open, directory, sync=sync))
    records = 0
    deadline = time.perf_counter() + duration_s

    async def caller() -> None:
        nonlocal records
        while time.perf_counter() < deadline:
            await aspool.append(payload)
            records += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    syncs = aspool.spool.fsync_count
    await aspool.close()
    return {"appends_per_s": records / elapsed, "syncs_per_s": syncs / elapsed, "records": records}


def run_cases(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    payload = b"v" * args.payload_bytes
    syncs = list(SYNC_STEPS) if args.sync == "both" else [args.sync]
    cases = [(f"batch={batch}", batch, 0) for batch in args.batches]
    cases += [(f"async x{concurrency}", 0, concurrency) for concurrency in args.concurrency]
    results = []
    for n, (name, batch, concurrency) in enumerate(cases):
        for sync_name in syncs:
            directory, sync = root / f"case-{n}-{sync_name}", SYNC_STEPS[sync_name]
            if batch:
                result = batch_case(directory, sync, batch=batch, payload=payload, duration_s=args.duration)
            else:
                result = asyncio.run(
                    async_case(directory, sync, concurrency=concurrency, payload=payload, duration_s=args.duration)
                )
            results.append({"case": name, "sync": sync_name, **result})
            print(
                f"  {name:<12} {sync_name:<9} {result['appends_per_s']:>10.0f} appends/s"
                f" {result['syncs_per_s']:>8.0f} syncs/s",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spool_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="parent of the temporary spool directories")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per case")
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="payloads per Spool.append call")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[64], help="concurrent AsyncSpool callers")
    parser.add_argument("--sync", choices=["both", *SYNC_STEPS], default="both")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=args.dir) as tmp:
        print(f"spool append throughput, {args.payload_bytes} B payloads, in {tmp}:", flush=True)
        results = run_cases(args, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps({"payload_bytes": args.payload_bytes, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
