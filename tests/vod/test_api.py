"""bridge.vodapi: TC3 signing (against the official SDK), VodClient against FakeVod, secret hygiene, env."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakevod import FakeVod
from tencentcloud.common import abstract_client as sdk_abstract_client
from tencentcloud.common.abstract_client import AbstractClient
from tencentcloud.common.credential import Credential as SdkCredential
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.sign import Sign

from bridge.errors import ConfigError, UpstreamError
from bridge.vod.api import (
    MAX_CONFIRM_HANDLES,
    Credentials,
    EventConfig,
    VodApiError,
    VodClient,
    VodRateLimited,
    VodTransportError,
    is_retriable_code,
    sign_request,
)

SECRET_ID = "AKIDtestTESTtest0123abcd"
SECRET_KEY = "Sk3y-s3cr3t-VALUE-never-LOG-me"
TOKEN = "T0ken-sessi0n-VALUE-never-LOG-me"

# Tencent's PullComplete sample (event-notification docs, reliable callback), without EventHandle.
PULL_COMPLETE: dict[str, Any] = {
    "EventType": "PullComplete",
    "PullCompleteEvent": {
        "TaskId": "125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8",
        "Status": "FINISH",
        "ErrCode": 0,
        "Message": "SUCCESS",
        "FileId": "14508071098244959037",
        "MediaBasicInfo": {
            "Name": "Animal World",
            "CreateTime": "2019-01-09T16:36:22Z",
            "ExpireTime": "9999-12-31T23:59:59Z",
            "ClassId": 0,
            "Type": "mp4",
            "TagSet": [],
            "StorageRegion": "ap-chongqing",
            "SourceInfo": {"SourceType": "Upload", "SourceContext": ""},
        },
        "FileUrl": "http://125676836723.vod2.myqcloud.com/xxx/xxx/xxx.mp4",
        "SessionContext": "",
        "SessionId": "",
    },
}


def _event(task_id: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(json.dumps(PULL_COMPLETE))
    event["PullCompleteEvent"]["TaskId"] = task_id
    return event


# --------------------------------------------------------------------------------------------------------
# (a) signature byte-for-byte equal to the official SDK
# --------------------------------------------------------------------------------------------------------


class _SdkVodClient(AbstractClient):  # type: ignore[misc]
    _apiVersion = "2018-07-17"
    _endpoint = "vod.tencentcloudapi.com"
    _service = "vod"


def _sdk_signed(
    monkeypatch: pytest.MonkeyPatch,
    *,
    params: dict[str, Any],
    timestamp: int,
    region: str,
    token: str | None,
    content_type: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body exactly as the SDK builds them for a POST with ``params`` at ``timestamp``."""
    monkeypatch.setattr(sdk_abstract_client, "time", types.SimpleNamespace(time=lambda: timestamp))
    client = _SdkVodClient(SdkCredential(SECRET_ID, SECRET_KEY, token), region)
    req = RequestInternal(client._get_endpoint(), "POST", "/")
    client._build_req_with_tc3_signature("PullEvents", params, req)
    if content_type is not None:
        # Re-sign with another Content-Type through the SDK's own canonical-request code.
        req.header["Content-Type"] = content_type
        date = time.strftime("%Y-%m-%d", time.gmtime(timestamp))
        signature = client._get_tc3_signature(params, req, date, "vod", SECRET_KEY)
        req.header["Authorization"] = (
            f"TC3-HMAC-SHA256 Credential={SECRET_ID}/{date}/vod/tc3_request, "
            f"SignedHeaders=content-type;host, Signature={signature}"
        )
    return dict(req.header), req.data.encode("utf-8")


@pytest.mark.parametrize(
    "case",
    [
        (None, "", {}, 1_700_000_000),
        (TOKEN, "ap-guangzhou", {"SubAppId": 1500012345}, 1_704_067_199),  # 23:59:59 UTC
        (None, "ap-singapore", {"EventHandles": ["h1", "h2"], "SubAppId": 7}, 1_704_067_200),  # midnight
    ],
)
@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8"])
def test_signature_matches_official_sdk(
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str | None, str, dict[str, Any], int],
    content_type: str | None,
) -> None:
    token, region, params, timestamp = case
    sdk_headers, body = _sdk_signed(
        monkeypatch, params=params, timestamp=timestamp, region=region, token=token, content_type=content_type
    )
    ours = sign_request(
        credentials=Credentials(SECRET_ID, SECRET_KEY, token),
        action="PullEvents",
        payload=body,
        timestamp=timestamp,
        host=sdk_headers["Host"],
        region=region or None,
        content_type=sdk_headers["Content-Type"],
    )
    assert ours["Authorization"] == sdk_headers["Authorization"]
    for name in ("Content-Type", "Host", "X-TC-Action", "X-TC-Timestamp", "X-TC-Version"):
        assert ours[name] == sdk_headers[name]
    assert ours.get("X-TC-Region") == sdk_headers.get("X-TC-Region")
    assert ours.get("X-TC-Token") == sdk_headers.get("X-TC-Token")


