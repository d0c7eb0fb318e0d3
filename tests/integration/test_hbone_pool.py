"""The HBONE client pool against a real HBONE server over loopback mTLS (in-process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from h2.errors import ErrorCodes

from tests.support.echo import echo_tunnel
from tests.support.eventually import eventually_async
from ztunnel.hbone.client import REFUSED_RETRIES, HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority, HboneError
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket

SERVER_IP = "127.0.170.1"
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/pool/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/pool/sa/server")
TARGET = Authority(SERVER_IP, 9000)


@dataclass
class Setup:
    server: HboneServer
    contexts: TlsContexts
    key: PoolKey
    handshakes: list[int]


@pytest.fixture
async def setup(certs: CertificateManager) -> AsyncIterator[Setup]:
    contexts = TlsContexts(certs)
    server = HboneServer(contexts, echo_tunnel)
    handshakes: list[int] = []
    original = server._new_connection

    def counting(identity: SpiffeId):  # type: ignore[no-untyped-def]
        handshakes.append(1)
        return original(identity)

    server._new_connection = counting  # type: ignore[method-assign]
    listener = await server.listen(listening_socket(SERVER_IP, 15008), SERVER)
    yield Setup(server, contexts, PoolKey(CLIENT, SERVER, (SERVER_IP, 15008)), handshakes)
    listener.close()
    server.abort()
    await listener.wait_closed()


async def _roundtrip(pool: HbonePool, key: PoolKey, i: int, hold: asyncio.Event | None = None) -> None:
    stream = await pool.connect(key, TARGET, expected_identities=[SERVER.uri])
    msg = b"stream %d" % i
    await stream.write(msg)
    assert await stream.read() == msg
    if hold is not None:
        await hold.wait()
    await stream.write_eof()
    assert await stream.read() == b""


async def test_concurrent_first_requests_share_one_handshake_then_spill_at_100_streams(setup: Setup) -> None:
    pool = HbonePool(setup.contexts)
    hold = asyncio.Event()
    try:
        tasks = [asyncio.create_task(_roundtrip(pool, setup.key, i, hold)) for i in range(150)]
        await eventually_async(
            lambda: sum(c.active_streams for c in pool.connections()) >= 150, 10, interval=0.01, what="150 open streams"
        )
        conns = pool.connections(setup.key)
        assert sorted(len(c.streams) for c in conns) == [50, 100]
        assert len(setup.handshakes) == 2 and pool.stats.connections_opened == 2
        hold.set()
        await asyncio.gather(*tasks)
    finally:
        pool.close()


async def test_idle_connections_are_released(setup: Setup) -> None:
    pool = HbonePool(setup.contexts, idle_timeout=0.2)
    try:
        await _roundtrip(pool, setup.key, 1)
        assert pool.size == 1
        conn = pool.connections()[0]
        await asyncio.wait_for(conn.closed, 5)
        assert pool.size == 0
        await _roundtrip(pool, setup.key, 2)  # a new connection is made on demand
        assert pool.stats.connections_opened == 2
    finally:
        pool.close()


async def test_a_connection_in_use_stays_and_is_released_one_idle_timeout_after_its_last_tunnel(setup: Setup) -> None:
    """Tunnels one after another (each leaves the connection idle for a moment) keep the connection; it closes
    an idle timeout after the last one, not earlier (a reaper armed during an earlier idle spell waits the rest)."""
    loop = asyncio.get_running_loop()
    pool = HbonePool(setup.contexts, idle_timeout=0.3)
    try:
        started = loop.time()
        i = 0
        while loop.time() - started < 0.7:  # past two idle timeouts of use, gaps well under one
            await _roundtrip(pool, setup.key, i)
            i += 1
            await asyncio.sleep(0.05)
        last = loop.time()
        assert pool.stats.connections_opened == 1 and pool.size == 1
        conn = pool.connections()[0]
        await asyncio.wait_for(conn.closed, 5)
        assert loop.time() - last >= 0.3 * 0.98 - 0.05
        assert pool.size == 0
    finally:
        pool.close()


async def test_server_drain_moves_new_streams_to_a_new_connection(setup: Setup) -> None:
    pool = HbonePool(setup.contexts)
    try:
        hold = asyncio.Event()
        first = asyncio.create_task(_roundtrip(pool, setup.key, 1, hold))
        await eventually_async(
            lambda: pool.connections() and pool.connections()[0].streams, 10, interval=0.01, what="the first stream"
        )
        old = pool.connections()[0]
        setup.server.drain()  # GOAWAY: the open stream finishes, new ones need a new connection
        await eventually_async(lambda: old.draining, 10, interval=0.01, what="the GOAWAY seen by the client")
        setup.server._draining = False  # the listener keeps accepting for this test
        await _roundtrip(pool, setup.key, 2)
        assert pool.stats.connections_opened == 2
        hold.set()
        await first
        await asyncio.wait_for(old.closed, 5)
    finally:
        pool.close()


async def test_a_rotated_server_certificate_is_used_without_a_new_listener(setup: Setup) -> None:
    provider = setup.contexts.provider
    assert isinstance(provider, CertificateManager)

    async def served_serial() -> int:
        pool = HbonePool(setup.contexts)
        try:
            await _roundtrip(pool, setup.key, 0)
            ssl_object = pool.connections()[0].transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            return int(ssl_object.getpeercert()["serialNumber"], 16)
        finally:
            pool.close()

    first = await served_serial()
    assert first == (await provider.get(SERVER)).serial
    provider.forget(SERVER)  # the next get() signs a new certificate, as a rotation would
    await setup.contexts.refresh(SERVER)
    rotated = (await provider.get(SERVER)).serial
    assert rotated != first
    assert await served_serial() == rotated


async def test_a_stream_the_server_refused_unprocessed_is_sent_again_on_a_new_connection(
    certs: CertificateManager,
) -> None:
    """A draining server refuses a stream it never processed (REFUSED_STREAM, or a stream above its
    GOAWAY's last id): the pool sends the request again on another connection (RFC 9113 §8.7) instead of
    failing the client's connection."""
    contexts = TlsContexts(certs)
    served: list[int] = []

    async def refuse_first_thenecho_tunnel(tunnel: InboundTunnel) -> None:
        served.append(tunnel.stream.stream_id)
        if len(served) == 1:
            tunnel.stream.connection.goaway()  # this connection takes no new streams...
            tunnel.stream.abort(ErrorCodes.REFUSED_STREAM)  # ...and did not process this one
            return
        await echo_tunnel(tunnel)

    server = HboneServer(contexts, refuse_first_thenecho_tunnel)
    address = ("127.0.170.2", 15008)
    listener = await server.listen(listening_socket(*address), SERVER)
    pool = HbonePool(contexts)
    try:
        await _roundtrip(pool, PoolKey(CLIENT, SERVER, address), 1)
        assert len(served) == 2  # refused once, then served
        assert pool.stats.connections_opened == 2
    finally:
        pool.close()
        listener.close()
        server.abort()
        await listener.wait_closed()


async def test_a_refused_stream_is_retried_a_bounded_number_of_times(certs: CertificateManager) -> None:
    contexts = TlsContexts(certs)
    served: list[int] = []

    async def always_refuse(tunnel: InboundTunnel) -> None:
        served.append(tunnel.stream.stream_id)
        tunnel.stream.abort(ErrorCodes.REFUSED_STREAM)

    server = HboneServer(contexts, always_refuse)
    address = ("127.0.170.3", 15008)
    listener = await server.listen(listening_socket(*address), SERVER)
    pool = HbonePool(contexts)
    try:
        with pytest.raises(HboneError) as failure:
            await pool.connect(PoolKey(CLIENT, SERVER, address), TARGET, expected_identities=[SERVER.uri])
        assert failure.value.refused
        assert len(served) == REFUSED_RETRIES + 1
    finally:
        pool.close()
        listener.close()
        server.abort()
        await listener.wait_closed()
