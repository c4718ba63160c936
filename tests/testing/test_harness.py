"""bridge.testing.VodBridge and bridge_settings: settings by flat name, start-up and shutdown, the async API."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SessionBrokers

from bridge.errors import ConfigError
from bridge.testing import (
    BridgeStartError,
    KafkaEndpoint,
    UnexpectedRecords,
    VodBridge,
    bridge_settings,
    build_event,
    event_key,
)

KAFKA = KafkaEndpoint("127.0.0.1:9092", supports_idempotence=False)


def threads_of(bridge: VodBridge) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"vod-bridge {bridge.topic}"]


def test_settings_defaults_give_each_bridge_topics_of_its_own() -> None:
    first, second = bridge_settings(KAFKA), bridge_settings(KAFKA)
    assert first.kafka.topic.startswith("vod.events.test-") and first.kafka.topic != second.kafka.topic
    assert first.delivery.dead_letter_topic == f"{first.kafka.topic}.dlq"
    assert (first.kafka.bootstrap_servers, first.kafka.enable_idempotence) == ("127.0.0.1:9092", False)
    assert (first.http.host, first.http.port) == ("127.0.0.1", 0)


def test_settings_by_flat_name() -> None:
    settings = bridge_settings(
        KAFKA,
        kafka_topic="orders.vod",
        kafka_linger_ms=5,
        http_sign_key="Key123",
        delivery_dedup_window_s=0,
        spool_publish_budget_s=1,
        otel_enabled=True,
    )
    assert (settings.kafka.topic, settings.delivery.dead_letter_topic) == ("orders.vod", "orders.vod.dlq")
    assert settings.kafka.linger_ms == 5 and settings.http.sign_key == "Key123"
    assert settings.delivery.dedup_window_s == 0.0 and settings.spool.publish_budget_s == 1.0
    assert settings.otel_enabled is True


def test_unknown_names_and_wrong_types_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unknown vod_bridge setting 'http_signkey'; did you mean http_sign_key"):
        bridge_settings(KAFKA, http_signkey="Key123")
    with pytest.raises(TypeError, match=r"unknown vod_bridge setting 'linger_ms'.*kafka_linger_ms"):
        bridge_settings(KAFKA, linger_ms=5)
    with pytest.raises(TypeError, match=r"vod_bridge setting delivery_dedup_window_s: Expected `float`, got `str`$"):
        bridge_settings(KAFKA, delivery_dedup_window_s="60")


def test_inconsistent_values_are_refused_by_name_without_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        bridge_settings(KAFKA, http_sign_key="not a sign key!")
    assert caught.value.message == "vod_bridge setting http_sign_key: VOD sign keys are letters and digits"


@pytest.mark.integration
def test_a_broker_refusing_the_idempotent_producer_stops_the_start_with_the_remedy(
    session_brokers: SessionBrokers,
) -> None:
    tansu = session_brokers.get("tansu")
    bridge = VodBridge(bridge_settings(KafkaEndpoint(tansu.bootstrap_servers, supports_idempotence=True)))
    with pytest.raises(BridgeStartError, match=r"refused the idempotent producer.*VOD_BRIDGE_TEST_IDEMPOTENCE=false"):
        bridge.start()
    assert not threads_of(bridge), "the bridge's thread ended with the failed start"


@pytest.mark.integration
def test_stop_closes_the_port_and_ends_the_thread(vod_bridge_kafka: KafkaEndpoint) -> None:
    with VodBridge(bridge_settings(vod_bridge_kafka)) as bridge:
        address = ("127.0.0.1", int(bridge.base_url.rpartition(":")[2]))
        socket.create_connection(address, timeout=1).close()
        assert len(threads_of(bridge)) == 1
    assert not threads_of(bridge)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=1)
    with pytest.raises(RuntimeError, match="not running"):
        bridge.post(build_event("PullComplete"))
    bridge.stop()  # a second stop is harmless


@pytest.mark.integration
async def test_the_async_api_in_an_async_test(vod_bridge: VodBridge) -> None:
    events = [build_event("TranscodeComplete") for _ in range(5)]
    answers = await asyncio.gather(*(vod_bridge.apost(event) for event in events))
    assert [answer.status for answer in answers] == [200] * 5
    records = await vod_bridge.arecords(5)
    assert sorted(record.key_text for record in records) == sorted(event_key(event) for event in events)
    await vod_bridge.apost(build_event("PullComplete", TaskId=None))
    (letter,) = await vod_bridge.adead_letters(1)
    assert letter.headers["error-reason"] == "missing_key"


@pytest.mark.integration
def test_assert_no_records_reports_what_came_and_keeps_it(vod_bridge: VodBridge) -> None:
    event = build_event("PullComplete", TaskId="late-1")
    vod_bridge.post(event)
    with pytest.raises(UnexpectedRecords, match=r"got 1 \(keys: 'late-1'\)"):
        vod_bridge.assert_no_records(within_s=5)
    assert [record.key for record in vod_bridge.records(1)] == [b"late-1"], "still there for records()"


@pytest.mark.integration
def test_posts_bytes_as_they_are(vod_bridge: VodBridge) -> None:
    status, answer = vod_bridge.post(b"{not json")
    assert status == 400 and answer["error"] == "invalid_payload"
    status, _ = vod_bridge.post(b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "raw-1"}}')
    assert status == 200
    assert vod_bridge.records(1)[0].value == b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId": "raw-1"}}'


@pytest.mark.integration
def test_https_settings_serve_the_callback_over_tls(
    vod_bridge_factory: Callable[..., VodBridge], tmp_path: Path
) -> None:
    import trustme

    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    bridge = vod_bridge_factory(http_tls_cert_file=str(cert), http_tls_key_file=str(key))
    assert bridge.callback_url.startswith("https://127.0.0.1:")
    assert bridge.post(build_event("PullComplete", TaskId="tls-1")).status == 200
    assert [record.key for record in bridge.records(1)] == [b"tls-1"]
