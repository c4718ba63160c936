"""The prebuilt "published" answer is the JSON answer it replaces, byte for byte."""

from __future__ import annotations

import pytest

from bridge.sources import http
from bridge.sources.http import json_answer, published_answer


@pytest.mark.parametrize(
    ("topic", "partition", "offset"),
    [("vod.events", 0, 0), ("vod.events", 2, 123456789), ('odd"topic\\ü', 7, -1), ("x", 2**31 - 1, 2**63 - 1)],
)
def test_published_answer_is_the_json_answer(topic: str, partition: int, offset: int) -> None:
    for _ in range(2):  # built, then from the cached prefix
        fast = published_answer(topic, partition, offset)
        slow = json_answer({"status": "published", "topic": topic, "partition": partition, "offset": offset})
        assert fast.body == slow.body
        assert (fast.status, fast.content_type, fast.charset) == (slow.status, slow.content_type, slow.charset)


def test_prefix_cache_is_bounded() -> None:
    for i in range(2 * http._MAX_CACHED_TOPICS):
        assert (
            published_answer(f"t{i}", 1, 2).body == b'{"status":"published","topic":"t%d","partition":1,"offset":2}' % i
        )
    assert len(http._published_prefixes) <= http._MAX_CACHED_TOPICS
