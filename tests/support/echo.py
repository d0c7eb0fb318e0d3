"""The one echo app for tests: sends back what it reads, half-closes after the client does, counts
connections. Runs on the test's loop (`echo_server`) or on a loop in a thread (conftest's AppServer);
`echo_tunnel` is the same app behind an HBONE server, answering the CONNECT with 200."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ztunnel.hbone.server import InboundTunnel


class Echo:
    """The connection handler for asyncio.start_server; `connections` counts accepted connections."""

    def __init__(self, chunk: int = 256 * 1024) -> None:
        self.chunk = chunk
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(self.chunk):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def echo_server(host: str, port: int = 0) -> AsyncIterator[tuple[Echo, int]]:
    """An echo server on this loop at host:port (0: any free port); yields the handler and the port."""
    echo = Echo()
    server = await asyncio.start_server(echo, host, port, reuse_address=True, backlog=2048)
    try:
        yield echo, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class CountingServer:
    """The echo app as a server with a visible lifetime (start/stop) for tests that hold several at once;
    `connections` counts what reached it."""

    def __init__(self) -> None:
        self.echo = Echo(chunk=65536)
        self.server: asyncio.Server | None = None

    @property
    def connections(self) -> int:
        return self.echo.connections

    async def start(self, ip: str, port: int) -> CountingServer:
        self.server = await asyncio.start_server(self.echo, ip, port, reuse_address=True)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def echo_tunnel(tunnel: InboundTunnel) -> None:
    """An HBONE tunnel handler that accepts the CONNECT and echoes until the client half-closes."""
    tunnel.stream.respond(200)
    while data := await tunnel.stream.read():
        await tunnel.stream.write(data)
    await tunnel.stream.write_eof()
