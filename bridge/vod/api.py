"""Tencent Cloud VOD API 3.0 client: ``PullEvents`` / ``ConfirmEvents`` (and the read-only
``DescribeEventConfig`` that ``vod-bridge check`` calls) with TC3-HMAC-SHA256 signing.

Contracts:

* :func:`sign_request` is pure (no I/O, no clock): same inputs, same headers. It reproduces the official
  SDK (``tencentcloud-sdk-python-common``: ``Sign.sign_tc3`` and
  ``AbstractClient._build_req_with_tc3_signature`` / ``_get_tc3_signature``) byte for byte.
* :class:`VodClient` never owns the :class:`aiohttp.ClientSession` it is given (it neither creates nor
  closes it) and never retries: every failure surfaces once, as a typed :class:`UpstreamError` subclass
  whose ``retriable`` flag tells the caller whether trying again can help.
* Secrets (secret key, session token, the ``Authorization`` header) never reach a log record, an exception
  message or a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from bridge.errors import ConfigError, UpstreamError
from bridge.secretfile import read_setting

__all__ = [
    "API_VERSION",
    "DEFAULT_ENDPOINT",
    "JSON_CONTENT_TYPE",
    "MAX_CONFIRM_HANDLES",
    "SERVICE",
    "Credentials",
    "EventConfig",
    "VodApiError",
    "VodClient",
    "VodRateLimited",
    "VodTransportError",
    "is_retriable_code",
    "sign_request",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

API_VERSION = "2018-07-17"
SERVICE = "vod"
DEFAULT_ENDPOINT = "https://vod.tencentcloudapi.com"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
#: ``ConfirmEvents.EventHandles`` array length limit (API docs, product 266 page 33434/34184).
MAX_CONFIRM_HANDLES = 16
#: PullEvents hangs up to 5 s when there is nothing to return; Tencent recommends a 10 s client timeout
#: (API docs, "PullEvents", product 266 page 33433/34183).
DEFAULT_REQUEST_TIMEOUT_S = 10.0
#: Upper bound on a response body we are willing to buffer (16 events, each possibly large).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

_ALGORITHM = "TC3-HMAC-SHA256"
_SIGNED_HEADERS = "content-type;host"


# --------------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------------


def _mask(secret_id: str) -> str:
    """``AKIDabcdefgh1234`` -> ``AKID****1234``; short ids are fully masked."""
    if len(secret_id) < 12:
        return "****"
    return f"{secret_id[:4]}****{secret_id[-4:]}"


def _is_header_safe(value: str) -> bool:
    """Printable ASCII without whitespace: safe inside an HTTP header and in the TC3 credential scope."""
    return value.isascii() and value.isprintable() and not any(c.isspace() for c in value)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A Tencent Cloud API key pair, plus a session token for temporary (STS) credentials.

    ``repr``/``str`` show only a masked ``secret_id``; the key and the token are never rendered.
    Raises ``ValueError`` (without the values) when a field is empty or not header-safe.
    """

    secret_id: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("secret_id", "secret_key"):
            value = getattr(self, name)
            if not value or not _is_header_safe(value):
                raise ValueError(f"{name} must be non-empty printable ASCII without whitespace")
        if self.token is not None and (not self.token or not _is_header_safe(self.token)):
            raise ValueError("token must be non-empty printable ASCII without whitespace")

    def __repr__(self) -> str:
        token = "<set>" if self.token else None
        return f"Credentials(secret_id={_mask(self.secret_id)!r}, secret_key='<hidden>', token={token!r})"

    __str__ = __repr__

    @property
    def masked_id(self) -> str:
        """The secret id as it may appear in logs."""
        return _mask(self.secret_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Credentials | None:
        """Read ``TENCENTCLOUD_SECRET_ID`` / ``_SECRET_KEY`` / ``_SESSION_TOKEN`` (or each one's ``_FILE``).

        A ``_FILE`` variable names a file whose content (whitespace-stripped) is the value; setting both a
        variable and its ``_FILE`` variant is an error. Returns ``None`` when neither the id nor the key is
        set (a lone session token is then ignored, with a warning). Raises :class:`ConfigError` when only
        one of id/key is set, a file cannot be read or a value is malformed; messages name variables and
        files, never their content.
        """
        secret_id = read_setting(environ, "TENCENTCLOUD_SECRET_ID")
        secret_key = read_setting(environ, "TENCENTCLOUD_SECRET_KEY")
        token = read_setting(environ, "TENCENTCLOUD_SESSION_TOKEN")
        if not secret_id and not secret_key:
            if token:
                logger.warning("TENCENTCLOUD_SESSION_TOKEN is set without a secret id/key pair; ignoring it")
            return None
        if not secret_id or not secret_key:
            present, missing = (
                ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY")
                if secret_id
                else ("TENCENTCLOUD_SECRET_KEY", "TENCENTCLOUD_SECRET_ID")
            )
            raise ConfigError(f"{present} is set but {missing} (or {missing}_FILE) is not; set both or neither")
        try:
            return cls(secret_id=secret_id, secret_key=secret_key, token=token or None)
        except ValueError as exc:
            # The ValueError message names the field only, never the value.
            raise ConfigError(f"invalid Tencent Cloud credentials: {exc}") from None


# --------------------------------------------------------------------------------------------------------
# Signing (sans I/O)
# --------------------------------------------------------------------------------------------------------


def _hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sign_request(
    *,
    credentials: Credentials,
    action: str,
    payload: bytes,
    timestamp: int,
    host: str,
    region: str | None,
    version: str = API_VERSION,
    service: str = SERVICE,
    content_type: str = JSON_CONTENT_TYPE,
) -> dict[str, str]:
    """Every header of a signed ``POST /`` API 3.0 request carrying ``payload`` (TC3-HMAC-SHA256).

    Mirrors the official SDK exactly: canonical request
    ``POST\\n/\\n\\ncontent-type:<ct>\\nhost:<host>\\n\\ncontent-type;host\\n<sha256(payload)>``, string to
    sign ``TC3-HMAC-SHA256\\n<timestamp>\\n<date>/<service>/tc3_request\\n<sha256(canonical)>`` and the
    HMAC chain ``"TC3"+key`` -> date -> service -> ``tc3_request`` -> string to sign. ``date`` is the UTC
    date of ``timestamp``. ``host`` and ``content_type`` are signed as given (pass them lower-case).
    """
    date = datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d")
    canonical_headers = f"content-type:{content_type}\nhost:{host}\n"
    canonical_request = "\n".join(
        ("POST", "/", "", canonical_headers, _SIGNED_HEADERS, hashlib.sha256(payload).hexdigest())
    )
    credential_scope = f"{date}/{service}/tc3_request"
    string_to_sign = "\n".join(
        (
            _ALGORITHM,
            str(timestamp),
            credential_scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        )
    )
    k_date = _hmac_sha256(("TC3" + credentials.secret_key).encode("utf-8"), date)
    k_service = _hmac_sha256(k_date, service)
    k_signing = _hmac_sha256(k_service, "tc3_request")
    signature = hmac.new(k_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()

    headers = {
        "Authorization": (
            f"{_ALGORITHM} Credential={credentials.secret_id}/{credential_scope}, "
            f"SignedHeaders={_SIGNED_HEADERS}, Signature={signature}"
        ),
        "Content-Type": content_type,
        "Host": host,
        "X-TC-Action": action,
        "X-TC-Timestamp": str(timestamp),
        "X-TC-Version": version,
    }
    if region:
        headers["X-TC-Region"] = region
    if credentials.token:
        headers["X-TC-Token"] = credentials.token
    return headers


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------

# Classification of API 3.0 error codes (common error codes: Tencent Cloud API docs, "Error Codes").
# Retriable: throttling and server-side trouble. Not retriable: the request, the key or the permissions are
# wrong and sending it again cannot change that. Anything else (e.g. FailedOperation, or ResourceNotFound,
# which the Go SDK lists for PullEvents without documenting its meaning) defaults to retriable, so a poller
# backs off rather than gives up.
_RETRIABLE_PREFIXES = (
    "RequestLimitExceeded",
    "InternalError",
    "ResourceUnavailable",
    "ResourceInsufficient",
)
_NON_RETRIABLE_PREFIXES = (
    "AuthFailure",
    "InvalidParameter",  # also InvalidParameterValue.*
    "UnauthorizedOperation",
    "MissingParameter",
    "UnknownParameter",
    "InvalidAction",
    "InvalidRequest",
    "ActionOffline",
    "NoSuchProduct",
    "NoSuchVersion",
    "UnsupportedOperation",
    "UnsupportedProtocol",
    "UnsupportedRegion",
    "IpInBlacklist",
    "IpNotInWhitelist",
    "OperationDenied",
    "FailedOperation.InvalidVodUser",  # VOD not enabled for the account
)


def is_retriable_code(api_code: str) -> bool:
    """Whether an API 3.0 ``Error.Code`` is worth retrying (after a back-off)."""
    if api_code.startswith(_RETRIABLE_PREFIXES):
        return True
    return not api_code.startswith(_NON_RETRIABLE_PREFIXES)


class VodApiError(UpstreamError):
    """The VOD API answered ``Response.Error`` (HTTP 200). ``api_code`` is ``Error.Code``."""

    code = "vod_api_error"

    def __init__(self, message: str, *, api_code: str, request_id: str, retriable: bool, action: str = "") -> None:
        super().__init__(message, api_code=api_code, request_id=request_id, retriable=retriable)
        self.action = action


class VodRateLimited(VodApiError):
    """``RequestLimitExceeded*``: always retriable, after backing off."""

    code = "vod_rate_limited"


class VodTransportError(UpstreamError):
    """No usable API answer: connection error, timeout, non-200 HTTP status or an unparseable body."""

    code = "vod_unreachable"

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = True,
        request_id: str = "",
        action: str = "",
        http_status: int = 0,
    ) -> None:
        super().__init__(message, api_code="", request_id=request_id, retriable=retriable)
        self.action = action
        #: HTTP status of the upstream answer when one was received, else 0 (``status`` is ours, 502).
        self.http_status = http_status


# --------------------------------------------------------------------------------------------------------
# Wire structures (module-level encoders/decoders, built once)
# --------------------------------------------------------------------------------------------------------


class _PullEventsRequest(msgspec.Struct, rename="pascal", omit_defaults=True):
    sub_app_id: int | None = None


class _ConfirmEventsRequest(msgspec.Struct, rename="pascal", omit_defaults=True):
    event_handles: list[str]
    sub_app_id: int | None = None


class _DescribeEventConfigRequest(msgspec.Struct, rename="pascal", omit_defaults=True):
    sub_app_id: int | None = None


class _ApiErrorBody(msgspec.Struct, rename="pascal"):
    code: str = ""
    message: str = ""


class _PullEventsResponse(msgspec.Struct, rename="pascal"):
    request_id: str = ""
    error: _ApiErrorBody | None = None
    # Each event stays raw JSON: the caller decodes it (unknown event types must pass through untouched).
    event_set: list[msgspec.Raw] | None = None


class _PullEventsEnvelope(msgspec.Struct, rename="pascal"):
    response: _PullEventsResponse


class _ConfirmEventsResponse(msgspec.Struct, rename="pascal"):
    request_id: str = ""
    error: _ApiErrorBody | None = None


class _ConfirmEventsEnvelope(msgspec.Struct, rename="pascal"):
    response: _ConfirmEventsResponse


class EventConfig(msgspec.Struct, frozen=True):
    """What ``DescribeEventConfig`` says about how the application receives event notifications.

    Only the mode is kept: the answer's ``NotificationUrl`` may embed the callback token.
    """

    #: ``PUSH``: normal callbacks to the notification URL; ``PULL``: reliable callbacks (PullEvents).
    mode: str


class _DescribeEventConfigResponse(msgspec.Struct, rename="pascal"):
    request_id: str = ""
    error: _ApiErrorBody | None = None
    mode: str = ""


class _DescribeEventConfigEnvelope(msgspec.Struct, rename="pascal"):
    response: _DescribeEventConfigResponse


_ENCODER = msgspec.json.Encoder()
_PULL_DECODER = msgspec.json.Decoder(_PullEventsEnvelope)
_CONFIRM_DECODER = msgspec.json.Decoder(_ConfirmEventsEnvelope)
_EVENT_CONFIG_DECODER = msgspec.json.Decoder(_DescribeEventConfigEnvelope)


# --------------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------------


def _parse_endpoint(endpoint: str) -> tuple[str, str]:
    """``(url, host)`` for an ``http(s)://host[:port][/]`` endpoint; ``host`` is what we sign and send."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"VOD endpoint must be an http(s) URL with a host, got {endpoint!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"VOD endpoint must not carry a path, query or user info, got {endpoint!r}")
    hostname = parts.hostname  # lower-cased by urlsplit
    if ":" in hostname:
        hostname = f"[{hostname}]"
    port = parts.port
    default_port = 443 if parts.scheme == "https" else 80
    host = hostname if port is None or port == default_port else f"{hostname}:{port}"
    return f"{parts.scheme}://{host}/", host


class VodClient:
    """Calls ``PullEvents`` / ``ConfirmEvents`` (and ``DescribeEventConfig``) on the VOD API with an injected,
    caller-owned session.

    Thread-unsafe but coroutine-safe (no shared mutable state besides the session). Never retries.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        region: str | None = None,
        sub_app_id: int | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if region is not None and not _is_header_safe(region):
            raise ValueError("region must be printable ASCII without whitespace")
        self._session = session
        self._credentials = credentials
        self._url, self._host = _parse_endpoint(endpoint)
        self._region = region or None
        self._sub_app_id = sub_app_id
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._clock = clock

    @property
    def endpoint(self) -> str:
        """The URL requests are POSTed to."""
        return self._url

    @property
    def sub_app_id(self) -> int | None:
        """The ``SubAppId`` every PullEvents and ConfirmEvents of this client carries (None: not sent)."""
        return self._sub_app_id

    async def pull_events(self) -> list[bytes]:
        """Pull up to 16 events; each item is one ``EventContent`` (with ``EventHandle``) as raw JSON bytes.

        A ``null``/missing ``EventSet`` yields ``[]``. May take up to ~5 s (server-side long poll).
        Raises :class:`VodApiError` (:class:`VodRateLimited`) or :class:`VodTransportError`.

        "No events" is an empty/null ``EventSet``, not an error: the API docs (product 266 page 33433)
        describe a long poll that returns when events exist or after up to 5 s, and document ``EventSet`` as
        possibly null; no error code for "no events" is documented (the Go SDK lists FailedOperation,
        FailedOperation.InvalidVodUser, InternalError, InvalidParameterValue, ResourceNotFound and
        UnauthorizedOperation for PullEvents, without a "no event" meaning), and Tencent's own sample server
        (tencentyun/vod-xiaoshipin-server, tasks/reliable_cb_task.js) treats an empty EventSet as "nothing".
        So every ``Error`` is raised as such.
        """
        payload = _ENCODER.encode(_PullEventsRequest(sub_app_id=self._sub_app_id))
        body = await self._call("PullEvents", payload)
        envelope = self._decode(_PULL_DECODER, "PullEvents", body)
        response = envelope.response
        if response.error is not None:
            raise self._api_error("PullEvents", response.error, response.request_id)
        events = [bytes(raw) for raw in response.event_set or ()]
        logger.debug("PullEvents returned %d event(s) (RequestId %s)", len(events), response.request_id)
        return events

    async def confirm_events(self, handles: Sequence[str]) -> None:
        """Confirm 1..16 ``EventHandle`` values (raises ``ValueError`` otherwise, before any I/O).

        A handle older than 30 s is refused by VOD with a parameter error (ConfirmEvents docs, product 266
        page 33434); that arrives here as a non-retriable :class:`VodApiError` and the events concerned
        will simply be delivered again. Raises :class:`VodApiError` or :class:`VodTransportError`.
        """
        if isinstance(handles, str):
            raise TypeError("handles must be a sequence of strings, not a string")
        if not handles:
            raise ValueError("confirm_events needs at least one event handle")
        if len(handles) > MAX_CONFIRM_HANDLES:
            raise ValueError(
                f"confirm_events accepts at most {MAX_CONFIRM_HANDLES} handles per call, got {len(handles)}"
            )
        handle_list = list(handles)
        if not all(isinstance(h, str) and h for h in handle_list):
            raise ValueError("event handles must be non-empty strings")
        payload = _ENCODER.encode(_ConfirmEventsRequest(event_handles=handle_list, sub_app_id=self._sub_app_id))
        body = await self._call("ConfirmEvents", payload)
        envelope = self._decode(_CONFIRM_DECODER, "ConfirmEvents", body)
        response = envelope.response
        if response.error is not None:
            raise self._api_error("ConfirmEvents", response.error, response.request_id)
        logger.debug("ConfirmEvents confirmed %d handle(s) (RequestId %s)", len(handle_list), response.request_id)

    async def describe_event_config(self) -> EventConfig:
        """The application's event notification mode, read-only: unlike PullEvents it hands out no event, so it
        proves the credentials, region and ``SubAppId`` without taking an event from the poller.

        Needs the CAM permission ``vod:DescribeEventConfig``. Raises :class:`VodApiError` or
        :class:`VodTransportError`.
        """
        payload = _ENCODER.encode(_DescribeEventConfigRequest(sub_app_id=self._sub_app_id))
        body = await self._call("DescribeEventConfig", payload)
        response = self._decode(_EVENT_CONFIG_DECODER, "DescribeEventConfig", body).response
        if response.error is not None:
            raise self._api_error("DescribeEventConfig", response.error, response.request_id)
        return EventConfig(mode=response.mode)

    # -- internals -----------------------------------------------------------------------------------------

    async def _call(self, action: str, payload: bytes) -> bytes:
        """POST one signed request; return the body of an HTTP 200 answer or raise VodTransportError."""
        headers = sign_request(
            credentials=self._credentials,
            action=action,
            payload=payload,
            timestamp=int(self._clock()),
            host=self._host,
            region=self._region,
        )
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url, data=payload, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                request_id = resp.headers.get("X-TC-RequestId", "")
                if status != 200:
                    retriable = status >= 500 or status in (408, 425, 429)
                    logger.debug("%s: HTTP %d after %.3fs", action, status, time.monotonic() - started)
                    raise VodTransportError(
                        f"VOD {action}: unexpected HTTP status {status}",
                        retriable=retriable,
                        request_id=request_id,
                        action=action,
                        http_status=status,
                    )
                body = await self._read_limited(resp, action)
        except VodTransportError:
            raise
        except TimeoutError:
            logger.debug("%s: timed out after %.3fs", action, time.monotonic() - started)
            raise VodTransportError(f"VOD {action}: no answer within {self._timeout.total}s", action=action) from None
        except aiohttp.ClientError as exc:
            # Only the exception class and its str(): aiohttp's repr of some errors embeds the request
            # headers (Authorization, X-TC-Token), so the original is not chained either.
            logger.debug("%s: %s after %.3fs", action, type(exc).__name__, time.monotonic() - started)
            raise VodTransportError(
                f"VOD {action}: {type(exc).__name__}: {self._redact(str(exc))}", action=action
            ) from None
        logger.debug("%s: HTTP 200, %d bytes in %.3fs", action, len(body), time.monotonic() - started)
        return body

    @staticmethod
    async def _read_limited(resp: aiohttp.ClientResponse, action: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise VodTransportError(f"VOD {action}: response larger than {MAX_RESPONSE_BYTES} bytes", action=action)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _decode(decoder: msgspec.json.Decoder[_T], action: str, body: bytes) -> _T:
        try:
            return decoder.decode(body)
        except msgspec.DecodeError as exc:  # includes ValidationError (valid JSON, unexpected shape)
            raise VodTransportError(f"VOD {action}: unparseable response: {exc}", action=action) from None

    def _api_error(self, action: str, error: _ApiErrorBody, request_id: str) -> VodApiError:
        api_code = error.code or "UnknownError"
        text = self._redact(error.message)[:500]
        message = f"VOD {action} failed: {api_code}: {text} (RequestId {request_id or '-'})"
        logger.debug("%s failed: %s (RequestId %s)", action, api_code, request_id)
        cls = VodRateLimited if api_code.startswith("RequestLimitExceeded") else VodApiError
        return cls(
            message,
            api_code=api_code,
            request_id=request_id,
            retriable=is_retriable_code(api_code),
            action=action,
        )

    def _redact(self, text: str) -> str:
        """Defence in depth: blank out our own key/token should a server or library ever echo them."""
        for secret in (self._credentials.secret_key, self._credentials.token):
            if secret:
                text = text.replace(secret, "***")
        # The id is not a secret like the key, but it is only ever shown masked.
        return text.replace(self._credentials.secret_id, self._credentials.masked_id)
