"""The ByteStream conformance checks (half-close, reset, backpressure) on real TCP and HBONE streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually_async
from tests.support.streams import BLOCK, Filler, check_backpressure, check_half_close, check_reset
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import STREAM_WINDOW, Authority
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket
from ztunnel.net.streams import READ_CHUNK, TCP_READ_BUFFER_LIMIT, ByteStream, StreamClosed, TcpStream
from ztunnel.proxy.listeners import serve_streams
from ztunnel.proxy.relay import RelayCounters, relay

HBONE_IP = "127.0.171.1"
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/streams/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/streams/sa/server")


@contextlib.asynccontextmanager
async def connected_tcp() -> AsyncIterator[tuple[TcpStream, TcpStream]]:
    """Both ends of one loopback TCP connection (connecting, accepted); aborted and the listener closed after."""
    accepted: asyncio.Queue[TcpStream] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def on_stream(s: TcpStream) -> None:
        accepted.put_nowait(s)

    sock = listening_socket("127.0.0.1", 0)
    server = await serve_streams(sock, on_stream, tasks=tasks)
    a = await TcpStream.connect(*sock.getsockname()[:2])
    b = await accepted.get()
    try:
        yield a, b
    finally:
        a.abort()
        b.abort()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[TcpStream, TcpStream]]:
    async with connected_tcp() as pair:
        yield pair


@pytest.fixture
async def hbone_pair(certs: CertificateManager) -> AsyncIterator[tuple[HboneStream, HboneStream]]:
    contexts = TlsContexts(certs)
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
    a_sock = a.transport.get_extra_info("socket")
    b_sock = b.transport.get_extra_info("socket")
    a_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    b_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # a fixed size: no autotuning growth
    # What may be in flight: a's write buffer (high-water mark, plus the block that crossed it), both
    # kernel buffers (getsockopt reports them with the kernel's overhead share), and b's user-space buffer
    # up to its pause limit plus one received chunk.
    limit = (
        a.transport.get_write_buffer_limits()[1]
        + BLOCK
        + a_sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        + b_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        + TCP_READ_BUFFER_LIMIT
        + READ_CHUNK
    )
    await check_backpressure(a, b, limit=limit)


async def test_hbone_half_close_both_ways(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    await check_half_close(*hbone_pair)


async def test_hbone_server_side_half_close_first(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    a, b = hbone_pair
    await check_half_close(b, a)


async def test_hbone_reset(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    await check_reset(*hbone_pair)


async def test_hbone_backpressure_is_bounded_by_the_stream_window(hbone_pair: tuple[HboneStream, HboneStream]) -> None:
    # Only the stream's flow-control window may be in flight while b does not read.
    await check_backpressure(*hbone_pair, limit=STREAM_WINDOW)


async def test_relay_keeps_half_close_and_resets(
    tcp_spliced: tuple[TcpStream, TcpStream, asyncio.Task[RelayCounters]],
) -> None:
    """client -> [relay] -> app, built from two TCP pairs: the relay's conformance end to end."""
    client, app, relaying = tcp_spliced
    await check_half_close(client, app)
    counters = await asyncio.wait_for(relaying, 5)
    assert (counters.a_to_b, counters.b_to_a) == (7, 16)


# ---- the relay between a TCP and an HBONE stream: the spliced (push) path every proxied connection takes ----


@pytest.fixture
async def spliced(
    tcp_pair: tuple[TcpStream, TcpStream], hbone_pair: tuple[HboneStream, HboneStream]
) -> AsyncIterator[tuple[TcpStream, HboneStream, TcpStream, HboneStream, asyncio.Task[RelayCounters]]]:
    """client (TCP) -> proxy_down | relay | proxy_up (HBONE) -> app: yields the two outer ends and the relay."""
    client, proxy_down = tcp_pair
    proxy_up, app = hbone_pair
    assert hasattr(proxy_down, "start_pushing") and hasattr(proxy_up, "start_pushing")
    relaying = asyncio.create_task(relay(proxy_down, proxy_up))
    yield client, app, proxy_down, proxy_up, relaying
    relaying.cancel()
    await asyncio.gather(relaying, return_exceptions=True)


