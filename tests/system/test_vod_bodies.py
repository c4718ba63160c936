"""Every body shape Tencent's documentation shows, replayed through both sources against a real broker.

The corpus and its expected outcomes live in ``tests/vod/bodies/`` (``expected.json``); the decoder's unit tests
use the same files. Here each body travels the whole way: HTTP receiver or PullEvents poller → delivery → Kafka
(its topic, or the dead-letter topic), and the records read back must match the manifest exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Kafka, headers_of, read_records, wait_until
from fakevod import FakeVod

from bridge.ops.metrics import Metrics
from bridge.vod.api import Credentials

pytestmark = [pytest.mark.integration, pytest.mark.producer]

BODIES = Path(__file__).resolve().parents[1] / "vod" / "bodies"
EXPECTED: dict[str, dict[str, Any]] = json.loads((BODIES / "expected.json").read_text())
CREDENTIALS = Credentials("AKIDbodiesBODIES1234", "bodies-secret-key-5678")


def corpus() -> list[tuple[str, bytes]]:
    return [(name, (BODIES / name).read_bytes()) for name in sorted(EXPECTED)]


def canonical(value: bytes) -> str:
    """The JSON value without transport fields, in a form that compares equal whatever the whitespace."""
    decoded = msgspec.json.decode(value)
    if isinstance(decoded, dict):
        decoded.pop("EventHandle", None)
    return json.dumps(decoded, sort_keys=True)


def check_event_records(records: list[Any], bodies: dict[str, bytes], *, source: str) -> None:
    """Each expected event is on the topic exactly once, with its key, headers and value."""
    by_value = {canonical(record.value): record for record in records}
    assert len(by_value) == len(records), "a body was published twice"
    for name, expected in EXPECTED.items():
        if expected["outcome"] != "event":
            continue
        record = by_value.pop(canonical(bodies[name]), None)
        assert record is not None, f"{name} did not reach the topic unchanged"
        headers = headers_of(record)
        assert record.key == expected["key"].encode(), name
        assert headers["event-type"] == expected["event_type"], name
        assert headers["event-format"] == expected["format"], name
        assert headers["source"] == source, name
        if expected["format"] == "legacy-v2" and source == "callback":
            assert record.value == bodies[name], f"{name}: a legacy body is published byte for byte"
    assert not by_value, "records nobody sent"


def check_dead_letters(letters: list[Any], *, source: str) -> None:
    expected = sorted(e["reason"] for e in EXPECTED.values() if e["outcome"] == "dead-letter")
    assert sorted(headers_of(r)["error-reason"] for r in letters) == expected
    assert all(headers_of(r)["source"] == source for r in letters)


async def test_every_body_through_the_callback(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    bodies = dict(corpus())
    for name, body in bodies.items():
        response = await client.post("/vod/callback", data=body, headers={"Content-Type": "application/json"})
        assert response.status == 200, (name, await response.text())
        answer = await response.json()
        assert answer["status"] == ("published" if EXPECTED[name]["outcome"] == "event" else "dead_lettered"), name
    events = sum(1 for e in EXPECTED.values() if e["outcome"] == "event")
    records = await read_records(kafka.bootstrap_servers, topic, count=events, settle_s=0.5)
    letters = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=len(bodies) - events, settle_s=0.5)
    check_event_records(records, bodies, source="callback")
    check_dead_letters(letters, source="callback")
    scrape = await (await client.get("/metrics")).text()
    for fallback in {f for e in EXPECTED.values() for f in e.get("fallbacks", [])}:
        assert f'vod_bridge_events_fallback_total{{reason="{fallback}",source="callback"}}' in scrape, fallback


async def test_every_body_through_the_poller(kafka: Kafka, make_settings, topic) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from msgspec.structs import replace

    from bridge.app import COMPONENTS, create_app
    from bridge.config import PollerSettings

    bodies = dict(corpus())
    async with FakeVod(secret_id=CREDENTIALS.secret_id, secret_key=CREDENTIALS.secret_key) as vod:
        ids = {vod.add_event(json.loads(body)): name for name, body in bodies.items()}
        poller = PollerSettings(enabled=True, endpoint=vod.endpoint, idle_interval_s=0.05, backoff_initial_s=0.05)
        settings = replace(make_settings(), callback_enabled=False, poller=poller)
        client = TestClient(TestServer(create_app(settings, credentials=CREDENTIALS, metrics=Metrics())))
        await client.start_server()
        try:
            await wait_until(lambda: not vod.pending_ids, timeout_s=30)
            (poller,) = client.server.app[COMPONENTS].pollers
            assert poller.stats.confirmed == len(bodies)
        finally:
            await client.close()
        confirmed = {event_id for _, event_id, _ in vod.confirmed}
    assert confirmed == set(ids), "every pulled item is confirmed, dead letters included, each after its ack"
    events = sum(1 for e in EXPECTED.values() if e["outcome"] == "event")
    records = await read_records(kafka.bootstrap_servers, topic, count=events, settle_s=0.5)
    letters = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=len(bodies) - events, settle_s=0.5)
    check_event_records(records, bodies, source="pull")
    check_dead_letters(letters, source="pull")
    assert all(headers_of(r).get("event-handle") for r in [*records, *letters])
