"""Callback authentication: URL token, source allow-list (X-Forwarded-For), VOD Sign/T — unit and through the
real app. The Sign/T rules themselves are unit-tested in tests/vod/test_signing.py."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from typing import Any

import pytest
from conftest import Kafka, read_records, sample_event, value_of
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from bridge.config import parse_networks
from bridge.errors import AuthFailed, Forbidden
from bridge.sources.access import MAX_FORWARDED_HOPS, SourceFilter, verify_token

KEY = "SignKey42"
TOKEN = "t0k3n-abcdefghijklmnop"


def vod_sign(key: str, t: int | str) -> str:
    return hashlib.md5(f"{key}{t}".encode()).hexdigest()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_token() -> None:
    verify_token(TOKEN, TOKEN)
    for wrong in (None, "", TOKEN[:-1], TOKEN + "x"):
        with pytest.raises(AuthFailed) as info:
            verify_token(wrong, TOKEN)
        assert info.value.reason == "bad_token"


#: The setting of issue 10 §3: an internal allow-list, and a local proxy that appends its own header line.
BEHIND_PROXY = SourceFilter(parse_networks(["10.0.0.0/8"]), parse_networks(["127.0.0.1"]))


class TestSourceFilter:
    def test_empty_allow_list_allows_all(self) -> None:
        SourceFilter(()).check("198.51.100.1", None)
        SourceFilter(()).check(None, ["garbage"])

    def test_allow_list(self) -> None:
        source = SourceFilter(parse_networks(["10.0.0.0/8", "2001:db8::/32"]))
        source.check("10.1.2.3", None)
        source.check("2001:db8::1", None)
        source.check("::ffff:10.1.2.3", None)  # an IPv4 client seen by a dual-stack listener
        for bad in ("11.0.0.1", None, "", "not-an-ip"):
            with pytest.raises(Forbidden):
                source.check(bad, None)

    def test_forwarded_for_only_from_trusted_proxies(self) -> None:
        source = SourceFilter(parse_networks(["203.0.113.0/24"]), parse_networks(["10.0.0.0/8"]))
        # Through our proxy: the client is the right-most untrusted hop.
        source.check("10.0.0.5", "198.51.100.9, 203.0.113.7")
        assert source.client_address("10.0.0.5", "203.0.113.7, 10.0.0.6") == ip("203.0.113.7")
        # A client cannot claim an address by sending the header itself, in one line or several.
        with pytest.raises(Forbidden):
            source.check("198.51.100.9", "203.0.113.7")
        with pytest.raises(Forbidden):
            source.check("198.51.100.9", ["203.0.113.7", "203.0.113.8"])
        with pytest.raises(Forbidden):
            source.check("10.0.0.5", "garbage, 203.0.113.7, nonsense")

    def test_a_forged_first_line_is_not_believed(self) -> None:
        # The client sends "10.9.9.9"; the proxy at 127.0.0.1 adds its own line with the real peer.
        lines = ["10.9.9.9", "203.0.113.9"]
        assert BEHIND_PROXY.client_address("127.0.0.1", lines) == ip("203.0.113.9")
        with pytest.raises(Forbidden):
            BEHIND_PROXY.check("127.0.0.1", lines)
        # The other way round, the real client is on the allow-list.
        BEHIND_PROXY.check("127.0.0.1", ["203.0.113.9", "10.9.9.9"])

    def test_a_forged_list_is_not_believed(self) -> None:
        for forged in ("10.9.9.9, 10.0.0.1, 203.0.113.9", "10.9.9.9,203.0.113.9", " 10.9.9.9 ,\t203.0.113.9 "):
            assert BEHIND_PROXY.client_address("127.0.0.1", [forged]) == ip("203.0.113.9"), forged
            with pytest.raises(Forbidden):
                BEHIND_PROXY.check("127.0.0.1", [forged])

    def test_lines_and_lists_form_one_chain(self) -> None:
        source = SourceFilter(parse_networks(["198.51.100.0/24"]), parse_networks(["10.0.0.0/8"]))
        lines = ["203.0.113.1, 198.51.100.1", "10.0.0.7, 10.0.0.8", "10.0.0.6"]
        assert source.client_address("10.0.0.5", lines) == ip("198.51.100.1")
        # Every hop trusted: the left-most one is the client.
        assert source.client_address("10.0.0.5", ["10.0.0.9, 10.0.0.8", "10.0.0.7"]) == ip("10.0.0.9")
        # No header: the trusted proxy itself is the peer we see.
        assert source.client_address("10.0.0.5", []) == ip("10.0.0.5")

    def test_an_untrusted_peer_s_header_is_ignored(self) -> None:
        assert BEHIND_PROXY.client_address("203.0.113.9", ["10.1.1.1", "10.2.2.2"]) == ip("203.0.113.9")
        assert BEHIND_PROXY.client_address("203.0.113.9", ["garbage"]) == ip("203.0.113.9")

    @pytest.mark.parametrize(
        ("hop", "client"),
        [
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("203.0.113.9:4711", "203.0.113.9"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("[::ffff:10.1.2.3]:80", "10.1.2.3"),
            ("2001:DB8:0:0::1", "2001:db8::1"),
            # Unbracketed, an IPv6 "port" is read as part of the address (documented): it is another address.
            ("2001:db8::1:4711", "2001:db8::1:4711"),
        ],
    )
    def test_address_forms(self, hop: str, client: str) -> None:
        assert BEHIND_PROXY.client_address("127.0.0.1", [hop]) == ip(client)
        assert BEHIND_PROXY.client_address("::ffff:127.0.0.1", [f"10.9.9.9, {hop}"]) == ip(client)

    def test_ipv6_proxies(self) -> None:
        source = SourceFilter(parse_networks(["2001:db8:c::/48"]), parse_networks(["2001:db8:f::/48", "::1"]))
        source.check("::1", ["2001:db8:c::9, [2001:db8:f::2]:443"])
        with pytest.raises(Forbidden):
            source.check("::1", ["2001:db8:c::9", "2001:db8:e::1"])

    @pytest.mark.parametrize(
        "garbage",
        [
            "unknown",
            "_hidden",
            "for=203.0.113.9",
            '"203.0.113.9"',
            "example.com",
            "203.0.113.9:99999",
            "203.0.113.9:",
            "203.0.113.9:http",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[2001:db8::1]:",
            "[2001:db8::1]:0",
            "10.0.0.1/8",
            "10.0.0.1 10.0.0.2",
            "010.000.000.001",
            "1" * 5000,
            "\x00",
            "é",
        ],
    )
    def test_garbage_is_an_unknown_client(self, garbage: str) -> None:
        assert BEHIND_PROXY.client_address("127.0.0.1", [garbage]) is None
        assert BEHIND_PROXY.client_address("127.0.0.1", [f"10.1.1.1, {garbage}"]) is None
        assert BEHIND_PROXY.client_address("127.0.0.1", ["10.1.1.1", garbage]) is None
        with pytest.raises(Forbidden):
            BEHIND_PROXY.check("127.0.0.1", ["10.1.1.1", garbage])
        # Left of the client, it is the client's own text: ignored.
        assert BEHIND_PROXY.client_address("127.0.0.1", [garbage, "10.1.1.1"]) == ip("10.1.1.1")

    @pytest.mark.parametrize(
        "lines",
        [
            ["10.1.1.1,,"],
            [", 10.1.1.1"],  # nginx's "$http_x_forwarded_for, $remote_addr" with an empty header
            ["10.1.1.1", ""],
            ["", "10.1.1.1", " "],
            ["10.1.1.1", ",, ,"],
            ["203.0.113.9, , 10.1.1.1"],
        ],
    )
    def test_empty_elements_claim_nothing(self, lines: list[str]) -> None:
        assert BEHIND_PROXY.client_address("127.0.0.1", lines) == ip("10.1.1.1")
        BEHIND_PROXY.check("127.0.0.1", lines)

    def test_only_empty_elements_leave_the_peer(self) -> None:
        assert BEHIND_PROXY.client_address("127.0.0.1", ["", " , ,"]) == ip("127.0.0.1")
        with pytest.raises(Forbidden):
            BEHIND_PROXY.check("127.0.0.1", ["", ","])

    def test_many_lines(self) -> None:
        # aiohttp accepts up to 128 header lines: the walk stops at the first untrusted hop from the right.
        forged = [f"10.0.{i // 256}.{i % 256}" for i in range(127)]
        assert BEHIND_PROXY.client_address("127.0.0.1", [*forged, "203.0.113.9"]) == ip("203.0.113.9")
        assert BEHIND_PROXY.client_address("127.0.0.1", [", ".join(forged) + ", 203.0.113.9"]) == ip("203.0.113.9")
        # A chain of trusted hops longer than any real one makes the client unknown.
        long_chain = SourceFilter(parse_networks(["10.0.0.0/8"]), parse_networks(["10.0.0.0/8"]))
        assert long_chain.client_address("10.0.0.1", ["10.0.0.2"] * MAX_FORWARDED_HOPS) == ip("10.0.0.2")
        assert long_chain.client_address("10.0.0.1", ["10.0.0.2"] * (MAX_FORWARDED_HOPS + 1)) is None

    def test_a_single_string_is_one_line(self) -> None:
        # Not iterated character by character.
        assert BEHIND_PROXY.client_address("127.0.0.1", "10.9.9.9, 203.0.113.9") == ip("203.0.113.9")

    @given(
        forged=st.lists(st.text(max_size=40), max_size=8),
        client=st.ip_addresses(v=4).filter(lambda a: a not in ipaddress.ip_network("127.0.0.1/32")),
        proxies=st.integers(min_value=0, max_value=3),
    )
    def test_whatever_the_client_sends_the_proxy_s_hop_wins(self, forged: list[str], client, proxies: int) -> None:
        # Proxies append "<their peer>" to the incoming header (some as a new line, some to the last line).
        lines = [*forged, str(client), *(["127.0.0.1"] * proxies)]
        assert BEHIND_PROXY.client_address("127.0.0.1", lines) == client
        joined = [", ".join(lines)]
        assert BEHIND_PROXY.client_address("127.0.0.1", joined) == client

    def test_bad_cidr_is_named(self) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
            parse_networks(["10.0.0.0/33"])


def xff(*lines: str) -> CIMultiDict[str]:
    """Request headers with one ``X-Forwarded-For`` line per argument, in order."""
    return CIMultiDict(("X-Forwarded-For", line) for line in lines)


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


@pytest.mark.integration
async def test_forwarded_for_lines_through_the_app(kafka: Kafka, make_settings, make_client, topic) -> None:
    """Issue 10 §3: allow-list 10.0.0.0/8, trusted proxy 127.0.0.1 (the test client's address)."""
    client = await make_client(make_settings(http_allowed_cidrs=["10.0.0.0/8"], http_trusted_proxies=["127.0.0.1"]))
    cases: list[tuple[str, CIMultiDict[str], int]] = [
        ("forged-first-line", xff("10.9.9.9", "203.0.113.9"), 403),
        ("forged-list", xff("10.9.9.9, 203.0.113.9"), 403),
        ("forged-list-and-line", xff("10.1.1.1, 10.9.9.9", "203.0.113.9, 127.0.0.1"), 403),
        ("garbage-line", xff("10.9.9.9", "not an address"), 403),
        ("garbage-element", xff("10.9.9.9, [::1"), 403),
        ("binary-ish", xff("10.9.9.9, \u00e9\u00e9"), 403),
        ("only-empty", xff("", " , "), 403),
        ("many-forged-lines", xff(*["10.9.9.9"] * 100, "203.0.113.9"), 403),
        ("ipv6-client", xff("10.9.9.9", "[2001:db8::1]:4711"), 403),
        ("real-client-last", xff("203.0.113.9", "10.9.9.9"), 200),
        ("real-client-with-port", xff("203.0.113.9, 10.9.9.9:4711"), 200),
        ("mapped", xff("[::ffff:10.9.9.9]:4711"), 200),
        ("empty-elements", xff(", 10.9.9.9", ""), 200),
        ("many-lines-allowed", xff(*["203.0.113.9"] * 100, "10.9.9.9", "127.0.0.1"), 200),
    ]
    for name, headers, status in cases:
        response = await client.post("/vod/callback", json=sample_event(name), headers=headers)
        assert response.status == status, (name, await response.text())
        if status == 403:
            assert (await response.json())["error"] == "forbidden"
    allowed = sorted(name.encode() for name, _, status in cases if status == 200)
    records = await read_records(kafka.bootstrap_servers, topic, count=len(allowed), settle_s=1.0)
    assert sorted(r.key for r in records) == allowed


def rejection_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.reason for r in caplog.records if r.name == "bridge.sources.callback" and hasattr(r, "reason")]


