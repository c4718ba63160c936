"""``python -m bench.null_bridge serve ...``: ``vod-bridge`` with a sink that acknowledges every record at once.

A diagnostic, not a mode of the bridge: no Kafka client runs, so the CPU per event it needs is the bridge's own
path (aiohttp, the source checks, decoding, record headers, metrics, the answer), the part no Kafka client can
remove. Scenario ``null`` of ``python -m bench --only a,null``. Takes the arguments of ``vod-bridge``.
"""

from __future__ import annotations

import sys
from typing import Any


class _Ack:
    topic = "null"
    partition = 0
    offset = 0


class NullSink:
    """The surface ``bridge.app`` drives (``bridge.delivery.clients.ProducerSink``), doing nothing."""

    ready = True
    reachable = True
    in_flight = 0
    abandoned = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def connect(self, **kwargs: Any) -> None:
        return None

    async def close(self, **kwargs: Any) -> int:
        return 0

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Any, **kwargs: Any) -> _Ack:
        return _Ack()


def main() -> int:
    import bridge.app
    from bridge.cli import main as bridge_main

    # The one wiring point builds the sink through make_sink (or, in older trees, KafkaSink itself).
    if hasattr(bridge.app, "make_sink"):
        bridge.app.make_sink = NullSink  # type: ignore[assignment]
    else:
        bridge.app.KafkaSink = NullSink  # type: ignore[attr-defined,misc]
    return int(bridge_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
