"""Shared pieces of the spool tests."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Gate:
    """Wraps an I/O helper so its first call blocks until ``release``; later calls pass straight through.

    The wait is bounded by ``wait_s``: if whatever should release it is blocked (the event loop, say), the call
    fails instead of hanging the test.
    """

    def __init__(self, real: Callable[..., object], *, armed: bool = True, wait_s: float = 10.0) -> None:
        self.real = real
        #: Unarmed, every call passes straight through (e.g. the syncs of ``Spool.open``).
        self.armed = armed
        self.wait_s = wait_s
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: object) -> object:
        if self.armed and not self.entered.is_set():
            self.entered.set()
            if not self.release.wait(self.wait_s):
                raise AssertionError(f"the blocked call was never released within {self.wait_s:g}s")
        return self.real(*args)