@pytest.mark.integration
async def test_signed_callbacks_through_the_app(kafka: Kafka, make_settings, make_client, topic, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(make_settings(http_sign_key=KEY, http_sign_skew_s=5))
    t = int(time.time()) + 600
    accepted: list[tuple[str, dict[str, Any]]] = [
        ("numeric-t", {"Sign": vod_sign(KEY, t), "T": t}),
        ("string-t", {"Sign": vod_sign(KEY, t), "T": str(t)}),
        ("leading-zeros", {"Sign": vod_sign(KEY, f"000{t}"), "T": f"000{t}"}),
    ]
    for name, fields in accepted:
        response = await client.post("/vod/callback", json={**sample_event(name), **fields})
        assert response.status == 200, (name, await response.text())

    old = int(time.time()) - 60
    ahead = int(time.time()) + 3600
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("unsigned", {}, "missing_signature"),
        ("sign-only", {"Sign": vod_sign(KEY, t)}, "missing_signature"),
        ("bad-sign", {"Sign": vod_sign("wrong", t), "T": t}, "bad_signature"),
        ("replayed", {"Sign": vod_sign(KEY, old), "T": old}, "expired"),
        ("replayed-string", {"Sign": vod_sign(KEY, old), "T": str(old)}, "expired"),
        ("tampered-t", {"Sign": vod_sign(KEY, t), "T": t + 1}, "bad_signature"),
        ("zeros-dropped", {"Sign": vod_sign(KEY, f"000{t}"), "T": t}, "bad_signature"),
        ("non-numeric", {"Sign": vod_sign(KEY, "soon"), "T": "soon"}, "bad_signature"),
        ("float", {"Sign": vod_sign(KEY, f"{t}.5"), "T": t + 0.5}, "bad_signature"),
        ("negative", {"Sign": vod_sign(KEY, -t), "T": -t}, "bad_signature"),
        ("bool", {"Sign": vod_sign(KEY, "true"), "T": True}, "missing_signature"),
        ("far-future", {"Sign": vod_sign(KEY, ahead), "T": ahead}, "t_too_far_ahead"),
        ("far-future-string", {"Sign": vod_sign(KEY, ahead), "T": str(ahead)}, "t_too_far_ahead"),
        ("huge", {"Sign": vod_sign(KEY, "9" * 5000), "T": "9" * 5000}, "bad_signature"),
    ]
    caplog.clear()
    for name, fields, _ in refused:
        response = await client.post("/vod/callback", json={**sample_event(name), **fields})
        assert response.status == 401, (name, await response.text())
        assert (await response.json())["error"] == "unauthorized"
    assert rejection_reasons(caplog) == [reason for _, _, reason in refused]

    records = await read_records(kafka.bootstrap_servers, topic, count=len(accepted), settle_s=1.0)
    assert sorted(r.key.decode() for r in records) == sorted(name for name, _ in accepted)
    for record in records:
        value = value_of(record)
        assert "Sign" not in value and "T" not in value
        assert value == sample_event(record.key.decode())
    assert KEY not in caplog.text


