"""Typed ``web.AppKey``s for everything the app shares; the only way handlers reach shared resources."""

from __future__ import annotations

from aiohttp import web

from .auth import SourceFilter
from .config import Settings
from .dedup import DedupWindow
from .forwarder import SpoolForwarder
from .metrics import Metrics
from .poller import Poller
from .sink import Sink
from .tracing import EventTracer

SETTINGS_KEY = web.AppKey("settings", Settings)
METRICS_KEY = web.AppKey("metrics", Metrics)
SINK_KEY = web.AppKey("sink", Sink)
POLLER_KEY = web.AppKey("poller", Poller)
SOURCE_FILTER_KEY = web.AppKey("source_filter", SourceFilter)
DEDUP_KEY: web.AppKey[DedupWindow | None] = web.AppKey("dedup")
FORWARDER_KEY: web.AppKey[SpoolForwarder | None] = web.AppKey("forwarder")
TRACER_KEY: web.AppKey[EventTracer] = web.AppKey("tracer")
