"""The pytest plugin as a consumer team uses it: test files in another directory, run by their own pytest with
``-p bridge.testing`` against the installed package and the session's broker (pytester)."""

from __future__ import annotations

import importlib.metadata

import pytest
from readme import consumer_examples

from bridge.testing import KafkaEndpoint

pytest_plugins = ["pytester"]

#: The inner runs: no cache files, no pytest-asyncio (its configuration warning is not the consumer's concern).
RUN_OPTIONS = ("-p", "no:cacheprovider", "-p", "no:asyncio")

#: A consumer team's test file: every fixture of the plugin, and every modelled event type through Kafka.
CONSUMER_TESTS = """
import asyncio
import sys

import pytest

from bridge.testing import RecordsTimeout, event_key
from bridge.vod.event_types import EVENT_TYPES


def test_the_plugin_imports_neither_testcontainers_nor_docker():
    assert "testcontainers" not in sys.modules and "docker" not in sys.modules


def test_every_modelled_type_reaches_kafka(vod_bridge, vod_event):
    events = {event_type: vod_event(event_type) for event_type in EVENT_TYPES}
    for event_type, event in events.items():
        status, answer = vod_bridge.post(event)
        assert (status, answer["status"], answer["topic"]) == (200, "published", vod_bridge.topic), event_type
    records = {record.key_text: record for record in vod_bridge.records(len(events), timeout_s=15)}
    for event_type, event in events.items():
        record = records.pop(event_key(event))
        assert record.topic == vod_bridge.topic
        assert record.headers["event-type"] == event_type
        assert record.headers["source"] == "callback"
        assert record.headers["content-type"] == "application/json"
        assert record.headers["event-format"] == "eventcontent"
        assert record.json() == event
    assert not records
    vod_bridge.assert_no_records(within_s=0.2)


@pytest.mark.vod_bridge(http_sign_key="Key123")
def test_marker_settings_apply(vod_bridge, vod_event):
    status, answer = vod_bridge.post(vod_event("PullComplete"))
    assert (status, answer["error"]) == (401, "unauthorized")
    signed = vod_event("PullComplete", TaskId="signed-1", signed=True, sign_key="Key123")
    assert vod_bridge.post(signed).status == 200
    (record,) = vod_bridge.records(1)
    assert record.key == b"signed-1"
    assert "Sign" not in record.json() and "T" not in record.json()


def test_factory_settings_dead_letters_and_the_timeout_error(vod_bridge_factory, vod_event):
    bridge = vod_bridge_factory(delivery_dedup_window_s=60)
    event = vod_event("NewFileUpload")
    assert [bridge.post(event).body["status"] for _ in range(2)] == ["published", "duplicate"]
    (record,) = bridge.records(1)
    assert record.key_text == event["FileUploadEvent"]["FileId"]
    with pytest.raises(RecordsTimeout) as caught:
        bridge.records(1, timeout_s=0.3)
    assert str(caught.value) == f"expected 1 record(s) on topic {bridge.topic!r} within 0.3s, got 0"

    status, answer = bridge.post(vod_event("PullComplete", TaskId=None))
    assert (status, answer["status"], answer["topic"]) == (200, "dead_lettered", bridge.dead_letter_topic)
    (letter,) = bridge.dead_letters(1)
    assert letter.headers["error-reason"] == "missing_key" and letter.key is None

    with pytest.raises(TypeError, match="unknown vod_bridge setting 'delivery_dedup_window'"):
        vod_bridge_factory(delivery_dedup_window=60)


SESSION_BRIDGES = []


def test_session_bridge_in_a_sync_test(vod_bridge_session, vod_event):
    SESSION_BRIDGES.append(vod_bridge_session.callback_url)
    assert vod_bridge_session.post(vod_event("ClipComplete", TaskId="first")).status == 200
    assert [r.key for r in vod_bridge_session.records(1)] == [b"first"]


def test_session_bridge_in_an_async_test(vod_bridge_session, vod_event):
    async def scenario():
        status, _ = await vod_bridge_session.apost(vod_event("ClipComplete", TaskId="second"))
        assert status == 200
        return await vod_bridge_session.arecords(1)

    assert SESSION_BRIDGES == [vod_bridge_session.callback_url], "one bridge for the session"
    assert [r.key for r in asyncio.run(scenario())] == [b"second"], "the next record, not the first again"
"""


def test_consumer_tests_in_another_directory(
    pytester: pytest.Pytester, vod_bridge_kafka: KafkaEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme_example = consumer_examples()[0]
    pytester.makepyfile(test_consumer=CONSUMER_TESTS, test_readme_example=readme_example)
    # The session's broker: the plugin starts no embedded broker of its own.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", vod_bridge_kafka.bootstrap_servers)
    monkeypatch.setenv("VOD_BRIDGE_TEST_IDEMPOTENCE", str(vod_bridge_kafka.supports_idempotence).lower())
    # Without pytest-asyncio: the async test drives its own loop, as any async framework would.
    result = pytester.runpytest_subprocess(*RUN_OPTIONS, "-p", "bridge.testing", "-W", "error", "-v", timeout=120)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*test_readme_example.py::test_a_failed_pull_reaches_kafka PASSED*"])


def test_without_kafka_settings_the_plugin_runs_an_embedded_broker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest('pytest_plugins = ["bridge.testing"]\n')
    pytester.makepyfile(
        test_readme_example=consumer_examples()[0],
        test_broker="""
def test_the_broker_is_embedded_and_refuses_idempotence(vod_bridge_kafka):
    assert vod_bridge_kafka.bootstrap_servers.startswith("127.0.0.1:")
    assert vod_bridge_kafka.supports_idempotence is False
""",
    )
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("VOD_BRIDGE_TEST_IDEMPOTENCE", raising=False)
    result = pytester.runpytest_subprocess(*RUN_OPTIONS, "-W", "error", timeout=120)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)


def test_installing_the_package_does_not_load_the_plugin(pytester: pytest.Pytester) -> None:
    assert not [
        entry for entry in importlib.metadata.entry_points(group="pytest11") if entry.value.startswith("bridge")
    ]
    pytester.makepyfile("def test_uses_the_bridge(vod_bridge):\n    pass\n")
    result = pytester.runpytest_inprocess(*RUN_OPTIONS)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'vod_bridge' not found*"])
