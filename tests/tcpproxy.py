"""A TCP proxy the tests control, to cut the network between a client and a server on purpose.

::

    async with TcpProxy("127.0.0.1", broker_port) as proxy:
        client = connect_to(proxy.address)   # "127.0.0.1:<port>", an ephemeral port unless listen_port= is given
        proxy.cut()                          # or proxy.cut(mode="blackhole")
        ...
        proxy.restore()

Two ways to cut:

``reset``
    Every open connection is aborted on both sides with a TCP RST (``SO_LINGER`` 0), and every new
    connection is accepted and reset at once, so a client fails fast (``ConnectionResetError`` or EOF),
    as against a crashed peer or a closed port. The listening port stays ours, so :meth:`TcpProxy.restore`
    cannot lose it to another process.
``blackhole``
    Nothing is closed and nothing is forwarded: open connections stall with their data held, new
    connections are accepted (the kernel completes the handshake) but not connected upstream. Clients hang
    until their own timeouts, as behind a partition or a firewall that drops packets. :meth:`TcpProxy.restore`
    heals it like a partition that heals before TCP gives up: held data is delivered in order, and waiting
    connections are connected upstream. A client that timed out and closed meanwhile is seen as closed.

Holding one direction (:meth:`TcpProxy.hold`, :meth:`TcpProxy.release`): data keeps flowing the other way,
so a request reaches the server and its answer waits in the proxy (a Kafka produce request is appended by the
broker, its ack held), optionally only on the connections of some clients (``clients=``, a predicate on the
client's ``(host, port)``; e.g. the connections of one process, see ``faultkit.connected_ports``). Released, the
held data is delivered in order; a cut in ``reset`` mode discards it with the connections.

Counters: :attr:`TcpProxy.connections` (accepted), :attr:`TcpProxy.active`, :attr:`TcpProxy.resets`
(connections reset by a cut), :attr:`TcpProxy.bytes_upstream` (client to target),
:attr:`TcpProxy.bytes_downstream` (target to client) and :attr:`TcpProxy.held_bytes` (read, and waiting at a
hold now).

Kafka note: a broker advertises its own listener address in its metadata and clients then connect there,
bypassing a proxy given only as bootstrap server. Put a proxy in front of a broker only when the broker
advertises the proxy's address (tansu: ``--advertised-listener-url tcp://127.0.0.1:<proxy port>``): start the
proxy first and give its port to the broker, or pick the port first and pass it as ``listen_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from types import TracebackType
from typing import Literal

CutMode = Literal["reset", "blackhole"]
#: ``upstream``: client to target; ``downstream``: target to client.
Direction = Literal["upstream", "downstream"]

_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: the peer sees ``ConnectionResetError``, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side, the target side once connected, and its pump tasks."""

    def __init__(self, client_writer: asyncio.StreamWriter) -> None:
        self.client_writer = client_writer
        self.target_writer: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: Set while the direction flows; cleared by :meth:`TcpProxy.hold` for this link.
        self.open: dict[Direction, asyncio.Event] = {"upstream": asyncio.Event(), "downstream": asyncio.Event()}
        for event in self.open.values():
            event.set()

    @property
    def client(self) -> tuple[str, int]:
        peer = self.client_writer.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer else ("", 0)

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _reset(self.client_writer)
        if self.target_writer is not None:
            _reset(self.target_writer)


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` in both directions until told otherwise."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_port: int = 0, connect_timeout_s: float = 5.0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout_s = connect_timeout_s
        self.connections = 0
        self.resets = 0
        self.bytes_upstream = 0
        self.bytes_downstream = 0
        #: Bytes read from one side and waiting at a hold (not yet passed on) right now.
        self.held_bytes = 0
        #: The current hold: its direction and which clients' connections it holds (``None``: all).
        self._hold: tuple[Direction, Callable[[tuple[str, int]], bool] | None] | None = None
        self._mode: CutMode | None = None
        #: Set while forwarding; pumps and new connections wait on it during a blackhole.
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        #: The port to listen on; 0 picks a free one. A fixed port is for a peer that must know it in advance
        #: (a Kafka broker advertising the proxy's address).
        self._port = listen_port

    # ---------------------------------------------------------------------------------------------------
    # Control
    # ---------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def active(self) -> int:
        """Connections currently open on the client side."""
        return len(self._links)

    @property
    def mode(self) -> CutMode | None:
        """``None`` while forwarding, else the mode of the current cut."""
        return self._mode

    def cut(self, mode: CutMode = "reset") -> None:
        """Cut the network. ``reset``: abort every connection with RST and reset new ones; ``blackhole``:
        forward nothing and close nothing. A second cut replaces the first (a blackhole turned into a reset
        resets the stalled connections)."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"unknown cut mode {mode!r}")
        self._mode = mode
        self._flowing.clear()
        if mode == "reset":
            for link in list(self._links):
                self._drop(link)

    def restore(self) -> None:
        """Forward again; connections stalled by a blackhole resume where they stopped."""
        self._mode = None
        self._flowing.set()

    def hold(
        self, direction: Direction = "downstream", *, clients: Callable[[tuple[str, int]], bool] | None = None
    ) -> None:
        """Hold the data of one direction (the other keeps flowing), on the connections whose client address
        ``clients`` accepts (all by default): open ones now, new ones when accepted while the hold lasts. A new
        hold replaces the previous one."""
        if direction not in ("upstream", "downstream"):
            raise ValueError(f"unknown direction {direction!r}")
        self.release()
        self._hold = (direction, clients)
        for link in self._links:
            self._apply_hold(link)

    def release(self) -> None:
        """End the hold: the held data is passed on, in order."""
        self._hold = None
        for link in self._links:
            for event in link.open.values():
                event.set()

    def _apply_hold(self, link: _Link) -> None:
        if self._hold is not None:
            direction, clients = self._hold
            if clients is None or clients(link.client):
                link.open[direction].clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", self._port, reuse_address=True)

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link, count=False)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------------------------
    # Forwarding
    # ---------------------------------------------------------------------------------------------------

    def _drop(self, link: _Link, *, count: bool = True) -> None:
        if link in self._links:
            self._links.discard(link)
            if count:
                self.resets += 1
            link.reset()

    async def _on_connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        link = _Link(client_writer)
        self._links.add(link)
        self._apply_hold(link)
        try:
            await self._serve(link, client_reader)
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            if link in self._links:
                self._links.discard(link)
                client_writer.transport.abort()
                if link.target_writer is not None:
                    link.target_writer.transport.abort()

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        if self._mode == "reset":
            self._drop(link)
            return
        # A blackhole holds new connections here: accepted, but not connected upstream.
        await self._flowing.wait()
        if link not in self._links:  # reset while waiting
            return
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except (OSError, TimeoutError):
            self._drop(link, count=False)  # the target is down: the client sees what it would see without us
            return
        link.target_writer = target_writer
        if link not in self._links:  # reset while connecting
            target_writer.transport.abort()
            return
        upstream = asyncio.create_task(self._pump(client_reader, target_writer, upstream=True, link=link))
        downstream = asyncio.create_task(self._pump(target_reader, link.client_writer, upstream=False, link=link))
        link.tasks = {upstream, downstream}
        # Each side's EOF is passed on (half-close); the link ends when both directions ended.
        await asyncio.gather(upstream, downstream, return_exceptions=True)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool, link: _Link
    ) -> None:
        gate = link.open["upstream" if upstream else "downstream"]
        try:
            while True:
                data = await reader.read(_CHUNK)
                # During a blackhole the data read is held here (and TCP back-pressure builds behind it).
                await self._flowing.wait()
                if not gate.is_set():  # held in this direction: the same, for this link and direction only
                    self.held_bytes += len(data)
                    try:
                        await gate.wait()
                    finally:
                        self.held_bytes -= len(data)
                    await self._flowing.wait()  # a cut may have begun meanwhile
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                if upstream:
                    self.bytes_upstream += len(data)
                else:
                    self.bytes_downstream += len(data)
        except (ConnectionError, OSError):
            # One side went away: take the other one down too, as the network would.
            writer.transport.abort()