def test_sign_request_shape_and_hmac_chain() -> None:
    creds = Credentials(SECRET_ID, SECRET_KEY)
    headers = sign_request(
        credentials=creds, action="PullEvents", payload=b"{}", timestamp=1_551_113_065, host="h", region=None
    )
    assert set(headers) == {
        "Authorization",
        "Content-Type",
        "Host",
        "X-TC-Action",
        "X-TC-Timestamp",
        "X-TC-Version",
    }
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["X-TC-Version"] == "2018-07-17"
    prefix = (
        f"TC3-HMAC-SHA256 Credential={SECRET_ID}/2019-02-25/vod/tc3_request, "
        "SignedHeaders=content-type;host, Signature="
    )
    assert headers["Authorization"].startswith(prefix)
    # Same bytes in, same signature out (pure); another payload, another signature.
    again = sign_request(
        credentials=creds, action="PullEvents", payload=b"{}", timestamp=1_551_113_065, host="h", region=None
    )
    other = sign_request(
        credentials=creds, action="PullEvents", payload=b"{ }", timestamp=1_551_113_065, host="h", region=None
    )
    assert again == headers
    assert other["Authorization"] != headers["Authorization"]
    # The signature is the SDK's HMAC chain applied to the documented string to sign.
    canonical = "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:h\n\ncontent-type;host\n"
    canonical += hashlib.sha256(b"{}").hexdigest()
    to_sign = "TC3-HMAC-SHA256\n1551113065\n2019-02-25/vod/tc3_request\n"
    to_sign += hashlib.sha256(canonical.encode()).hexdigest()
    assert headers["Authorization"].endswith("Signature=" + Sign.sign_tc3(SECRET_KEY, "2019-02-25", "vod", to_sign))


# --------------------------------------------------------------------------------------------------------
# (b) VodClient against FakeVod
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def vod() -> AsyncIterator[FakeVod]:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, visibility_timeout_s=30.0) as fake:
        yield fake


def _client(session: aiohttp.ClientSession, vod: FakeVod, **kwargs: Any) -> VodClient:
    creds = kwargs.pop("credentials", Credentials(SECRET_ID, SECRET_KEY))
    return VodClient(session, creds, endpoint=vod.endpoint, **kwargs)


