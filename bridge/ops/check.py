"""`vod-bridge check`: pre-flight checks of a configuration against what it will talk to.

Each check is a coroutine that returns a :class:`CheckResult` (it raises nothing); :func:`run_checks` runs them in
three groups side by side — Kafka (metadata, then the topics, then the producer), the VOD API (poller only), the
spool directories (spool only) — each check within ``timeout_s`` and the whole run within
``OVERALL_TIMEOUTS * timeout_s``, whatever hangs. Nothing here prints: ``bridge.cli`` does.

The metadata and topics are read with aiokafka's admin client whatever ``BRIDGE_KAFKA_CLIENT`` says (same
address, TLS and SASL settings); the producer check uses the configured client, as the bridge will.

Nothing here changes what a running bridge depends on. Topics are looked up in the metadata of all topics,
because a metadata request that names a topic makes an auto-creating broker create it (the embedded brokers
do). The producer connects (with idempotence on, that includes InitProducerId) and sends nothing. The VOD call
is the read-only DescribeEventConfig: PullEvents would hand events out and leave them unconfirmed. A spool's
lock is taken only when free, and released at once.

No result carries a secret: every detail passes :func:`redact` with the configured secrets (the library
messages already leave them out; this is the second line).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import msgspec
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code

from bridge.config import KafkaSettings, PollerSettings, Settings, secret_values
from bridge.delivery.clients import make_sink
from bridge.delivery.kafka import connection_options
from bridge.delivery.spool import SpoolError, SpoolInUse, probe_lock, spool_dirs
from bridge.errors import BridgeError
from bridge.ops.metrics import Metrics
from bridge.threads import DaemonCalls
from bridge.vod.api import Credentials, VodApiError, VodClient, VodTransportError

logger = logging.getLogger(__name__)


CheckStatus = Literal["ok", "warn", "fail", "skip"]

#: Per check: connecting, one metadata or API answer, a producer id.
DEFAULT_TIMEOUT_S: Final = 10.0
#: The whole run ends within this many ``timeout_s``: the Kafka group runs three checks one after the other, and
#: closing its clients gets one more.
OVERALL_TIMEOUTS: Final = 4
#: How long cancelled checks may take to close their clients once the overall bound is reached.
CANCEL_GRACE_S: Final = 2.0
#: How often the producer may try to connect within its check (librdkafka gives each attempt at most 2 s).
PRODUCER_ATTEMPTS: Final = 2
_AUTO_CREATE: Final = "auto.create.topics.enable"
_LABELS: Final[dict[CheckStatus, str]] = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the report. ``warn`` and ``skip`` do not fail the run; ``fail`` does."""

    name: str
    status: CheckStatus
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def format_result(result: CheckResult) -> str:
    """``ok   kafka metadata: 3 brokers`` / ``FAIL dead-letter topic vod.events.dlq: missing ...``."""
    return f"{_LABELS[result.status]} {result.name}: {result.detail}"


def format_summary(results: Iterable[CheckResult]) -> str:
    """The last line: how many checks failed, or that all passed (with the warnings counted)."""
    results = list(results)
    failed = sum(r.failed for r in results)
    warned = sum(r.status == "warn" for r in results)
    if failed:
        return f"{failed} of {len(results)} checks failed"
    return f"all {len(results)} checks passed" + (f" ({warned} with a warning)" if warned else "")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***`` (longest first, so that no part of one survives)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def configured_secrets(settings: Settings, credentials: Credentials | None) -> list[str]:
    """Every secret value the configuration holds: what no check may ever print."""
    values = secret_values(settings)
    if credentials is not None:
        values += [value for value in (credentials.secret_key, credentials.token) if value]
    return values


def describe_configuration(settings: Settings) -> str:
    """The configuration line's detail: what the checks below are about, no secret in it."""
    kafka = settings.kafka
    idempotence = "idempotent" if kafka.enable_idempotence else "idempotence off"
    sources = ", ".join(
        name for name, on in (("callback", settings.callback_enabled), ("poller", settings.poller.enabled)) if on
    )
    spool = settings.spool.dir or "off"
    return (
        f"valid; kafka {kafka.bootstrap_servers} ({kafka.client}, {kafka.security_protocol}, {idempotence}); "
        f"sources: {sources}; spool: {spool}; workers: {settings.workers}"
    )


