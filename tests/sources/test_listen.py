"""Binding the listening sockets before anything announces them (bridge.sources.listen)."""

from __future__ import annotations

import socket

import pytest

from bridge.errors import ConfigError
from bridge.sources.listen import bind_listeners, listening_urls


def test_a_busy_port_is_a_configuration_error_naming_address_port_and_settings() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            bind_listeners("127.0.0.1", port, reuse_port=False)
    message = info.value.message
    assert f"cannot listen on 127.0.0.1 port {port}: address already in use" in message
    assert "BRIDGE_HTTP_HOST / --host" in message and "BRIDGE_HTTP_PORT / --port" in message


def test_reuse_port_lets_workers_share_the_port() -> None:
    first = bind_listeners("127.0.0.1", 0, reuse_port=True)
    port = first[0].getsockname()[1]
    second = bind_listeners("127.0.0.1", port, reuse_port=True)
    try:
        assert listening_urls(first, scheme="http") == listening_urls(second, scheme="http")
        assert listening_urls(first, scheme="https") == [f"https://127.0.0.1:{port}"]
        # Listening already: a client connects before any event loop accepts.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        for sock in first + second:
            sock.close()


def test_an_unknown_host_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        bind_listeners("no-such-host.invalid", 0, reuse_port=False)
    assert "cannot listen on no-such-host.invalid:0" in info.value.message


def test_an_ephemeral_port_is_reported_as_bound() -> None:
    (sock,) = bind_listeners("127.0.0.1", 0, reuse_port=False)
    try:
        assert listening_urls([sock], scheme="http") == [f"http://127.0.0.1:{sock.getsockname()[1]}"]
    finally:
        sock.close()
