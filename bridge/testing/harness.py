"""A real bridge for tests, running in a background thread: :class:`VodBridge`.

The bridge is the real ``create_app`` served by aiohttp on 127.0.0.1 (a free port by default), on an event loop
of its own in its own thread. So a test drives it the same way whatever its framework: the synchronous methods
(:meth:`VodBridge.post`, :meth:`VodBridge.records`) block with timeouts and work in plain tests, and their
``a``-prefixed twins are awaitables that leave the caller's loop free. Records are read back with a Kafka
consumer of each topic, from its beginning: every :class:`VodBridge` gets topics of its own by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import logging
import re
import threading
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple, TypeVar

import aiohttp
import msgspec
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from bridge.app import COMPONENTS, create_app, runner_options
from bridge.config import ENV_VARS, KafkaSettings, Settings, validate_settings
from bridge.delivery.kafka import IdempotenceUnsupported, connection_options
from bridge.errors import ConfigError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Extra seconds a blocking call waits for its coroutine beyond the coroutine's own timeout, so that the
#: coroutine's clearer error (not a bare TimeoutError) is what the test sees.
_GRACE_S: Final = 5.0


class BridgeStartError(RuntimeError):
    """The bridge did not become ready (its producer did not connect, or the broker refused it)."""


class BridgeStopError(RuntimeError):
    """The bridge did not shut down within its bound; its thread was abandoned."""


class RecordsTimeout(AssertionError):
    """Fewer records than asked for arrived in time. ``records`` holds those that did (they stay unread)."""

    def __init__(self, topic: str, wanted: int, records: list[KafkaRecord], timeout_s: float) -> None:
        keys = ", ".join(repr(record.key_text) for record in records[:10])
        more = ", ..." if len(records) > 10 else ""
        super().__init__(
            f"expected {wanted} record(s) on topic {topic!r} within {timeout_s:g}s, got {len(records)}"
            + (f" (keys: {keys}{more})" if records else "")
        )
        self.topic = topic
        self.wanted = wanted
        self.records = records


class UnexpectedRecords(AssertionError):
    """Records arrived where none were expected. ``records`` holds them (they stay unread)."""

    def __init__(self, topic: str, records: list[KafkaRecord], within_s: float) -> None:
        keys = ", ".join(repr(record.key_text) for record in records[:10])
        super().__init__(f"expected no record on topic {topic!r} for {within_s:g}s, got {len(records)} (keys: {keys})")
        self.topic = topic
        self.records = records


@dataclass(frozen=True)
class KafkaEndpoint:
    """The Kafka a test bridge publishes to. ``supports_idempotence`` is False for brokers that refuse
    aiokafka's idempotent producer (the embedded tansu broker); the producer then runs with acks=all only."""

    bootstrap_servers: str
    supports_idempotence: bool = True


@dataclass(frozen=True)
class KafkaRecord:
    """One record read back from Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    #: Header name -> value as text (the bridge writes UTF-8 headers, each name once).
    headers: Mapping[str, str]
    timestamp_ms: int

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else self.key.decode(errors="replace")

    def json(self) -> Any:
        """The value decoded as JSON."""
        return msgspec.json.decode(self.value)


class Answer(NamedTuple):
    """The bridge's answer to a callback: ``status, body = bridge.post(event)``."""

    status: int
    #: The JSON answer decoded (the bridge answers JSON, errors included); the text when it is not JSON.
    body: Any


# ------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------

#: Settings sections: an override ``<section>_<field>`` sets ``Settings.<section>.<field>``.
_SECTIONS: Final[dict[str, frozenset[str]]] = {
    name: frozenset(section.__struct_fields__)
    for name, section in ((name, getattr(Settings(), name)) for name in Settings.__struct_fields__)
    if isinstance(section, msgspec.Struct)
}
#: Top-level Settings fields, set by their own name (``otel_enabled``, ``callback_enabled``).
_TOP_LEVEL: Final = frozenset(Settings.__struct_fields__) - frozenset(_SECTIONS)

#: Every override name :func:`bridge_settings` accepts.
SETTING_NAMES: Final = frozenset(
    {f"{section}_{name}" for section, names in _SECTIONS.items() for name in names} | _TOP_LEVEL
)

_ENV_TO_NAME: Final = {var.name: var.path.replace(".", "_") for var in ENV_VARS}
_PATH_IN_ERROR: Final = re.compile(r" - at `\$\.([\w.]+)`")


