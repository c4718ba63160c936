"""Typed ``web.AppKey``s for everything the app shares; the only way handlers reach shared resources."""

from __future__ import annotations

from aiohttp import web

from bridge.config import Settings
from bridge.delivery.dedup import DedupWindow
from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.kafka import Sink
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import EventTracer
from bridge.sources.access import SourceFilter
from bridge.sources.poller import Poller

SETTINGS_KEY = web.AppKey("settings", Settings)
METRICS_KEY = web.AppKey("metrics", Metrics)
SINK_KEY = web.AppKey("sink", Sink)
POLLER_KEY = web.AppKey("poller", Poller)
SOURCE_FILTER_KEY = web.AppKey("source_filter", SourceFilter)
DEDUP_KEY: web.AppKey[DedupWindow | None] = web.AppKey("dedup")
FORWARDER_KEY: web.AppKey[SpoolForwarder | None] = web.AppKey("forwarder")
TRACER_KEY: web.AppKey[EventTracer] = web.AppKey("tracer")
