"""The HTTP conventions of the bridge: JSON answers and one error middleware for every route."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Final

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.errors import BodyTimeout, BridgeError, PayloadTooLarge, PublishFailed, UnsupportedEncoding

logger = logging.getLogger(__name__)


class ClientGone(BridgeError):
    """The client hung up mid-request; nobody will read an answer."""

    code = "client_disconnected"


class ExpectationFailed(BridgeError):
    """An ``Expect`` header other than ``100-continue`` (RFC 9110 10.1.1): 417."""

    status = HTTPStatus.EXPECTATION_FAILED
    code = "expectation_failed"


_BODY_NOT_READ = (PayloadTooLarge, UnsupportedEncoding, BodyTimeout, ClientGone)


def json_answer(body: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with msgspec (about 5x cheaper than aiohttp's json.dumps)."""
    return web.Response(
        body=_json_encoder.encode(body), status=status, headers=headers, content_type="application/json"
    )


_json_encoder: Final = msgspec.json.Encoder()

#: ``{"status":"published","topic":<topic>,"partition":`` per topic. Topics come from the configuration (a
#: handful); the bound only guards against a sink reporting topics we never configured.
_published_prefixes: dict[str, bytes] = {}
_MAX_CACHED_TOPICS: Final = 256


def published_answer(topic: str, partition: int, offset: int) -> web.Response:
    """``json_answer({"status": "published", "topic": ..., "partition": ..., "offset": ...})``, byte for byte,
    from a prebuilt prefix: the answer to almost every callback."""
    prefix = _published_prefixes.get(topic)
    if prefix is None:
        prefix = b'{"status":"published","topic":' + _json_encoder.encode(topic) + b',"partition":'
        if len(_published_prefixes) < _MAX_CACHED_TOPICS:
            _published_prefixes[topic] = prefix
    return web.Response(body=b'%s%d,"offset":%d}' % (prefix, partition, offset), content_type="application/json")


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
        # The route pattern, not request.path: a path segment may be the secret callback token.
        logger.exception("unhandled error on %s %s", request.method, _route(request))
        return json_answer(error_body("internal_error", "internal error"), status=500)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"
