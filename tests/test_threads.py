"""Blocking calls on daemon threads, awaited from the loop (bridge/threads.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bridge.threads import DaemonCalls


async def test_a_call_resolves_its_future_with_the_result_or_the_exception() -> None:
    calls = DaemonCalls()
    assert await calls.run(lambda: 42, name="answer") == 42

    def fail() -> int:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        await calls.run(fail, name="failing")


async def test_running_lists_a_call_until_it_returns_and_its_thread_is_a_daemon() -> None:
    calls = DaemonCalls()
    release = threading.Event()
    future = calls.run(release.wait, name="held")
    (thread,) = calls.running()
    assert thread.name == "held" and thread.daemon
    release.set()
    assert await future is True
    thread.join(timeout=5)
    assert calls.running() == []


async def test_a_wait_given_up_leaves_the_call_to_finish_without_error() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    calls = DaemonCalls()
    release = threading.Event()
    future = calls.run(release.wait, name="abandoned")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(future, timeout=0.05)
    assert future.cancelled()
    (thread,) = calls.running()
    release.set()  # the result arrives for a cancelled future: dropped, not an InvalidStateError on the loop
    thread.join(timeout=5)
    # Queued after the result's callback (call_soon_threadsafe keeps order): once it ran, that one ran too.
    after: asyncio.Future[None] = loop.create_future()
    loop.call_soon_threadsafe(after.set_result, None)
    await after
    assert errors == [] and calls.running() == []
