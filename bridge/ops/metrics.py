"""Prometheus metrics, on a registry owned by one app instance (no process-global state between tests)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

from bridge.vod.event_types import EVENT_TYPES

#: Unknown EventTypes are caller-controlled strings; they share one label value to bound cardinality.
OTHER_EVENT_TYPE: Final = "other"


def event_type_label(event_type: str) -> str:
    return event_type if event_type in EVENT_TYPES else OTHER_EVENT_TYPE


class Metrics:
    """Every counter the bridge keeps. Label values are bounded: event types via :func:`event_type_label`,
    reasons from the fixed set of ``InvalidPayload.reason`` / error codes."""

    def __init__(self) -> None:
        # The *_created series double the output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.pulls = Counter("vod_bridge_poller_pulls", "PullEvents calls, by outcome", ["outcome"], registry=r)
        self.pulled_events = Counter("vod_bridge_poller_events_pulled", "Events returned by PullEvents", registry=r)
        self.confirmed_events = Counter(
            "vod_bridge_poller_events_confirmed", "Event handles confirmed with ConfirmEvents", registry=r
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
        self.fallbacks = Counter(
            "vod_bridge_events_fallback",
            "Events published although their body is not of the documented shape, by how the key was found",
            ["source", "reason"],
            registry=r,
        )
        self.spool_depth = Gauge("vod_bridge_spool_depth", "Events in the spool not yet acked by Kafka", registry=r)
        self.in_flight = Gauge("vod_bridge_publish_in_flight", "Publishes awaiting an ack", registry=r)
        self.kafka_connected = Gauge("vod_bridge_kafka_connected", "1 when the producer is connected", registry=r)
        self.tls_reloads = Counter("vod_bridge_tls_reloads", "TLS certificate reloads", ["outcome"], registry=r)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
