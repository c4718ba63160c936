"""`vod-bridge check` against a real broker, the fake VOD API and real spool directories."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from conftest import Kafka
from fakevod import FakeVod
from faultkit import bridge_env, create_topic

from bridge.cli import main
from bridge.config import PollerSettings, Settings, SpoolSettings
from bridge.delivery.spool import Spool
from bridge.ops.check import (
    OVERALL_TIMEOUTS,
    CheckResult,
    ClusterView,
    check_spool_dir,
    check_vod_api,
    format_result,
    redact,
    run_checks,
    topic_result,
)
from bridge.ops.embedded import free_port
from bridge.vod.api import Credentials

SECRET_ID = "AKIDcheckCHECKcheck0001"
SECRET_KEY = "check-SECRET-key-never-printed-0001"
SUB_APP_ID = 1500000001


async def create_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Create each topic: through CreateTopics where the broker has it (tansu, Kafka), else (the mock cluster) by
    naming it in a metadata request, which makes an auto-creating broker create it."""
    for name in topics:
        await create_topic(bootstrap_servers, name)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers)
    await producer.start()
    try:
        for name in topics:
            await producer.partitions_for(name)
    finally:
        await producer.stop()


async def all_topics(bootstrap_servers: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


@pytest.fixture
async def vod() -> AsyncIterator[FakeVod]:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, sub_app_ids=frozenset({SUB_APP_ID})) as fake:
        yield fake


def with_poller_and_spool(settings: Settings, vod: FakeVod, spool_dir: Path | None = None) -> Settings:
    poller = PollerSettings(enabled=True, endpoint=vod.endpoint, region="ap-guangzhou", sub_app_id=SUB_APP_ID)
    spool = SpoolSettings(dir=str(spool_dir) if spool_dir is not None else None)
    return msgspec.structs.replace(settings, poller=poller, spool=spool)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


@pytest.mark.producer
@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_every_check_passes_and_nothing_is_consumed_or_created(
    kafka: Kafka, make_settings: Callable[..., Settings], vod: FakeVod, tmp_path: Path, client: str
) -> None:
    routed = f"test.{uuid.uuid4().hex[:12]}.uploads"
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    settings = with_poller_and_spool(
        make_settings(client=client, topic_routes={"NewFileUpload": routed}), vod, spool_dir
    )
    topic = settings.kafka.topic
    await create_topics(kafka.bootstrap_servers, [topic, routed, f"{topic}.dlq"])
    topics_before = sorted(await all_topics(kafka.bootstrap_servers))
    queued = vod.add_event({"EventType": "NewFileUpload", "FileUploadEvent": {"FileId": "1"}})

    results = await run_checks(settings, Credentials(SECRET_ID, SECRET_KEY), timeout_s=5)

    lines = [format_result(result) for result in results]
    assert [result.status for result in results] == ["ok"] * 7, lines
    idempotence = "idempotent" if kafka.supports_idempotence else "idempotence off"
    assert [line.partition(": ")[0] for line in lines] == [
        "ok   kafka metadata",
        f"ok   topic {topic}",
        f"ok   topic {routed} (NewFileUpload)",
        f"ok   dead-letter topic {topic}.dlq",
        "ok   kafka producer",
        "ok   vod api",
        f"ok   spool {spool_dir}",
    ]
    checked = by_name(results)
    assert checked[f"topic {topic}"].detail.endswith(" partitions")
    assert checked["kafka producer"].detail == f"{client} producer initialised (acks=all, {idempotence})"
    assert checked["vod api"].detail.endswith("event notification mode PULL (reliable callback)")
    assert f"SubAppId {SUB_APP_ID}" in checked["vod api"].detail
    # Read-only everywhere: no event handed out, no topic created, only the lock file left in the spool.
    assert [request.action for request in vod.requests] == ["DescribeEventConfig"]
    assert vod.deliveries[queued] == 0 and vod.pulls_received == 0
    assert sorted(await all_topics(kafka.bootstrap_servers)) == topics_before
    assert [path.name for path in spool_dir.iterdir()] == ["LOCK"]


