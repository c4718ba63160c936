"""Prometheus metrics, on a registry owned by one app instance (no process-global state between tests).

A worker of ``--workers N`` (bridge.ops.workers) runs in prometheus_client's multiprocess mode instead: its values
live in memory-mapped files in a directory shared by the workers, and ``/metrics`` merges every worker's files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from bridge.errors import (
    AUTH_FAILED_REASONS,
    INVALID_PAYLOAD_REASONS,
    PRODUCER_REPLACED,
    BodyTimeout,
    ConfigError,
    Forbidden,
    PayloadTooLarge,
    SpoolNoRoom,
    UnsupportedEncoding,
)
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import FALLBACK_REASONS, UNDECODABLE_REASONS

#: Unknown EventTypes are caller-controlled strings; they share one label value to bound cardinality.
OTHER_EVENT_TYPE: Final = "other"

#: prometheus_client reads this variable when it is imported: set, every metric value of the process is kept in
#: a memory-mapped file in that directory. The supervisor of ``--workers N`` sets it for its workers.
MULTIPROCESS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Why a producer was replaced (``vod_bridge_producer_replacements_total{reason}``): aiokafka's sender task or
#: its client's metadata task ended, librdkafka's poll thread ended, or the producer stalled (either client).
REPLACEMENT_REASONS: Final = ("sender_died", "metadata_task_died", "poll_thread_died", "stalled")

#: How often a worker copies the gauges it reads on demand (:meth:`Metrics.feed`) into its file: a scrape
#: answered by another worker sees them at most this old.
GAUGE_REFRESH_INTERVAL_S: Final = 1.0


#: The ``source`` label values (``bridge.delivery.records.Source``).
SOURCES: Final = ("callback", "pull")
#: Every reason a callback is refused with (``vod_bridge_events_rejected_total``): before its body is decoded
#: (the error codes; ``client_disconnected`` is ``bridge.sources.http.ClientGone``), for an unreadable body, for a
#: failed signature or token, and, with ``BRIDGE_CALLBACK_INVALID=reject``, for a body without a usable key.
REJECT_REASONS: Final = (
    Forbidden.code,
    PayloadTooLarge.code,
    UnsupportedEncoding.code,
    BodyTimeout.code,
    "client_disconnected",
    *INVALID_PAYLOAD_REASONS,
    *AUTH_FAILED_REASONS,
    *sorted(UNDECODABLE_REASONS),
)
#: Why a record went to the dead-letter topic: a body without a usable key, a spooled record Kafka refused for good,
#: a spooled record this version cannot read (``bridge.delivery.forwarder``).
DEAD_LETTER_REASONS: Final = (*sorted(UNDECODABLE_REASONS), "kafka_refused", "spool_format")
#: The causes of ``vod_bridge_publish_failures_total`` known in advance; a Kafka error adds its class name.
PUBLISH_FAILURE_CAUSES: Final = ("timeout", "not_ready", "overloaded", "spool", SpoolNoRoom.code, PRODUCER_REPLACED)


def event_type_label(event_type: str) -> str:
    return event_type if event_type in EVENT_TYPES else OTHER_EVENT_TYPE


class Metrics:
    """Every counter the bridge keeps. Label values are bounded: event types via :func:`event_type_label`,
    reasons from the fixed set of ``InvalidPayload.reason`` / error codes.

    With ``multiprocess_dir`` (a worker of ``--workers N``; the process must have been started with
    ``PROMETHEUS_MULTIPROC_DIR`` set to it), :meth:`render` answers for every worker writing to that directory.
    Raises :class:`ConfigError` if prometheus_client was not started in multiprocess mode.
    """

    def __init__(self, *, multiprocess_dir: Path | None = None) -> None:
        # The *_created series double the output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            raise ConfigError(f"{MULTIPROCESS_DIR_ENV} must be set when the process starts, before metrics exist")
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        #: What a scrape renders: the own registry, or in multiprocess mode the merged files of every worker.
        self._scraped = self.registry
        if multiprocess_dir is not None:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
        #: Gauges read on demand (:meth:`feed`) that multiprocess mode must copy into the files.
        self._fed: list[tuple[Gauge, Callable[[], float]]] = []
        #: Labelled children of ``received`` and ``published`` by (source, event type label): see :meth:`_child`.
        self._received: dict[tuple[str, str], Counter] = {}
        self._published: dict[tuple[str, str], Counter] = {}
        r = self.registry
        self.received = Counter("vod_bridge_events_received", "Events received", ["source", "event_type"], registry=r)
        self.published = Counter(
            "vod_bridge_events_published", "Events acked by Kafka", ["source", "event_type"], registry=r
        )
        self.rejected = Counter(
            "vod_bridge_events_rejected", "Inputs rejected, by reason", ["source", "reason"], registry=r
        )
        self.duplicates = Counter(
            "vod_bridge_events_duplicate", "Repeats suppressed by the de-duplication window", ["source"], registry=r
        )
        self.dead_lettered = Counter(
            "vod_bridge_events_dead_lettered",
            "Bodies without a usable key, and records Kafka refused for good, sent to the dead-letter topic",
            ["source", "reason"],
            registry=r,
        )
        # ``sub_app_id``: the poller loop's SubAppId in decimal, "" for the default application. Bounded: the
        # configured BRIDGE_VOD_SUB_APP_ID(S), never a value from a request.
        self.pulls = Counter(
            "vod_bridge_poller_pulls", "PullEvents calls, by outcome", ["outcome", "sub_app_id"], registry=r
        )
        self.pulled_events = Counter("vod_bridge_poller_events_pulled", "Events returned by PullEvents", registry=r)
        self.confirmed_events = Counter(
            "vod_bridge_poller_events_confirmed",
            "Event handles confirmed with ConfirmEvents",
            ["sub_app_id"],
            registry=r,
        )
        self.confirm_errors = Counter(
            "vod_bridge_poller_confirm_errors", "Failed ConfirmEvents calls", ["code"], registry=r
        )
        self.confirm_age = Histogram(
            "vod_bridge_poller_confirm_age_seconds",
            "Time from PullEvents request to ConfirmEvents success (VOD re-delivers after 30 s)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 25, 30),
            registry=r,
        )
        self.publish_failed = Counter(
            "vod_bridge_publish_failures", "Publishes not acked by Kafka", ["source", "code"], registry=r
        )
        self.publish_latency = Histogram(
            "vod_bridge_publish_latency_seconds",
            "Time from publish call to broker ack",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.spooled = Counter("vod_bridge_events_spooled", "Events stored in the local spool", ["source"], registry=r)
        self.published_from_spool = Counter("vod_bridge_spool_forwarded", "Spooled events acked by Kafka", registry=r)
        self.spool_set_aside = Counter(
            "vod_bridge_spool_set_aside",
            "Spooled records refused for good by Kafka and by the dead-letter topic, kept in <spool>/refused/",
            registry=r,
        )
        self.spool_set_aside_failures = Counter(
            "vod_bridge_spool_set_aside_failures",
            "Records that could not be copied to <spool>/refused/ (kept in the spool, retried later)",
            registry=r,
        )
        self.spool_cursor_write_failures = Counter(
            "vod_bridge_spool_cursor_write_failures",
            "Spool cursor writes that failed (forwarding went on; a restart may re-send delivered records)",
            registry=r,
        )
        self.fallbacks = Counter(
            "vod_bridge_events_fallback",
            "Events published although their body is not of the documented shape, by how the key was found",
            ["source", "reason"],
            registry=r,
        )
        # How a gauge combines over the workers (ignored in a single process). Each worker has its own spool and
        # its own publishes, so depth and in-flight add up; the files of a worker that exited are dropped
        # (mark_process_dead), as its spool is no longer served and its publishes are over.
        self.spool_depth = Gauge(
            "vod_bridge_spool_depth",
            "Events in the spool not yet acked by Kafka",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight = Gauge(
            "vod_bridge_publish_in_flight", "Publishes awaiting an ack", multiprocess_mode="livesum", registry=r
        )
        # Each worker has its own producer and a scrape cannot tell which worker takes the next callback: 1 only
        # when every live worker is connected, so that a disconnected producer alerts even with others healthy
        # (a sum would have to be compared with N, and a max would hide the one failing worker).
        self.kafka_connected = Gauge(
            "vod_bridge_kafka_connected",
            "1 when the producer is connected and the cluster answered within seconds (with several workers: when"
            " every worker's is)",
            multiprocess_mode="livemin",
            registry=r,
        )
        # Like kafka_connected: a scrape cannot tell which worker takes the next callback, so ready only when
        # every live worker is.
        self.ready = Gauge(
            "vod_bridge_ready",
            "1 when /readyz answers 200: Kafka connected, or a spool takes the events (with several workers: every"
            " worker)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.producer_replacements = Counter(
            "vod_bridge_producer_replacements",
            "Producers replaced because they stopped making progress, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REPLACEMENT_REASONS:  # every series at 0 from the start, so that increase() sees the first
            self.producer_replacements.labels(reason)
        self.tls_reloads = Counter("vod_bridge_tls_reloads", "TLS certificate reloads", ["outcome"], registry=r)
        self.abandoned = Counter(
            "vod_bridge_producer_abandoned",
            "Records the producer still held, unacknowledged, when its bounded flush at shutdown gave up (none was "
            "answered 200 or confirmed)",
            registry=r,
        )
        # bridge.sources.connections: each worker bounds its own connections, so the open ones add up.
        self.connections_open = Gauge(
            "vod_bridge_http_connections_open", "Open HTTP connections", multiprocess_mode="livesum", registry=r
        )
        self.connections_closed = Counter(
            "vod_bridge_http_connections_closed",
            "HTTP connections closed by the bridge: header_timeout, evicted (to make room at the bound), over_limit",
            ["reason"],
            registry=r,
        )
        self.accept_failures = Counter(
            "vod_bridge_http_accept_failures",
            "accept() calls that failed for lack of resources, by errno (uvloop: one-second probes that found no free"
            " file descriptor)",
            ["error"],
            registry=r,
        )
        self._declare_known_series()

    def _declare_known_series(self) -> None:
        """Create every series whose label values are known in advance, at 0.

        A labelled family shows nothing until its first child exists: a dashboard would say "No data" where 0 is
        true, and ``increase()`` would miss the first event. Declared here, each series is in the first scrape, in
        one process and (its file written at once) with ``--workers``. Label values that depend on the deployment
        (the poller's SubAppIds) are declared where they become known; Kafka error classes and VOD API codes are not
        known in advance.
        """
        event_types = [*EVENT_TYPES, OTHER_EVENT_TYPE]
        for source, event_type in itertools.product(SOURCES, event_types):
            self._child(self.received, source, event_type)
            self._child(self.published, source, event_type)
        _declare(self.rejected, ["callback"], REJECT_REASONS)
        _declare(self.duplicates, SOURCES)
        _declare(self.dead_lettered, SOURCES, DEAD_LETTER_REASONS)
        _declare(self.publish_failed, SOURCES, PUBLISH_FAILURE_CAUSES)
        _declare(self.spooled, SOURCES)
        _declare(self.fallbacks, SOURCES, sorted(FALLBACK_REASONS))
        _declare(self.tls_reloads, ["ok", "failed"])

    def count_received(self, source: str, event_type: str) -> None:
        (self._received.get((source, event_type)) or self._child(self.received, source, event_type)).inc()

    def count_published(self, source: str, event_type: str) -> None:
        (self._published.get((source, event_type)) or self._child(self.published, source, event_type)).inc()

    def _child(self, counter: Counter, source: str, event_type: str) -> Counter:
        # labels() takes a lock and builds a key on every call: the hot path finds the child in a dict instead,
        # with one lookup by the event type as given. The dict stays bounded: its keys are label values, so a
        # known type has its own entry and every other (caller-controlled) type shares the "other" one.
        cache = self._received if counter is self.received else self._published
        key = (source, event_type_label(event_type))
        child = cache.get(key)
        if child is None:
            child = cache[key] = counter.labels(*key)
        return child

    def feed(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make ``gauge`` show ``read()``: read at each scrape in a single process (exact); in multiprocess mode,
        where a scrape may be answered by another worker, copied into the file by :meth:`refresh_gauges`."""
        if self.multiprocess_dir is None:
            gauge.set_function(read)
        else:
            self._fed.append((gauge, read))

    def refresh_gauges(self) -> None:
        """Copy the fed gauges' current values into this worker's file (multiprocess mode; call it every
        :data:`GAUGE_REFRESH_INTERVAL_S`)."""
        for gauge, read in self._fed:
            gauge.set(read())

    def render(self) -> bytes:
        """The Prometheus text of this process, or in multiprocess mode of every worker."""
        # The worker answering sees its own fed gauges exactly; the other workers' at most a refresh old.
        self.refresh_gauges()
        return generate_latest(self._scraped)


def _declare(counter: Counter, *label_values: Iterable[str]) -> None:
    """Create ``counter``'s child for every combination of ``label_values`` (one sequence per label)."""
    for labels in itertools.product(*label_values):
        counter.labels(*labels)