async def run_checks(
    settings: Settings, credentials: Credentials | None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[CheckResult]:
    """Run every check that applies to ``settings`` and return their results: Kafka's first, then the VOD API's,
    then the spool's. Returns within ``OVERALL_TIMEOUTS * timeout_s`` plus at most ``CANCEL_GRACE_S``.
    ``credentials`` are needed when the poller is on (without them its check fails)."""
    if not timeout_s > 0:
        raise ValueError("timeout_s must be positive")
    groups: dict[str, Callable[[Callable[[CheckResult], None]], Coroutine[Any, Any, None]]] = {
        "kafka": lambda emit: _kafka_checks(settings, timeout_s, emit),
    }
    if settings.poller.enabled:
        poller = settings.poller
        if credentials is None:
            missing = CheckResult("vod api", "fail", "the poller needs TENCENTCLOUD_SECRET_ID and _SECRET_KEY")
            groups["vod api"] = lambda emit: _emit_one(emit, asyncio.sleep(0, missing))
        else:
            loops = [msgspec.structs.replace(poller, sub_app_id=s, sub_app_ids=[]) for s in poller.loop_sub_app_ids()]
            groups["vod api"] = lambda emit: _vod_api_checks(loops, credentials, timeout_s, emit)
    if settings.spool.dir is not None:
        directories = spool_dirs(Path(settings.spool.dir), settings.workers)
        max_bytes = settings.spool.max_bytes
        groups["spool"] = lambda emit: _spool_checks(directories, max_bytes, timeout_s, emit)

    collected: dict[str, list[CheckResult]] = {name: [] for name in groups}
    tasks = {
        name: asyncio.create_task(run(collected[name].append), name=f"check-{name}") for name, run in groups.items()
    }
    overall_s = OVERALL_TIMEOUTS * timeout_s
    _, pending = await asyncio.wait(tasks.values(), timeout=overall_s)
    for name, task in tasks.items():
        if task in pending:
            task.cancel()
            collected[name].append(CheckResult(name, "fail", f"unfinished after {overall_s:g}s (the overall bound)"))
        elif (exc := task.exception()) is not None:
            logger.error("check %s crashed", name, exc_info=exc)
            collected[name].append(CheckResult(name, "fail", f"the check itself failed: {type(exc).__name__}"))
    if pending:
        # Cancelled clients close within their own bounds; do not wait for them beyond a moment more.
        await asyncio.wait(pending, timeout=min(timeout_s, CANCEL_GRACE_S))
    secrets = configured_secrets(settings, credentials)
    return [CheckResult(r.name, r.status, redact(r.detail, secrets)) for name in groups for r in collected[name]]


async def _emit_one(emit: Callable[[CheckResult], None], check: Awaitable[CheckResult]) -> None:
    emit(await check)


async def _vod_api_checks(
    loops: list[PollerSettings], credentials: Credentials, timeout_s: float, emit: Callable[[CheckResult], None]
) -> None:
    # One check per poller loop (each SubAppId of BRIDGE_VOD_SUB_APP_IDS), side by side, in the configured order.
    for result in await asyncio.gather(*(check_vod_api(loop, credentials, timeout_s=timeout_s) for loop in loops)):
        emit(result)


async def _bounded(name: str, timeout_s: float, check: Awaitable[CheckResult]) -> CheckResult:
    try:
        async with asyncio.timeout(timeout_s):
            return await check
    except TimeoutError:
        return CheckResult(name, "fail", f"no answer within {timeout_s:g}s")


# --------------------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What the metadata of all topics says."""

    broker_ids: tuple[int, ...]
    cluster_id: str | None
    #: Topic -> number of partitions, for each topic listed without an error.
    partitions: dict[str, int]
    #: Topic -> Kafka error name, for each topic listed with one (e.g. no leader yet).
    errors: dict[str, str]


def expected_topics(settings: Settings) -> dict[str, str]:
    """Topic -> the name of its check: the default topic, each routed topic (with its event types), the
    dead-letter topic. A topic serving several purposes is checked once, under its first name."""
    kafka = settings.kafka
    names = {kafka.topic: f"topic {kafka.topic}"}
    routed: dict[str, list[str]] = {}
    for event_type, topic in sorted(kafka.topic_routes.items()):
        routed.setdefault(topic, []).append(event_type)
    for topic, event_types in sorted(routed.items()):
        names.setdefault(topic, f"topic {topic} ({', '.join(event_types)})")
    dead_letters = settings.delivery.dead_letter_topic
    names.setdefault(dead_letters, f"dead-letter topic {dead_letters}")
    return names


def topic_result(name: str, topic: str, view: ClusterView, auto_create: bool | None, *, acl_hint: bool) -> CheckResult:
    """The verdict on one topic. ``auto_create``: the broker's ``auto.create.topics.enable``, None if unknown."""
    if topic in view.partitions:
        count = view.partitions[topic]
        return CheckResult(name, "ok", f"{count} partition{'s' if count != 1 else ''}")
    if topic in view.errors:
        return CheckResult(name, "fail", f"listed with the error {view.errors[topic]}")
    missing = "missing" + (" (or this user may not Describe it)" if acl_hint else "")
    if auto_create is True:
        return CheckResult(
            name, "warn", f"{missing}; the broker auto-creates topics ({_AUTO_CREATE}=true), with its defaults"
        )
    if auto_create is False:
        return CheckResult(name, "fail", f"{missing}, and auto-creation is off ({_AUTO_CREATE}=false): create it")
    return CheckResult(
        name,
        "fail",
        f"{missing}: create it (whether the broker auto-creates topics is unknown: it does not tell {_AUTO_CREATE})",
    )


async def _kafka_checks(settings: Settings, timeout_s: float, emit: Callable[[CheckResult], None]) -> None:
    kafka = settings.kafka
    topics = expected_topics(settings)
    admin = AIOKafkaAdminClient(
        **connection_options(kafka), client_id=kafka.client_id, request_timeout_ms=max(1, int(timeout_s * 1000))
    )
    try:
        metadata, view = await check_metadata(admin, kafka, timeout_s=timeout_s)
        emit(metadata)
        if view is None:
            for name in topics.values():
                emit(CheckResult(name, "skip", "needs the kafka metadata"))
            emit(CheckResult("kafka producer", "skip", "needs the kafka metadata"))
            return
        auto_create: bool | None = None
        if any(topic not in view.partitions and topic not in view.errors for topic in topics):
            auto_create = await _auto_create_enabled(admin, view, timeout_s)
        for topic, name in topics.items():
            emit(topic_result(name, topic, view, auto_create, acl_hint=kafka.sasl_mechanism is not None))
    finally:
        await _quietly(admin.close(), timeout_s)
    emit(await check_producer(kafka, timeout_s=timeout_s))


async def check_metadata(
    admin: AIOKafkaAdminClient, kafka: KafkaSettings, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[CheckResult, ClusterView | None]:
    """Bootstrap ``admin`` (the configured address, TLS and SASL) and read the metadata of all topics."""
    name = "kafka metadata"
    with _client_errors("aiokafka") as client_errors:
        try:
            async with asyncio.timeout(timeout_s):
                view = await _cluster_view(admin)
        except TimeoutError:
            why = f"no answer within {timeout_s:g}s"
        except KafkaError as exc:
            why = str(exc)  # aiokafka's messages name addresses and error classes, never credentials
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
        else:
            count = len(view.broker_ids)
            cluster = f" (cluster {view.cluster_id})" if view.cluster_id else ""
            return CheckResult(name, "ok", f"{count} broker{'s' if count != 1 else ''}{cluster}"), view
    # aiokafka says why a bootstrap failed (refused, TLS, SASL mechanism or credentials) only in its log.
    if client_errors.last is not None:
        why += f"; last client error: {client_errors.last}"
    return CheckResult(name, "fail", f"{kafka.bootstrap_servers}: {why}"), None


class _LastError(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


@contextlib.contextmanager
def _client_errors(logger_name: str) -> Iterator[_LastError]:
    """The last ERROR line the client library logs meanwhile (none if its logger is set above ERROR)."""
    target = logging.getLogger(logger_name)
    handler = _LastError()
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)


async def _cluster_view(admin: AIOKafkaAdminClient) -> ClusterView:
    await admin.start()
    # Both are the metadata of all topics: a request naming topics would make an auto-creating broker create them.
    cluster: dict[str, Any] = await admin.describe_cluster()
    listed: list[dict[str, Any]] = await admin.describe_topics()
    partitions: dict[str, int] = {}
    errors: dict[str, str] = {}
    for entry in listed:
        if entry["error_code"]:
            errors[entry["topic"]] = for_code(entry["error_code"]).__name__
        else:
            partitions[entry["topic"]] = len(entry["partitions"])
    return ClusterView(
        broker_ids=tuple(broker["node_id"] for broker in cluster["brokers"]),
        cluster_id=cluster.get("cluster_id"),
        partitions=partitions,
        errors=errors,
    )


async def _auto_create_enabled(admin: AIOKafkaAdminClient, view: ClusterView, timeout_s: float) -> bool | None:
    """The broker's ``auto.create.topics.enable`` (DescribeConfigs), or None when it does not say: a broker
    without the API (the embedded ones) or a user without DescribeConfigs on the cluster."""
    if not view.broker_ids:
        return None
    resource = ConfigResource(ConfigResourceType.BROKER, str(view.broker_ids[0]), {_AUTO_CREATE: None})
    try:
        async with asyncio.timeout(timeout_s):
            responses = await admin.describe_configs([resource])
    except (KafkaError, OSError, TimeoutError) as exc:
        logger.debug("cannot read %s: %s", _AUTO_CREATE, exc)
        return None
    for response in responses:
        for entry in response.to_object().get("resources", []):
            if entry.get("error_code"):
                continue
            for config in entry.get("config_entries", []):
                if config.get("config_names") == _AUTO_CREATE and config.get("config_value") in ("true", "false"):
                    return bool(config["config_value"] == "true")
    return None


async def check_producer(kafka: KafkaSettings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    """Connect the configured client's producer (``BRIDGE_KAFKA_CLIENT``), as the bridge will, and close it: with
    idempotence on this includes InitProducerId, which brokers without support (or without the IdempotentWrite
    ACL) refuse. Sends nothing."""
    name = "kafka producer"
    idempotence = "idempotent" if kafka.enable_idempotence else "idempotence off"
    try:
        sink = make_sink(kafka, Metrics())
    except BridgeError as exc:
        return CheckResult(name, "fail", exc.message)
    try:
        async with asyncio.timeout(timeout_s):
            await sink.connect(retry_delay_s=0.2, max_retry_delay_s=0.5, max_attempts=PRODUCER_ATTEMPTS)
    except TimeoutError:
        return CheckResult(name, "fail", f"{kafka.client} producer not connected within {timeout_s:g}s ({idempotence})")
    except BridgeError as exc:
        return CheckResult(name, "fail", exc.message)
    finally:
        await _quietly(sink.close(flush_timeout_s=1.0), timeout_s)
    return CheckResult(name, "ok", f"{kafka.client} producer initialised (acks=all, {idempotence})")


async def _quietly(closing: Awaitable[object], timeout_s: float) -> None:
    """Close a client within a bound: a check's result is already known, its cleanup must not hang the run."""
    try:
        async with asyncio.timeout(timeout_s):
            await closing
    except Exception as exc:  # nothing to report about a client being thrown away
        logger.debug("closing a check's client: %s", exc)


# --------------------------------------------------------------------------------------------------------
# The VOD API
# --------------------------------------------------------------------------------------------------------

#: CAM refused the action although the signature was valid: the key works, it may just not read the config.
_CAM_DENIED: Final = ("AuthFailure.UnauthorizedOperation", "UnauthorizedOperation")


async def check_vod_api(
    poller: PollerSettings, credentials: Credentials, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> CheckResult:
    """Call DescribeEventConfig once (read-only: it hands out no event) with the poller's credentials, endpoint,
    region and SubAppId, and report the event notification mode (PULL is what the poller needs)."""
    name = "vod api"
    target = f"{poller.endpoint}, region {poller.region or '(none)'}, " + (
        f"SubAppId {poller.sub_app_id}" if poller.sub_app_id is not None else "no SubAppId"
    )
    async with aiohttp.ClientSession() as session:
        client = VodClient(
            session,
            credentials,
            endpoint=poller.endpoint,
            region=poller.region,
            sub_app_id=poller.sub_app_id,
            request_timeout_s=timeout_s,
        )
        try:
            async with asyncio.timeout(timeout_s):
                config = await client.describe_event_config()
        except TimeoutError:
            return CheckResult(name, "fail", f"{target}: no answer within {timeout_s:g}s")
        except VodApiError as exc:
            if exc.api_code.startswith(_CAM_DENIED):
                return CheckResult(
                    name,
                    "warn",
                    f"{target}: key {credentials.masked_id} accepted, but it may not call DescribeEventConfig "
                    f"({exc.api_code}), so the region, SubAppId and notification mode are unverified; grant "
                    "vod:DescribeEventConfig to check them",
                )
            return CheckResult(name, "fail", f"{target}: {exc.message}")
        except VodTransportError as exc:
            return CheckResult(name, "fail", f"{target}: {exc.message}")
    if config.mode != "PULL":
        return CheckResult(
            name,
            "warn",
            f"{target}: key {credentials.masked_id} accepted; event notification mode is {config.mode or '(unset)'}, "
            "not PULL (reliable callback): the poller gets no events until ModifyEventConfig sets Mode=PULL",
        )
    return CheckResult(
        name, "ok", f"{target}: key {credentials.masked_id} accepted; event notification mode PULL (reliable callback)"
    )


# --------------------------------------------------------------------------------------------------------
# The spool
# --------------------------------------------------------------------------------------------------------


async def _spool_checks(
    directories: list[Path], max_bytes: int, timeout_s: float, emit: Callable[[CheckResult], None]
) -> None:
    for directory in directories:
        name = f"spool {directory}"
        probe = functools.partial(check_spool_dir, directory, max_bytes)
        emit(await _bounded(name, timeout_s, DaemonCalls().run(probe, name="check-spool")))


def check_spool_dir(directory: Path, max_bytes: int) -> CheckResult:
    """Blocking: ``directory`` can be written and its spool lock is free (taken and released at once), or, when it
    does not exist yet, the bridge can create it. Warns when its volume has less room than ``max_bytes``."""
    name = f"spool {directory}"
    if not directory.exists():
        parent = next((p for p in directory.parents if p.exists()), Path("/"))
        if not parent.is_dir():
            return CheckResult(name, "fail", f"cannot be created: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            return CheckResult(name, "fail", f"cannot be created: {parent} is not writable")
        return _with_room(name, parent, max_bytes, f"does not exist yet; the bridge can create it in {parent}")
    if not directory.is_dir():
        return CheckResult(name, "fail", "not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vod-bridge-check-", dir=directory)
        try:
            os.write(fd, b"check")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return CheckResult(name, "fail", f"not writable: {exc.strerror or exc}")
    try:
        probe_lock(directory)
    except SpoolInUse:
        return CheckResult(name, "fail", "its lock is held by another process (a bridge running on it?)")
    except SpoolError as exc:
        return CheckResult(name, "fail", exc.message)
    return _with_room(name, directory, max_bytes, "writable, lock free")


def _with_room(name: str, directory: Path, max_bytes: int, detail: str) -> CheckResult:
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return CheckResult(name, "ok", detail)
        return CheckResult(name, "fail", f"{detail}, but its free space is unknown: {exc.strerror or exc}")
    mib = 1024 * 1024
    if free < max_bytes:
        return CheckResult(
            name, "warn", f"{detail}; {free // mib} MiB free, less than BRIDGE_SPOOL_MAX_BYTES ({max_bytes // mib} MiB)"
        )
    return CheckResult(name, "ok", f"{detail}, {free // mib} MiB free")
