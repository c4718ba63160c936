"""VOD callback signing, sans I/O: the ``Sign``/``T`` fields VOD adds when the app has a ``SignKey``.

The body carries ``T`` (UNIX seconds, the *expiry* of the message) and ``Sign`` = lower-case hex
``MD5(SignKey + str(T))``. Note what this does and does not give: it proves the sender knows the key and bounds
replay to the validity window, but it does not cover the body. Combine it with TLS, and with the URL token or
the IP allow-list where that matters.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from bridge.errors import AuthFailed

_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def expected_sign(sign_key: str, expires_at: int) -> str:
    return hashlib.md5((sign_key + str(expires_at)).encode(), usedforsecurity=False).hexdigest()


def verify_sign(sign: str | None, expires_at: int | None, *, sign_key: str, now_s: float, skew_s: float) -> None:
    """Raise :class:`AuthFailed` unless ``sign`` matches ``expires_at`` and the message has not expired
    (``now_s`` may exceed ``expires_at`` by at most ``skew_s``, for clock differences)."""
    if sign is None or expires_at is None:
        raise AuthFailed("callback signature missing: Sign and T are required", reason="missing_signature")
    candidate = sign.lower()
    # compare_digest needs ASCII; a non-hex Sign can never match anyway.
    if not (len(candidate) == 32 and set(candidate) <= _HEX_DIGITS) or not hmac.compare_digest(
        candidate, expected_sign(sign_key, expires_at)
    ):
        raise AuthFailed("callback signature does not match", reason="bad_signature")
    if now_s > expires_at + skew_s:
        raise AuthFailed("callback signature expired (T is in the past)", reason="expired")
