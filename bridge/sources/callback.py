"""The normal-callback source: ``POST <callback_path>`` → decode → publish → 200 only after the Kafka ack."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from bridge.delivery.forwarder import SpoolForwarder
from bridge.delivery.kafka import Sink
from bridge.errors import (
    AuthFailed,
    BodyTimeout,
    BridgeError,
    Forbidden,
    InvalidPayload,
    PayloadTooLarge,
    PublishFailed,
    UnsupportedEncoding,
)
from bridge.keys import DEDUP_KEY, FORWARDER_KEY, METRICS_KEY, SETTINGS_KEY, SINK_KEY, SOURCE_FILTER_KEY, TRACER_KEY
from bridge.ops.tracing import EventSpan, Headers
from bridge.sources.access import verify_token
from bridge.vod.decode import decode_event
from bridge.vod.model import VodEvent
from bridge.vod.signing import verify_sign

logger = logging.getLogger(__name__)


async def handle_callback(request: web.Request) -> web.Response:
    """Publish one VOD event. 200 means the broker acknowledged the record (acks=all)."""
    with request.app[TRACER_KEY].span("vod.callback", request.headers) as span:
        return await _handle(request, span)


async def _handle(request: web.Request, span: EventSpan) -> web.Response:
    app = request.app
    metrics = app[METRICS_KEY]
    received_at = datetime.now(UTC)
    try:
        _authorize_source(request)
        body = await _read_body(request)
        event = decode_event(body)
        span.annotate(event)
        settings = app[SETTINGS_KEY].http
        if settings.sign_key is not None:
            verify_sign(
                event.sign, event.expires_at, sign_key=settings.sign_key, now_s=time.time(), skew_s=settings.sign_skew_s
            )
    except (InvalidPayload, AuthFailed) as exc:
        _reject(request, exc.reason, exc.message)
        raise
    except (Forbidden, PayloadTooLarge, UnsupportedEncoding, BodyTimeout, ClientGone) as exc:
        _reject(request, exc.code, exc.message)
        raise

    metrics.count_received("callback", event.event_type)
    dedup = app[DEDUP_KEY]
    if dedup is not None and dedup.seen(event):
        metrics.duplicates.labels("callback").inc()
        return json_answer({"status": "duplicate"})
    forwarder = app[FORWARDER_KEY]
    trace_headers = span.kafka_headers()
    try:
        if forwarder is None:
            answer = await _publish(app[SINK_KEY], event, received_at, trace_headers)
        else:
            answer = await _publish_or_spool(app, forwarder, event, received_at, trace_headers)
    except PublishFailed as exc:
        logger.warning(
            "callback %s key=%s not acked: %s",
            event.event_type,
            event.key,
            exc.message,
            extra={"reason": exc.code, "key": event.key, "event_type": event.event_type},
        )
        raise
    if dedup is not None:
        dedup.record(event)
    return json_answer(answer)


def _reject(request: web.Request, reason: str, message: str) -> None:
    """Count and log one refused callback: the reason, never the payload."""
    request.app[METRICS_KEY].rejected.labels("callback", reason).inc()
    logger.info("rejected callback from %s: %s (%s)", request.remote, reason, message, extra={"reason": reason})


async def _publish(
    sink: Sink,
    event: VodEvent,
    received_at: datetime,
    trace_headers: Headers,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    ack = await sink.publish(
        event, source="callback", received_at=received_at, timeout_s=timeout_s, extra_headers=trace_headers
    )
    return {"status": "published", "topic": ack.topic, "partition": ack.partition, "offset": ack.offset}


async def _publish_or_spool(
    app: web.Application, forwarder: SpoolForwarder, event: VodEvent, received_at: datetime, trace_headers: Headers
) -> dict[str, Any]:
    """Kafka first, within the publish budget; the spool when Kafka cannot ack in time.

    While older events wait in the spool, new ones queue behind them, so forwarding keeps arrival order.
    """
    sink = app[SINK_KEY]
    if forwarder.depth == 0 and sink.ready:
        try:
            return await _publish(sink, event, received_at, trace_headers, app[SETTINGS_KEY].spool.publish_budget_s)
        except PublishFailed as exc:
            if not exc.retriable:
                raise  # Kafka will never take it (e.g. too large): spooling would only block the queue
            # A timed-out record may still reach Kafka later; the spooled copy is then a duplicate (same key).
            logger.info("kafka did not ack %s key=%s in time (%s); spooling it", event.event_type, event.key, exc)
    seq = await forwarder.store(event, source="callback", received_at=received_at)
    return {"status": "spooled", "seq": seq}


def _authorize_source(request: web.Request) -> None:
    """IP allow-list, then the URL token; both before the body is read."""
    app = request.app
    app[SOURCE_FILTER_KEY].check(request.remote, request.headers.get("X-Forwarded-For"))
    token = app[SETTINGS_KEY].http.token
    if token is not None:
        verify_token(request.match_info.get("token") or request.query.get("token"), token)


async def _read_body(request: web.Request) -> bytes:
    settings = request.app[SETTINGS_KEY].http
    _check_declared_size(request)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:40]!r} is not accepted; send the JSON as is")
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the usual case): no timer needed to read it.
            body = await request.read()
        else:
            async with asyncio.timeout(settings.body_timeout_s):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"body exceeds the limit of {settings.max_body_bytes} bytes") from None
    except TimeoutError:
        raise BodyTimeout(f"body not received within {settings.body_timeout_s:g}s") from None
    except RequestPayloadError as exc:
        raise InvalidPayload(f"unreadable body: {exc}", reason="unreadable_body") from None
    except ConnectionResetError:
        raise ClientGone("client disconnected while sending its body") from None
    if not body:
        raise InvalidPayload("empty body: expected a VOD event JSON object", reason="empty_body")
    return body


def _check_declared_size(request: web.BaseRequest) -> None:
    limit = request.app[SETTINGS_KEY].http.max_body_bytes if isinstance(request, web.Request) else 0
    if limit and request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")


async def expect_continue(request: web.Request) -> None:
    """``Expect: 100-continue``: refuse an oversized body before inviting the client to send it."""
    try:
        _check_declared_size(request)
    except PayloadTooLarge as exc:
        # Expect handlers run outside the middleware chain: build the JSON answer here.
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.app[SETTINGS_KEY].http.max_body_bytes,
            actual_size=request.content_length or 0,
            text=msgspec.json.encode(error_body(exc.code, exc.message)).decode(),
            content_type="application/json",
        ) from None
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class ClientGone(BridgeError):
    """The client hung up mid-request; nobody will read an answer."""

    code = "client_disconnected"


_BODY_NOT_READ = (PayloadTooLarge, UnsupportedEncoding, BodyTimeout, ClientGone)


def json_answer(body: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with msgspec (about 5x cheaper than aiohttp's json.dumps)."""
    return web.Response(
        body=_json_encoder.encode(body), status=status, headers=headers, content_type="application/json"
    )


_json_encoder = msgspec.json.Encoder()


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body ``{"error": code, "message": ...}`` with the error's own status."""
    try:
        return await handler(request)
    except BridgeError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, PublishFailed) else None
        response = json_answer(error_body(exc.code, exc.message), status=exc.status, headers=headers)
        if isinstance(exc, _BODY_NOT_READ):
            # Close instead of reading ("lingering" on) a body we refused: a stalled or hostile client
            # must not keep the connection.
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_answer(error_body(code, exc.reason), status=exc.status, headers=_allow(exc))
    except Exception:
        # A bug must not take the service down or leak internals; VOD will retry the event.
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return json_answer(error_body("internal_error", "internal error"), status=500)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
