"""Which spool directory each worker opens, and the start-up check that no spooled event is left behind.

With ``BRIDGE_WORKERS=1`` the bridge spools into ``BRIDGE_SPOOL_DIR`` itself; with N > 1, worker ``i`` spools
into ``BRIDGE_SPOOL_DIR/worker-<i>``. Changing the worker count therefore leaves some spools unopened, and
their undelivered events would wait forever: ``check_no_stranded`` refuses such a start and says how to
drain them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge.delivery.spool.format import segment_first_seq
from bridge.delivery.spool.store import Spool, SpoolError, SpoolInUse
from bridge.errors import ConfigError

_WORKER_DIR_RE: Final = re.compile(r"^worker-(0|[1-9]\d*)$")


def worker_spool_dir(spool_dir: Path, index: int) -> Path:
    """The spool directory of worker ``index`` when the bridge runs more than one worker."""
    return spool_dir / f"worker-{index}"


def spool_dirs(spool_dir: Path, workers: int) -> list[Path]:
    """The spool directories a bridge with ``workers`` workers opens."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    return [spool_dir] if workers == 1 else [worker_spool_dir(spool_dir, i) for i in range(workers)]


@dataclass(frozen=True, slots=True)
class StrandedSpool:
    """A spool that a worker count does not open, yet holds undelivered events or is open elsewhere."""

    directory: Path
    #: Undelivered events (``last_seq - committed_seq``); None when another process has the spool open.
    depth: int | None
    #: The smallest BRIDGE_WORKERS value that opens this spool: 1 for the root, ``max(2, i + 1)`` for worker-i.
    opened_by_workers: int

    @property
    def in_use(self) -> bool:
        return self.depth is None


def find_stranded(spool_dir: Path, workers: int) -> list[StrandedSpool]:
    """Spools under ``spool_dir`` that ``workers`` workers will not open and that still hold events.

    A directory without segment files is not a spool worth a look; one whose events are all delivered is
    fine. A spool another process holds is reported with ``depth=None``. Each candidate is locked briefly and
    scanned read-only (``Spool.inspect``), so call this before the bridge opens its own spools. Root first,
    then by worker index. Raises ``SpoolError`` if a spool cannot be read.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    spool_dir = Path(spool_dir)
    if not spool_dir.is_dir():
        return []
    candidates: list[tuple[Path, int]] = []
    if workers > 1:
        candidates.append((spool_dir, 1))
    try:
        indexed = sorted(
            (int(m.group(1)), p)
            for p in spool_dir.iterdir()
            if (m := _WORKER_DIR_RE.match(p.name)) is not None and p.is_dir()
        )
    except OSError as exc:
        raise SpoolError(f"cannot list spool directory {spool_dir}: {exc}") from exc
    candidates += [(p, max(2, i + 1)) for i, p in indexed if workers == 1 or i >= workers]

    stranded: list[StrandedSpool] = []
    for directory, opened_by in candidates:
        if not _has_segments(directory):
            continue
        try:
            depth = Spool.inspect(directory).depth
        except SpoolInUse:
            stranded.append(StrandedSpool(directory, None, opened_by))
            continue
        if depth > 0:
            stranded.append(StrandedSpool(directory, depth, opened_by))
    return stranded


def check_no_stranded(spool_dir: str | os.PathLike[str] | None, workers: int) -> None:
    """Raise ``ConfigError`` if ``workers`` workers would leave spooled events unforwarded (see ``find_stranded``).

    The message lists the spools and says which BRIDGE_WORKERS value drains them. ``spool_dir=None`` (no
    spool configured) passes. Call it before the bridge opens its spools.
    """
    if spool_dir is None:
        return
    root = Path(spool_dir)
    try:
        stranded = find_stranded(root, workers)
        if not stranded:
            return
        waiting = [s for s in stranded if not s.in_use]
        drain_workers = max((s.opened_by_workers for s in waiting), default=None)
        # The draining start is itself refused if it leaves out a spool with events: that happens only when
        # the root spool and worker-<i> spools both hold some.
        blocking = [s for s in find_stranded(root, drain_workers) if not s.in_use] if drain_workers is not None else []
    except SpoolError as exc:
        message = f"cannot check {root} for spooled events that BRIDGE_WORKERS={workers} would strand: {exc}"
        raise ConfigError(message) from exc
    raise ConfigError(stranded_message(root, workers, stranded, blocking))


def stranded_message(
    spool_dir: Path, workers: int, stranded: list[StrandedSpool], blocking: list[StrandedSpool]
) -> str:
    """What is stranded and how to drain it; ``blocking`` are the spools the suggested drain start leaves out."""
    lines = [
        f"refusing to start: BRIDGE_WORKERS={workers} does not open these spools under "
        f"BRIDGE_SPOOL_DIR={spool_dir}, so nothing would forward their events:"
    ]
    for s in stranded:
        state = "in use by another process" if s.in_use else _events(s.depth or 0)
        lines.append(f"  {s.directory}: {state} (opened with {_workers_setting(s.opened_by_workers)})")
    in_use = [s for s in stranded if s.in_use]
    if in_use:
        lines.append(
            "Another process has "
            + ", ".join(str(s.directory) for s in in_use)
            + " open (a bridge still running with another BRIDGE_WORKERS?): stop it, then start again to see"
            " whether its events need draining."
        )
    waiting = [s for s in stranded if not s.in_use]
    if not waiting:
        return "\n".join(lines)
    drain = max(s.opened_by_workers for s in waiting)
    if not blocking:
        every = " on every worker" if drain > 1 else ""
        lines.append(
            f"Start once with BRIDGE_WORKERS={drain} until vod_bridge_spool_depth is 0{every}, stop, then start "
            f"with BRIDGE_WORKERS={workers}."
        )
        return "\n".join(lines)
    # The root spool and worker spools both hold events: no worker count opens both, so drain one at a time.
    worker_spools = list({s.directory: s for s in (*waiting, *blocking) if s.directory != spool_dir}.values())
    last = max(s.opened_by_workers for s in worker_spools)
    steps = (
        f"move them back and start with BRIDGE_WORKERS={workers}"
        if workers > 1 and last <= workers
        else f"move them back, start with BRIDGE_WORKERS={last} until vod_bridge_spool_depth is 0 on every worker, "
        f"stop, then start with BRIDGE_WORKERS={workers}"
    )
    lines.append(
        f"{spool_dir} itself (BRIDGE_WORKERS=1) and worker-<i> spools (BRIDGE_WORKERS>1) both hold events, so no "
        f"single start drains them all. Move "
        + ", ".join(s.directory.name for s in worker_spools)
        + f" out of {spool_dir}, start once with BRIDGE_WORKERS=1 until vod_bridge_spool_depth is 0, stop, "
        + steps
        + "."
    )
    return "\n".join(lines)


def _has_segments(directory: Path) -> bool:
    try:
        return any(segment_first_seq(p.name) is not None for p in directory.iterdir())
    except OSError as exc:
        raise SpoolError(f"cannot list spool directory {directory}: {exc}") from exc


def _events(count: int) -> str:
    return f"{count} undelivered event" + ("" if count == 1 else "s")


def _workers_setting(opened_by: int) -> str:
    return "BRIDGE_WORKERS=1" if opened_by == 1 else f"BRIDGE_WORKERS>={opened_by}"