@pytest.mark.producer
async def test_a_missing_topic_fails_and_the_check_does_not_create_it(
    kafka: Kafka, make_settings: Callable[..., Settings], topic: str
) -> None:
    """Both embedded brokers create a topic that a metadata request names (so does a Kafka with auto-creation on):
    a check that asked for the topics by name would create the missing one and pass."""
    missing = f"{topic}.missing"
    await create_topics(kafka.bootstrap_servers, [topic, f"{topic}.dlq"])
    settings = make_settings(topic_routes={"FileDeleted": missing})

    results = by_name(await run_checks(settings, None, timeout_s=5))

    assert results[f"topic {topic}"].status == "ok"
    assert results[f"dead-letter topic {topic}.dlq"].status == "ok"
    verdict = results[f"topic {missing} (FileDeleted)"]
    if kafka.kind == "embedded":
        # Neither answers DescribeConfigs, so whether they auto-create is unknown: a failure, with the hint.
        assert verdict == CheckResult(
            f"topic {missing} (FileDeleted)",
            "fail",
            "missing: create it (whether the broker auto-creates topics is unknown: it does not tell "
            "auto.create.topics.enable)",
        )
    else:
        assert verdict.detail.startswith("missing") and verdict.status in ("warn", "fail")
    assert missing not in await all_topics(kafka.bootstrap_servers)


def test_topic_verdicts_follow_what_the_broker_says_about_auto_creation() -> None:
    view = ClusterView(
        broker_ids=(1,), cluster_id="c", partitions={"present": 1}, errors={"sick": "LeaderNotAvailable"}
    )

    def verdict(topic: str, auto_create: bool | None, *, acl_hint: bool = False) -> tuple[str, str]:
        result = topic_result("t", topic, view, auto_create, acl_hint=acl_hint)
        return result.status, result.detail

    assert verdict("present", None) == ("ok", "1 partition")
    assert verdict("sick", None) == ("fail", "listed with the error LeaderNotAvailable")
    assert verdict("absent", True) == (
        "warn",
        "missing; the broker auto-creates topics (auto.create.topics.enable=true), with its defaults",
    )
    assert verdict("absent", False) == (
        "fail",
        "missing, and auto-creation is off (auto.create.topics.enable=false): create it",
    )
    assert verdict("absent", False, acl_hint=True)[1].startswith("missing (or this user may not Describe it)")


