"""A shim for aiokafka issue #1038 (open in 0.14.0): on uvloop, a write to a connection a network reset has
just closed raises ``RuntimeError``, which aiokafka's connection does not treat as a broken connection.

How that wedges a producer: uvloop closes a reset transport at once, while ``AIOKafkaConnection.connected()``
still says True for a few loop turns. A request sent meanwhile (the client's metadata task is the one that
matters) gets uvloop's ``RuntimeError("unable to perform operation on <TCPTransport closed=True ...>; the
handler is closed")`` from ``StreamWriter.write``. ``AIOKafkaConnection.send`` catches only ``OSError`` and the
client's metadata update only ``KafkaError``/``TimeoutError``, so the metadata task dies silently and its
``_md_update_fut`` stays pending for ever; every produce request that failed with a connection error then waits
on it (``sender.py`` → ``client._maybe_wait_metadata``), its partitions stay muted, and nothing is delivered
again until the process restarts.

The shim makes ``send`` do for that ``RuntimeError`` what it already does for an ``OSError``: close the
connection as broken and raise ``KafkaConnectionError``, which every caller in aiokafka handles (a retry on a new
connection). **Remove it when aiokafka fixes #1038** (its test, ``tests/delivery/test_aiokafka_patch.py``, says
when the unpatched library stops raising ``RuntimeError``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Final

from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError

logger = logging.getLogger(__name__)

#: Marks the patched method, so that :func:`apply` is idempotent and :func:`remove` finds the original.
_ORIGINAL: Final = "__bridge_unpatched__"


def _transport_closing(conn: AIOKafkaConnection) -> bool:
    writer = getattr(conn, "_writer", None)  # aiokafka keeps no public handle on it
    transport = getattr(writer, "transport", None)
    return transport is not None and bool(transport.is_closing())


def _patched(send: Any) -> Any:
    @functools.wraps(send)
    def send_on_live_connection(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return send(self, request, expect_response)
        except RuntimeError as err:
            # Only uvloop's refusal to write to a closed transport; any other RuntimeError is not ours to hide.
            if not _transport_closing(self):
                raise
            self.close(reason=CloseReason.CONNECTION_BROKEN, exc=err)
            raise KafkaConnectionError(f"Connection at {self.host}:{self.port} broken: {err}") from err

    setattr(send_on_live_connection, _ORIGINAL, send)
    return send_on_live_connection


def applied() -> bool:
    """True while ``AIOKafkaConnection.send`` is the patched one."""
    return hasattr(AIOKafkaConnection.send, _ORIGINAL)


def apply() -> None:
    """Patch ``AIOKafkaConnection.send`` (once per process; later calls do nothing)."""
    if applied():
        return
    AIOKafkaConnection.send = _patched(AIOKafkaConnection.send)
    logger.debug("aiokafka patched for issue #1038 (uvloop RuntimeError on a closed connection)")


def remove() -> None:
    """Restore aiokafka's own ``send`` (tests use it to show the wedge the shim prevents)."""
    if applied():
        AIOKafkaConnection.send = getattr(AIOKafkaConnection.send, _ORIGINAL)
