"""Settings: one frozen, typed tree built once at start-up from environment variables (CLI flags override).

Every setting has exactly one environment variable, listed in ``ENV_VARS``; the README's configuration
table is that list. Validation happens here, before any socket is opened, and fails with a
:class:`ConfigError` that names the variable, never its (possibly secret) value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import msgspec

from bridge.errors import ConfigError
from bridge.secretfile import read_setting

CompressionType = Literal["none", "gzip"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogFormat = Literal["auto", "text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
KafkaClient = Literal["aiokafka", "librdkafka"]
InvalidPolicy = Literal["dead-letter", "reject"]

_MASK: Final = "'***'"

#: A VOD SubAppId as configured and as accepted in a callback path: a positive decimal integer without leading
#: zeros, at most 18 digits (below 2**63). Real ones are ten digits (``1500012345``).
SUB_APP_ID_PATTERN: Final = "[1-9][0-9]{0,17}"
_SUB_APP_ID_RE: Final = re.compile(SUB_APP_ID_PATTERN)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True):
    bootstrap_servers: str = "localhost:9092"
    #: Default topic for every event type without a route.
    topic: str = "vod.events"
    #: EventType -> topic overrides, e.g. ``{"NewFileUpload": "vod.uploads"}``.
    topic_routes: dict[str, str] = {}
    #: Idempotent producer (acks=all either way). Off is needed for brokers lacking InitProducerId v0+
    #: support for aiokafka, notably the embedded tansu broker; see README "Idempotence".
    enable_idempotence: bool = True
    #: How long a publish may wait for the broker ack before the caller gets a 503 / no confirm.
    publish_timeout_s: float = 10.0
    #: Producer batching: wait up to linger_ms to fill batches of up to max_batch_bytes. 0 still batches
    #: whatever accumulates while a produce request is in flight, without adding latency (docs/performance.md).
    linger_ms: int = 0
    max_batch_bytes: int = 65536
    compression: CompressionType = "none"
    client_id: str = "vod-kafka-bridge"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    #: Bound on publishes waiting for an ack at once; beyond it callbacks get 503 + Retry-After.
    max_in_flight: int = 1000
    #: A producer that stopped making progress is replaced; after this many failed connection attempts of its
    #: replacement the process exits non-zero so that its orchestrator restarts it.
    replace_max_attempts: int = 10
    #: A producer whose records wait this long for their ack while the cluster answers all along is stalled,
    #: and replaced (bridge.delivery.progress); an outage, when the cluster does not answer, is no stall.
    stall_timeout_s: float = 15.0
    #: The producer library behind the sink: aiokafka (pure Python) or librdkafka (confluent-kafka, the
    #: ``librdkafka`` extra). Same records, partitions and acks either way (README "Kafka client").
    client: KafkaClient = "aiokafka"

    def __repr__(self) -> str:
        return _masked_repr(self, ("sasl_password",))

    def topic_for(self, event_type: str) -> str:
        return self.topic_routes.get(event_type, self.topic)


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "0.0.0.0"
    port: int = 8080
    callback_path: str = "/vod/callback"
    max_body_bytes: int = 1024 * 1024
    #: A client has this long to send its body once its headers arrived (slow-loris bound); 408 after.
    body_timeout_s: float = 10.0
    #: Idle keep-alive connections, and clients still sending their headers, are closed after this.
    idle_timeout_s: float = 30.0
    #: A request line and headers must be complete this long after accept, or after the request's first byte on
    #: a keep-alive connection; the connection is closed otherwise (bridge.sources.connections).
    header_timeout_s: float = 10.0
    #: Open connections at most; at the bound the oldest unfinished head (or an idle keep-alive) makes room.
    #: 0: the soft RLIMIT_NOFILE minus a reserve of max(64, 10 %) for Kafka, the spool and logs.
    max_connections: int = 0
    #: Bind with SO_REUSEPORT so several processes share the port (set for each of ``--workers``).
    reuse_port: bool = False
    #: Graceful shutdown: how long in-flight callbacks may take to finish after SIGTERM.
    shutdown_timeout_s: float = 30.0
    #: VOD's SignKey: when set, every callback must carry a valid Sign/T (401 otherwise).
    sign_key: str | None = None
    #: How far past its expiry T a signed callback is still accepted (clock differences).
    sign_skew_s: float = 60.0
    #: How far ahead of now a signed callback's T may lie (plus sign_skew_s); VOD's default expiry is 600 s.
    sign_max_ttl_s: float = 600.0
    #: When set, callbacks must carry it as ``?token=...`` or as a last path segment.
    token: str | None = None
    #: Source addresses allowed to post callbacks (CIDRs); empty allows all.
    allowed_cidrs: list[str] = []
    #: Proxies whose X-Forwarded-For is believed when finding the client address.
    trusted_proxies: list[str] = []
    #: PEM certificate chain and private key: when set (both), the server speaks HTTPS only (bridge.sources.tls).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: PEM CA bundle: when set, every client must present a certificate it signed (mutual TLS).
    tls_client_ca_file: str | None = None
    #: How often the certificate and key files are checked for a rotation; 0 leaves reloading to SIGHUP.
    tls_reload_interval_s: float = 10.0

    def __repr__(self) -> str:
        return _masked_repr(self, ("sign_key", "token"))

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


def _masked_repr(settings: msgspec.Struct, secret_fields: tuple[str, ...]) -> str:
    shown = {f: getattr(settings, f) for f in settings.__struct_fields__}
    for name in secret_fields:
        if shown[name] is not None:
            shown[name] = "***"
    return f"{type(settings).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


class PollerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The reliable-callback source: PullEvents -> Kafka -> ConfirmEvents."""

    enabled: bool = False
    endpoint: str = "https://vod.tencentcloudapi.com"
    region: str | None = None
    #: One VOD application (``SubAppId``); unset: the account's default application.
    sub_app_id: int | None = None
    #: Several VOD applications, one poller loop each; exclusive with ``sub_app_id``.
    sub_app_ids: list[int] = []
    #: PullEvents long-polls up to ~5 s server-side; Tencent recommends a 10 s client timeout.
    request_timeout_s: float = 10.0
    #: Pause after an empty PullEvents answer that did not long-poll, to stay well inside API rate limits.
    idle_interval_s: float = 1.0
    #: Jittered exponential back-off on API errors and Kafka outages.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Confirms later than this after the pull are logged as warnings (VOD re-delivers after 30 s).
    confirm_warn_after_s: float = 20.0
    #: Pipelining: pulled batches being published/confirmed while the next PullEvents runs.
    max_batches_in_flight: int = 2

    def loop_sub_app_ids(self) -> tuple[int | None, ...]:
        """The SubAppId of each poller loop, in configured order; ``(None,)`` is one loop on the default app."""
        return tuple(self.sub_app_ids) or (self.sub_app_id,)


