"""The ByteStream conformance checks (half-close, reset, backpressure) on real TCP and HBONE streams."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.connection import HboneStream
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.streams import ByteStream, StreamClosed, TcpStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.proxy.certs import SigningProvider
from ztunnel.proxy.listeners import listening_socket, serve_streams
from ztunnel.proxy.relay import relay

HBONE_IP = "127.0.171.1"
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/streams/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/streams/sa/server")


async def check_half_close(a: ByteStream, b: ByteStream) -> None:
    """a half-closes; b sees EOF and can still answer; then b half-closes too."""
    await a.write(b"request")
    await a.write_eof()
    got = b""
    while chunk := await b.read():
        got += chunk
    assert got == b"request"
    await b.write(b"answer after EOF")
    await b.write_eof()
    got = b""
    while chunk := await a.read():
        got += chunk
    assert got == b"answer after EOF"


async def check_reset(a: ByteStream, b: ByteStream) -> None:
    """An abort on one side is an error on the other, not a clean EOF."""
    await a.write(b"x")
    assert await b.read() == b"x"
    a.abort()
    with pytest.raises((StreamClosed, ConnectionError)):
        for _ in range(100):
            if not await b.read():
                raise AssertionError("a reset was reported as a clean EOF")


async def check_backpressure(a: ByteStream, b: ByteStream, limit: int) -> None:
    """With nobody reading b, writes to a stall instead of buffering without bound."""
    written = 0
    block = b"z" * (1 << 20)

    async def writer() -> None:
        nonlocal written
        while True:
            await a.write(block)
            written += len(block)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    stalled_at = written
    await asyncio.sleep(0.3)
    assert written == stalled_at, "the writer kept going although nobody reads"
    assert written <= limit, written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[TcpStream, TcpStream]]:
    accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def on_stream(s: TcpStream) -> None:
        accepted.put_nowait(s)

    sock = listening_socket("127.0.0.1", 0)
    server = await serve_streams(sock, on_stream, tasks=tasks)
    a = await TcpStream.connect(*sock.getsockname()[:2])
    b = await accepted.get()
    yield a, b
    a.abort()
    b.abort()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def hbone_pair(ca_dir: Path) -> AsyncIterator[tuple[HboneStream, HboneStream]]:
    contexts = TlsContexts(SigningProvider.from_dir(ca_dir))
    served: asyncio.Queue[HboneStream] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(tunnel: InboundTunnel) -> None:
        tunnel.stream.respond(200)
        served.put_nowait(tunnel.stream)
        await done.wait()

    server = HboneServer(contexts, handler)
    listener = await server.listen(listening_socket(HBONE_IP, 15008), SERVER)
    pool = HbonePool(contexts)
    a = await pool.connect(
        PoolKey(CLIENT, SERVER, (HBONE_IP, 15008)), Authority(HBONE_IP, 1), expected_identities=[SERVER.uri]
    )
    b = await served.get()
    yield a, b
    done.set()
    pool.close()
    server.abort()
    listener.close()
    await listener.wait_closed()


async def test_tcp_half_close(tcp_pair: tuple[TcpStream, TcpStream]) -> None:
    await check_half_close(*tcp_pair)


async def test_tcp_reset(tcp_pair: tuple[TcpStream, TcpStream]) -> None:
    await check_reset(*tcp_pair)


async def test_tcp_backpressure(tcp_pair: tuple[TcpStream, TcpStream]) -> None:
    a, b = tcp_pair
    sock = a.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    await check_backpressure(a, b, limit=64 * 1024 * 1024)


async def test_hbone_half_close_both_ways(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    await check_half_close(*hbone_pair)


async def test_hbone_server_side_half_close_first(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    a, b = hbone_pair
    await check_half_close(b, a)


async def test_hbone_reset(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    await check_reset(*hbone_pair)


async def test_hbone_backpressure_is_bounded_by_the_stream_window(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    await check_backpressure(*hbone_pair, limit=8 * 1024 * 1024)


async def test_relay_keeps_half_close_and_resets(tcp_pair: tuple[TcpStream, TcpStream]) -> None:
    """client -> [relay] -> app, built from two TCP pairs: the relay's conformance end to end."""
    client, proxy_down = tcp_pair
    accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def on_stream(s: TcpStream) -> None:
        accepted.put_nowait(s)

    sock = listening_socket("127.0.0.1", 0)
    server = await serve_streams(sock, on_stream, tasks=tasks)
    proxy_up = await TcpStream.connect(*sock.getsockname()[:2])
    app = await accepted.get()
    relaying = asyncio.create_task(relay(proxy_down, proxy_up))
    try:
        await check_half_close(client, app)
        counters = await asyncio.wait_for(relaying, 5)
        assert (counters.a_to_b, counters.b_to_a) == (7, 16)
    finally:
        relaying.cancel()
        proxy_up.abort()
        app.abort()
        server.close()
        await server.wait_closed()
