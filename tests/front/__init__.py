"""Tests of the data-plane front (`proxy.front`): helpers shared by its test modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from proxy.front.message import Answer, Incoming
from proxy.front.server import FrontLimits, FrontServer

Handler = Callable[[Incoming], Awaitable[None]]


async def ok_handler(incoming: Incoming) -> None:
    await incoming.respond(Answer(200, b"ok:" + incoming.target.encode(), [("X-T", "1")]))


@asynccontextmanager
async def serve(
    handler: Handler = ok_handler, *, control: Any = None, **limits: Any
) -> AsyncIterator[FrontServer]:
    front = FrontServer(handler, limits=FrontLimits(**limits), control=control)
    await front.start("127.0.0.1", 0)
    try:
        yield front
    finally:
        await front.shutdown(1.0)


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Client:
    """A raw HTTP/1.1 client over one connection, reading answers strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, front: FrontServer) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def get(self, target: str = "/", **kw: Any) -> Reply:
        await self.send(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return await self.read(**kw)

    async def read(self, *, head: bool = False, within: float = 5.0) -> Reply:
        return await asyncio.wait_for(self._read(head), within)

    async def _read(self, head_only: bool) -> Reply:
        line = await self.reader.readuntil(b"\r\n")
        version, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0")
        headers: list[tuple[str, str]] = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("utf-8", "surrogateescape").rstrip("\r\n").partition(":")
            headers.append((name, value.strip()))
        reply = Reply(int(status), reason, headers, b"")
        code = int(status)
        if head_only or code < 200 or code in (204, 304):
            return reply
        te = reply.header("Transfer-Encoding")
        length = reply.header("Content-Length")
        if te is not None:
            assert te == "chunked"
            assert length is None
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                data = await self.reader.readexactly(size + 2)
                assert data.endswith(b"\r\n")
                if size == 0:
                    break
                parts.append(data[:-2])
            reply.chunks = parts
            reply.body = b"".join(parts)
        elif length is not None:
            reply.body = await self.reader.readexactly(int(length))
        else:
            reply.body = await self.reader.read()
        return reply

    async def closed(self, within: float = 5.0) -> bool:
        """Whether the server closes the connection (EOF) within `within` seconds, reading
        anything still sent."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), within):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()