Spliced = tuple[TcpStream, HboneStream, TcpStream, HboneStream, "asyncio.Task[RelayCounters]"]


async def test_splice_keeps_half_close_both_ways(spliced: Spliced) -> None:
    client, app, _, _, relaying = spliced
    await check_half_close(client, app)
    counters = await asyncio.wait_for(relaying, 5)
    assert (counters.a_to_b, counters.b_to_a, counters.error) == (7, 16, None)


async def test_splice_server_half_closes_first(spliced: Spliced) -> None:
    client, app, _, _, relaying = spliced
    await check_half_close(app, client)
    counters = await asyncio.wait_for(relaying, 5)
    assert (counters.a_to_b, counters.b_to_a, counters.error) == (16, 7, None)


async def test_splice_passes_a_client_reset_on_as_a_stream_reset(spliced: Spliced) -> None:
    client, app, _, _, relaying = spliced
    await check_reset(client, app)
    counters = await asyncio.wait_for(relaying, 5)
    assert counters.error


async def test_splice_passes_a_stream_reset_on_as_a_tcp_reset(spliced: Spliced) -> None:
    client, app, _, _, relaying = spliced
    await check_reset(app, client)
    counters = await asyncio.wait_for(relaying, 5)
    assert counters.error


async def test_splice_backpressure_towards_the_app(spliced: Spliced) -> None:
    # Nobody reads the app end: the stream window fills, the proxy stops reading the client socket, and
    # the client's writes stall after the window plus the TCP buffers on the way.
    client, app, _, _, _ = spliced
    limit = STREAM_WINDOW + client.transport.get_write_buffer_limits()[1] + BLOCK + 16 * 1024 * 1024
    await check_backpressure(client, app, limit=limit)


async def test_splice_backpressure_towards_the_client(spliced: Spliced) -> None:
    # Nobody reads the client: the proxy's TCP write buffer passes its high-water mark, the proxy stops
    # acknowledging the stream's data, and the app's writes stall at the stream window.
    client, app, _, _, _ = spliced
    limit = STREAM_WINDOW + 2 * BLOCK + 16 * 1024 * 1024
    await check_backpressure(app, client, limit=limit)