async def test_pull_returns_raw_events_and_confirm_removes_them(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    queued = {vod.add_event(_event(f"task-{i}")): _event(f"task-{i}") for i in range(3)}
    client = _client(session, vod)

    raw = await client.pull_events()

    assert all(isinstance(item, bytes) for item in raw)
    decoded = [json.loads(item) for item in raw]
    handles = [d.pop("EventHandle") for d in decoded]
    assert decoded == list(queued.values())
    assert len(set(handles)) == 3
    assert vod.requests[-1].params == {}  # no SubAppId configured -> "{}"

    await client.confirm_events(handles)

    assert [(h, e) for h, e, _ in vod.confirmed] == list(zip(handles, queued, strict=True))
    assert vod.pending_ids == []
    assert await client.pull_events() == []
    assert vod.pulls == 2
    assert not session.closed  # the client never owns the session


async def test_pull_with_nothing_queued_is_empty(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    assert await _client(session, vod).pull_events() == []


async def test_max_events_per_pull(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, max_events_per_pull=16) as vod:
        for i in range(20):
            vod.add_event(_event(f"t{i}"))
        client = _client(session, vod)
        first = await client.pull_events()
        second = await client.pull_events()
        assert (len(first), len(second)) == (16, 4)


async def test_unconfirmed_event_is_redelivered_with_new_handle(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, visibility_timeout_s=0.3) as vod:
        event_id = vod.add_event(_event("task-redeliver"))
        client = _client(session, vod)

        first = await client.pull_events()
        assert len(first) == 1
        assert await client.pull_events() == []  # in flight: invisible

        await asyncio.sleep(0.35)
        second = await client.pull_events()

        assert len(second) == 1
        old_handle = json.loads(first[0])["EventHandle"]
        new_handle = json.loads(second[0])["EventHandle"]
        assert new_handle != old_handle
        assert {k: v for k, v in json.loads(second[0]).items() if k != "EventHandle"} == _event("task-redeliver")
        assert vod.deliveries[event_id] == 2

        # The expired handle is refused (parameter error, not retriable) ...
        with pytest.raises(VodApiError) as excinfo:
            await client.confirm_events([old_handle])
        assert excinfo.value.api_code == "InvalidParameterValue"
        assert excinfo.value.retriable is False
        assert vod.rejected_confirms == [old_handle]
        # ... and the current one works.
        await client.confirm_events([new_handle])
        assert [e for _, e, _ in vod.confirmed] == [event_id]


async def test_long_poll_returns_early_when_an_event_arrives(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY) as vod:
        vod.pull_delay_s = 5.0
        client = _client(session, vod)
        started = time.monotonic()
        pull = asyncio.create_task(client.pull_events())
        await asyncio.sleep(0.1)
        vod.add_event(_event("late"))
        events = await pull
        assert len(events) == 1
        assert time.monotonic() - started < 2.0


async def test_sub_app_id_is_sent(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    vod.add_event(_event("x"), sub_app_id=1500012345)  # the fake keeps one queue per application
    client = _client(session, vod, sub_app_id=1500012345, region="ap-guangzhou")
    assert client.sub_app_id == 1500012345
    [raw] = await client.pull_events()
    await client.confirm_events([json.loads(raw)["EventHandle"]])
    assert vod.requests[0].params == {"SubAppId": 1500012345}
    assert vod.requests[1].params == {
        "EventHandles": [json.loads(raw)["EventHandle"]],
        "SubAppId": 1500012345,
    }
    assert vod.requests[0].headers["x-tc-region"] == "ap-guangzhou"
    assert vod.requests[0].headers["host"] == vod.endpoint.removeprefix("http://")


async def test_describe_event_config_reads_the_mode_and_takes_no_event(
    session: aiohttp.ClientSession, vod: FakeVod
) -> None:
    event_id = vod.add_event(_event("stays-queued"))
    vod.event_mode = "PUSH"
    client = _client(session, vod, sub_app_id=1500012345, region="ap-guangzhou")

    config = await client.describe_event_config()

    assert config == EventConfig(mode="PUSH")
    assert not hasattr(config, "notification_url")  # it may embed the callback token
    assert [(r.action, r.params) for r in vod.requests] == [("DescribeEventConfig", {"SubAppId": 1500012345})]
    assert vod.deliveries[event_id] == 0 and vod.pulls_received == 0


async def test_describe_event_config_errors_are_typed(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, sub_app_ids=frozenset({1500000001})) as vod:
        with pytest.raises(VodApiError) as excinfo:
            await _client(session, vod, sub_app_id=1500000002).describe_event_config()
        assert excinfo.value.api_code == "InvalidParameterValue.SubAppId"
        assert excinfo.value.action == "DescribeEventConfig"
        assert await _client(session, vod, sub_app_id=1500000001).describe_event_config() == EventConfig("PULL")

        vod.hang_next(1, action="DescribeEventConfig")
        started = time.monotonic()
        with pytest.raises(VodTransportError, match=r"DescribeEventConfig: no answer within 0\.3s"):
            await _client(session, vod, sub_app_id=1500000001, request_timeout_s=0.3).describe_event_config()
        assert time.monotonic() - started < 2.0


async def test_the_fake_keeps_each_applications_handles_to_itself(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    """What the poller tests rely on: a handle confirmed under another SubAppId is refused, not silently taken."""
    vod.add_event(_event("mine"), sub_app_id=1500001)
    owner = _client(session, vod, sub_app_id=1500001)
    other = _client(session, vod, sub_app_id=1500002)
    assert await other.pull_events() == []
    [raw] = await owner.pull_events()
    handle = json.loads(raw)["EventHandle"]
    with pytest.raises(UpstreamError, match="InvalidParameterValue"):
        await other.confirm_events([handle])
    await owner.confirm_events([handle])
    assert [(c.sub_app_id, c.pulled_under, c.accepted) for c in vod.confirm_log] == [
        (1500002, 1500001, False),
        (1500001, 1500001, True),
    ]
    assert vod.pending_ids == []


async def test_temporary_credentials_send_the_token(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, token=TOKEN) as vod:
        ok = _client(session, vod, credentials=Credentials(SECRET_ID, SECRET_KEY, TOKEN))
        assert await ok.pull_events() == []
        wrong = _client(session, vod, credentials=Credentials(SECRET_ID, SECRET_KEY, TOKEN + "x"))
        with pytest.raises(VodApiError) as excinfo:
            await wrong.pull_events()
        assert excinfo.value.api_code == "AuthFailure.TokenFailure"
        assert excinfo.value.retriable is False


async def test_wrong_secret_key_is_a_non_retriable_signature_failure(
    session: aiohttp.ClientSession, vod: FakeVod
) -> None:
    client = _client(session, vod, credentials=Credentials(SECRET_ID, "not-the-right-key"))
    with pytest.raises(VodApiError) as excinfo:
        await client.pull_events()
    err = excinfo.value
    assert err.api_code == "AuthFailure.SignatureFailure"
    assert err.retriable is False
    assert err.request_id
    assert err.request_id in str(err)
    assert not isinstance(err, VodRateLimited)


async def test_clock_skew_is_signature_expire(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    client = _client(session, vod, clock=lambda: time.time() - 3600)
    with pytest.raises(VodApiError) as excinfo:
        await client.pull_events()
    assert excinfo.value.api_code == "AuthFailure.SignatureExpire"


async def test_fail_next_gives_retriable_errors_then_recovers(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    client = _client(session, vod)
    vod.fail_next(2)
    for _ in range(2):
        with pytest.raises(VodApiError) as excinfo:
            await client.pull_events()
        assert excinfo.value.api_code == "InternalError"
        assert excinfo.value.retriable is True
        assert isinstance(excinfo.value, UpstreamError)
    assert await client.pull_events() == []


async def test_rate_limit_is_vod_rate_limited(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    vod.fail_next(1, code="RequestLimitExceeded")
    with pytest.raises(VodRateLimited) as excinfo:
        await _client(session, vod).pull_events()
    assert excinfo.value.retriable is True
    assert excinfo.value.api_code == "RequestLimitExceeded"


@pytest.mark.parametrize("count", [0, MAX_CONFIRM_HANDLES + 1])
async def test_confirm_rejects_bad_handle_counts_before_io(
    session: aiohttp.ClientSession, vod: FakeVod, count: int
) -> None:
    with pytest.raises(ValueError, match="handle"):
        await _client(session, vod).confirm_events([f"h{i}" for i in range(count)])
    assert vod.requests == []


async def test_confirm_rejects_a_bare_string(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    with pytest.raises(TypeError):
        await _client(session, vod).confirm_events("EH-abc")


async def test_fake_refuses_more_than_16_handles(session: aiohttp.ClientSession, vod: FakeVod) -> None:
    # Straight at the fake, bypassing the client-side check.
    body = json.dumps({"EventHandles": [f"h{i}" for i in range(17)]}).encode()
    headers = sign_request(
        credentials=Credentials(SECRET_ID, SECRET_KEY),
        action="ConfirmEvents",
        payload=body,
        timestamp=int(time.time()),
        host=vod.endpoint.removeprefix("http://"),
        region=None,
    )
    async with session.post(vod.endpoint + "/", data=body, headers=headers) as resp:
        answer = await resp.json()
    assert answer["Response"]["Error"]["Code"] == "InvalidParameterValue"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_transport_error(session: aiohttp.ClientSession) -> None:
    client = VodClient(session, Credentials(SECRET_ID, SECRET_KEY), endpoint=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(VodTransportError) as excinfo:
        await client.pull_events()
    assert excinfo.value.retriable is True
    with pytest.raises(VodTransportError):
        await client.confirm_events(["h"])


async def test_timeout_is_transport_error(session: aiohttp.ClientSession) -> None:
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, pull_delay_s=3.0) as vod:
        client = _client(session, vod, request_timeout_s=0.2)
        with pytest.raises(VodTransportError, match="no answer"):
            await client.pull_events()


@pytest.mark.parametrize(
    ("status", "body", "retriable"),
    [(502, b"<html>bad gateway</html>", True), (403, b"forbidden", False), (200, b"<html>not json", True)],
)
async def test_bad_http_answers_are_transport_errors(
    session: aiohttp.ClientSession, vod: FakeVod, status: int, body: bytes, retriable: bool
) -> None:
    vod.fail_next_http(1, status=status, body=body)
    with pytest.raises(VodTransportError) as excinfo:
        await _client(session, vod).pull_events()
    assert excinfo.value.retriable is retriable
    assert excinfo.value.http_status == (status if status != 200 else 0)


def test_endpoint_validation() -> None:
    creds = Credentials(SECRET_ID, SECRET_KEY)
    fake_session: Any = object()
    assert VodClient(fake_session, creds).endpoint == "https://vod.tencentcloudapi.com/"
    assert VodClient(fake_session, creds, endpoint="https://VOD.example.com:443").endpoint == (
        "https://vod.example.com/"
    )
    assert VodClient(fake_session, creds, endpoint="http://127.0.0.1:8080/").endpoint == "http://127.0.0.1:8080/"
    for bad in (
        "ftp://vod.tencentcloudapi.com",
        "vod.tencentcloudapi.com",
        "https://h/path",
        "https://u:p@h",
    ):
        with pytest.raises(ValueError):
            VodClient(fake_session, creds, endpoint=bad)


def test_error_code_classification() -> None:
    retriable = [
        "RequestLimitExceeded",
        "RequestLimitExceeded.UinLimitExceeded",
        "InternalError",
        "InternalError.GetFileInfoError",
        "ResourceUnavailable",
        "FailedOperation",
    ]
    final = [
        "AuthFailure.SignatureFailure",
        "AuthFailure.SecretIdNotFound",
        "InvalidParameter",
        "InvalidParameterValue",
        "UnauthorizedOperation",
        "FailedOperation.InvalidVodUser",
    ]
    assert all(is_retriable_code(code) for code in retriable)
    assert not any(is_retriable_code(code) for code in final)


# --------------------------------------------------------------------------------------------------------
# (c) no secret in reprs, error messages or logs
# --------------------------------------------------------------------------------------------------------


def test_credentials_repr_masks_everything() -> None:
    creds = Credentials("AKIDexampleexampleabcd", SECRET_KEY, TOKEN)
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert SECRET_KEY not in text
        assert TOKEN not in text
        assert "AKIDexampleexampleabcd" not in text
    assert "AKID****abcd" in repr(creds)
    assert creds.masked_id == "AKID****abcd"


def test_credentials_reject_header_unsafe_values() -> None:
    with pytest.raises(ValueError) as excinfo:
        Credentials(SECRET_ID, "bad key\r\nX-Injected: 1")
    assert "bad key" not in str(excinfo.value)
    with pytest.raises(ValueError):
        Credentials("", SECRET_KEY)


async def test_no_secret_leaks_into_errors_or_logs(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    authorizations: list[str] = []
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY, token=TOKEN, visibility_timeout_s=0.05) as vod:
        good = _client(session, vod, credentials=Credentials(SECRET_ID, SECRET_KEY, TOKEN))
        bad_key = _client(session, vod, credentials=Credentials(SECRET_ID, SECRET_KEY + "x", TOKEN))
        bad_token = _client(session, vod, credentials=Credentials(SECRET_ID, SECRET_KEY, TOKEN[::-1]))
        vod.add_event(_event("leak"))
        [raw] = await good.pull_events()
        authorizations.append(vod.last_authorization or "")
        await asyncio.sleep(0.1)
        vod.fail_next(1, code="InternalError", message=f"server echoes {SECRET_KEY} and {TOKEN}")
        vod.fail_next_http(1, status=503)
        vod.fail_next_http(1, status=200, body=b"garbage")
        calls = [
            bad_key.pull_events(),
            bad_token.pull_events(),
            good.pull_events(),
            good.pull_events(),
            good.pull_events(),
            good.confirm_events([json.loads(raw)["EventHandle"]]),  # expired by now
        ]
        for call in calls:
            try:
                await call
            except UpstreamError as exc:
                errors.append(exc)
                authorizations.append(vod.last_authorization or "")
    unreachable = VodClient(
        session, Credentials(SECRET_ID, SECRET_KEY, TOKEN), endpoint=f"http://127.0.0.1:{_closed_port()}"
    )
    with pytest.raises(VodTransportError) as excinfo:
        await unreachable.pull_events()
    errors.append(excinfo.value)

    assert len(errors) == 7
    signatures = [a.rpartition("Signature=")[2] for a in authorizations if a]
    assert len(signatures) >= 6
    secrets = [SECRET_KEY, TOKEN, TOKEN[::-1], SECRET_KEY + "x", *signatures]
    texts = [caplog.text] + [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [str(arg) for record in caplog.records for arg in (record.args or ())]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "server echoes *** and ***" in str(errors[2])


# --------------------------------------------------------------------------------------------------------
# (d) Credentials.from_env
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def secret_files(tmp_path: Path) -> Iterator[dict[str, str]]:
    files = {}
    for name, value in (("id", SECRET_ID), ("key", SECRET_KEY), ("token", TOKEN)):
        path = tmp_path / name
        path.write_text(f"  {value}\n\n")
        files[name] = str(path)
    yield files


def test_from_env_none_when_unset() -> None:
    assert Credentials.from_env({}) is None
    assert Credentials.from_env({"TENCENTCLOUD_SECRET_ID": "  ", "OTHER": "x"}) is None


def test_from_env_token_alone_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert Credentials.from_env({"TENCENTCLOUD_SESSION_TOKEN": TOKEN}) is None
    assert TOKEN not in caplog.text


def test_from_env_plain_variables() -> None:
    creds = Credentials.from_env({"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY": f" {SECRET_KEY} "})
    assert creds == Credentials(SECRET_ID, SECRET_KEY, None)
    creds = Credentials.from_env(
        {
            "TENCENTCLOUD_SECRET_ID": SECRET_ID,
            "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
            "TENCENTCLOUD_SESSION_TOKEN": TOKEN,
        }
    )
    assert creds == Credentials(SECRET_ID, SECRET_KEY, TOKEN)


def test_from_env_file_variants(secret_files: dict[str, str]) -> None:
    creds = Credentials.from_env(
        {
            "TENCENTCLOUD_SECRET_ID_FILE": secret_files["id"],
            "TENCENTCLOUD_SECRET_KEY_FILE": secret_files["key"],
            "TENCENTCLOUD_SESSION_TOKEN_FILE": secret_files["token"],
        }
    )
    assert creds == Credentials(SECRET_ID, SECRET_KEY, TOKEN)
    mixed = Credentials.from_env(
        {"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY_FILE": secret_files["key"]}
    )
    assert mixed == Credentials(SECRET_ID, SECRET_KEY)


@pytest.mark.parametrize(
    ("environ", "secret"),
    [
        ({"TENCENTCLOUD_SECRET_ID": SECRET_ID}, SECRET_ID),
        ({"TENCENTCLOUD_SECRET_KEY": SECRET_KEY}, SECRET_KEY),
        ({"TENCENTCLOUD_SECRET_KEY": SECRET_KEY, "TENCENTCLOUD_SESSION_TOKEN": TOKEN}, TOKEN),
    ],
)
def test_from_env_only_one_of_id_and_key(environ: dict[str, str], secret: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Credentials.from_env(environ)
    message = str(excinfo.value)
    assert "TENCENTCLOUD_SECRET_ID" in message
    assert "TENCENTCLOUD_SECRET_KEY" in message
    for value in (SECRET_ID, SECRET_KEY, TOKEN):
        assert value not in message


def test_from_env_only_one_of_id_and_key_via_file(secret_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Credentials.from_env({"TENCENTCLOUD_SECRET_KEY_FILE": secret_files["key"]})
    assert SECRET_KEY not in str(excinfo.value)


def test_from_env_variable_and_file_together_is_an_error(secret_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="not both") as excinfo:
        Credentials.from_env(
            {
                "TENCENTCLOUD_SECRET_ID": SECRET_ID,
                "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
                "TENCENTCLOUD_SECRET_KEY_FILE": secret_files["key"],
            }
        )
    assert SECRET_KEY not in str(excinfo.value)


def test_from_env_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="TENCENTCLOUD_SECRET_KEY_FILE"):
        Credentials.from_env({"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY_FILE": str(missing)})


def test_from_env_malformed_value_does_not_echo_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("two words-and-a-SECRET\n")
    with pytest.raises(ConfigError) as excinfo:
        Credentials.from_env({"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY_FILE": str(path)})
    assert "SECRET" not in str(excinfo.value).replace("TENCENTCLOUD_SECRET", "")
