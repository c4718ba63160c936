"""The normal-callback source: ``POST <callback_path>`` → read and decode the body → delivery → HTTP answer.

200 only after the delivery acknowledged the record (Kafka, or the fsync'ed spool). Authentication comes first
(allow-list and URL token before the body is read, Sign/T right after it is parsed), so a stranger's body is
refused (401/403) and never reaches Kafka, not even the dead-letter topic.

The paths (:func:`callback_paths`): ``<callback_path>``, ``<callback_path>/<SubAppId>`` and, with a token,
``<callback_path>/<token>`` and ``<callback_path>/<SubAppId>/<token>``. A SubAppId segment is a positive decimal
(``SUB_APP_ID_PATTERN``); tokens are never digits only (``bridge.config``), so no path reads both ways. The
SubAppId of the path becomes the record's ``vod-sub-app-id`` header: VOD's bodies carry none (SDK
``EventContent`` has no such field), so a VOD application is told apart by the ``NotificationUrl`` it was given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from bridge.config import SUB_APP_ID_PATTERN, HttpSettings
from bridge.delivery.pipeline import DeadLettered, Delivery, Duplicate, Failed, Published, Refused, Spooled
from bridge.errors import (
    AuthFailed,
    BodyTimeout,
    Forbidden,
    InvalidPayload,
    PayloadTooLarge,
    UnsupportedEncoding,
)
from bridge.ops.logs import describe_parse_error
from bridge.ops.metrics import Metrics
from bridge.ops.tracing import NO_SPAN, EventSpan, EventTracer, tracing_off
from bridge.sources.access import SourceFilter, verify_token
from bridge.sources.http import ClientGone, ExpectationFailed, error_body, json_answer, published_answer
from bridge.vod.decode import read_event
from bridge.vod.signing import verify_sign

logger = logging.getLogger(__name__)

#: ``match_info`` names of the path segments.
_SUB_APP_ID = "sub_app_id"
_TOKEN = "token"


def callback_paths(callback_path: str, *, with_token: bool) -> list[str]:
    """The aiohttp route paths the receiver answers, in the order they must be registered.

    A path SubAppId is registered before the token segment so that a digits-only segment is always read as a
    SubAppId; configuration refuses digits-only tokens, so no genuine token is ever taken for one.
    """
    base = callback_path.rstrip("/")
    sub_app = f"{base}/{{{_SUB_APP_ID}:{SUB_APP_ID_PATTERN}}}"
    paths = [callback_path, sub_app]
    if with_token:
        paths += [f"{base}/{{{_TOKEN}}}", f"{sub_app}/{{{_TOKEN}}}"]
    return paths


class CallbackReceiver:
    """The aiohttp handler of VOD's normal callback, with its collaborators passed in."""

    def __init__(
        self,
        delivery: Delivery,
        settings: HttpSettings,
        metrics: Metrics,
        tracer: EventTracer,
        *,
        source_filter: SourceFilter,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self._delivery = delivery
        self._settings = settings
        self._metrics = metrics
        self._tracer = tracer
        self._source_filter = source_filter
        self._clock_s = clock_s
        # Per-request work skipped when nothing asks for it: a span when tracing is off, the source checks
        # when there is neither an allow-list nor a token.
        self._traced = not tracing_off(tracer)
        self._check_source = source_filter.active or settings.token is not None

    async def handle(self, request: web.Request) -> web.Response:
        """Deliver one VOD callback. 200 means the record is acknowledged (acks=all, or fsync'ed spool)."""
        if not self._traced:
            return await self._handle(request, NO_SPAN)
        with self._tracer.span("vod.callback", request.headers) as span:
            return await self._handle(request, span)

    async def _handle(self, request: web.Request, span: EventSpan) -> web.Response:
        received_at = datetime.now(UTC)
        settings = self._settings
        try:
            if self._check_source:
                self._authorize_source(request)
            body = await self._read_body(request)
            item = read_event(body)
            if settings.sign_key is not None:
                verify_sign(
                    item.sign,
                    item.expires_at_text,
                    sign_key=settings.sign_key,
                    now_s=self._clock_s(),
                    skew_s=settings.sign_skew_s,
                    # VOD's default expiry: Tencent documents no longer one for callbacks.
                    max_ttl_s=settings.sign_max_ttl_s,
                )
        except (InvalidPayload, AuthFailed) as exc:
            self._reject(request, exc.reason, exc.message)
            raise
        except (Forbidden, PayloadTooLarge, UnsupportedEncoding, BodyTimeout, ClientGone) as exc:
            self._reject(request, exc.code, exc.message)
            raise
        span.annotate(item)
        sub_app_text = request.match_info.get(_SUB_APP_ID)
        outcome = await self._delivery.deliver(
            item,
            source="callback",
            received_at=received_at,
            # The route admits only SUB_APP_ID_PATTERN, so this is a positive integer below 2**63.
            sub_app_id=None if sub_app_text is None else int(sub_app_text),
            trace_headers=span.kafka_headers(),
        )
        if isinstance(outcome, Published):  # nearly every callback: no pattern matching, a prebuilt answer
            return published_answer(outcome.topic, outcome.partition, outcome.offset)
        match outcome:
            case Spooled(seq):
                return json_answer({"status": "spooled", "seq": seq})
            case Duplicate():
                return json_answer({"status": "duplicate"})
            case DeadLettered(topic, partition, offset, reason):
                return json_answer(
                    {
                        "status": "dead_lettered",
                        "reason": reason,
                        "topic": topic,
                        "partition": partition,
                        "offset": offset,
                    }
                )
            case Refused(error):
                self._reject(request, error.reason, error.message)
                raise error
            case Failed(error):
                raise error

    def _reject(self, request: web.Request, reason: str, message: str) -> None:
        """Count and log one refused callback: the reason, never the payload."""
        self._metrics.rejected.labels("callback", reason).inc()
        logger.info("rejected callback from %s: %s (%s)", request.remote, reason, message, extra={"reason": reason})

    def _authorize_source(self, request: web.Request) -> None:
        """IP allow-list, then the URL token; both before the body is read."""
        # Every header line, in order: a proxy that adds its own line (HAProxy ``option forwardfor``) leaves the
        # client's forged line first, so reading only the first line would believe the client.
        self._source_filter.check(request.remote, request.headers.getall("X-Forwarded-For", []))
        token = self._settings.token
        if token is not None:
            verify_token(request.match_info.get(_TOKEN) or request.query.get("token"), token)

    async def _read_body(self, request: web.Request) -> bytes:
        settings = self._settings
        check_declared_size(request, settings.max_body_bytes)
        encoding = request.headers.get("Content-Encoding")
        if encoding is not None and (encoding := encoding.strip().lower()) not in ("", "identity"):
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
        except (RequestPayloadError, HttpProcessingError) as exc:
            # Not str(exc): a parser message quotes the request's bytes. HttpProcessingError itself arrives when
            # the pure-Python parser fails mid-body (llhttp's failures come wrapped in RequestPayloadError).
            described = describe_parse_error(exc) or type(exc).__name__
            raise InvalidPayload(f"unreadable body ({described})", reason="unreadable_body") from None
        except ConnectionResetError:
            raise ClientGone("client disconnected while sending its body") from None
        if not body:
            raise InvalidPayload("empty body: expected a VOD event JSON object", reason="empty_body")
        return body

    async def expect_continue(self, request: web.Request) -> web.Response | None:
        """``Expect: 100-continue``: the same checks, in the same order, as without the header (allow-list and
        token, then the declared size), before inviting the client to send its body.

        Returns the JSON refusal (counted and logged like any other) or None after writing ``100 Continue``.
        aiohttp runs expect handlers outside the middleware chain, so the answer is built here.
        """
        try:
            if self._check_source:
                self._authorize_source(request)
            expect = request.headers.get("Expect", "")
            if request.version >= HttpVersion11 and expect.strip().lower() != "100-continue":
                raise ExpectationFailed(f"Expect {expect[:40]!r} is not supported; send 100-continue or nothing")
            check_declared_size(request, self._settings.max_body_bytes)
        except (AuthFailed, Forbidden, PayloadTooLarge, ExpectationFailed) as exc:
            self._reject(request, exc.reason if isinstance(exc, AuthFailed) else exc.code, exc.message)
            response = json_answer(error_body(exc.code, exc.message), status=exc.status)
            # The client holds its body back until it sees 100: nothing to linger on, the connection is done.
            response.force_close()
            return response
        if request.version >= HttpVersion11:  # an HTTP/1.0 client does not wait for an interim answer
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # As aiohttp's own expect handler: the 100 is not part of the response's size.
            request.writer.output_size = 0
        return None


def check_declared_size(request: web.BaseRequest, limit: int) -> None:
    """Raise :class:`PayloadTooLarge` when the declared ``Content-Length`` exceeds ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