async def test_splice_moves_bulk_data_both_ways_through_pauses(spliced: Spliced) -> None:
    """8 MiB each way at once, each reader pausing now and then: every pause/resume path, bytes intact."""
    client, app, _, _, relaying = spliced
    size = 8 * 1024 * 1024
    up = bytes(range(256)) * (size // 256)
    down = bytes(reversed(range(256))) * (size // 256)

    async def send(s: ByteStream, data: bytes) -> None:
        for i in range(0, len(data), 300_000):
            await s.write(data[i : i + 300_000])
        await s.write_eof()

    async def receive(s: ByteStream) -> bytes:
        got = bytearray()
        n = 0
        while chunk := await s.read():
            got += chunk
            n += 1
            if n % 7 == 0:
                await asyncio.sleep(0.01)  # a slow reader: lets the buffers fill (not a readiness wait)
        return bytes(got)

    results = await asyncio.wait_for(
        asyncio.gather(send(client, up), send(app, down), receive(app), receive(client)), 60
    )
    assert results[2] == up and results[3] == down
    counters = await asyncio.wait_for(relaying, 5)
    assert (counters.a_to_b, counters.b_to_a, counters.error) == (size, size, None)


async def test_splice_delivers_what_arrived_before_it_started(
    tcp_pair: tuple[TcpStream, TcpStream], hbone_pair: tuple[HboneStream, HboneStream]
) -> None:
    client, proxy_down = tcp_pair
    proxy_up, app = hbone_pair
    await client.write(b"early bytes")
    await client.write_eof()
    await app.write(b"early answer")
    await eventually_async(  # both arrived, nobody relaying yet
        lambda: proxy_down.protocol._eof and proxy_up._chunks, 5, interval=0.01, what="both ends' early bytes"
    )
    relaying = asyncio.create_task(relay(proxy_down, proxy_up))
    try:
        got = b""
        while chunk := await app.read():
            got += chunk
        assert got == b"early bytes"
        assert await client.read() == b"early answer"
        await app.write_eof()
        assert await client.read() == b""
        counters = await asyncio.wait_for(relaying, 5)
        assert (counters.a_to_b, counters.b_to_a) == (11, 12)
    finally:
        relaying.cancel()


async def test_an_abort_from_outside_ends_the_splice_with_an_error(spliced: Spliced) -> None:
    # What a policy change does to an open connection (the tracker aborts both ends).
    client, app, proxy_down, proxy_up, relaying = spliced
    await client.write(b"x")
    assert await app.read() == b"x"
    proxy_down.abort()
    proxy_up.abort()
    counters = await asyncio.wait_for(relaying, 5)
    assert counters.error
    with pytest.raises((StreamClosed, ConnectionError)):
        for _ in range(100):
            if not await app.read():
                raise AssertionError("an abort was reported as a clean EOF")


async def test_cancelling_the_splice_resets_both_ends(spliced: Spliced) -> None:
    client, app, _, _, relaying = spliced
    await client.write(b"x")
    assert await app.read() == b"x"
    relaying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await relaying
    for end in (client, app):
        with pytest.raises((StreamClosed, ConnectionError)):
            for _ in range(100):
                if not await end.read():
                    raise AssertionError("a cancelled relay closed cleanly instead of resetting")


@pytest.fixture
async def tcp_spliced(
    tcp_pair: tuple[TcpStream, TcpStream],
) -> AsyncIterator[tuple[TcpStream, TcpStream, asyncio.Task[RelayCounters]]]:
    """client -> proxy_down | relay | proxy_up -> app over TCP on both sides (the plaintext inbound path)."""
    client, proxy_down = tcp_pair
    async with connected_tcp() as (proxy_up, app):
        relaying = asyncio.create_task(relay(proxy_down, proxy_up))
        yield client, app, relaying
        relaying.cancel()
        await asyncio.gather(relaying, return_exceptions=True)


@pytest.mark.parametrize("towards", ["app", "client"])
async def test_tcp_splice_backpressure(
    tcp_spliced: tuple[TcpStream, TcpStream, asyncio.Task[RelayCounters]], towards: str
) -> None:
    # Nobody reads the far end: the proxy holds at most its read queue limit and a write buffer, plus
    # what the kernel buffers of the two hops take (at most the autotuning maxima of both ends of both).
    client, app, _ = tcp_spliced
    writer, reader = (client, app) if towards == "app" else (app, client)
    kernel = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        kernel += 2 * int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    limit = TCP_READ_BUFFER_LIMIT + READ_CHUNK + 2 * BLOCK + kernel
    await check_backpressure(writer, reader, limit=limit)


async def _fill_until_stalled(writer: ByteStream) -> asyncio.Task[None]:
    """Write until the writes stall (nobody reads the far end); return the still-blocked writer task."""
    filler = Filler(writer)
    await filler.until_stalled()
    return filler.task


async def _expect_reset(end: ByteStream) -> None:
    with pytest.raises((StreamClosed, ConnectionError)):
        async with asyncio.timeout(10):
            while await end.read():
                pass
            raise AssertionError("a reset arrived as a clean EOF")


@pytest.mark.parametrize("who", ["app", "client"])
async def test_splice_passes_a_reset_on_while_the_sink_is_full(spliced: Spliced, who: str) -> None:
    # Bytes queued in a full sink and a paused source must not turn a reset into a clean end.
    client, app, _, _, relaying = spliced
    writer, other = (app, client) if who == "app" else (client, app)
    task = await _fill_until_stalled(writer)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    writer.abort()
    await _expect_reset(other)
    counters = await asyncio.wait_for(relaying, 5)
    assert counters.error


async def test_a_splice_of_an_already_aborted_tcp_end_resets_the_other_end(
    tcp_pair: tuple[TcpStream, TcpStream], hbone_pair: tuple[HboneStream, HboneStream]
) -> None:
    # An abort (a policy change, a drain) can land between accepting a connection and relaying it: the
    # transport then reports its loss without an error, which must not reach the peer as a clean EOF.
    _, proxy_down = tcp_pair
    proxy_up, app = hbone_pair
    proxy_down.abort()
    counters = await asyncio.wait_for(relay(proxy_down, proxy_up), 5)
    assert counters.error
    await _expect_reset(app)
