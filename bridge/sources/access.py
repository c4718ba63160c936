"""Who may post callbacks, sans I/O: the secret URL token and the source-address allow-list (with
``X-Forwarded-For`` believed only from trusted proxies)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from bridge.config import IPAddress, IPNetwork
from bridge.errors import AuthFailed, Forbidden


def verify_token(provided: str | None, expected: str) -> None:
    """Constant-time check of the secret URL token."""
    if provided is None or not hmac.compare_digest(provided.encode(), expected.encode()):
        raise AuthFailed("missing or wrong callback token", reason="bad_token")


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