@pytest.mark.parametrize("listener", ["closed port", "silent listener"])
async def test_unreachable_kafka_fails_within_the_bound(
    make_settings: Callable[..., Settings], vod: FakeVod, tmp_path: Path, listener: str
) -> None:
    """A closed port fails at once; a listener that accepts and never answers (a black hole) fails at the
    per-check timeout. Either way the other groups still report, and the run ends within its bound."""
    held: list[asyncio.StreamWriter] = []

    async def accept_and_ignore(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = None
    if listener == "closed port":
        port = free_port()
    else:
        server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    timeout_s = 1.0
    settings = with_poller_and_spool(make_settings(bootstrap_servers=f"127.0.0.1:{port}"), vod, tmp_path / "spool")
    try:
        started = time.monotonic()
        results = await run_checks(settings, Credentials(SECRET_ID, SECRET_KEY), timeout_s=timeout_s)
        elapsed_s = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        if server is not None:
            server.close()
            await server.wait_closed()

    assert elapsed_s < OVERALL_TIMEOUTS * timeout_s
    metadata, *topics, producer, vod_api, spool = results
    assert metadata.name == "kafka metadata" and metadata.failed
    if listener == "closed port":
        assert metadata.detail.startswith(f"127.0.0.1:{port}: KafkaConnectionError: Unable to bootstrap")
        assert "last client error: Unable connect to" in metadata.detail
    else:
        assert metadata.detail == f"127.0.0.1:{port}: no answer within 1s"
    assert [(r.status, r.detail) for r in [*topics, producer]] == [("skip", "needs the kafka metadata")] * 3
    assert (vod_api.status, spool.status) == ("ok", "ok")


@pytest.mark.parametrize(
    ("arrange", "credentials", "status", "detail"),
    [
        (None, Credentials(SECRET_ID, "another-key"), "fail", "AuthFailure.SignatureFailure"),
        (None, Credentials("AKIDunknownUNKNOWN0001", SECRET_KEY), "fail", "AuthFailure.SecretIdNotFound"),
        ("cam", Credentials(SECRET_ID, SECRET_KEY), "warn", "may not call DescribeEventConfig"),
        ("push", Credentials(SECRET_ID, SECRET_KEY), "warn", "mode is PUSH, not PULL (reliable callback)"),
        ("sub app", Credentials(SECRET_ID, SECRET_KEY), "fail", "InvalidParameterValue.SubAppId"),
    ],
)
async def test_vod_api_check_verdicts(
    vod: FakeVod, arrange: str | None, credentials: Credentials, status: str, detail: str
) -> None:
    poller = PollerSettings(enabled=True, endpoint=vod.endpoint, sub_app_id=SUB_APP_ID)
    if arrange == "cam":
        vod.fail_next(1, "AuthFailure.UnauthorizedOperation", "not authorized", action="DescribeEventConfig")
    elif arrange == "push":
        vod.event_mode = "PUSH"
    elif arrange == "sub app":
        poller = msgspec.structs.replace(poller, sub_app_id=SUB_APP_ID + 1)

    result = await check_vod_api(poller, credentials, timeout_s=5)

    assert (result.name, result.status) == ("vod api", status), result.detail
    assert detail in result.detail
    assert "fake-callback-token" not in result.detail  # DescribeEventConfig's NotificationUrl is never shown


async def test_every_sub_app_id_gets_its_own_vod_api_check(
    make_settings: Callable[..., Settings], vod: FakeVod
) -> None:
    poller = PollerSettings(enabled=True, endpoint=vod.endpoint, sub_app_ids=[SUB_APP_ID + 1, SUB_APP_ID])
    settings = msgspec.structs.replace(make_settings(), poller=poller)
    results = await run_checks(settings, Credentials(SECRET_ID, SECRET_KEY), timeout_s=5)
    checked = [(r.status, r.detail) for r in results if r.name == "vod api"]
    assert [status for status, _ in checked] == ["fail", "ok"], checked
    assert f"SubAppId {SUB_APP_ID + 1}: " in checked[0][1] and "InvalidParameterValue.SubAppId" in checked[0][1]
    assert f"SubAppId {SUB_APP_ID}: " in checked[1][1]
    assert sorted(r.params.get("SubAppId") for r in vod.requests) == [SUB_APP_ID, SUB_APP_ID + 1]


async def test_a_hanging_vod_api_fails_within_the_timeout(vod: FakeVod) -> None:
    vod.hang_next(1, action="DescribeEventConfig")
    poller = PollerSettings(enabled=True, endpoint=vod.endpoint, sub_app_id=SUB_APP_ID)
    started = time.monotonic()
    result = await check_vod_api(poller, Credentials(SECRET_ID, SECRET_KEY), timeout_s=0.5)
    assert time.monotonic() - started < 2
    assert result.failed
    assert result.detail.endswith("VOD DescribeEventConfig: no answer within 0.5s")
    assert [r.outcome for r in vod.requests] == ["held"]


def test_spool_dir_verdicts(tmp_path: Path) -> None:
    mib = 1024 * 1024
    free = tmp_path / "free"
    free.mkdir()
    assert check_spool_dir(free, mib).status == "ok"
    assert check_spool_dir(tmp_path / "new" / "spool", mib).detail.startswith(
        f"does not exist yet; the bridge can create it in {tmp_path}"
    )
    # As root every mode bit is ignored: a file where the directory should be is what nobody can write into.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert check_spool_dir(blocker, mib) == CheckResult(f"spool {blocker}", "fail", "not a directory")
    assert check_spool_dir(blocker / "spool", mib) == CheckResult(
        f"spool {blocker / 'spool'}", "fail", f"cannot be created: {blocker} is not a directory"
    )
    small = check_spool_dir(free, 1 << 60)
    assert small.status == "warn" and "less than BRIDGE_SPOOL_MAX_BYTES" in small.detail


async def test_a_spool_held_by_a_running_bridge_fails_and_stays_intact(
    make_settings: Callable[..., Settings], vod: FakeVod, tmp_path: Path
) -> None:
    """Two workers: worker-0's spool is open (its lock held, as by a running bridge), worker-1's is free."""
    root = tmp_path / "spool"
    running = Spool.open(root / "worker-0", fsync=False)
    try:
        running.append([b"spooled"])
        settings = with_poller_and_spool(make_settings(bootstrap_servers=f"127.0.0.1:{free_port()}"), vod, root)
        settings = msgspec.structs.replace(settings, workers=2)

        results = by_name(await run_checks(settings, Credentials(SECRET_ID, SECRET_KEY), timeout_s=2))

        assert results[f"spool {root / 'worker-0'}"] == CheckResult(
            f"spool {root / 'worker-0'}", "fail", "its lock is held by another process (a bridge running on it?)"
        )
        assert results[f"spool {root / 'worker-1'}"].status == "ok"
        assert running.append([b"after the check"]) == [2]
        assert [payload for _, payload in running.read(0, 10)] == [b"spooled", b"after the check"]
    finally:
        running.close()


def test_redact_replaces_every_secret_longest_first() -> None:
    assert redact("a pw and a pw-long", ["pw", "pw-long", ""]) == "a *** and a ***"


@pytest.mark.parametrize(
    ("argv", "environ", "line"),
    [
        ([], {"BRIDGE_PULL_ENABLED": "true"}, "FAIL configuration: BRIDGE_PULL_ENABLED needs TENCENTCLOUD_SECRET_ID"),
        (["--port", "http"], {}, "FAIL configuration: BRIDGE_HTTP_PORT: "),
        (["--timeout-s", "0"], {}, "FAIL configuration: --timeout-s must be positive"),
    ],
)
def test_invalid_configuration_is_one_fail_line_and_exit_2(
    argv: list[str], environ: dict[str, str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", *argv], environ=environ) == 2
    out = capsys.readouterr().out
    assert out.startswith(line)
    assert out.count("\n") == 1


def test_cli_exits_0_when_every_check_passes(
    kafka: Kafka, topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(create_topics(kafka.bootstrap_servers, [topic, f"{topic}.dlq"]))
    environ = {
        "BRIDGE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BRIDGE_KAFKA_TOPIC": topic,
        "BRIDGE_KAFKA_DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "BRIDGE_SPOOL_DIR": str(tmp_path / "spool"),
        "BRIDGE_LOG_FORMAT": "text",
    }
    idempotence = str(kafka.supports_idempotence).lower()
    assert main(["check", "--enable-idempotence", idempotence, "--timeout-s", "5"], environ=environ) == 0, (
        capsys.readouterr().out
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line[:5] for line in lines[:-1]] == ["ok   "] * 6
    assert lines[-1] == "all 6 checks passed"


async def test_no_secret_is_printed_whatever_fails(kafka: Kafka, vod: FakeVod, tmp_path: Path) -> None:
    """Every secret set, DEBUG logging, SASL against a broker without it, and a VOD error message that echoes the
    key and the session token back: none of them reaches stdout or stderr."""
    token = "session-TOKEN-never-printed-0001"
    secrets = {
        "BRIDGE_KAFKA_SASL_PASSWORD": "kafka-PASSWORD-never-printed-0001",
        "BRIDGE_CALLBACK_SIGN_KEY": "SignKeyNeverPrinted0001",
        "BRIDGE_CALLBACK_TOKEN": "callback-TOKEN-never-printed-0001",
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
        "TENCENTCLOUD_SESSION_TOKEN": token,
    }
    vod.token = token
    vod.fail_next(1, "FailedOperation", f"cannot use {SECRET_KEY} with {token}", action="DescribeEventConfig")
    env: dict[str, Any] = bridge_env(
        BRIDGE_LOG_LEVEL="DEBUG",
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BRIDGE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        BRIDGE_KAFKA_SASL_MECHANISM="PLAIN",
        BRIDGE_KAFKA_SASL_USERNAME="bridge",
        BRIDGE_PULL_ENABLED="true",
        BRIDGE_VOD_ENDPOINT=vod.endpoint,
        BRIDGE_VOD_SUB_APP_ID=str(SUB_APP_ID),
        TENCENTCLOUD_SECRET_ID=SECRET_ID,
        BRIDGE_SPOOL_DIR=str(tmp_path / "spool"),
        **secrets,
    )
    command = [sys.executable, "-m", "bridge", "check", "--timeout-s", "3"]

    result = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL kafka metadata" in result.stdout
    assert "FAIL vod api" in result.stdout and "FailedOperation: cannot use *** with ***" in result.stdout
    assert SECRET_ID not in result.stdout  # shown masked only
    for name, value in secrets.items():
        assert value not in result.stdout, name
        assert value not in result.stderr, name
