"""VOD callback signing, sans I/O: the ``Sign``/``T`` fields VOD adds when the app has a ``SignKey``.

The body carries ``T`` (UNIX seconds, the *expiry* of the message; VOD's default is 10 minutes after sending)
and ``Sign`` = lower-case hex ``MD5(SignKey + T)``, where ``T`` is the digits exactly as sent. Tencent's pages
do not say whether ``T`` travels as a JSON number or a numeric string, so both are read (see
:mod:`bridge.vod.decode`), and the MD5 covers the text as it came (``"0001700000000"`` hashes those 13
characters, not ``str(int(T))``).

What this gives: proof that the sender knows the key, and a bound on how long one captured ``Sign``/``T`` pair
stays usable. What it does not give: the body is not signed, so anyone who captured one signed callback can
send *any* body with its ``Sign``/``T`` until ``T`` expires. Combine it with TLS, and with the URL token or the
IP allow-list.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from bridge.errors import AuthFailed

_HEX_DIGITS: Final = frozenset("0123456789abcdef")

#: Longest ``T`` text read at all. Ten digits reach the year 2286; the rest leaves room for leading zeros, and
#: the bound keeps a hostile ``T`` from costing a big-integer parse.
MAX_T_CHARS: Final = 32

#: How far past *now* a ``T`` may lie: VOD's documented default expiry (10 minutes after sending). Tencent
#: documents no larger value for event callbacks; a ``T`` further out would keep a captured ``Sign`` usable
#: for longer than VOD itself intends, so it is refused (``t_too_far_ahead``).
DEFAULT_MAX_TTL_S: Final = 600.0


def parse_expiry(text: str) -> int | None:
    """``T``'s value in UNIX seconds when ``text`` is 1 to :data:`MAX_T_CHARS` ASCII digits, else ``None``
    (a sign, a fraction, an exponent, spaces or any other character make it unusable)."""
    if not 0 < len(text) <= MAX_T_CHARS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def expected_sign(sign_key: str, expires_at: int | str) -> str:
    """``MD5(SignKey + T)`` in lower-case hex; a ``str`` ``T`` is hashed exactly as given."""
    return hashlib.md5((sign_key + str(expires_at)).encode(), usedforsecurity=False).hexdigest()


def verify_sign(
    sign: str | None,
    expires_at_text: str | None,
    *,
    sign_key: str,
    now_s: float,
    skew_s: float,
    max_ttl_s: float = DEFAULT_MAX_TTL_S,
) -> None:
    """Raise :class:`AuthFailed` unless ``sign`` is the MD5 of ``sign_key`` + ``expires_at_text`` (``T`` as
    sent) and ``T`` is within ``[now_s - skew_s, now_s + max_ttl_s + skew_s]``: ``skew_s`` allows for clock
    differences in both directions. Reasons: ``missing_signature``, ``bad_signature`` (also for a ``T`` that is
    not digits), ``expired``, ``t_too_far_ahead``. Messages never contain the key or the sent values."""
    if sign is None or expires_at_text is None:
        raise AuthFailed("callback signature missing: Sign and T are required", reason="missing_signature")
    expires_at = parse_expiry(expires_at_text)
    if expires_at is None:
        raise AuthFailed("callback signature unusable: T must be UNIX seconds in digits", reason="bad_signature")
    candidate = sign.lower()
    # compare_digest needs ASCII; a non-hex Sign can never match anyway.
    if not (len(candidate) == 32 and set(candidate) <= _HEX_DIGITS) or not hmac.compare_digest(
        candidate, expected_sign(sign_key, expires_at_text)
    ):
        raise AuthFailed("callback signature does not match", reason="bad_signature")
    if now_s > expires_at + skew_s:
        raise AuthFailed("callback signature expired (T is in the past)", reason="expired")
    if expires_at > now_s + max_ttl_s + skew_s:
        raise AuthFailed(
            f"callback signature valid for too long (T is more than {max_ttl_s + skew_s:g}s ahead)",
            reason="t_too_far_ahead",
        )
