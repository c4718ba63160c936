"""A fake Tencent Cloud VOD API 3.0 server (``PullEvents`` / ``ConfirmEvents`` / ``DescribeEventConfig``) for tests.

It checks the TC3-HMAC-SHA256 signature of every request with its own implementation, written from
Tencent's "Signature v3" documentation (it does not import ``bridge.vodapi``), and models the reliable
callback queue: events pulled become invisible for ``visibility_timeout_s``; an event whose handle was not
confirmed in time is handed out again with a new handle (at-least-once).

One queue per VOD application: an event added with ``sub_app_id=X`` is handed out only to a PullEvents carrying
``SubAppId: X`` (``None``: a request without SubAppId, the default application), and its handle is confirmed
only by a ConfirmEvents carrying the same SubAppId; under another one it is refused like an unknown handle.

Usage::

    async with FakeVod(secret_id="AKID...", secret_key="...") as vod:
        event_id = vod.add_event({"EventType": "PullComplete", "PullCompleteEvent": {...}})
        client = VodClient(session, creds, endpoint=vod.endpoint)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = ["ConfirmedHandle", "FakeVod", "RecordedRequest", "SignatureRejected", "verify_tc3_signature"]

API_VERSION = "2018-07-17"
SERVICE = "vod"
MAX_CONFIRM_HANDLES = 16


class SignatureRejected(Exception):
    """The request is not validly signed; ``code`` is the API 3.0 ``AuthFailure.*`` code to answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def verify_tc3_signature(
    *,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    credentials_by_id: dict[str, str],
    now: float,
    service: str = SERVICE,
    max_skew_s: float = 300.0,
) -> str:
    """Check a TC3-HMAC-SHA256 request; return its SecretId or raise :class:`SignatureRejected`.

    ``headers`` must have lower-case names. Implements the documented algorithm: canonical headers are the
    ``SignedHeaders`` listed in ``Authorization``, each ``name:value`` with the value trimmed and
    lower-cased; canonical query string is the raw query; the payload hash is SHA-256 of the raw body.
    """
    auth = headers.get("authorization", "")
    algorithm, _, rest = auth.partition(" ")
    if algorithm != "TC3-HMAC-SHA256":
        raise SignatureRejected("AuthFailure.InvalidAuthorization", "Authorization is not TC3-HMAC-SHA256.")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureRejected("AuthFailure.InvalidAuthorization", "Malformed Authorization header.")
        fields[name] = value
    try:
        credential, signed_headers, signature = (
            fields["Credential"],
            fields["SignedHeaders"],
            fields["Signature"],
        )
        secret_id, date, scope_service, terminator = credential.split("/")
    except (KeyError, ValueError):
        raise SignatureRejected("AuthFailure.InvalidAuthorization", "Malformed Authorization header.") from None
    if terminator != "tc3_request" or scope_service != service:
        raise SignatureRejected("AuthFailure.InvalidAuthorization", "Bad credential scope.")
    signed = signed_headers.split(";")
    if "content-type" not in signed or "host" not in signed or signed != sorted(signed):
        raise SignatureRejected("AuthFailure.InvalidAuthorization", "SignedHeaders must include content-type;host.")
    secret_key = credentials_by_id.get(secret_id)
    if secret_key is None:
        raise SignatureRejected("AuthFailure.SecretIdNotFound", "The SecretId is not found.")
    try:
        timestamp = int(headers.get("x-tc-timestamp", ""))
    except ValueError:
        raise SignatureRejected("AuthFailure.InvalidAuthorization", "X-TC-Timestamp is missing.") from None
    if abs(now - timestamp) > max_skew_s:
        raise SignatureRejected("AuthFailure.SignatureExpire", "The signature expired.")
    if datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d") != date:
        raise SignatureRejected("AuthFailure.SignatureFailure", "Credential date does not match timestamp.")

    canonical_headers = "".join(f"{name}:{headers.get(name, '').strip().lower()}\n" for name in signed)
    canonical_request = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{_sha256_hex(body)}"
    string_to_sign = (
        f"TC3-HMAC-SHA256\n{timestamp}\n{date}/{service}/tc3_request\n{_sha256_hex(canonical_request.encode('utf-8'))}"
    )
    key = _hmac(_hmac(_hmac(f"TC3{secret_key}".encode(), date), service), "tc3_request")
    expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureRejected(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated. Please check your signature is correct.",
        )
    return secret_id


@dataclass
class _Event:
    event_id: str
    content: dict[str, Any]
    sub_app_id: int | None = None
    invisible_until: float = 0.0
    handle: str | None = None


