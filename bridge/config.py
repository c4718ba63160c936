"""Settings: one frozen, typed tree built once at start-up from environment variables (CLI flags override).

Every setting has exactly one environment variable, listed in ``ENV_VARS``; the README's configuration
table is that list. Validation happens here, before any socket is opened, and fails with a
:class:`ConfigError` that names the variable, never its (possibly secret) value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from bridge.errors import ConfigError

CompressionType = Literal["none", "gzip"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogFormat = Literal["auto", "text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EventLoop = Literal["auto", "asyncio", "uvloop"]

_MASK: Final = "'***'"

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
    #: Bind with SO_REUSEPORT so several processes share the port (set for each of ``--workers``).
    reuse_port: bool = False
    #: Graceful shutdown: how long in-flight callbacks may take to finish after SIGTERM.
    shutdown_timeout_s: float = 30.0
    #: VOD's SignKey: when set, every callback must carry a valid Sign/T (401 otherwise).
    sign_key: str | None = None
    #: How far past its expiry T a signed callback is still accepted (clock differences).
    sign_skew_s: float = 60.0
    #: When set, callbacks must carry it as ``?token=...`` or as a last path segment.
    token: str | None = None
    #: Source addresses allowed to post callbacks (CIDRs); empty allows all.
    allowed_cidrs: list[str] = []
    #: Proxies whose X-Forwarded-For is believed when finding the client address.
    trusted_proxies: list[str] = []
    #: Suppress repeats of (EventType, key, Status) within this window; 0 turns it off.
    dedup_window_s: float = 0.0
    dedup_max_entries: int = 100_000

    def __repr__(self) -> str:
        return _masked_repr(self, ("sign_key", "token"))


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
    sub_app_id: int | None = None
    #: PullEvents long-polls up to ~5 s server-side; Tencent recommends a 10 s client timeout.
    request_timeout_s: float = 10.0
    #: Undecodable events go here (raw, error in headers) and are confirmed once this record is acked.
    dead_letter_topic: str = "vod.events.dlq"
    #: Pause after an empty PullEvents answer that did not long-poll, to stay well inside API rate limits.
    idle_interval_s: float = 1.0
    #: Jittered exponential back-off on API errors and Kafka outages.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Confirms later than this after the pull are logged as warnings (VOD re-delivers after 30 s).
    confirm_warn_after_s: float = 20.0
    #: Pipelining: pulled batches being published/confirmed while the next PullEvents runs.
    max_batches_in_flight: int = 2


class SpoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Optional durable spool for callbacks Kafka cannot take in time."""

    #: Directory of the fsync'ed spool; unset means no spool (callbacks get 503 while Kafka is down).
    dir: str | None = None
    max_bytes: int = 1024 * 1024 * 1024
    #: How long a callback waits for the Kafka ack before it is spooled instead.
    publish_budget_s: float = 2.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
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


