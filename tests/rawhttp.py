"""A bare HTTP/1.1 client over TCP, for what an HTTP client library will not send (partial heads, ``Expect``
without a body, a body only after ``100 Continue``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    #: Interim responses (``100 Continue``) seen before this one.
    interim: list[int]

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """A bare TCP connection, for what an HTTP client library will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, timeout_s: float = 2.0) -> RawResponse:
        interim: list[int] = []
        async with asyncio.timeout(timeout_s):
            while True:
                head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                status = int(head[0].split()[1])
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)
                }
                if 100 <= status < 200:
                    interim.append(status)
                    continue
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
                return RawResponse(status, headers, body, interim)

    async def closed_by_server(self, *, within_s: float) -> bool:
        """True when the server closes (EOF or reset) within ``within_s``; data sent before that is ignored."""
        try:
            async with asyncio.timeout(within_s):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def raw_connection(host: str, port: int) -> AsyncIterator[RawConnection]:
    connection = await RawConnection.open(host, port)
    try:
        yield connection
    finally:
        connection.close()


def raw_request(method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
