"""Callback authentication: VOD Sign/T, URL token, source allow-list — unit and through the real app."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time

import pytest
from conftest import Kafka, read_records, sample_event, value_of

from bridge.config import parse_networks
from bridge.errors import AuthFailed, Forbidden
from bridge.sources.access import SourceFilter, verify_token
from bridge.vod.signing import verify_sign

KEY = "SignKey42"
TOKEN = "t0k3n-abcdefghijklmnop"


def vod_sign(key: str, expires_at: int) -> str:
    return hashlib.md5(f"{key}{expires_at}".encode()).hexdigest()


class TestSign:
    def test_valid_signature_passes(self) -> None:
        t = int(time.time()) + 600
        verify_sign(vod_sign(KEY, t), t, sign_key=KEY, now_s=time.time(), skew_s=60)
        verify_sign(vod_sign(KEY, t).upper(), t, sign_key=KEY, now_s=time.time(), skew_s=60)

    @pytest.mark.parametrize(
        ("sign", "t", "now_offset_s", "reason"),
        [
            (None, 1000, 0, "missing_signature"),
            ("abc", None, 0, "missing_signature"),
            ("0" * 32, 1000, 0, "bad_signature"),
            ("zz", 1000, 0, "bad_signature"),
            ("é" * 32, 1000, 0, "bad_signature"),
            ("RIGHT", 1000, 61, "expired"),
        ],
    )
    def test_rejections(self, sign, t, now_offset_s, reason) -> None:
        if sign == "RIGHT":
            sign = vod_sign(KEY, t)
        with pytest.raises(AuthFailed) as info:
            verify_sign(sign, t, sign_key=KEY, now_s=1000 + now_offset_s, skew_s=60)
        assert info.value.reason == reason
        assert info.value.status == 401
        assert KEY not in info.value.message

    def test_skew_allowance_is_inclusive(self) -> None:
        verify_sign(vod_sign(KEY, 1000), 1000, sign_key=KEY, now_s=1060, skew_s=60)

    def test_signature_of_another_key_fails(self) -> None:
        with pytest.raises(AuthFailed):
            verify_sign(vod_sign("OtherKey", 5000), 5000, sign_key=KEY, now_s=1000, skew_s=0)


def test_token() -> None:
    verify_token(TOKEN, TOKEN)
    for wrong in (None, "", TOKEN[:-1], TOKEN + "x"):
        with pytest.raises(AuthFailed):
            verify_token(wrong, TOKEN)


class TestSourceFilter:
    def test_empty_allow_list_allows_all(self) -> None:
        SourceFilter(()).check("198.51.100.1", None)

    def test_allow_list(self) -> None:
        source = SourceFilter(parse_networks(["10.0.0.0/8", "2001:db8::/32"]))
        source.check("10.1.2.3", None)
        source.check("2001:db8::1", None)
        for bad in ("11.0.0.1", None, "not-an-ip"):
            with pytest.raises(Forbidden):
                source.check(bad, None)

    def test_forwarded_for_only_from_trusted_proxies(self) -> None:
        source = SourceFilter(parse_networks(["203.0.113.0/24"]), parse_networks(["10.0.0.0/8"]))
        # Through our proxy: the client is the right-most untrusted hop.
        source.check("10.0.0.5", "198.51.100.9, 203.0.113.7")
        assert source.client_address("10.0.0.5", "203.0.113.7, 10.0.0.6") == ipaddress.ip_address("203.0.113.7")
        # A client cannot claim an address by sending the header itself.
        with pytest.raises(Forbidden):
            source.check("198.51.100.9", "203.0.113.7")
        with pytest.raises(Forbidden):
            source.check("10.0.0.5", "garbage, 203.0.113.7, nonsense")

    def test_bad_cidr_is_named(self) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
            parse_networks(["10.0.0.0/33"])


@pytest.mark.integration
async def test_signed_callbacks_through_the_app(kafka: Kafka, make_settings, make_client, topic, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(make_settings(http_sign_key=KEY, http_sign_skew_s=5))
    t = int(time.time()) + 600
    good = {**sample_event("signed-ok"), "Sign": vod_sign(KEY, t), "T": t}
    assert (await client.post("/vod/callback", json=good)).status == 200

    old = int(time.time()) - 60
    cases = [
        (sample_event("unsigned"), "missing_signature"),
        ({**sample_event("bad-sign"), "Sign": vod_sign("wrong", t), "T": t}, "bad_signature"),
        ({**sample_event("replayed"), "Sign": vod_sign(KEY, old), "T": old}, "expired"),
        ({**sample_event("tampered-t"), "Sign": vod_sign(KEY, t), "T": t + 1}, "bad_signature"),
    ]
    for body, reason in cases:
        response = await client.post("/vod/callback", json=body)
        assert response.status == 401, reason
        assert (await response.json())["error"] == "unauthorized"

    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=1.0)
    assert record.key == b"signed-ok"
    value = value_of(record)
    assert "Sign" not in value and "T" not in value
    assert value == sample_event("signed-ok")
    assert KEY not in caplog.text


@pytest.mark.integration
async def test_token_in_path_or_query(kafka: Kafka, make_settings, make_client, topic, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(make_settings(http_token=TOKEN))
    assert (await client.post(f"/vod/callback/{TOKEN}", json=sample_event("by-path"))).status == 200
    assert (await client.post(f"/vod/callback?token={TOKEN}", json=sample_event("by-query"))).status == 200
    for path in ("/vod/callback", "/vod/callback/wrong-token-xxxxxxxx", "/vod/callback?token=nope"):
        response = await client.post(path, json=sample_event("intruder"))
        assert response.status == 401
        assert TOKEN not in await response.text()
    records = await read_records(kafka.bootstrap_servers, topic, count=2, settle_s=1.0)
    assert sorted(r.key for r in records) == [b"by-path", b"by-query"]
    assert TOKEN not in caplog.text


@pytest.mark.integration
async def test_allow_list_through_a_trusted_proxy(make_settings, make_client) -> None:
    client = await make_client(
        make_settings(http_allowed_cidrs=["203.0.113.0/24"], http_trusted_proxies=["127.0.0.0/8"])
    )
    allowed = await client.post("/vod/callback", json=sample_event("p1"), headers={"X-Forwarded-For": "203.0.113.9"})
    assert allowed.status == 200
    denied = await client.post("/vod/callback", json=sample_event("p2"), headers={"X-Forwarded-For": "198.51.100.1"})
    assert denied.status == 403
    assert (await denied.json())["error"] == "forbidden"
    assert (await client.post("/vod/callback", json=sample_event("p3"))).status == 403
