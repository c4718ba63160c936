"""The optional de-duplication window."""

from __future__ import annotations

import json

import pytest
from conftest import Kafka, read_records, sample_event

from bridge.delivery.dedup import DedupWindow, dedup_key
from bridge.vod.decode import decode_event


def event(task_id: str, status: str = "FINISH"):
    return decode_event(json.dumps(sample_event(task_id, Status=status)).encode())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_key_distinguishes_status_transitions() -> None:
    assert dedup_key(event("t", "PROCESSING")) != dedup_key(event("t", "FINISH"))
    assert dedup_key(event("t")) == ("PullComplete", "t", "FINISH")


def test_window_expires_entries() -> None:
    clock = FakeClock()
    window = DedupWindow(60, 100, clock=clock)
    assert not window.seen(event("a"))
    window.record(event("a"))
    clock.now = 59.9
    assert window.seen(event("a"))
    assert not window.seen(event("a", "PROCESSING"))
    clock.now = 60.0
    assert not window.seen(event("a"))
    assert len(window) == 0


def test_window_is_bounded_oldest_first() -> None:
    window = DedupWindow(3600, 3, clock=FakeClock())
    for name in "abcd":
        window.record(event(name))
    assert len(window) == 3
    assert not window.seen(event("a"))
    assert all(window.seen(event(name)) for name in "bcd")


@pytest.mark.integration
async def test_repeat_within_window_is_answered_but_not_published(
    kafka: Kafka, make_settings, make_client, topic
) -> None:
    client = await make_client(make_settings(http_dedup_window_s=300))
    first = await client.post("/vod/callback", json=sample_event("dup"))
    again = await client.post("/vod/callback", json=sample_event("dup"))
    changed = await client.post("/vod/callback", json=sample_event("dup", Status="PROCESSING"))
    assert [first.status, again.status, changed.status] == [200, 200, 200]
    assert (await again.json())["status"] == "duplicate"
    records = await read_records(kafka.bootstrap_servers, topic, count=2, settle_s=1.0)
    assert len(records) == 2


@pytest.mark.integration
async def test_a_failed_publish_does_not_suppress_its_retry(make_settings, make_client) -> None:
    from bridge.ops.embedded import free_port

    client = await make_client(
        make_settings(http_dedup_window_s=300, bootstrap_servers=f"127.0.0.1:{free_port()}"), wait_ready=False
    )
    assert (await client.post("/vod/callback", json=sample_event("retry-me"))).status == 503
    again = await client.post("/vod/callback", json=sample_event("retry-me"))
    assert again.status == 503, "the first copy was never acked, so the retry must be tried again"
