"""One order and one accounting for every refusal of a callback, with and without ``Expect: 100-continue``:
allow-list (403), then token (401), then declared size (413); each counted in
``vod_bridge_events_rejected_total{source="callback"}`` and logged with its reason, with a JSON body."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import sample_bytes
from rawhttp import RawConnection, RawResponse, raw_connection, raw_request

from bridge.app import COMPONENTS

pytestmark = pytest.mark.integration

TOKEN = "t0k3n-abcdefghijklmnop"
ALLOWED = "10.1.2.3"
STRANGER = "203.0.113.9"
LIMIT = 4096

#: (client address, token, declared size) -> (status, error code, rejected reason); None: accepted.
CASES: list[tuple[str, str | None, int, tuple[int, str, str] | None]] = [
    (STRANGER, None, 10 * LIMIT, (403, "forbidden", "forbidden")),
    (STRANGER, TOKEN, 10 * LIMIT, (403, "forbidden", "forbidden")),
    (STRANGER, TOKEN, 0, (403, "forbidden", "forbidden")),
    (ALLOWED, None, 10 * LIMIT, (401, "unauthorized", "bad_token")),
    (ALLOWED, "wrong-token-xxxxxxxxxx", 10 * LIMIT, (401, "unauthorized", "bad_token")),
    (ALLOWED, TOKEN, 10 * LIMIT, (413, "payload_too_large", "payload_too_large")),
    (ALLOWED, TOKEN, 0, None),
]


def rejected(client: Any, reason: str) -> float:
    registry = client.server.app[COMPONENTS].metrics.registry
    return registry.get_sample_value("vod_bridge_events_rejected_total", {"source": "callback", "reason": reason}) or 0


def logged_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.reason for r in caplog.records if r.name == "bridge.sources.callback" and hasattr(r, "reason")]


async def post(
    connection: RawConnection, *, source: str, token: str | None, size: int, expect: bool, accepted: bool
) -> RawResponse:
    """One POST; with ``expect`` the head alone first, the body only after a ``100 Continue``. ``size`` 0: the
    sample event, else a declared Content-Length of ``size`` whose body is never sent. ``accepted``: whether a
    ``100 Continue`` is expected (then the body follows it)."""
    body = sample_bytes() if size == 0 else b""
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body) if size == 0 else size),
        "X-Forwarded-For": source,
    }
    if expect:
        headers["Expect"] = "100-continue"
    path = "/vod/callback" if token is None else f"/vod/callback?token={token}"
    await connection.send(raw_request("POST", path, headers=headers))
    if expect and accepted:
        # The interim answer comes before the body is sent; the final one after it.
        head = await connection.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 100 "), head
        await connection.send(body)
        response = await connection.response(timeout_s=5.0)
        response.interim.insert(0, 100)
        return response
    if not expect:
        await connection.send(body)
    return await connection.response(timeout_s=5.0)


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
@pytest.mark.parametrize("case", CASES)
async def test_refusal_order_and_accounting(make_settings, make_client, caplog, expect: bool, case: Any) -> None:
    source, token, size, refusal = case
    caplog.set_level(logging.INFO, logger="bridge")
    settings = make_settings(
        http_token=TOKEN,
        http_allowed_cidrs=["10.0.0.0/8"],
        http_trusted_proxies=["127.0.0.1"],
        http_max_body_bytes=LIMIT,
    )
    client = await make_client(settings)
    async with raw_connection(client.server.host, client.server.port) as connection:
        response = await post(
            connection, source=source, token=token, size=size, expect=expect, accepted=refusal is None
        )
    if refusal is None:
        assert response.status == 200, response.body
        assert response.json()["status"] == "published"
        assert response.interim == ([100] if expect else [])
        assert logged_reasons(caplog) == []
        return
    status, code, reason = refusal
    assert (response.status, response.json()["error"]) == (status, code), response.body
    assert isinstance(response.json()["message"], str)
    assert response.headers["content-type"].startswith("application/json")
    # No "100 Continue" invites a body that is refused anyway.
    assert response.interim == []
    assert rejected(client, reason) == 1
    assert logged_reasons(caplog) == [reason]
    assert TOKEN not in caplog.text


async def test_an_unknown_expectation_gets_417_after_the_source_checks(make_settings, make_client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    client = await make_client(make_settings(http_token=TOKEN))
    for path, status, reason in (
        ("/vod/callback", 401, "bad_token"),
        (f"/vod/callback?token={TOKEN}", 417, "expectation_failed"),
    ):
        async with raw_connection(client.server.host, client.server.port) as connection:
            headers = {"Content-Length": "10", "Expect": "something-else"}
            await connection.send(raw_request("POST", path, headers=headers))
            response = await connection.response(timeout_s=5.0)
        assert response.status == status and response.interim == [], response.body
        assert rejected(client, reason) == 1
    assert logged_reasons(caplog) == ["bad_token", "expectation_failed"]
