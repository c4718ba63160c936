"""The suite's own tools do what they say: a cut port really refuses or stalls, and heals; a tmpfs really fills."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from netns import Firewall, tmpfs


@pytest.fixture
async def listener() -> AsyncIterator[asyncio.Server]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server
    server.close()
    await server.wait_closed()


async def _round_trip(port: int, timeout_s: float) -> bytes:
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        data = await reader.readexactly(4)
        writer.close()
        return data


async def test_reset_refuses_then_heal_restores(listener: asyncio.Server) -> None:
    port = listener.sockets[0].getsockname()[1]
    assert await _round_trip(port, 2) == b"ping"
    with Firewall() as firewall:
        firewall.cut([port], "reset")
        with pytest.raises(ConnectionRefusedError):
            await _round_trip(port, 2)
    assert await _round_trip(port, 2) == b"ping"


async def test_blackhole_stalls_then_heal_restores(listener: asyncio.Server) -> None:
    port = listener.sockets[0].getsockname()[1]
    with Firewall() as firewall:
        firewall.cut([port], "blackhole")
        with pytest.raises(TimeoutError):
            await _round_trip(port, 0.5)
        assert firewall.cut_ports == {port}
    assert await _round_trip(port, 2) == b"ping"


def test_reset_breaks_an_open_connection() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=2)
    peer, _ = server.accept()
    with Firewall() as firewall:
        firewall.cut([port], "reset")
        client.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    for s in (client, peer, server):
        s.close()


def test_tmpfs_fills_up(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 64 * 1024) as small:
        path = small / "fill"
        with pytest.raises(OSError) as raised, path.open("wb") as out:
            for _ in range(100):
                out.write(b"\0" * 4096)
                out.flush()
                os.fsync(out.fileno())
        assert raised.value.errno == errno.ENOSPC