@dataclass(frozen=True)
class ConfirmedHandle:
    """One handle of one ConfirmEvents call that reached the queue, whatever became of it."""

    handle: str
    #: The ``SubAppId`` of the ConfirmEvents call (None: not sent).
    sub_app_id: int | None
    #: The ``SubAppId`` of the PullEvents that handed the handle out (None also for an unknown handle).
    pulled_under: int | None
    accepted: bool


@dataclass
class _Fault:
    code: str
    message: str
    http_status: int = 200
    raw_body: bytes | None = None
    #: No answer at all until the fake closes (a VOD endpoint that hangs).
    hang: bool = False
    #: Only a call of this action takes the fault; None: the next call of any action.
    action: str | None = None


@dataclass
class RecordedRequest:
    """One request that reached the fake (after the signature check, if it passed)."""

    action: str
    params: dict[str, Any]
    outcome: str  # "ok" or the error code answered
    headers: dict[str, str] = field(repr=False, default_factory=dict)


class FakeVod:
    """In-memory VOD event queue behind a real HTTP server on ``127.0.0.1`` (random port).

    Observable state: ``pulls`` (PullEvents calls that were answered with an ``EventSet``), ``pulls_received``
    (PullEvents calls that reached the queue, answered or still held; :meth:`wait_for_pulls`), ``deliveries``
    (``event_id`` -> times handed out), ``confirmed`` (``(handle, event_id, monotonic time)``),
    ``rejected_confirms`` (handles that were expired, unknown, already used or sent under another SubAppId),
    ``confirm_log`` (:class:`ConfirmedHandle` for every handle of every ConfirmEvents that reached the queue),
    ``requests`` (:class:`RecordedRequest` for every signed request) and ``last_authorization``.

    ``DescribeEventConfig`` answers ``event_mode`` (``PULL`` or ``PUSH``). With ``sub_app_ids`` set, a call of any
    action whose ``SubAppId`` is not one of them is answered ``InvalidParameterValue.SubAppId``.

    Expired handles: the ConfirmEvents docs (product 266 page 33434) say a handle older than 30 s gets "a
    parameter error (4000)". So, with ``strict_confirms=True`` (default), a ConfirmEvents call containing
    any expired/unknown handle is answered ``InvalidParameterValue`` -- after the valid handles of the same
    call have been confirmed (the docs do not say whether the call is all-or-nothing; partial success is
    the harder case for a client). ``strict_confirms=False`` answers success and only records them.
    """

    def __init__(
        self,
        *,
        secret_id: str = "AKIDfakeFAKEfake0000",
        secret_key: str = "fake-secret-key-0000",
        token: str | None = None,
        visibility_timeout_s: float = 30.0,
        max_events_per_pull: int = 16,
        pull_delay_s: float = 0.0,
        answer_delay_s: float = 0.0,
        strict_confirms: bool = True,
        max_skew_s: float = 300.0,
        event_mode: str = "PULL",
        sub_app_ids: frozenset[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.token = token
        self.visibility_timeout_s = visibility_timeout_s
        self.max_events_per_pull = max_events_per_pull
        #: Long poll: when nothing is visible, PullEvents waits up to this long for an event.
        self.pull_delay_s = pull_delay_s
        #: A PullEvents answer leaves this long after its events were handed out, their windows already running
        #: (a slow network, a large answer).
        self.answer_delay_s = answer_delay_s
        self.strict_confirms = strict_confirms
        self.max_skew_s = max_skew_s
        self.event_mode = event_mode
        self.notification_url = "https://bridge.example/vod/callback/fake-callback-token-0000"
        self.sub_app_ids = sub_app_ids
        self._clock = clock

        self.pulls = 0
        self.pulls_received = 0
        self.deliveries: dict[str, int] = {}
        self.confirmed: list[tuple[str, str, float]] = []
        self.rejected_confirms: list[str] = []
        self.confirm_log: list[ConfirmedHandle] = []
        self.requests: list[RecordedRequest] = []
        self.last_authorization: str | None = None

        self._events: dict[str, _Event] = {}
        self._handles: dict[str, tuple[str, float]] = {}  # handle -> (event_id, expires_at)
        self._handed_out_under: dict[str, int | None] = {}  # handle -> SubAppId of its PullEvents
        self._faults: list[_Fault] = []
        self._refused_sub_apps: dict[int | None, str] = {}
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._pull_arrived = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeVod:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        self._closed.set()
        self._wake()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test controls ---------------------------------------------------------------------------------------

    def add_event(self, event: dict[str, Any], *, sub_app_id: int | None = None) -> str:
        """Queue an ``EventContent`` (without ``EventHandle``) in the queue of VOD application ``sub_app_id``
        (None: the default application); return its id. Wakes long polls."""
        event_id = f"evt-{next(self._ids)}"
        content = {k: v for k, v in event.items() if k != "EventHandle"}
        self._events[event_id] = _Event(event_id, content, sub_app_id)
        self.deliveries.setdefault(event_id, 0)
        self._wake()
        return event_id

    def fail_next(
        self, n: int, code: str = "InternalError", message: str | None = None, *, action: str | None = None
    ) -> None:
        """Answer the next ``n`` signed API calls (of ``action`` only, if given) with ``Response.Error.Code = code``
        (HTTP 200)."""
        self._faults.extend(_Fault(code, message or f"injected {code}", action=action) for _ in range(n))

    def hang_next(self, n: int, *, action: str | None = None) -> None:
        """Leave the next ``n`` signed API calls (of ``action`` only, if given) unanswered until the fake closes."""
        self._faults.extend(_Fault("", "", hang=True, action=action) for _ in range(n))

    def refuse_sub_app(self, sub_app_id: int | None, code: str = "UnauthorizedOperation") -> None:
        """Answer every signed API call carrying ``SubAppId: sub_app_id`` with ``code`` from now on (a key without
        permission on that application)."""
        self._refused_sub_apps[sub_app_id] = code

    def fail_next_http(self, n: int, status: int = 502, body: bytes = b"<html>bad gateway</html>") -> None:
        """Answer the next ``n`` requests with raw HTTP ``status``/``body`` (200 + junk = unparseable)."""
        self._faults.extend(_Fault("", "", http_status=status, raw_body=body) for _ in range(n))

    @property
    def pending_ids(self) -> list[str]:
        """Ids of events not confirmed yet (visible or in flight), of every application."""
        return list(self._events)

    def pending_for(self, sub_app_id: int | None) -> list[str]:
        """Ids of the events of VOD application ``sub_app_id`` not confirmed yet."""
        return [e.event_id for e in self._events.values() if e.sub_app_id == sub_app_id]

    async def wait_for_pulls(self, count: int, *, timeout_s: float = 10.0) -> None:
        """Return once ``pulls_received >= count``: that many PullEvents calls reached the queue (the last may
        still be held in its long poll). Raises ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while self.pulls_received < count:
                await self._pull_arrived.wait()

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    @staticmethod
    def _error(code: str, message: str) -> dict[str, Any]:
        return {"Error": {"Code": code, "Message": message}}

    def _answer(
        self, action: str, params: dict[str, Any], headers: dict[str, str], payload: dict[str, Any]
    ) -> web.Response:
        """Record the request and wrap ``payload`` as ``{"Response": {..., "RequestId": ...}}`` (HTTP 200)."""
        outcome = payload["Error"]["Code"] if "Error" in payload else "ok"
        self.requests.append(RecordedRequest(action, params, outcome, headers))
        return web.json_response({"Response": {**payload, "RequestId": str(uuid.uuid4())}})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.last_authorization = headers.get("authorization")
        action = headers.get("x-tc-action", "")
        if request.method != "POST":
            return self._answer(action, {}, headers, self._error("UnsupportedProtocol", "Use POST."))
        try:
            verify_tc3_signature(
                method=request.method,
                path=request.rel_url.raw_path,
                query=request.rel_url.raw_query_string,
                headers=headers,
                body=body,
                credentials_by_id={self.secret_id: self.secret_key},
                now=time.time(),
                max_skew_s=self.max_skew_s,
            )
        except SignatureRejected as exc:
            return self._answer(action, {}, headers, self._error(exc.code, exc.message))
        if self.token is not None and headers.get("x-tc-token") != self.token:
            return self._answer(action, {}, headers, self._error("AuthFailure.TokenFailure", "Bad token."))
        if headers.get("x-tc-version") != API_VERSION:
            return self._answer(action, {}, headers, self._error("NoSuchVersion", "Unknown API version."))
        try:
            params = json.loads(body) if body else {}
        except ValueError:
            params = None
        if not isinstance(params, dict):
            return self._answer(action, {}, headers, self._error("InvalidParameter", "Body is not a JSON object."))

        fault = next((f for f in self._faults if f.action in (None, action)), None)
        if fault is not None:
            self._faults.remove(fault)
            if fault.hang:
                self.requests.append(RecordedRequest(action, params, "held", headers))
                await self._closed.wait()
                return web.Response(status=503)
            if fault.raw_body is not None:
                self.requests.append(RecordedRequest(action, params, f"HTTP {fault.http_status}", headers))
                return web.Response(status=fault.http_status, body=fault.raw_body, content_type="text/html")
            return self._answer(action, params, headers, self._error(fault.code, fault.message))

        if self.sub_app_ids is not None and params.get("SubAppId") not in self.sub_app_ids:
            return self._answer(
                action, params, headers, self._error("InvalidParameterValue.SubAppId", "The SubAppId does not exist.")
            )
        refused = self._refused_sub_apps.get(params.get("SubAppId"))
        if refused is not None:
            return self._answer(action, params, headers, self._error(refused, "No permission on this SubAppId."))
        if action == "PullEvents":
            payload = await self._pull_events(params.get("SubAppId"))
        elif action == "ConfirmEvents":
            payload = self._confirm_events(params)
        elif action == "DescribeEventConfig":
            # NotificationUrl as VOD would send it: with a callback token in it, which must never be printed.
            payload = {"Mode": self.event_mode, "NotificationUrl": self.notification_url}
        else:
            payload = self._error("InvalidAction", "The action does not exist.")
        return self._answer(action, params, headers, payload)

    def _visible(self, now: float, sub_app_id: int | None) -> list[_Event]:
        return [e for e in self._events.values() if e.invisible_until <= now and e.sub_app_id == sub_app_id]

    async def _pull_events(self, sub_app_id: int | None) -> dict[str, Any]:
        self.pulls_received += 1
        self._pull_arrived.set()
        self._pull_arrived = asyncio.Event()
        deadline = self._clock() + self.pull_delay_s
        visible = self._visible(self._clock(), sub_app_id)
        while not visible and not self._closing:
            now = self._clock()
            if now >= deadline:
                break
            wait = deadline - now
            in_flight = [e.invisible_until for e in self._events.values() if e.sub_app_id == sub_app_id]
            if in_flight:
                wait = min(wait, max(0.0, min(in_flight) - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            visible = self._visible(self._clock(), sub_app_id)

        now = self._clock()
        event_set = []
        for event in visible[: self.max_events_per_pull]:
            handle = f"EH-{uuid.uuid4().hex}"
            event.handle = handle
            event.invisible_until = now + self.visibility_timeout_s
            self._handles[handle] = (event.event_id, event.invisible_until)
            self._handed_out_under[handle] = sub_app_id
            self.deliveries[event.event_id] = self.deliveries.get(event.event_id, 0) + 1
            event_set.append({"EventHandle": handle, **event.content})
        if self.answer_delay_s > 0 and not self._closing:
            await asyncio.sleep(self.answer_delay_s)
        self.pulls += 1
        return {"EventSet": event_set}

    def _confirm_events(self, params: dict[str, Any]) -> dict[str, Any]:
        handles = params.get("EventHandles")
        if handles is None:
            return self._error("MissingParameter", "EventHandles is required.")
        if not isinstance(handles, list) or not handles or not all(isinstance(h, str) and h for h in handles):
            return self._error("InvalidParameterValue", "EventHandles must be a non-empty list of strings.")
        if len(handles) > MAX_CONFIRM_HANDLES:
            return self._error("InvalidParameterValue", f"EventHandles accepts at most {MAX_CONFIRM_HANDLES}.")
        now = self._clock()
        sub_app_id = params.get("SubAppId")
        rejected = []
        for handle in handles:
            pulled_under = self._handed_out_under.get(handle)
            if pulled_under != sub_app_id:
                # Another application's queue does not know this handle (and keeps it for its own confirm).
                self.confirm_log.append(ConfirmedHandle(handle, sub_app_id, pulled_under, accepted=False))
                rejected.append(handle)
                continue
            event_id, expires_at = self._handles.pop(handle, ("", 0.0))
            event = self._events.get(event_id)
            if event is None or now >= expires_at or event.handle != handle:
                self.confirm_log.append(ConfirmedHandle(handle, sub_app_id, pulled_under, accepted=False))
                rejected.append(handle)
                continue
            del self._events[event_id]
            self.confirmed.append((handle, event_id, now))
            self.confirm_log.append(ConfirmedHandle(handle, sub_app_id, pulled_under, accepted=True))
        self.rejected_confirms.extend(rejected)
        if rejected and self.strict_confirms:
            return self._error("InvalidParameterValue", f"{len(rejected)} event handle(s) expired or do not exist.")
        return {}