@pytest.mark.integration
async def test_a_body_with_string_t_signed_as_sent(kafka: Kafka, make_settings, make_client, topic) -> None:
    """The raw body, byte for byte as a sender that quotes T would write it."""
    client = await make_client(make_settings(http_sign_key=KEY))
    t = str(int(time.time()) + 300)
    body = json.dumps(sample_event("raw-string-t"))[:-1] + f', "Sign": "{vod_sign(KEY, t)}", "T": "{t}"}}'
    response = await client.post("/vod/callback", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 200, await response.text()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert value_of(record) == sample_event("raw-string-t")


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
async def test_token_is_still_required_with_a_sub_app_id_in_the_path(kafka: Kafka, make_settings, make_client, topic):
    client = await make_client(make_settings(http_token=TOKEN))
    for path, status in (
        ("/vod/callback/1500001", 401),
        ("/vod/callback/1500001/wrong-token-xxxxxxxx", 401),
        ("/vod/callback/1500001?token=nope", 401),
        (f"/vod/callback/{TOKEN}/1500001", 404),  # the SubAppId comes first, the token last
    ):
        response = await client.post(path, json=sample_event("intruder"))
        assert response.status == status, path
        assert TOKEN not in await response.text()
    assert (await client.post(f"/vod/callback/1500001/{TOKEN}", json=sample_event("by-path"))).status == 200
    assert (await client.post(f"/vod/callback/1500002?token={TOKEN}", json=sample_event("by-query"))).status == 200
    assert (await client.post(f"/vod/callback/{TOKEN}", json=sample_event("no-sub-app"))).status == 200
    records = await read_records(kafka.bootstrap_servers, topic, count=3, settle_s=1.0)
    assert {r.key: dict(r.headers).get("vod-sub-app-id") for r in records} == {
        b"by-path": b"1500001",
        b"by-query": b"1500002",
        b"no-sub-app": None,
    }
