"""Real network and disk faults for the fault-injection suite (tests/faults, ``make faults``).

The suite runs inside a private network and mount namespace that ``tests/faults/run`` makes with ``unshare``
(CI runs as root): everything it starts — brokers, the bridge, the witness consumer — talks over that namespace's
own loopback, so :class:`Firewall` can cut brokers with iptables as a real network fault would (resets or a
blackhole, on the brokers' advertised ports, which a TCP proxy cannot cover), and :func:`tmpfs` can give a spool a
tiny filesystem of its own, without touching the machine's network or mounts.

Outside such a namespace (``pytest tests/faults`` run directly, or not as root) :func:`isolation_problem` says why,
and the suite's tests skip visibly with that reason; they never cut the host's own network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final, Literal

#: Set by tests/faults/run to the network namespace it was started in (``readlink /proc/self/ns/net``), so a test can
#: tell that it now runs in another one.
OUTER_NETNS_ENV: Final = "BRIDGE_FAULTS_OUTER_NETNS"
OUTER_MNTNS_ENV: Final = "BRIDGE_FAULTS_OUTER_MNTNS"

CutMode = Literal["reset", "blackhole"]


def isolation_problem() -> str | None:
    """None when this process runs in the private namespaces tests/faults/run made, else why not (a skip reason)."""
    outer_net, outer_mnt = os.environ.get(OUTER_NETNS_ENV), os.environ.get(OUTER_MNTNS_ENV)
    if not outer_net or not outer_mnt:
        return "needs the private network and mount namespace of `make faults` (tests/faults/run, as root)"
    if os.readlink("/proc/self/ns/net") == outer_net or os.readlink("/proc/self/ns/mnt") == outer_mnt:
        return "not in a private network and mount namespace (unshare did not take effect)"
    if shutil.which("iptables") is None:
        return "iptables is not installed (`make faults` installs the Debian package)"
    return None


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", *args], check=True, capture_output=True, text=True)


class Firewall:
    """iptables rules on this namespace's loopback that cut TCP ports, and nothing else.

    ``reset``: every packet to or from a cut port is answered with a TCP RST, so open connections break at once
    (both ends see the reset) and new ones are refused — a crashed peer. ``blackhole``: every such packet is
    dropped, so connections stall until the clients' own timeouts — a partition. :meth:`heal` removes every rule
    this firewall added; so does leaving the ``with`` block.
    """

    def __init__(self) -> None:
        problem = isolation_problem()
        if problem is not None:
            raise RuntimeError(f"refusing to touch iptables: {problem}")
        self._rules: list[tuple[str, ...]] = []

    @property
    def cut_ports(self) -> set[int]:
        return {int(rule[rule.index("--dport") + 1]) for rule in self._rules if "--dport" in rule}

    def cut(self, ports: Iterable[int], mode: CutMode = "reset") -> None:
        """Cut every connection to and from ``ports`` (added to what is already cut)."""
        target = ("REJECT", "--reject-with", "tcp-reset") if mode == "reset" else ("DROP",)
        for port in ports:
            for direction in ("--dport", "--sport"):
                # The RSTs a reset sends come from the cut port too: they must pass, or the cut is a blackhole.
                rule = ("INPUT", "-p", "tcp", direction, str(port), "!", "--tcp-flags", "RST", "RST", "-j", *target)
                _iptables("-I", *rule)
                self._rules.append(rule)

    def heal(self) -> None:
        """Remove every rule this firewall added: the ports are reachable again."""
        while self._rules:
            _iptables("-D", *self._rules.pop())

    def __enter__(self) -> Firewall:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal()


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (created) for the block, in this process's private mount
    namespace (see :func:`isolation_problem`); unmounted lazily at the end, even if a process still uses it."""
    problem = isolation_problem()
    if problem is not None:
        raise RuntimeError(f"refusing to mount: {problem}")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
