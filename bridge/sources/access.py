"""Who may post callbacks, sans I/O: the secret URL token and the source-address allow-list (with
``X-Forwarded-For`` believed only from trusted proxies)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Final

from bridge.config import IPAddress, IPNetwork
from bridge.errors import AuthFailed, Forbidden

#: Hops of ``X-Forwarded-For`` looked at, from the right, before giving up (the client is then unknown and
#: refused). Real chains have a handful of proxies; the bound keeps the walk's cost fixed whatever the
#: client sends (aiohttp already caps a request at 128 header lines of 8 KiB).
MAX_FORWARDED_HOPS: Final = 32


def verify_token(provided: str | None, expected: str) -> None:
    """Constant-time check of the secret URL token."""
    if provided is None or not hmac.compare_digest(provided.encode(), expected.encode()):
        raise AuthFailed("missing or wrong callback token", reason="bad_token")


class SourceFilter:
    """Decides the client address (honouring ``X-Forwarded-For`` only from trusted proxies) and whether it
    is allowed. An empty allow-list allows everyone.

    ``X-Forwarded-For`` is read as *all* its header lines, in order, each a comma-separated list, and walked
    from the right (the hop nearest to us) leftwards: the client is the first hop that is not a trusted proxy;
    what lies left of it was written by the client and is never believed. A hop is an IPv4 or IPv6 address,
    optionally with a port (``203.0.113.9:4711``, ``[2001:db8::1]:4711``) or in brackets (``[2001:db8::1]``);
    IPv4-mapped IPv6 addresses count as IPv4. An IPv6 address with a port must be bracketed (unbracketed, the
    port would read as part of the address). Empty elements (``a,,b``, an empty line) claim nothing and are
    skipped. Anything else (``unknown``, a host name, RFC 7239 ``for=`` syntax) makes the client unknown:
    refused when an allow-list is set, never guessed.
    """

    def __init__(self, allowed: Iterable[IPNetwork], trusted_proxies: Iterable[IPNetwork] = ()) -> None:
        self._allowed = tuple(allowed)
        self._trusted = tuple(trusted_proxies)

    @property
    def active(self) -> bool:
        return bool(self._allowed)

    def client_address(self, peer: str | None, forwarded_for: str | Iterable[str] | None = ()) -> IPAddress | None:
        """The client: ``peer`` unless it is a trusted proxy, else the first hop of ``forwarded_for`` (its
        header lines in order, or one line) from the right that is not a trusted proxy, or the left-most hop
        when all are trusted. ``None`` when that hop is unparseable or the chain is longer than
        :data:`MAX_FORWARDED_HOPS`."""
        address = _parse_peer(peer)
        if address is None or not self._is_trusted(address):
            return address
        lines = (forwarded_for,) if isinstance(forwarded_for, str) else tuple(forwarded_for or ())
        hops = 0
        for line in reversed(lines):
            for hop in reversed(line.split(",")):
                text = hop.strip()
                if not text:
                    continue
                hops += 1
                hop_address = _parse_hop(text) if hops <= MAX_FORWARDED_HOPS else None
                if hop_address is None:
                    return None  # a forged or broken chain: do not guess
                if not self._is_trusted(hop_address):
                    return hop_address
                address = hop_address
        return address

    def check(self, peer: str | None, forwarded_for: str | Iterable[str] | None = ()) -> None:
        """Raise :class:`Forbidden` unless the client address (see :meth:`client_address`) is on the
        allow-list."""
        if not self._allowed:
            return
        address = self.client_address(peer, forwarded_for)
        if address is None or not any(address in network for network in self._allowed):
            raise Forbidden("source address not allowed")

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)


def _parse_peer(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _parse_hop(text: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` element: ``ip``, ``ipv4:port``, ``[ipv6]`` or ``[ipv6]:port``."""
    if text.startswith("["):
        text, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return None
    elif text.count(":") == 1:  # IPv4 with a port; an IPv6 address has at least two colons
        text, _, port = text.partition(":")
        if not _is_port(port):
            return None
    try:
        return _unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and 0 < int(text) <= 65535


def _unmapped(address: IPAddress) -> IPAddress:
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; the allow-list names them as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