def bridge_settings(kafka: KafkaEndpoint, **overrides: Any) -> Settings:
    """Settings for a test bridge on ``kafka``, validated as the CLI validates its own.

    Defaults: a topic of its own (``vod.events.test-<hex>``) with dead letters on ``<topic>.dlq``,
    idempotence as ``kafka`` supports it, a 5 s publish timeout, linger 0, 127.0.0.1 on a free port, a 5 s
    shutdown. ``overrides`` name a setting by its path in :class:`~bridge.config.Settings` with ``_`` for the
    dot: ``kafka_linger_ms``, ``http_sign_key``, ``delivery_dedup_window_s``, ``otel_enabled``
    (:data:`SETTING_NAMES`). An unknown name or a value of the wrong type raises :class:`TypeError`; an
    inconsistent value :class:`~bridge.errors.ConfigError`.
    """
    sections: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    top: dict[str, Any] = {}
    for name, value in overrides.items():
        section, field = _locate(name)
        (sections[section] if section else top)[field] = value
    kafka_tree, http, delivery = sections["kafka"], sections["http"], sections["delivery"]
    topic = kafka_tree.setdefault("topic", f"vod.events.test-{uuid.uuid4().hex[:12]}")
    kafka_tree.setdefault("bootstrap_servers", kafka.bootstrap_servers)
    kafka_tree.setdefault("enable_idempotence", kafka.supports_idempotence)
    kafka_tree.setdefault("publish_timeout_s", 5.0)
    kafka_tree.setdefault("linger_ms", 0)
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 0)
    http.setdefault("shutdown_timeout_s", 5.0)
    delivery.setdefault("dead_letter_topic", f"{topic}.dlq")
    try:
        settings = msgspec.convert({**top, **sections}, Settings)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_IN_ERROR.search(message)
        where = match.group(1).replace(".", "_") if match else "settings"
        raise TypeError(f"vod_bridge setting {where}: {_PATH_IN_ERROR.sub('', message)}") from None
    try:
        validate_settings(settings)
    except ConfigError as exc:
        variable, _, detail = exc.message.partition(": ")
        if variable in _ENV_TO_NAME:
            raise ConfigError(f"vod_bridge setting {_ENV_TO_NAME[variable]}: {detail}") from None
        raise
    return settings