ENV_VARS: Final = (
    EnvVar("BRIDGE_KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers", "Kafka bootstrap servers, host:port,..."),
    EnvVar("BRIDGE_KAFKA_TOPIC", "kafka.topic", "default topic for all event types"),
    EnvVar(
        "BRIDGE_KAFKA_TOPIC_ROUTES",
        "kafka.topic_routes",
        "per-type topics: EventType=topic,EventType=topic",
    ),
    EnvVar("BRIDGE_KAFKA_ENABLE_IDEMPOTENCE", "kafka.enable_idempotence", "idempotent producer (true/false)"),
    EnvVar("BRIDGE_KAFKA_PUBLISH_TIMEOUT_S", "kafka.publish_timeout_s", "max wait for the broker ack"),
    EnvVar("BRIDGE_KAFKA_LINGER_MS", "kafka.linger_ms", "producer linger"),
    EnvVar("BRIDGE_KAFKA_MAX_BATCH_BYTES", "kafka.max_batch_bytes", "producer batch size"),
    EnvVar("BRIDGE_KAFKA_COMPRESSION", "kafka.compression", "none or gzip"),
    EnvVar("BRIDGE_KAFKA_CLIENT_ID", "kafka.client_id", "Kafka client id"),
    EnvVar(
        "BRIDGE_KAFKA_SECURITY_PROTOCOL",
        "kafka.security_protocol",
        "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
    ),
    EnvVar("BRIDGE_KAFKA_SASL_MECHANISM", "kafka.sasl_mechanism", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    EnvVar("BRIDGE_KAFKA_SASL_USERNAME", "kafka.sasl_username", "SASL user"),
    EnvVar("BRIDGE_KAFKA_SASL_PASSWORD", "kafka.sasl_password", "SASL password (or _FILE)", secret=True),
    EnvVar("BRIDGE_KAFKA_SSL_CAFILE", "kafka.ssl_cafile", "CA bundle for SSL/SASL_SSL"),
    EnvVar("BRIDGE_KAFKA_MAX_IN_FLIGHT", "kafka.max_in_flight", "publishes awaiting an ack at once"),
    EnvVar("BRIDGE_HTTP_HOST", "http.host", "listen address"),
    EnvVar("BRIDGE_HTTP_PORT", "http.port", "listen port"),
    EnvVar("BRIDGE_CALLBACK_PATH", "http.callback_path", "path VOD posts events to"),
    EnvVar("BRIDGE_HTTP_MAX_BODY_BYTES", "http.max_body_bytes", "larger callbacks get 413"),
    EnvVar("BRIDGE_SHUTDOWN_TIMEOUT_S", "http.shutdown_timeout_s", "drain time after SIGTERM"),
    EnvVar("BRIDGE_HTTP_BODY_TIMEOUT_S", "http.body_timeout_s", "time to send the body after the headers"),
    EnvVar("BRIDGE_HTTP_IDLE_TIMEOUT_S", "http.idle_timeout_s", "idle / slow-header connection timeout"),
    EnvVar("BRIDGE_CALLBACK_SIGN_KEY", "http.sign_key", "VOD SignKey; requires valid Sign/T", secret=True),
    EnvVar("BRIDGE_CALLBACK_SIGN_SKEW_S", "http.sign_skew_s", "accepted lateness past T"),
    EnvVar("BRIDGE_CALLBACK_TOKEN", "http.token", "secret token in the callback URL", secret=True),
    EnvVar("BRIDGE_CALLBACK_ALLOWED_CIDRS", "http.allowed_cidrs", "allowed source CIDRs, comma-separated"),
    EnvVar("BRIDGE_TRUSTED_PROXIES", "http.trusted_proxies", "proxy CIDRs whose X-Forwarded-For is used"),
    EnvVar("BRIDGE_DEDUP_WINDOW_S", "http.dedup_window_s", "suppress repeats within this window (0: off)"),
    EnvVar("BRIDGE_DEDUP_MAX_ENTRIES", "http.dedup_max_entries", "bound on remembered events"),
    EnvVar("BRIDGE_SPOOL_DIR", "spool.dir", "directory of the durable callback spool (unset: no spool)"),
    EnvVar("BRIDGE_SPOOL_MAX_BYTES", "spool.max_bytes", "spool size bound; beyond it callbacks get 503"),
    EnvVar("BRIDGE_SPOOL_PUBLISH_BUDGET_S", "spool.publish_budget_s", "wait for Kafka before spooling"),
    EnvVar("BRIDGE_CALLBACK_ENABLED", "callback_enabled", "serve the callback endpoint (true/false)"),
    EnvVar("BRIDGE_PULL_ENABLED", "poller.enabled", "run the PullEvents poller (true/false)"),
    EnvVar("BRIDGE_VOD_ENDPOINT", "poller.endpoint", "VOD API endpoint"),
    EnvVar("BRIDGE_VOD_REGION", "poller.region", "X-TC-Region, if any"),
    EnvVar("BRIDGE_VOD_SUB_APP_ID", "poller.sub_app_id", "VOD SubAppId, if any"),
    EnvVar("BRIDGE_VOD_REQUEST_TIMEOUT_S", "poller.request_timeout_s", "VOD API request timeout"),
    EnvVar("BRIDGE_KAFKA_DEAD_LETTER_TOPIC", "poller.dead_letter_topic", "topic for undecodable events"),
    EnvVar("BRIDGE_PULL_IDLE_INTERVAL_S", "poller.idle_interval_s", "pause after an empty pull"),
    EnvVar("BRIDGE_PULL_BACKOFF_INITIAL_S", "poller.backoff_initial_s", "first back-off delay"),
    EnvVar("BRIDGE_PULL_BACKOFF_MAX_S", "poller.backoff_max_s", "longest back-off delay"),
    EnvVar("BRIDGE_PULL_CONFIRM_WARN_AFTER_S", "poller.confirm_warn_after_s", "warn on confirms this late"),
    EnvVar("BRIDGE_PULL_MAX_BATCHES_IN_FLIGHT", "poller.max_batches_in_flight", "pipelined batches"),
    EnvVar("BRIDGE_WORKERS", "workers", "worker processes sharing the port"),
    EnvVar("BRIDGE_EVENT_LOOP", "event_loop", "auto, asyncio or uvloop"),
    EnvVar("BRIDGE_OTEL_ENABLED", "otel_enabled", "OpenTelemetry spans and traceparent headers"),
    EnvVar("BRIDGE_HTTP_REUSE_PORT", "http.reuse_port", "bind with SO_REUSEPORT"),
    EnvVar("BRIDGE_LOG_LEVEL", "log_level", "DEBUG, INFO, WARNING, ERROR"),
    EnvVar("BRIDGE_LOG_FORMAT", "log_format", "auto (text on a terminal), text or json"),
)
_BY_PATH: Final = {var.path: var for var in ENV_VARS}
_LIST_PATHS: Final = frozenset({"http.allowed_cidrs", "http.trusted_proxies"})
_ROUTE_RE: Final = re.compile(r"^[A-Za-z0-9]+=[A-Za-z0-9._-]{1,249}$")
_TOPIC_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def load_settings(environ: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """Build and validate Settings from environment variables; ``overrides`` (env-var name -> value, from
    CLI flags) win over ``environ``. Raises :class:`ConfigError` naming the offending variable."""
    merged = dict(environ)
    merged.update(overrides or {})
    tree: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = _read(merged, var)
        if raw is None:
            continue
        value: object = raw
        if var.path == "kafka.topic_routes":
            value = _parse_routes(raw)
        elif var.path in _LIST_PATHS:
            value = [item.strip() for item in raw.split(",") if item.strip()]
        section, _, field = var.path.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[field] = value
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    _validate(settings)
    return settings


def _read(environ: Mapping[str, str], var: EnvVar) -> str | None:
    if var.secret and (path := environ.get(var.name + "_FILE")):
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{var.name}_FILE: cannot read {path}: {exc.strerror}") from None
    value = environ.get(var.name)
    return value if value not in (None, "") else None


def _parse_routes(raw: str) -> dict[str, str]:
    routes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        if not _ROUTE_RE.match(item):
            raise ConfigError(f"BRIDGE_KAFKA_TOPIC_ROUTES: {item!r} is not EventType=topic")
        event_type, topic = item.split("=", 1)
        routes[event_type] = topic
    return routes


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


def _validate(settings: Settings) -> None:
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
        (http.shutdown_timeout_s >= 0, "BRIDGE_SHUTDOWN_TIMEOUT_S: must be >= 0"),
    ]
    poller = settings.poller
    checks += [
        (
            poller.endpoint.startswith(("http://", "https://")),
            "BRIDGE_VOD_ENDPOINT: must be an http(s) URL",
        ),
        (poller.request_timeout_s > 0, "BRIDGE_VOD_REQUEST_TIMEOUT_S: must be > 0"),
        (
            bool(_TOPIC_RE.match(poller.dead_letter_topic)),
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
        (
            http.sign_key is None or (0 < len(http.sign_key) <= 64 and http.sign_key.isalnum()),
            "BRIDGE_CALLBACK_SIGN_KEY: VOD sign keys are letters and digits",
        ),
        (
            http.token is None or (len(http.token) >= 16 and "/" not in http.token),
            "BRIDGE_CALLBACK_TOKEN: use at least 16 characters, without '/'",
        ),
        (http.dedup_window_s >= 0, "BRIDGE_DEDUP_WINDOW_S: must be >= 0"),
        (http.dedup_max_entries >= 1, "BRIDGE_DEDUP_MAX_ENTRIES: must be >= 1"),
    ]
    checks += [
        (settings.spool.max_bytes >= 1024 * 1024, "BRIDGE_SPOOL_MAX_BYTES: must be >= 1 MiB"),
        (settings.spool.publish_budget_s > 0, "BRIDGE_SPOOL_PUBLISH_BUDGET_S: must be > 0"),
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
