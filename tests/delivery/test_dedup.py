"""The optional de-duplication window."""

from __future__ import annotations

import json

import pytest
from conftest import sample_event

from bridge.delivery.dedup import DedupWindow, Seen, digest
from bridge.testing import VodBridge
from bridge.vod.decode import decode_event


def event(task_id: str, status: str = "FINISH"):
    return decode_event(json.dumps(sample_event(task_id, Status=status)).encode())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_exact_repeats_share_a_digest() -> None:
    assert digest(event("t")) == digest(event("t"))
    assert digest(event("t", "PROCESSING")) != digest(event("t", "FINISH"))
    # Same type, key and status, different event (a corrected PullComplete): not a repeat.
    corrected = decode_event(json.dumps(sample_event("t", Message="retried OK")).encode())
    assert digest(corrected) != digest(event("t"))


def test_transport_fields_do_not_make_a_copy_new() -> None:
    resigned = {**sample_event("t", Status="FINISH"), "Sign": "0" * 32, "T": 1_900_000_000, "EventHandle": "h-2"}
    assert digest(decode_event(json.dumps(resigned).encode())) == digest(event("t"))


def test_window_expires_entries() -> None:
    clock = FakeClock()
    window = DedupWindow(60, 100, clock=clock)
    assert window.lookup(event("a")) is None
    window.record(event("a"), in_kafka=True)
    clock.now = 59.9
    assert window.lookup(event("a")) == Seen(60.0, in_kafka=True)
    assert window.lookup(event("a", "PROCESSING")) is None
    clock.now = 60.0
    assert window.lookup(event("a")) is None
    assert len(window) == 0


def test_a_kafka_ack_is_never_downgraded_to_spooled() -> None:
    window = DedupWindow(60, 100, clock=FakeClock())
    window.record(event("a"), in_kafka=False)
    assert window.lookup(event("a")) == Seen(60.0, in_kafka=False)
    window.record(event("a"), in_kafka=True)
    window.record(event("a"), in_kafka=False)
    seen = window.lookup(event("a"))
    assert seen is not None and seen.in_kafka


def test_window_is_bounded_oldest_first() -> None:
    window = DedupWindow(3600, 3, clock=FakeClock())
    for name in "abcd":
        window.record(event(name), in_kafka=True)
    assert len(window) == 3
    assert window.lookup(event("a")) is None
    assert all(window.lookup(event(name)) is not None for name in "bcd")


@pytest.mark.integration
@pytest.mark.vod_bridge(delivery_dedup_window_s=300)
def test_repeat_within_window_is_answered_but_not_published(vod_bridge: VodBridge) -> None:
    first = vod_bridge.post(sample_event("dup"))
    again = vod_bridge.post(sample_event("dup"))
    changed = vod_bridge.post(sample_event("dup", Status="PROCESSING"))
    # The black-box case: same TaskId and Status, different content -> a different event.
    corrected = vod_bridge.post(sample_event("dup", Message="corrected"))
    assert [first.status, again.status, changed.status, corrected.status] == [200, 200, 200, 200]
    assert [answer.body["status"] for answer in (first, again, changed, corrected)] == [
        "published",
        "duplicate",
        "published",
        "published",
    ]
    records = vod_bridge.records(3)
    assert [r.json()["PullCompleteEvent"].get("Message") for r in records] == ["SUCCESS", "SUCCESS", "corrected"]
    vod_bridge.assert_no_records(within_s=1.0)


@pytest.mark.integration
async def test_a_failed_publish_does_not_suppress_its_retry(make_settings, make_client) -> None:
    from bridge.ops.embedded import free_port

    client = await make_client(
        make_settings(delivery_dedup_window_s=300, bootstrap_servers=f"127.0.0.1:{free_port()}"), wait_ready=False
    )
    assert (await client.post("/vod/callback", json=sample_event("retry-me"))).status == 503
    again = await client.post("/vod/callback", json=sample_event("retry-me"))
    assert again.status == 503, "the first copy was never acked, so the retry must be tried again"