class DeliverySettings(msgspec.Struct, frozen=True, kw_only=True):
    """The delivery path both sources share: dead letters and de-duplication."""

    #: Bodies without a usable key (and spooled records Kafka refuses for good), with the reason in headers.
    dead_letter_topic: str = "vod.events.dlq"
    #: A callback body that is a JSON object without a usable key: ``dead-letter`` (200 after the ack) or
    #: ``reject`` (400, as before the tolerant reader; VOD may never send it again).
    callback_invalid: InvalidPolicy = "dead-letter"
    #: Suppress exact repeats (same type, key and value) within this window; 0 turns it off.
    dedup_window_s: float = 0.0
    dedup_max_entries: int = 100_000


class SpoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Optional durable spool for callbacks Kafka cannot take in time."""

    #: Directory of the fsync'ed spool; unset means no spool (callbacks get 503 while Kafka is down).
    dir: str | None = None
    #: Bound on the undelivered bytes in the spool; segments are 1/16 of it (64 KiB..64 MiB).
    max_bytes: int = 1024 * 1024 * 1024
    #: Free space an append must leave on the spool's filesystem; None: 5% of the filesystem, at most 64 MiB.
    min_free_bytes: int | None = None
    #: How long a callback waits for the Kafka ack before it is spooled instead.
    publish_budget_s: float = 2.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
    delivery: DeliverySettings = DeliverySettings()
    poller: PollerSettings = PollerSettings()
    spool: SpoolSettings = SpoolSettings()
    #: The normal-callback receiver; off runs the poller alone (health and metrics are always served).
    callback_enabled: bool = True
    #: Worker processes sharing the HTTP port (SO_REUSEPORT); each has its own producer.
    workers: int = 1
    #: ``auto`` uses uvloop when installed (the ``fast`` extra).
    event_loop: EventLoop = "auto"
    #: One OpenTelemetry span per event and ``traceparent`` in Kafka headers (the ``otel`` extra).
    otel_enabled: bool = False
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "auto"


class EnvVar(msgspec.Struct, frozen=True):
    name: str
    #: Dotted path into Settings, e.g. ``kafka.topic``.
    path: str
    help: str
    secret: bool = False
    #: Also a CLI flag of ``serve``/``dev``/``send``/``tail``: ``--`` + the last part of ``path``.
    flag: bool = False

    @property
    def flag_name(self) -> str:
        return "--" + self.path.rpartition(".")[2].replace("_", "-")


#: Every setting, grouped by the part of the bridge that owns it. The README's configuration table and the CLI
#: flags are generated from this list (``render_settings_table``, ``bridge.cli``).
ENV_VARS: Final = (
    # Kafka: the producer (bridge.delivery.kafka).
    EnvVar("BRIDGE_KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers", "`host:port[,host:port...]`", flag=True),
    EnvVar("BRIDGE_KAFKA_TOPIC", "kafka.topic", "default topic", flag=True),
    EnvVar(
        "BRIDGE_KAFKA_TOPIC_ROUTES",
        "kafka.topic_routes",
        "per-type topics: `NewFileUpload=vod.uploads,FileDeleted=vod.deletes`",
    ),
    EnvVar(
        "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE",
        "kafka.enable_idempotence",
        'idempotent producer; see "Idempotence"',
        flag=True,
    ),
    EnvVar(
        "BRIDGE_KAFKA_PUBLISH_TIMEOUT_S",
        "kafka.publish_timeout_s",
        "longest wait for the broker ack before answering 503",
    ),
    EnvVar(
        "BRIDGE_KAFKA_LINGER_MS",
        "kafka.linger_ms",
        "producer linger; 0 still batches what accumulates while a request is in flight",
    ),
    EnvVar("BRIDGE_KAFKA_MAX_BATCH_BYTES", "kafka.max_batch_bytes", "producer batch size"),
    EnvVar("BRIDGE_KAFKA_COMPRESSION", "kafka.compression", "`none` or `gzip`"),
    EnvVar("BRIDGE_KAFKA_CLIENT_ID", "kafka.client_id", "Kafka client id"),
    EnvVar(
        "BRIDGE_KAFKA_SECURITY_PROTOCOL",
        "kafka.security_protocol",
        "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT`, `SASL_SSL`",
    ),
    EnvVar("BRIDGE_KAFKA_SASL_MECHANISM", "kafka.sasl_mechanism", "`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`"),
    EnvVar("BRIDGE_KAFKA_SASL_USERNAME", "kafka.sasl_username", "SASL user"),
    EnvVar("BRIDGE_KAFKA_SASL_PASSWORD", "kafka.sasl_password", "SASL password (a mounted Secret)", secret=True),
    EnvVar("BRIDGE_KAFKA_SSL_CAFILE", "kafka.ssl_cafile", "CA bundle for `SSL`/`SASL_SSL` (default: system CAs)"),
    EnvVar(
        "BRIDGE_KAFKA_MAX_IN_FLIGHT",
        "kafka.max_in_flight",
        "publishes awaiting an ack at once; beyond it 503 + `Retry-After: 1`",
    ),
    EnvVar(
        "BRIDGE_KAFKA_REPLACE_MAX_ATTEMPTS",
        "kafka.replace_max_attempts",
        'failed attempts to connect a replacement producer (see "Kafka client") before the process exits (code 3)',
    ),
    EnvVar(
        "BRIDGE_KAFKA_STALL_TIMEOUT_S",
        "kafka.stall_timeout_s",
        'a producer whose records wait this long while the cluster answers is replaced; see "Kafka client"',
    ),
    EnvVar(
        "BRIDGE_KAFKA_CLIENT",
        "kafka.client",
        '`aiokafka` or `librdkafka` (the `librdkafka` extra); see "Kafka client"',
    ),
    # HTTP: the callback source (bridge.sources.callback) and the server.
    EnvVar("BRIDGE_HTTP_HOST", "http.host", "listen address", flag=True),
    EnvVar("BRIDGE_HTTP_PORT", "http.port", "listen port", flag=True),
    EnvVar("BRIDGE_CALLBACK_PATH", "http.callback_path", "the path VOD posts to", flag=True),
    EnvVar("BRIDGE_HTTP_MAX_BODY_BYTES", "http.max_body_bytes", "larger bodies get 413"),
    EnvVar("BRIDGE_SHUTDOWN_TIMEOUT_S", "http.shutdown_timeout_s", "drain time for in-flight callbacks after SIGTERM"),
    EnvVar(
        "BRIDGE_HTTP_BODY_TIMEOUT_S",
        "http.body_timeout_s",
        "time a client has to send its body once its headers arrived; then 408 and close",
    ),
    EnvVar(
        "BRIDGE_HTTP_IDLE_TIMEOUT_S",
        "http.idle_timeout_s",
        "idle keep-alive connections, and clients still sending headers, are closed after this",
    ),
    EnvVar(
        "BRIDGE_HTTP_HEADER_TIMEOUT_S",
        "http.header_timeout_s",
        "time a request line and headers may take, from accept or from a request's first byte; then close",
    ),
    EnvVar(
        "BRIDGE_HTTP_MAX_CONNECTIONS",
        "http.max_connections",
        "`0`: the file limit (`RLIMIT_NOFILE`) minus max(64, 10 %) and two listen backlogs (4096 gives 3431); see "
        '"Slow clients and connection limits"',
    ),
    EnvVar(
        "BRIDGE_HTTP_REUSE_PORT",
        "http.reuse_port",
        "bind with `SO_REUSEPORT` (set for each worker by `--workers`)",
    ),
    EnvVar(
        "BRIDGE_CALLBACK_SIGN_KEY",
        "http.sign_key",
        "VOD's `SignKey`: every callback must then carry a valid `Sign`/`T`",
        secret=True,
    ),
    EnvVar("BRIDGE_CALLBACK_SIGN_SKEW_S", "http.sign_skew_s", "how long after its expiry `T` a callback is accepted"),
    EnvVar(
        "BRIDGE_CALLBACK_SIGN_MAX_TTL_S",
        "http.sign_max_ttl_s",
        "how far in the future `T` may lie (plus the skew); VOD's default expiry is 600 s",
    ),
    EnvVar(
        "BRIDGE_CALLBACK_TOKEN",
        "http.token",
        "secret required as `?token=...` or `/vod/callback/<token>` (at least 16 characters, not only digits)",
        secret=True,
    ),
    EnvVar(
        "BRIDGE_CALLBACK_ALLOWED_CIDRS",
        "http.allowed_cidrs",
        "source addresses allowed to post, e.g. `203.0.113.0/24,2001:db8::/32` (default: all)",
    ),
    EnvVar("BRIDGE_TRUSTED_PROXIES", "http.trusted_proxies", "proxies (CIDRs) whose `X-Forwarded-For` is believed"),
    EnvVar(
        "BRIDGE_HTTP_TLS_CERT_FILE",
        "http.tls_cert_file",
        'PEM certificate chain (leaf first): serve HTTPS instead of HTTP; see "HTTPS"',
    ),
    EnvVar("BRIDGE_HTTP_TLS_KEY_FILE", "http.tls_key_file", "PEM private key of that certificate (unencrypted)"),
    EnvVar(
        "BRIDGE_HTTP_TLS_CLIENT_CA_FILE",
        "http.tls_client_ca_file",
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    ),
    EnvVar(
        "BRIDGE_HTTP_TLS_RELOAD_INTERVAL_S",
        "http.tls_reload_interval_s",
        "how often the certificate and key files are checked for a rotation (SIGHUP reloads too); 0: SIGHUP only",
    ),
    # Delivery: the path both sources share (bridge.delivery).
    EnvVar(
        "BRIDGE_KAFKA_DEAD_LETTER_TOPIC",
        "delivery.dead_letter_topic",
        "bodies without a usable key, and spooled records Kafka refuses for good, with `error-reason` headers",
    ),
    EnvVar(
        "BRIDGE_CALLBACK_INVALID",
        "delivery.callback_invalid",
        "a callback that is a JSON object without a usable key: `dead-letter` (200 after the ack) or `reject` (400)",
    ),
    EnvVar(
        "BRIDGE_DEDUP_WINDOW_S",
        "delivery.dedup_window_s",
        "suppress exact repeats (same type, key and value) within this window; 0 is off",
    ),
    EnvVar("BRIDGE_DEDUP_MAX_ENTRIES", "delivery.dedup_max_entries", "bound on remembered events (oldest first)"),
    EnvVar("BRIDGE_SPOOL_DIR", "spool.dir", "directory of the durable callback spool (unset: no spool)"),
    EnvVar(
        "BRIDGE_SPOOL_MAX_BYTES",
        "spool.max_bytes",
        "bound on undelivered spooled bytes; when reached (and Kafka unavailable) callbacks get 503 `spool_full`",
    ),
    EnvVar(
        "BRIDGE_SPOOL_MIN_FREE_BYTES",
        "spool.min_free_bytes",
        "free space a spool append must leave on its filesystem, else 503 `spool_full` (default: 5% of the"
        " filesystem, at most 64 MiB; 0: none)",
    ),
    EnvVar(
        "BRIDGE_SPOOL_PUBLISH_BUDGET_S",
        "spool.publish_budget_s",
        "how long a callback waits for Kafka before it is spooled instead",
    ),
    # Poller: the reliable-callback source (bridge.sources.poller) and the VOD API client.
    EnvVar(
        "BRIDGE_CALLBACK_ENABLED", "callback_enabled", "serve `POST <callback path>`; `false` runs the poller alone"
    ),
    EnvVar("BRIDGE_PULL_ENABLED", "poller.enabled", "run the PullEvents poller (reliable callback)"),
    EnvVar(
        "BRIDGE_VOD_ENDPOINT", "poller.endpoint", "VOD API endpoint (tests and private deployments point elsewhere)"
    ),
    EnvVar("BRIDGE_VOD_REGION", "poller.region", "sent as `X-TC-Region`"),
    EnvVar(
        "BRIDGE_VOD_SUB_APP_ID",
        "poller.sub_app_id",
        "VOD application (`SubAppId`); required for accounts opened since 2023-12-25 outside the default app",
    ),
    EnvVar(
        "BRIDGE_VOD_SUB_APP_IDS",
        "poller.sub_app_ids",
        "several VOD applications, e.g. `1500001,1500002`: one poller loop each; not with `BRIDGE_VOD_SUB_APP_ID`",
    ),
    EnvVar("BRIDGE_VOD_REQUEST_TIMEOUT_S", "poller.request_timeout_s", "per API call; PullEvents long-polls ~5 s"),
    EnvVar(
        "BRIDGE_PULL_IDLE_INTERVAL_S",
        "poller.idle_interval_s",
        "pause after an empty PullEvents answer that came back at once",
    ),
    EnvVar(
        "BRIDGE_PULL_BACKOFF_INITIAL_S",
        "poller.backoff_initial_s",
        "first back-off after an API error or a Kafka outage (doubles, ±20 % jitter)",
    ),
    EnvVar("BRIDGE_PULL_BACKOFF_MAX_S", "poller.backoff_max_s", "back-off ceiling"),
    EnvVar(
        "BRIDGE_PULL_CONFIRM_WARN_AFTER_S",
        "poller.confirm_warn_after_s",
        "log a warning when a confirm comes this long after its pull",
    ),
    EnvVar(
        "BRIDGE_PULL_MAX_BATCHES_IN_FLIGHT",
        "poller.max_batches_in_flight",
        "pipelining: batches being published and confirmed while the next PullEvents runs",
    ),
    # The process.
    EnvVar(
        "BRIDGE_WORKERS",
        "workers",
        "processes sharing the port (`SO_REUSEPORT`), each with its own producer",
        flag=True,
    ),
    EnvVar("BRIDGE_EVENT_LOOP", "event_loop", "`auto` (uvloop when installed, the `fast` extra), `asyncio`, `uvloop`"),
    EnvVar(
        "BRIDGE_OTEL_ENABLED",
        "otel_enabled",
        "OpenTelemetry span per event and `traceparent` in Kafka headers (the `otel` extra)",
    ),
    EnvVar("BRIDGE_LOG_LEVEL", "log_level", "`DEBUG`, `INFO`, `WARNING`, `ERROR`", flag=True),
    EnvVar(
        "BRIDGE_LOG_FORMAT",
        "log_format",
        "`auto` (text on a terminal, JSON lines otherwise), `text`, `json`",
        flag=True,
    ),
)
_BY_PATH: Final = {var.path: var for var in ENV_VARS}
_LIST_PATHS: Final = frozenset({"http.allowed_cidrs", "http.trusted_proxies"})
_ROUTE_RE: Final = re.compile(r"^[A-Za-z0-9]+=[A-Za-z0-9._-]{1,249}$")
_TOPIC_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_DIGITS_RE: Final = re.compile("[0-9]+")


def load_settings(environ: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """Build and validate Settings from environment variables; ``overrides`` (env-var name -> value, from
    CLI flags) win over ``environ``. Raises :class:`ConfigError` naming the offending variable."""
    merged = dict(environ)
    merged.update(overrides or {})
    tree: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = read_setting(merged, var.name, from_file=var.secret)
        if raw is None:
            continue
        value: object = raw
        if var.path == "kafka.topic_routes":
            value = _parse_routes(raw)
        elif var.path == "poller.sub_app_id":
            value = _parse_sub_app_id(var.name, raw)
        elif var.path == "poller.sub_app_ids":
            value = _parse_sub_app_ids(raw)
        elif var.path in _LIST_PATHS:
            value = [item.strip() for item in raw.split(",") if item.strip()]
        section, _, field = var.path.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[field] = value
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    validate_settings(settings)
    return settings


def secret_values(settings: Settings) -> list[str]:
    """The set values of every setting ``ENV_VARS`` marks secret: what no output may show."""
    values: list[str] = []
    for var in ENV_VARS:
        if var.secret:
            value: object = settings
            for part in var.path.split("."):
                value = getattr(value, part)
            if isinstance(value, str) and value:
                values.append(value)
    return values


def render_settings_table() -> str:
    """The README's configuration table: every variable, its default and its meaning, from ``ENV_VARS``."""
    defaults = msgspec.to_builtins(Settings())
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var in ENV_VARS:
        section, _, field = var.path.rpartition(".")
        default = (defaults.get(section, {}) if section else defaults).get(field)
        if default in (None, [], {}):
            shown = "(none)"
        else:
            text = (
                str(default).lower()
                if isinstance(default, bool)
                else f"{default:g}"
                if isinstance(default, float)
                else str(default)
            )
            shown = f"`{text}`"
        meaning = var.help + (f" (or `{var.name}_FILE`)" if var.secret else "")
        rows.append(f"| `{var.name}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def _parse_routes(raw: str) -> dict[str, str]:
    routes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        if not _ROUTE_RE.match(item):
            raise ConfigError(f"BRIDGE_KAFKA_TOPIC_ROUTES: {item!r} is not EventType=topic")
        event_type, topic = item.split("=", 1)
        routes[event_type] = topic
    return routes


def _parse_sub_app_id(name: str, raw: str) -> int:
    # Stricter than int(): no sign, no leading zero, no non-ASCII digits, so the value reads the same everywhere.
    if not _SUB_APP_ID_RE.fullmatch(raw):
        raise ConfigError(f"{name}: {raw[:40]!r} is not a SubAppId (a positive decimal integer)")
    return int(raw)


def _parse_sub_app_ids(raw: str) -> list[int]:
    sub_app_ids: list[int] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        sub_app_id = _parse_sub_app_id("BRIDGE_VOD_SUB_APP_IDS", item)
        if sub_app_id in sub_app_ids:
            raise ConfigError(f"BRIDGE_VOD_SUB_APP_IDS: {sub_app_id} is listed twice")
        sub_app_ids.append(sub_app_id)
    return sub_app_ids


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec reports e.g. "Expected `int`, got `str` - at `$.kafka.linger_ms`": name the env var instead.
    message = str(exc)
    match = re.search(r"at `\$\.([\w.]+)`", message)
    if match and (var := _BY_PATH.get(match.group(1))):
        detail = message.split(" - at ", maxsplit=1)[0]
        if var.secret:
            detail = "invalid value"
        return f"{var.name}: {detail}"
    return f"invalid configuration: {message}"


def validate_settings(settings: Settings) -> None:
    """Raise :class:`ConfigError` naming the environment variable of the first inconsistent setting (for
    Settings built in code, as ``load_settings`` checks its own)."""
    kafka, http = settings.kafka, settings.http
    checks: list[tuple[bool, str]] = [
        (bool(kafka.bootstrap_servers.strip()), "BRIDGE_KAFKA_BOOTSTRAP_SERVERS: must not be empty"),
        (
            all(_is_host_port(s) for s in kafka.bootstrap_servers.split(",")),
            "BRIDGE_KAFKA_BOOTSTRAP_SERVERS: expected host:port[,host:port...]",
        ),
        (bool(_TOPIC_RE.match(kafka.topic)), "BRIDGE_KAFKA_TOPIC: not a valid Kafka topic name"),
        (kafka.publish_timeout_s > 0, "BRIDGE_KAFKA_PUBLISH_TIMEOUT_S: must be > 0"),
        (kafka.linger_ms >= 0, "BRIDGE_KAFKA_LINGER_MS: must be >= 0"),
        (kafka.max_batch_bytes >= 1024, "BRIDGE_KAFKA_MAX_BATCH_BYTES: must be >= 1024"),
        (kafka.max_in_flight >= 1, "BRIDGE_KAFKA_MAX_IN_FLIGHT: must be >= 1"),
        (kafka.replace_max_attempts >= 1, "BRIDGE_KAFKA_REPLACE_MAX_ATTEMPTS: must be >= 1"),
        (kafka.stall_timeout_s >= 1, "BRIDGE_KAFKA_STALL_TIMEOUT_S: must be >= 1"),
        (
            kafka.sasl_mechanism is None or kafka.security_protocol.startswith("SASL"),
            "BRIDGE_KAFKA_SASL_MECHANISM: needs BRIDGE_KAFKA_SECURITY_PROTOCOL SASL_PLAINTEXT or SASL_SSL",
        ),
        (
            not kafka.security_protocol.startswith("SASL")
            or (kafka.sasl_mechanism is not None and bool(kafka.sasl_username) and kafka.sasl_password is not None),
            "BRIDGE_KAFKA_SECURITY_PROTOCOL: SASL needs BRIDGE_KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD",
        ),
        (0 <= http.port <= 65535, "BRIDGE_HTTP_PORT: must be 0..65535"),
        (
            http.callback_path.startswith("/") and http.callback_path not in ("/healthz", "/readyz", "/metrics"),
            "BRIDGE_CALLBACK_PATH: must start with / and not clash with /healthz, /readyz, /metrics",
        ),
        (http.max_body_bytes >= 1024, "BRIDGE_HTTP_MAX_BODY_BYTES: must be >= 1024"),
        (http.body_timeout_s > 0, "BRIDGE_HTTP_BODY_TIMEOUT_S: must be > 0"),
        (http.idle_timeout_s > 0, "BRIDGE_HTTP_IDLE_TIMEOUT_S: must be > 0"),
        (http.header_timeout_s > 0, "BRIDGE_HTTP_HEADER_TIMEOUT_S: must be > 0"),
        (http.max_connections >= 0, "BRIDGE_HTTP_MAX_CONNECTIONS: must be >= 0 (0: derived from RLIMIT_NOFILE)"),
        (http.shutdown_timeout_s >= 0, "BRIDGE_SHUTDOWN_TIMEOUT_S: must be >= 0"),
        (
            (http.tls_cert_file is None) == (http.tls_key_file is None),
            "BRIDGE_HTTP_TLS_CERT_FILE and BRIDGE_HTTP_TLS_KEY_FILE: set both or neither",
        ),
        (
            http.tls_client_ca_file is None or http.tls_enabled,
            "BRIDGE_HTTP_TLS_CLIENT_CA_FILE: needs BRIDGE_HTTP_TLS_CERT_FILE and BRIDGE_HTTP_TLS_KEY_FILE",
        ),
        (http.tls_reload_interval_s >= 0, "BRIDGE_HTTP_TLS_RELOAD_INTERVAL_S: must be >= 0"),
    ]
    poller = settings.poller
    checks += [
        (
            poller.endpoint.startswith(("http://", "https://")),
            "BRIDGE_VOD_ENDPOINT: must be an http(s) URL",
        ),
        (poller.request_timeout_s > 0, "BRIDGE_VOD_REQUEST_TIMEOUT_S: must be > 0"),
        (
            poller.sub_app_id is None or not poller.sub_app_ids,
            "BRIDGE_VOD_SUB_APP_ID and BRIDGE_VOD_SUB_APP_IDS: set one of them, not both",
        ),
        (
            bool(_TOPIC_RE.match(settings.delivery.dead_letter_topic)),
            "BRIDGE_KAFKA_DEAD_LETTER_TOPIC: not a valid topic",
        ),
        (poller.idle_interval_s >= 0, "BRIDGE_PULL_IDLE_INTERVAL_S: must be >= 0"),
        (1 <= poller.max_batches_in_flight <= 16, "BRIDGE_PULL_MAX_BATCHES_IN_FLIGHT: must be 1..16"),
        (
            0 < poller.backoff_initial_s <= poller.backoff_max_s,
            "BRIDGE_PULL_BACKOFF_INITIAL_S: must be > 0 and <= BRIDGE_PULL_BACKOFF_MAX_S",
        ),
        (
            settings.callback_enabled or poller.enabled,
            "BRIDGE_CALLBACK_ENABLED: with the poller off too, the bridge would have no source",
        ),
    ]
    checks += [
        (http.sign_skew_s >= 0, "BRIDGE_CALLBACK_SIGN_SKEW_S: must be >= 0"),
        (http.sign_max_ttl_s > 0, "BRIDGE_CALLBACK_SIGN_MAX_TTL_S: must be > 0"),
        (
            http.sign_key is None or (0 < len(http.sign_key) <= 64 and http.sign_key.isalnum()),
            "BRIDGE_CALLBACK_SIGN_KEY: VOD sign keys are letters and digits",
        ),
        (
            http.token is None
            or (len(http.token) >= 16 and "/" not in http.token and not _DIGITS_RE.fullmatch(http.token)),
            # Digits alone would read as a SubAppId in /vod/callback/<segment>.
            "BRIDGE_CALLBACK_TOKEN: use at least 16 characters, without '/', not only digits",
        ),
        (settings.delivery.dedup_window_s >= 0, "BRIDGE_DEDUP_WINDOW_S: must be >= 0"),
        (settings.delivery.dedup_max_entries >= 1, "BRIDGE_DEDUP_MAX_ENTRIES: must be >= 1"),
    ]
    checks += [
        (settings.spool.max_bytes >= 1024 * 1024, "BRIDGE_SPOOL_MAX_BYTES: must be >= 1 MiB"),
        (settings.spool.publish_budget_s > 0, "BRIDGE_SPOOL_PUBLISH_BUDGET_S: must be > 0"),
        (
            settings.spool.min_free_bytes is None or settings.spool.min_free_bytes >= 0,
            "BRIDGE_SPOOL_MIN_FREE_BYTES: must be >= 0",
        ),
    ]
    checks += [
        (1 <= settings.workers <= 64, "BRIDGE_WORKERS: must be 1..64"),
        (settings.workers == 1 or http.port != 0, "BRIDGE_WORKERS: several workers need a fixed BRIDGE_HTTP_PORT"),
    ]
    for name, cidrs in (
        ("BRIDGE_CALLBACK_ALLOWED_CIDRS", http.allowed_cidrs),
        ("BRIDGE_TRUSTED_PROXIES", http.trusted_proxies),
    ):
        try:
            parse_networks(cidrs)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for event_type, topic in kafka.topic_routes.items():
        if not _TOPIC_RE.match(topic):
            raise ConfigError(f"BRIDGE_KAFKA_TOPIC_ROUTES: {topic!r} for {event_type} is not a valid topic")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.0.0.0/8", "203.0.113.7"]`` -> networks; raises ValueError naming a bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr.strip()!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _is_host_port(server: str) -> bool:
    host, sep, port = server.strip().rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) <= 65535)