def _locate(name: str) -> tuple[str | None, str]:
    if name in _TOP_LEVEL:
        return None, name
    section, _, field = name.partition("_")
    if field in _SECTIONS.get(section, ()):
        return section, field
    close = difflib.get_close_matches(name, SETTING_NAMES, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise TypeError(
        f"unknown vod_bridge setting {name!r}{hint} (names are Settings paths with '_' for '.', "
        f"e.g. kafka_linger_ms, http_sign_key, delivery_dedup_window_s; sections: {', '.join(_SECTIONS)})"
    )


# ------------------------------------------------------------------------------------------------------------
# The running bridge
# ------------------------------------------------------------------------------------------------------------


class VodBridge:
    """A running bridge: ``with VodBridge(bridge_settings(kafka)) as bridge: bridge.post(event)``.

    :meth:`start` returns once the bridge answers and its producer is connected (so a callback gets its 200
    at once), and Kafka consumers of its topic and dead-letter topic are reading from their beginning.
    :meth:`stop` shuts the bridge down as SIGTERM would (in-flight callbacks drain, the producer flushes),
    within ``stop_timeout_s``. The callback path runs with the settings' authentication (sign key, token,
    allow-list) and delivery rules; the PullEvents poller is not supported here.
    """

    def __init__(self, settings: Settings, *, startup_timeout_s: float = 30.0, stop_timeout_s: float = 20.0) -> None:
        self.settings = settings
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._readers: dict[str, _TopicReader] = {}
        self._port: int | None = None
        self._scheme = "http"
        #: What made the app report a fatal failure (a refused producer, ...), if anything did.
        self.fatal_error: BaseException | None = None

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the bridge is not running")
        host = self.settings.http.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"{self._scheme}://{shown}:{self._port}"

    @property
    def callback_url(self) -> str:
        """Where VOD would post: ``http://127.0.0.1:<port>/vod/callback``."""
        return self.base_url + self.settings.http.callback_path

    @property
    def bootstrap_servers(self) -> str:
        return self.settings.kafka.bootstrap_servers

    @property
    def topic(self) -> str:
        """The default topic (event types routed elsewhere by ``kafka_topic_routes`` go to their own)."""
        return self.settings.kafka.topic

    @property
    def dead_letter_topic(self) -> str:
        return self.settings.delivery.dead_letter_topic

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> VodBridge:
        """Start the bridge; raise :class:`BridgeStartError` when it is not ready within ``startup_timeout_s``."""
        if self._thread is not None:
            raise RuntimeError("the bridge is already started")
        self.fatal_error = None
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=_run_loop, args=(loop,), name=f"vod-bridge {self.topic}", daemon=True)
        self._thread.start()
        try:
            self._call(self._astart(), self.startup_timeout_s + _GRACE_S)
        except BaseException:
            with contextlib.suppress(BridgeStopError):
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut the bridge down (bounded by ``stop_timeout_s``) and end its thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            future = asyncio.run_coroutine_threadsafe(self._astop(), loop)
            try:
                future.result(timeout=self.stop_timeout_s)
            except TimeoutError:
                future.cancel()
                raise BridgeStopError(f"the bridge did not stop within {self.stop_timeout_s:g}s") from None
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=self.stop_timeout_s)
            self._port = None
        if thread.is_alive():
            raise BridgeStopError(f"the bridge's thread did not end within {self.stop_timeout_s:g}s")

    def __enter__(self) -> VodBridge:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- callbacks ---------------------------------------------------------------------------------------

    def post(
        self,
        event: Mapping[str, Any] | bytes | str,
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> Answer:
        """POST ``event`` (a dict is sent as JSON; bytes and text as they are) to the callback path, or to
        ``path`` (e.g. ``/vod/callback/<token>``); return the status and the decoded answer."""
        return self._call(self._apost(event, path, headers, timeout_s), timeout_s + _GRACE_S)

    async def apost(
        self,
        event: Mapping[str, Any] | bytes | str,
        *,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> Answer:
        """:meth:`post` for async tests: the request runs on the bridge's loop; the caller's stays free."""
        return await self._acall(self._apost(event, path, headers, timeout_s))

    # -- records -----------------------------------------------------------------------------------------

    def records(self, n: int, timeout_s: float = 10.0, *, topic: str | None = None) -> list[KafkaRecord]:
        """The next ``n`` records of ``topic`` (default: :attr:`topic`), each returned once: a second call
        continues where the first stopped. Order is Kafka's: per partition, so per key. Raises
        :class:`RecordsTimeout` when fewer arrive within ``timeout_s``."""
        return self._call(self._arecords(n, timeout_s, topic), timeout_s + _GRACE_S)

    async def arecords(self, n: int, timeout_s: float = 10.0, *, topic: str | None = None) -> list[KafkaRecord]:
        """:meth:`records` for async tests."""
        return await self._acall(self._arecords(n, timeout_s, topic))

    def dead_letters(self, n: int, timeout_s: float = 10.0) -> list[KafkaRecord]:
        """:meth:`records` of :attr:`dead_letter_topic`."""
        return self.records(n, timeout_s, topic=self.dead_letter_topic)

    async def adead_letters(self, n: int, timeout_s: float = 10.0) -> list[KafkaRecord]:
        return await self.arecords(n, timeout_s, topic=self.dead_letter_topic)

    def assert_no_records(self, within_s: float = 0.5, *, topic: str | None = None) -> None:
        """Raise :class:`UnexpectedRecords` if a record not yet read arrives on ``topic`` within ``within_s``."""
        self._call(self._aassert_no_records(within_s, topic), within_s + _GRACE_S)

    # -- internals ---------------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float) -> _T:
        loop = self._running_loop(coro)
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking VodBridge calls cannot run on the bridge's own loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    async def _acall(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._running_loop(coro)))

    def _running_loop(self, coro: Coroutine[Any, Any, Any]) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the bridge is not running")
        return self._loop

    def _on_fatal(self, exc: BaseException) -> None:
        logger.error("test bridge: fatal: %s", exc)
        self.fatal_error = exc

    async def _astart(self) -> None:
        settings = self.settings
        app = create_app(settings, on_fatal=self._on_fatal)
        runner = self._runner = web.AppRunner(app, **runner_options(settings))
        await runner.setup()
        tls = app[COMPONENTS].tls
        self._scheme = "https" if tls is not None else "http"
        site = web.TCPSite(
            runner,
            settings.http.host,
            settings.http.port,
            reuse_port=settings.http.reuse_port,
            ssl_context=tls.context if tls is not None else None,
        )
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._session = aiohttp.ClientSession()
        for topic in (self.topic, self.dead_letter_topic):
            self._readers[topic] = _TopicReader(topic, settings.kafka)
        # The consumers connect while the producer does; a reader that failed to start is reported after the
        # producer, whose failure says more (a refused idempotent producer, say).
        starting = asyncio.gather(*(reader.start() for reader in self._readers.values()), return_exceptions=True)
        await self._wait_ready(app)
        for result in await starting:
            if isinstance(result, BaseException):
                raise BridgeStartError(f"cannot read the bridge's topics from Kafka: {result!r}") from result

    async def _wait_ready(self, app: web.Application) -> None:
        sink = app[COMPONENTS].sink
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_s
        while not sink.ready:
            if self.fatal_error is not None:
                hint = (
                    " (use a KafkaEndpoint with supports_idempotence=False; with the pytest plugin, set "
                    "VOD_BRIDGE_TEST_IDEMPOTENCE=false)"
                    if isinstance(self.fatal_error, IdempotenceUnsupported)
                    else ""
                )
                raise BridgeStartError(f"the bridge failed to start: {self.fatal_error}{hint}") from self.fatal_error
            if loop.time() >= deadline:
                raise BridgeStartError(
                    f"the bridge's producer did not connect to {self.bootstrap_servers} "
                    f"within {self.startup_timeout_s:g}s"
                )
            await asyncio.sleep(0.02)

    async def _astop(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        try:
            await asyncio.gather(*(reader.close() for reader in readers))
        finally:
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                # The graceful shutdown of `vod-bridge serve`: drain handlers, then the producer flushes.
                await self._runner.cleanup()

    async def _apost(
        self,
        event: Mapping[str, Any] | bytes | str,
        path: str | None,
        headers: Mapping[str, str] | None,
        timeout_s: float,
    ) -> Answer:
        assert self._session is not None
        body = event if isinstance(event, bytes) else event.encode() if isinstance(event, str) else None
        if body is None:
            assert not isinstance(event, bytes | str)
            body = msgspec.json.encode(event)
        url = self.base_url + path if path is not None else self.callback_url
        sent_headers = {"Content-Type": "application/json", **(headers or {})}
        async with self._session.post(
            url,
            data=body,
            headers=sent_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            # With http_tls_* settings: the bridge's own certificate, on loopback, is not checked by its own test
            # client (which also has no client certificate for http_tls_client_ca_file).
            ssl=self._scheme != "https",
        ) as response:
            raw = await response.read()
        try:
            answer: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            answer = raw.decode(errors="replace")
        return Answer(response.status, answer)

    def _reader(self, topic: str | None) -> _TopicReader:
        name = topic or self.topic
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = _TopicReader(name, self.settings.kafka)
        return reader

    async def _arecords(self, n: int, timeout_s: float, topic: str | None) -> list[KafkaRecord]:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        return await self._reader(topic).take(n, timeout_s)

    async def _aassert_no_records(self, within_s: float, topic: str | None) -> None:
        reader = self._reader(topic)
        arrived = await reader.wait_any(within_s)
        if arrived:
            raise UnexpectedRecords(reader.topic, arrived, within_s)


class _TopicReader:
    """A consumer of one topic from its beginning, without a group; what it fetched beyond what was asked for
    waits in a buffer for the next call."""

    def __init__(self, topic: str, kafka: KafkaSettings) -> None:
        self.topic = topic
        self._consumer = AIOKafkaConsumer(
            topic,
            **connection_options(kafka),
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Brokers that create a topic only when it is first written to: look for it again soon.
            metadata_max_age_ms=1000,
            # Answer a test as soon as its record is there, not after the broker's default 500 ms wait.
            fetch_max_wait_ms=100,
        )
        self._buffer: deque[KafkaRecord] = deque()
        self._started: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.create_task(self._consumer.start())
        await asyncio.shield(self._started)

    async def close(self) -> None:
        if self._started is not None:
            with contextlib.suppress(Exception):
                await self._started
        await self._consumer.stop()

    async def take(self, n: int, timeout_s: float) -> list[KafkaRecord]:
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self._buffer) < n:
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise RecordsTimeout(self.topic, n, list(self._buffer), timeout_s)
            await self._fetch(min(remaining_s, 0.2))
        return [self._buffer.popleft() for _ in range(n)]

    async def wait_any(self, within_s: float) -> list[KafkaRecord]:
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not self._buffer and (remaining_s := deadline - loop.time()) > 0:
            await self._fetch(min(remaining_s, 0.2))
        return list(self._buffer)

    async def _fetch(self, timeout_s: float) -> None:
        batches = await self._consumer.getmany(timeout_ms=max(1, int(timeout_s * 1000)))
        for batch in batches.values():
            self._buffer.extend(_record(message) for message in batch)


def read_records(bootstrap_servers: str, topic: str, n: int, *, timeout_s: float = 10.0) -> list[KafkaRecord]:
    """The first ``n`` records of ``topic``, from its beginning: for a bridge this process does not run (in a
    container, say). Blocks, also when called from a running event loop; raises :class:`RecordsTimeout`."""

    async def read() -> list[KafkaRecord]:
        reader = _TopicReader(topic, KafkaSettings(bootstrap_servers=bootstrap_servers))
        try:
            return await reader.take(n, timeout_s)
        finally:
            await reader.close()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vod-bridge-read") as pool:
        return pool.submit(asyncio.run, read()).result()


def _record(message: Any) -> KafkaRecord:
    return KafkaRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers={name: value.decode(errors="replace") for name, value in message.headers},
        timestamp_ms=message.timestamp,
    )


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The bridge thread: run ``loop`` until stopped, then finish it as ``asyncio.run`` does."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
