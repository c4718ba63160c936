"""Callback authentication, sans I/O: VOD's ``Sign``/``T`` signature, a URL token, a source-IP allow-list.

VOD signs callbacks when the app has a ``SignKey``: the body carries ``T`` (UNIX seconds, the *expiry* of the
message) and ``Sign`` = lower-case hex ``MD5(SignKey + str(T))``. Note what this does and does not give: it
proves the sender knows the key and bounds replay to the validity window, but it does not cover the body.
Combine it with TLS, and with the URL token or the IP allow-list where that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

from .errors import BridgeError, Unauthorized

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEX_DIGITS: Final = frozenset("0123456789abcdef")


class Forbidden(BridgeError):
    """The source address is not on the allow-list."""

    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class AuthFailed(Unauthorized):
    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: Bounded label for metrics: missing_signature, bad_signature, expired, bad_token.
        self.reason = reason


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


def verify_token(provided: str | None, expected: str) -> None:
    """Constant-time check of the secret URL token."""
    if provided is None or not hmac.compare_digest(provided.encode(), expected.encode()):
        raise AuthFailed("missing or wrong callback token", reason="bad_token")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.0.0.0/8", "203.0.113.7"]`` -> networks; raises ValueError naming a bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr.strip()!r} is not an IP address or CIDR") from None
    return tuple(networks)


class SourceFilter:
    """Decides the client address (honouring ``X-Forwarded-For`` only from trusted proxies) and whether it
    is allowed. An empty allow-list allows everyone."""

    def __init__(self, allowed: Iterable[IPNetwork], trusted_proxies: Iterable[IPNetwork] = ()) -> None:
        self._allowed = tuple(allowed)
        self._trusted = tuple(trusted_proxies)

    @property
    def active(self) -> bool:
        return bool(self._allowed)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> IPAddress | None:
        """The first hop, from the right, that is not a trusted proxy; ``None`` if unparseable."""
        address = _parse_ip(peer)
        if address is None or not forwarded_for or not self._is_trusted(address):
            return address
        for hop in reversed(forwarded_for.split(",")):
            hop_address = _parse_ip(hop.strip())
            if hop_address is None:
                return None  # a forged or broken chain: do not guess
            if not self._is_trusted(hop_address):
                return hop_address
            address = hop_address
        return address

    def check(self, peer: str | None, forwarded_for: str | None) -> None:
        """Raise :class:`Forbidden` unless the client address is on the allow-list."""
        if not self._allowed:
            return
        address = self.client_address(peer, forwarded_for)
        if address is None or not any(address in network for network in self._allowed):
            raise Forbidden("source address not allowed")

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)


def _parse_ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
