"""The normal-callback source: ``POST <callback_path>`` → decode → publish → 200 only after the Kafka ack."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import AuthFailed, Forbidden, verify_sign, verify_token
from .errors import BridgeError, InvalidPayload, PayloadTooLarge, PublishFailed
from .events import VodEvent, decode_event
from .forwarder import SpoolForwarder
from .keys import DEDUP_KEY, FORWARDER_KEY, METRICS_KEY, SETTINGS_KEY, SINK_KEY, SOURCE_FILTER_KEY
from .metrics import event_type_label
from .sink import Sink

logger = logging.getLogger("bridge.receiver")


async def handle_callback(request: web.Request) -> web.Response:
    """Publish one VOD event. 200 means the broker acknowledged the record (acks=all)."""
    app = request.app
    metrics = app[METRICS_KEY]
    received_at = datetime.now(UTC)
    try:
        _authorize_source(request)
        body = await _read_body(request)
        event = decode_event(body)
        settings = app[SETTINGS_KEY].http
        if settings.sign_key is not None:
            verify_sign(
                event.sign, event.expires_at, sign_key=settings.sign_key, now_s=time.time(), skew_s=settings.sign_skew_s
            )
    except (InvalidPayload, AuthFailed) as exc:
        metrics.rejected.labels("callback", exc.reason).inc()
        logger.info("rejected callback from %s: %s (%s)", request.remote, exc.reason, exc.message)
        raise
    except Forbidden:
        metrics.rejected.labels("callback", "forbidden").inc()
        logger.info("rejected callback from %s: source address not allowed", request.remote)
        raise
    except PayloadTooLarge:
        metrics.rejected.labels("callback", "too_large").inc()
        logger.info("rejected callback from %s: body over the size limit", request.remote)
        raise

    metrics.received.labels("callback", event_type_label(event.event_type)).inc()
    dedup = app[DEDUP_KEY]
    if dedup is not None and dedup.seen(event):
        metrics.duplicates.labels("callback").inc()
        return web.json_response({"status": "duplicate"})
    forwarder = app[FORWARDER_KEY]
    try:
        if forwarder is None:
            answer = await _publish(app[SINK_KEY], event, received_at)
        else:
            answer = await _publish_or_spool(app, forwarder, event, received_at)
    except PublishFailed as exc:
        logger.warning("callback %s key=%s not acked: %s", event.event_type, event.key, exc.message)
        raise
    if dedup is not None:
        dedup.record(event)
    return web.json_response(answer)


async def _publish(
    sink: Sink, event: VodEvent, received_at: datetime, timeout_s: float | None = None
) -> dict[str, Any]:
    ack = await sink.publish(event, source="callback", received_at=received_at, timeout_s=timeout_s)
    return {"status": "published", "topic": ack.topic, "partition": ack.partition, "offset": ack.offset}


async def _publish_or_spool(
    app: web.Application, forwarder: SpoolForwarder, event: VodEvent, received_at: datetime
) -> dict[str, Any]:
    """Kafka first, within the publish budget; the spool when Kafka cannot ack in time.

    While older events wait in the spool, new ones queue behind them, so forwarding keeps arrival order.
    """
    sink = app[SINK_KEY]
    if forwarder.depth == 0 and sink.ready:
        try:
            return await _publish(sink, event, received_at, app[SETTINGS_KEY].spool.publish_budget_s)
        except PublishFailed as exc:
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
    limit = request.app[SETTINGS_KEY].http.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes") from None
    if not body:
        raise InvalidPayload("empty body: expected a VOD event JSON object", reason="empty_body")
    return body


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body ``{"error": code, "message": ...}`` with the error's own status."""
    try:
        return await handler(request)
    except BridgeError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, PublishFailed) else None
        return web.json_response(error_body(exc.code, exc.message), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response(error_body(code, exc.reason), status=exc.status, headers=_allow(exc))
    except Exception:
        # A bug must not take the service down or leak internals; VOD will retry the event.
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("internal_error", "internal error"), status=500)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
