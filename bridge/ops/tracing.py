"""Optional OpenTelemetry: one span per event, from receipt to the Kafka ack, and W3C ``traceparent`` in the record.

Off unless ``BRIDGE_OTEL_ENABLED=true`` (which needs the ``otel`` extra, ``opentelemetry-api``). The bridge
uses the global tracer provider: run it under ``opentelemetry-instrument`` or install an SDK and exporter
configured by the standard ``OTEL_*`` variables. An incoming ``traceparent`` header on a callback becomes the
parent of the event's span; the span's context is written into the Kafka record's headers, so consumers can
continue the trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Protocol

from bridge.errors import ConfigError
from bridge.vod.model import Undecodable, VodEvent

Headers = list[tuple[str, bytes]]


class EventSpan(Protocol):
    def annotate(self, event: VodEvent | Undecodable) -> None:
        """Attach the event's type and key once it is decoded."""

    def kafka_headers(self) -> Headers:
        """The trace context to put into the record (empty when tracing is off)."""


class EventTracer(Protocol):
    def span(self, name: str, carrier: Mapping[str, str] | None = None) -> Any:
        """A context manager yielding an :class:`EventSpan`; ``carrier`` holds incoming HTTP headers."""


class _NoSpan:
    def annotate(self, event: VodEvent | Undecodable) -> None:
        pass

    def kafka_headers(self) -> Headers:
        return []


#: The span of every event while tracing is off: annotates nothing, adds no header.
NO_SPAN: Final[EventSpan] = _NoSpan()


class _NoSpanContext:
    span = NO_SPAN

    def __enter__(self) -> EventSpan:
        return self.span

    def __exit__(self, *exc_info: object) -> None:
        return None


class NoTracer:
    """Tracing off: one shared no-op context manager, nothing allocated per event."""

    _context = _NoSpanContext()

    def span(self, name: str, carrier: Mapping[str, str] | None = None) -> _NoSpanContext:
        return self._context


class _OtelSpan:
    def __init__(self, span: Any, propagate: Any) -> None:
        self._span = span
        self._propagate = propagate

    def annotate(self, event: VodEvent | Undecodable) -> None:
        if event.event_type is not None:
            self._span.set_attribute("vod.event_type", event.event_type)
        if isinstance(event, VodEvent):
            self._span.set_attribute("messaging.kafka.message.key", event.key)

    def kafka_headers(self) -> Headers:
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        return [(name, value.encode()) for name, value in carrier.items()]


class OtelTracer:
    """Spans through ``opentelemetry-api``'s global tracer; errors (4xx/5xx paths) mark the span as failed."""

    def __init__(self) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            raise ConfigError("BRIDGE_OTEL_ENABLED needs the 'otel' extra (opentelemetry-api)") from None
        from bridge import __version__

        self._trace = trace
        self._propagate = propagate
        self._tracer = trace.get_tracer("vod-kafka-bridge", __version__)

    @contextmanager
    def span(self, name: str, carrier: Mapping[str, str] | None = None) -> Iterator[EventSpan]:
        parent = self._propagate.extract(carrier) if carrier is not None else None
        kind = self._trace.SpanKind.PRODUCER
        with self._tracer.start_as_current_span(name, context=parent, kind=kind) as span:
            span.set_attribute("messaging.system", "kafka")
            yield _OtelSpan(span, self._propagate)


def make_tracer(enabled: bool) -> EventTracer:
    return OtelTracer() if enabled else NoTracer()


def tracing_off(tracer: EventTracer) -> bool:
    """True for :class:`NoTracer`: a source may then skip the span altogether and use :data:`NO_SPAN`."""
    return isinstance(tracer, NoTracer)
