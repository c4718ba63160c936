"""Optional OpenTelemetry: a span per event from receipt to ack, traceparent carried into the Kafka record."""

from __future__ import annotations

import pytest
from conftest import Kafka, headers_of, read_records, sample_event
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

pytestmark = pytest.mark.integration

PARENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # process-wide, once: the bridge uses the global provider
    return exporter


async def test_span_per_event_and_traceparent_in_the_record(
    kafka: Kafka, make_settings, make_client, topic, spans: InMemorySpanExporter
) -> None:
    from msgspec.structs import replace

    spans.clear()
    client = await make_client(replace(make_settings(), otel_enabled=True))
    traceparent = f"00-{PARENT_TRACE_ID}-00f067aa0ba902b7-01"
    response = await client.post("/vod/callback", json=sample_event("traced"), headers={"traceparent": traceparent})
    assert response.status == 200
    assert (await client.post("/vod/callback", data=b"{broken")).status == 400

    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=0.5)
    carried = headers_of(record)["traceparent"]
    assert carried.split("-")[1] == PARENT_TRACE_ID, "the record continues the caller's trace"

    finished = [s for s in spans.get_finished_spans() if s.name == "vod.callback"]
    assert len(finished) == 2
    ok, failed = finished
    assert ok.attributes["vod.event_type"] == "PullComplete"
    assert ok.attributes["messaging.kafka.message.key"] == "traced"
    assert format(ok.context.trace_id, "032x") == PARENT_TRACE_ID
    assert carried.split("-")[2] == format(ok.context.span_id, "016x"), "the record's parent is the event span"
    assert failed.status.status_code is StatusCode.ERROR


async def test_tracing_off_adds_no_headers(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    traceparent = f"00-{PARENT_TRACE_ID}-00f067aa0ba902b7-01"
    assert (
        await client.post("/vod/callback", json=sample_event("plain"), headers={"traceparent": traceparent})
    ).status == 200
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=0.5)
    assert "traceparent" not in headers_of(record)
