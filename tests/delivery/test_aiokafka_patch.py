"""The aiokafka shim for issue #1038 (bridge/delivery/aiokafka_patch.py), on uvloop against a real broker: a write to
a connection whose transport a reset closed is a broken connection, not a ``RuntimeError`` that kills the task
that sent it (the client's metadata task, which wedges the producer: tests/faults/test_producer_wedge.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import uvloop
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest
from conftest import Kafka, wait_until

from bridge.delivery import aiokafka_patch

pytestmark = pytest.mark.integration


@pytest.fixture
def patched() -> Iterator[bool]:
    """Run the test with the shim applied (param True) or aiokafka as released, then restore what was."""
    was = aiokafka_patch.applied()
    yield was
    (aiokafka_patch.apply if was else aiokafka_patch.remove)()


async def _send_after_reset(bootstrap_servers: str) -> tuple[AIOKafkaConnection, BaseException | None]:
    """Open a connection, let its transport be closed under it as uvloop does on a reset, and send on it before
    aiokafka's read task noticed (the window #1038 is about); return the connection and what ``send`` raised."""
    host, _, port = bootstrap_servers.split(",", maxsplit=1)[0].rpartition(":")
    conn = await create_conn(host, int(port), request_timeout_ms=5000)
    # The read task is what notices a closed connection and closes it in aiokafka; stopped, it keeps the window
    # between uvloop closing the transport and aiokafka noticing open for as long as the test needs.
    read_task = conn._read_task
    read_task.cancel()
    await wait_until(read_task.done, timeout_s=5)
    conn._writer.transport.abort()
    await wait_until(conn._reader.at_eof, timeout_s=5)  # uvloop has closed the transport's handle
    try:
        pending = conn.send(MetadataRequest([]))
    except Exception as exc:
        return conn, exc
    pending.close()  # a coroutine: not awaited, as the send had nothing to wait for
    return conn, None


def _on_uvloop(run: Callable[[], object]) -> object:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())  # type: ignore[arg-type]


def test_a_write_to_a_reset_connection_is_a_broken_connection(kafka: Kafka, patched: bool) -> None:
    aiokafka_patch.apply()
    conn, raised = _on_uvloop(lambda: _send_after_reset(kafka.bootstrap_servers))  # type: ignore[misc]
    assert isinstance(raised, KafkaConnectionError) and "broken" in str(raised), raised
    assert isinstance(raised.__cause__, RuntimeError), "uvloop's error stays visible as the cause"
    assert not conn.connected(), "closed as broken, so the client makes a new connection"


def test_unpatched_aiokafka_still_raises_uvloops_runtime_error(kafka: Kafka, patched: bool) -> None:
    """When this fails, aiokafka fixed #1038: remove bridge/delivery/aiokafka_patch.py and its call in KafkaSink."""
    aiokafka_patch.remove()
    _, raised = _on_uvloop(lambda: _send_after_reset(kafka.bootstrap_servers))  # type: ignore[misc]
    assert isinstance(raised, RuntimeError) and "closed" in str(raised), raised


def test_apply_is_idempotent_and_remove_restores_the_original(patched: bool) -> None:
    aiokafka_patch.remove()
    original = AIOKafkaConnection.send
    aiokafka_patch.apply()
    patched_send = AIOKafkaConnection.send
    aiokafka_patch.apply()
    assert AIOKafkaConnection.send is patched_send is not original and aiokafka_patch.applied()
    aiokafka_patch.remove()
    assert AIOKafkaConnection.send is original and not aiokafka_patch.applied()
