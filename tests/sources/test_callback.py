"""The real app (``create_app``) against a real broker: what is answered, and what lands in Kafka."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from conftest import Kafka, headers_of, read_records, sample_bytes, sample_event, value_of

from bridge.app import COMPONENTS

pytestmark = pytest.mark.integration


@pytest.mark.producer
async def test_seed_event_is_published_keyed_by_task_id(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    before = datetime.now(UTC)
    response = await client.post("/vod/callback", data=sample_bytes(), headers={"Content-Type": "application/json"})
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "published" and body["topic"] == topic

    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8"
    assert value_of(record) == json.loads(sample_bytes())
    assert (record.partition, record.offset) == (body["partition"], body["offset"])
    headers = headers_of(record)
    assert headers["event-type"] == "PullComplete"
    assert headers["source"] == "callback"
    assert headers["content-type"] == "application/json"
    assert "event-handle" not in headers
    received_at = datetime.fromisoformat(headers["received-at"])
    assert headers["received-at"].endswith("Z")
    assert before - timedelta(seconds=1) <= received_at <= datetime.now(UTC)


@pytest.mark.producer
async def test_unknown_fields_and_types_reach_kafka_unchanged(kafka: Kafka, make_settings, make_client, topic):
    client = await make_client(make_settings())
    known = sample_event("t-known")
    known["PullCompleteEvent"]["AddedByVodTomorrow"] = {"nested": [1, "two"]}
    unknown = {"EventType": "SomethingNew", "SomethingNewEvent": {"TaskId": "t-new", "Blob": "x" * 100}}
    for event in (known, unknown):
        assert (await client.post("/vod/callback", json=event)).status == 200

    records = await read_records(kafka.bootstrap_servers, topic, count=2)
    assert [(r.key, value_of(r)) for r in records] == [(b"t-known", known), (b"t-new", unknown)]
    assert headers_of(records[1])["event-type"] == "SomethingNew"


#: Bodies that are not a JSON object: there is nothing to keep, so the sender gets a 400.
BAD_BODIES = [
    (b"{not json", "malformed JSON"),
    (b"[]", "JSON object"),
    (b"", "empty body"),
]

#: JSON objects without a usable key: dead-lettered (200 after the ack) by default, 400 with the reject policy.
KEYLESS_BODIES = [
    (b'{"EventType": "PullComplete"}', "no_payload", "payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"Status": "FINISH"}}', "missing_key", "TaskId"),
]


@pytest.mark.producer
async def test_bad_inputs_get_400_and_publish_nothing(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    for body, named in BAD_BODIES:
        response = await client.post("/vod/callback", data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400, body
        error = await response.json()
        assert error["error"] == "invalid_payload"
        assert named in error["message"], (body, error)
    # A good event afterwards is the first and only record: none of the bad ones were published.
    assert (await client.post("/vod/callback", json=sample_event("t-good"))).status == 200
    records = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=1.0)
    assert [(r.offset, r.key) for r in records] == [(0, b"t-good")]

    metrics = client.server.app[COMPONENTS].metrics
    rejected = sum(
        sample.value
        for metric in metrics.registry.collect()
        if metric.name == "vod_bridge_events_rejected"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert rejected == len(BAD_BODIES)


@pytest.mark.producer
async def test_keyless_objects_are_dead_lettered_after_the_ack(kafka: Kafka, make_settings, make_client, topic):
    client = await make_client(make_settings())
    for body, reason, _ in KEYLESS_BODIES:
        response = await client.post("/vod/callback", data=body)
        assert response.status == 200, body
        answer = await response.json()
        assert answer["status"] == "dead_lettered" and answer["reason"] == reason
        assert answer["topic"] == f"{topic}.dlq"
    letters = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=len(KEYLESS_BODIES), settle_s=0.5)
    assert sorted(json.dumps(value_of(r), sort_keys=True) for r in letters) == sorted(
        json.dumps(json.loads(body), sort_keys=True) for body, _, _ in KEYLESS_BODIES
    )
    assert sorted(headers_of(r)["error-reason"] for r in letters) == sorted(reason for _, reason, _ in KEYLESS_BODIES)
    assert all(headers_of(r)["source"] == "callback" for r in letters)


@pytest.mark.producer
async def test_reject_policy_keeps_the_400(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings(delivery_callback_invalid="reject"))
    for body, _, named in KEYLESS_BODIES:
        response = await client.post("/vod/callback", data=body)
        assert response.status == 400, body
        error = await response.json()
        assert error["error"] == "invalid_payload" and named in error["message"]
    assert (await client.post("/vod/callback", json=sample_event("t-after"))).status == 200
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=0.5)
    assert record.key == b"t-after"
    rendered = client.server.app[COMPONENTS].metrics.render().decode()
    for _, reason, _ in KEYLESS_BODIES:
        assert f'vod_bridge_events_rejected_total{{reason="{reason}",source="callback"}} 1.0' in rendered


async def test_oversized_body_gets_413_json(make_settings, make_client) -> None:
    client = await make_client(make_settings(http_max_body_bytes=2048))
    event = sample_event("t-big", SessionContext="x" * 4096)
    response = await client.post("/vod/callback", data=msgspec.json.encode(event))
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"


async def test_default_limit_is_one_mebibyte(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    response = await client.post("/vod/callback", data=io.BytesIO(b"{" + b" " * (1024 * 1024) + b"}"))
    assert response.status == 413


@pytest.mark.producer
async def test_per_type_routing(kafka: Kafka, make_settings, make_client, topic) -> None:
    uploads = f"{topic}.uploads"
    client = await make_client(make_settings(topic_routes={"NewFileUpload": uploads}))
    upload = {"EventType": "NewFileUpload", "FileUploadEvent": {"FileId": "f-42"}}
    assert (await client.post("/vod/callback", json=upload)).status == 200
    assert (await client.post("/vod/callback", json=sample_event("t-1"))).status == 200
    (routed,) = await read_records(kafka.bootstrap_servers, uploads, count=1)
    (default,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert (routed.key, default.key) == (b"f-42", b"t-1")


async def test_custom_callback_path_and_json_errors_elsewhere(make_settings, make_client) -> None:
    client = await make_client(make_settings(http_callback_path="/hooks/vod"))
    assert (await client.post("/hooks/vod", json=sample_event("t-p"))).status == 200
    missing = await client.post("/vod/callback", json=sample_event("t-p"))
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"
    wrong_method = await client.get("/hooks/vod")
    assert wrong_method.status == 405 and "POST" in wrong_method.headers["Allow"]


async def test_health_and_readiness(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    metrics = await client.get("/metrics")
    assert "vod_bridge_kafka_connected 1.0" in await metrics.text()


async def test_not_ready_until_kafka_answers(make_settings, make_client) -> None:
    # Nothing listens on this port: the producer keeps retrying in the background.
    from bridge.ops.embedded import free_port

    client = await make_client(make_settings(bootstrap_servers=f"127.0.0.1:{free_port()}"), wait_ready=False)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503
    response = await client.post("/vod/callback", json=sample_event(uuid.uuid4().hex))
    assert response.status == 503
    assert (await response.json())["error"] == "not_ready"
    assert response.headers["Retry-After"].isdigit()


@pytest.mark.producer
async def test_overload_answers_503_with_retry_after(kafka: Kafka, make_settings, make_client, topic) -> None:
    # A long linger keeps publishes waiting for their ack, so the in-flight bound is reached.
    client = await make_client(make_settings(max_in_flight=3, linger_ms=400))

    async def post(i: int):
        response = await client.post("/vod/callback", json=sample_event(f"burst-{i}"))
        return f"burst-{i}", response.status, await response.json(), response.headers.get("Retry-After")

    results = await asyncio.gather(*(post(i) for i in range(30)))
    accepted = {key for key, status, _, _ in results if status == 200}
    overloaded = [(body, retry) for _, status, body, retry in results if status == 503]
    assert len(accepted) == 3
    assert len(overloaded) == 27
    assert all(body["error"] == "overloaded" and retry == "1" for body, retry in overloaded)
    records = await read_records(kafka.bootstrap_servers, topic, count=3, settle_s=1.0)
    assert {r.key.decode() for r in records} == accepted


@pytest.mark.producer
async def test_sub_app_id_in_the_path_becomes_the_header(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    assert (await client.post("/vod/callback/1500001", json=sample_event("from-1500001"))).status == 200
    assert (await client.post("/vod/callback", json=sample_event("from-default"))).status == 200
    keyless, reason, _ = KEYLESS_BODIES[1]
    letter_answer = await client.post("/vod/callback/1500002", data=keyless)
    assert (await letter_answer.json())["status"] == "dead_lettered"
    records = await read_records(kafka.bootstrap_servers, topic, count=2)
    assert {r.key: headers_of(r).get("vod-sub-app-id") for r in records} == {
        b"from-1500001": "1500001",
        b"from-default": None,
    }
    (letter,) = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=1)
    assert headers_of(letter)["vod-sub-app-id"] == "1500002" and headers_of(letter)["error-reason"] == reason


async def test_a_path_segment_that_is_not_a_sub_app_id_is_not_found(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    for segment in ("abc", "0", "01500001", "-1500001", "+1500001", "1" * 19, "1500001/extra", "1500001/"):
        response = await client.post(f"/vod/callback/{segment}", json=sample_event("nowhere"))
        assert response.status == 404, segment
        assert (await response.json())["error"] == "not_found"
    received = client.server.app[COMPONENTS].metrics.received.collect()[0].samples
    assert not any(sample.value for sample in received), "nothing reached delivery"
