"""Blocking calls that may hang (a broker that does not answer, a stuck file system), awaited from the event loop.

Each runs on a daemon thread of its own, not on the loop's default executor: ``asyncio.run`` and the
interpreter's exit wait for executor threads, never for daemon threads, so a hung call cannot hold up the end of
a bounded shutdown or of a bounded command.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonCalls:
    """Runs blocking calls on daemon threads and knows which of them are still running."""

    def __init__(self) -> None:
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def run(self, call: Callable[[], T], *, name: str) -> asyncio.Future[T]:
        """Start ``call`` on a daemon thread named ``name``; the future resolves on the running loop with its
        result or exception. Cancelling the future stops only the wait: the call runs on to its end."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                outcome = call()
            except BaseException as exc:  # handed to whoever awaits the future
                _call_soon(loop, _set_exception, result, exc)
            else:
                _call_soon(loop, _set_result, result, outcome)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return result

    def running(self) -> list[threading.Thread]:
        """The threads whose call has not returned yet."""
        with self._lock:
            return list(self._threads)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(callback, *args)


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # else its waiter gave up (a timeout, a cancellation)
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
