"""CPU time and peak RSS of a process and its descendants, from /proc (Linux)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_s(root: int) -> float:
    """utime+stime of ``root`` and its live descendants, plus the time of the children they already reaped
    (cutime+cstime), in seconds."""
    total = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def peak_rss_kib(root: int) -> int:
    """Sum of VmHWM (peak resident set) over ``root`` and its live descendants, in KiB."""
    return sum(_hwm_kib(pid) for pid in tree(root))


def peak_rss_max_kib(root: int) -> int:
    """The largest VmHWM of one process of ``root``'s tree (per worker, when a supervisor runs several), in KiB."""
    return max((_hwm_kib(pid) for pid in tree(root)), default=0)


def _hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def thread_names(root: int) -> list[str]:
    """The names (``comm``) of every thread of ``root`` and its live descendants."""
    names = []
    for pid in tree(root):
        try:
            tasks = list(os.scandir(f"/proc/{pid}/task"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in tasks:
            try:
                names.append(Path(task.path, "comm").read_text().strip())
            except (FileNotFoundError, ProcessLookupError):
                continue
    return names


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot: user+nice+system+irq+softirq+steal."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK
