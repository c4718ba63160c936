"""VOD callback signing (Sign/T), sans I/O: how T is read from the body and how the signature is checked."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from conftest import sample_event

from bridge.errors import AuthFailed
from bridge.vod.decode import read_event
from bridge.vod.model import Undecodable, VodEvent
from bridge.vod.signing import DEFAULT_MAX_TTL_S, MAX_T_CHARS, expected_sign, parse_expiry, verify_sign

KEY = "SignKey42"
NOW = 1_700_000_000


def vod_sign(key: str, t_text: str) -> str:
    """The scheme as Tencent documents it, written independently of the code under test."""
    return hashlib.md5(f"{key}{t_text}".encode()).hexdigest()


def verify(sign: str | None, t_text: str | None, *, now_s: float = NOW, skew_s: float = 60) -> None:
    verify_sign(sign, t_text, sign_key=KEY, now_s=now_s, skew_s=skew_s)


class TestExpectedSign:
    def test_tencent_example(self) -> None:
        # The worked example of the same MD5(key + expiry) callback scheme in Tencent's TIW event docs.
        assert expected_sign("Xz4ZgayTr7rMgWQrH", 1588040109) == "a2dabb362a9b811c0e26953a6276a41c"

    def test_text_is_hashed_as_given(self) -> None:
        assert expected_sign(KEY, "0001700000000") == vod_sign(KEY, "0001700000000")
        assert expected_sign(KEY, "0001700000000") != expected_sign(KEY, 1700000000)
        assert expected_sign(KEY, 1700000000) == expected_sign(KEY, "1700000000")


class TestParseExpiry:
    @pytest.mark.parametrize(
        ("text", "value"),
        [("1700000000", 1700000000), ("0001700000000", 1700000000), ("0", 0), ("9" * MAX_T_CHARS, int("9" * 32))],
    )
    def test_digits(self, text: str, value: int) -> None:
        assert parse_expiry(text) == value

    @pytest.mark.parametrize(
        "text",
        [
            *("", "-5", "+5", "1.5", "1e9", " 17", "17 ", "0x10", "abc", "1_000", "9" * (MAX_T_CHARS + 1)),
            # str.isdigit() accepts these (full-width, Arabic-Indic); int() would even parse them.
            *("\uff11\uff17", "\u0661"),
        ],
    )
    def test_anything_else_is_unusable(self, text: str) -> None:
        assert parse_expiry(text) is None


class TestVerifySign:
    def test_numeric_t(self) -> None:
        t = str(NOW + 600)
        verify(vod_sign(KEY, t), t)
        verify(vod_sign(KEY, t).upper(), t)

    def test_leading_zeros_are_signed_as_sent(self) -> None:
        t = f"000{NOW + 600}"
        verify(vod_sign(KEY, t), t)
        # The same instant written without the zeros is another message: its Sign does not fit.
        with pytest.raises(AuthFailed) as info:
            verify(vod_sign(KEY, str(NOW + 600)), t)
        assert info.value.reason == "bad_signature"
        with pytest.raises(AuthFailed):
            verify(vod_sign(KEY, t), str(NOW + 600))

    @pytest.mark.parametrize(
        ("sign", "t", "reason"),
        [
            (None, str(NOW), "missing_signature"),
            ("abc", None, "missing_signature"),
            ("0" * 32, str(NOW), "bad_signature"),
            ("zz", str(NOW), "bad_signature"),
            ("é" * 32, str(NOW), "bad_signature"),
            ("RIGHT", "abc", "bad_signature"),
            ("RIGHT", "", "bad_signature"),
            ("RIGHT", f"{NOW}.0", "bad_signature"),
            ("RIGHT", "-5", "bad_signature"),
            ("RIGHT", "1.7e9", "bad_signature"),
            ("RIGHT", "9" * (MAX_T_CHARS + 1), "bad_signature"),
            ("RIGHT", str(NOW - 61), "expired"),
            ("RIGHT", "0", "expired"),
            ("RIGHT", str(NOW + 661), "t_too_far_ahead"),
            ("RIGHT", "9" * MAX_T_CHARS, "t_too_far_ahead"),
        ],
    )
    def test_rejections(self, sign: str | None, t: str | None, reason: str) -> None:
        if sign == "RIGHT":
            assert t is not None
            sign = vod_sign(KEY, t)  # a correct MD5 even over a malformed T: the T itself must be refused
        with pytest.raises(AuthFailed) as info:
            verify(sign, t)
        assert info.value.reason == reason
        assert info.value.status == 401
        assert KEY not in info.value.message
        if t:
            assert t not in info.value.message

    def test_window_bounds_are_inclusive(self) -> None:
        for t in (str(NOW - 60), str(NOW + int(DEFAULT_MAX_TTL_S) + 60)):
            verify(vod_sign(KEY, t), t)

    def test_max_ttl_is_a_parameter(self) -> None:
        t = str(NOW + 3600)
        verify_sign(vod_sign(KEY, t), t, sign_key=KEY, now_s=NOW, skew_s=0, max_ttl_s=3600)
        with pytest.raises(AuthFailed, match="ahead"):
            verify_sign(vod_sign(KEY, t), t, sign_key=KEY, now_s=NOW, skew_s=0, max_ttl_s=3599)

    def test_signature_of_another_key_fails(self) -> None:
        with pytest.raises(AuthFailed):
            verify(vod_sign("OtherKey", str(NOW)), str(NOW), skew_s=0)


def read(t_json: str) -> VodEvent:
    """A sample event with ``"T": <t_json>`` spliced in verbatim (so any JSON spelling can be sent)."""
    body = json.dumps({**sample_event("t"), "Sign": "s"})[:-1] + f', "T": {t_json}}}'
    event = read_event(body.encode())
    assert isinstance(event, VodEvent)
    assert "T" not in json.loads(event.value)  # never published, whatever its shape
    return event


class TestReadingT:
    @pytest.mark.parametrize(
        ("t_json", "value", "text"),
        [
            ("1700000000", 1700000000, "1700000000"),
            ('"1700000000"', 1700000000, "1700000000"),
            ('"0001700000000"', 1700000000, "0001700000000"),
            ('"\\u0031700000000"', 1700000000, "1700000000"),  # a JSON escape is the same string
        ],
    )
    def test_number_or_numeric_string(self, t_json: str, value: int, text: str) -> None:
        event = read(t_json)
        assert (event.expires_at, event.expires_at_text, event.fallbacks) == (value, text, ())

    @pytest.mark.parametrize(
        ("t_json", "text"),
        [
            ('"abc"', "abc"),
            ('""', ""),
            ("1700000000.5", "1700000000.5"),
            ("1.7e9", "1.7e9"),
            ("-5", "-5"),
            ('"-5"', "-5"),
            ("true", None),
            ("[1700000000]", None),
            ('{"T": 1}', None),
            (f'"{"1" * 5000}"', "1" * 5000),
            ("1" * 5000, "1" * 5000),
        ],
    )
    def test_unusable_t_is_labelled_and_kept_for_the_check(self, t_json: str, text: str | None) -> None:
        event = read(t_json)
        assert (event.expires_at, event.expires_at_text) == (None, text)
        assert event.fallbacks == ("transport_field_unreadable",)

    def test_null_t_is_absent(self) -> None:
        event = read("null")
        assert (event.expires_at, event.expires_at_text, event.fallbacks) == (None, None, ())

    def test_dead_letters_keep_t_too(self) -> None:
        dead = read_event(b'{"EventType": "PullComplete", "Sign": "s", "T": "0017"}')
        assert isinstance(dead, Undecodable)
        assert (dead.sign, dead.expires_at, dead.expires_at_text) == ("s", 17, "0017")

    def test_a_body_signed_over_string_t_verifies(self) -> None:
        t = str(int(time.time()) + 300)
        event = read_event(json.dumps({**sample_event("t"), "Sign": vod_sign(KEY, t), "T": t}).encode())
        assert isinstance(event, VodEvent)
        verify_sign(event.sign, event.expires_at_text, sign_key=KEY, now_s=time.time(), skew_s=60)
