"""HTTP/2 floods against a node proxy's HBONE port (issue 10): bounded in count and time, loopback only.

The attacks are bench/attack_bench.py's (which measures their cost); here each must end with the proxy
closing the connection with GOAWAY(ENHANCE_YOUR_CALM) (or, for stalled streams, resetting what goes over
the peer's memory budget), having done little for it, and still serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.attack_bench import (
    BLAST_PORT,
    DATA,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    HEADERS,
    SINK_PORT,
    FrameReader,
    RssSampler,
    blast_app,
    close_writer,
    connect_block,
    continuation_flood,
    flood,
    frame,
    open_attacker,
    rapid_reset,
    sink_app,
    stall,
    status_kib,
)
from tests.integration.conftest import ECHO_PORT, NODE_B_SERVER, LocalMesh, raw_hbone_status
from tests.support.eventually import eventually_async
from tests.support.svids import signed_svid
from ztunnel.hbone.protocol import MAX_INBOUND_CONNECTIONS, PEER_BUDGET, PEER_MAX_CONNECTIONS, STATUS_OK
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context
from ztunnel.net.listen import listening_socket

CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
HBONE = (NODE_B_SERVER, 15008)
ANOTHER_CLIENT_NODE = ("127.0.150.1", 0)  # the same identity dialing from another address (another node)
ECHO = f"{NODE_B_SERVER}:{ECHO_PORT}"
BLAST = f"{NODE_B_SERVER}:{BLAST_PORT}"
SINK = f"{NODE_B_SERVER}:{SINK_PORT}"


@pytest.fixture(scope="module")
def blasting_mesh(local_mesh: LocalMesh) -> Iterator[LocalMesh]:
    """The session's mesh with an app on node-b that writes 2 MiB to every connection and never reads."""
    blast_app(local_mesh.apps, NODE_B_SERVER)
    yield local_mesh


@pytest.fixture(scope="module")
def sinking_mesh(local_mesh: LocalMesh) -> Iterator[LocalMesh]:
    """The session's mesh with an app on node-b that accepts connections and never reads them."""
    sink_app(local_mesh.apps, NODE_B_SERVER)
    yield local_mesh


def _refusals(mesh: LocalMesh, reason: str) -> float:
    prefix = f'ztunnel_connections_refused_total{{reason="{reason}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in mesh.b.metrics().splitlines() if line.startswith(prefix))


async def _legit_connect_seconds(mesh: LocalMesh) -> float:
    ctx = client_context(signed_svid(mesh.ca_dir, CLIENT_ID))
    started = time.monotonic()
    assert await raw_hbone_status(ctx, HBONE, [(":method", "CONNECT"), (":authority", ECHO)]) == 200
    return time.monotonic() - started


async def test_rapid_reset_is_cut_off_without_dialing_the_app(local_mesh: LocalMesh) -> None:
    ctx = client_context(signed_svid(local_mesh.ca_dir, CLIENT_ID))
    dials = local_mesh.apps.connections
    async with asyncio.timeout(60):
        outcome = await rapid_reset(ctx, HBONE, ECHO, pairs=5000)
    assert outcome["goaway"] == ENHANCE_YOUR_CALM, outcome
    assert outcome["closed_by_proxy"], outcome
    # Before the fix every reset stream was dialed (5,000 app connections); now at most a few that the
    # handler reached before their reset arrived.
    assert local_mesh.apps.connections - dials < 50
    async with asyncio.timeout(30):
        assert await _legit_connect_seconds(local_mesh) < 5


async def test_continuation_flood_is_cut_off_at_the_header_block_cap(local_mesh: LocalMesh) -> None:
    ctx = client_context(signed_svid(local_mesh.ca_dir, CLIENT_ID))
    pid = local_mesh.b.proc.pid
    rss_before = status_kib(pid, "VmRSS")
    with RssSampler(pid) as rss:
        async with asyncio.timeout(60):
            outcome = await continuation_flood(ctx, HBONE, ECHO, conns=2, frames_per_conn=16, hold=0.5)
    assert outcome["goaway_codes"] == [ENHANCE_YOUR_CALM], outcome
    assert outcome["closed_by_proxy"] == 2, outcome
    # Refused at the first 1 MiB fragment's frame header; before, the proxy held both 15 MiB blocks.
    assert rss.peak - rss_before < 12 * 1024, (rss_before, rss.peak)
    async with asyncio.timeout(30):
        assert await _legit_connect_seconds(local_mesh) < 5


async def test_stalled_streams_pin_at_most_the_peer_budget(blasting_mesh: LocalMesh) -> None:
    """1,200 tunnels over 12 connections to an app that sends 2 MiB each, from a peer that grants no window
    (INITIAL_WINDOW_SIZE 0) but reads its socket: before, each pinned ~0.6 MiB of app data read ahead
    (~700 MiB in all); now a stream holds only the chunk it could not send (>= 64 KiB on loopback), the
    identity's parked chunks stay under PEER_BUDGET (64 MiB) and the streams past it are reset."""
    ctx = client_context(signed_svid(blasting_mesh.ca_dir, CLIENT_ID))
    pid = blasting_mesh.b.proc.pid
    rss_before = status_kib(pid, "VmRSS")
    with RssSampler(pid) as rss:
        async with asyncio.timeout(60):
            outcome = await stall(ctx, HBONE, BLAST, conns=12, streams=100, hold=30.0, settle_after_reset=1.5)
    assert outcome["streams"] == 1200, outcome
    assert outcome["resets_by_code"].get(ENHANCE_YOUR_CALM, 0) > 0, outcome
    assert rss.peak - rss_before < 120 * 1024, (rss_before, rss.peak)
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in blasting_mesh.b.metrics().splitlines()
        if line.startswith('ztunnel_connections_refused_total{reason="peer_memory_budget"}')
    ]
    assert counted and counted[0] > 0, "budget resets are counted in ztunnel_connections_refused_total"
    async with asyncio.timeout(30):
        assert await _legit_connect_seconds(blasting_mesh) < 5


async def test_data_sent_into_an_app_that_never_reads_is_held_within_the_peer_budget(sinking_mesh: LocalMesh) -> None:
    """48 tunnels over 12 connections to an app that never reads, each sent up to 8 MiB as far as the windows
    allow: before, every connection pinned its whole 16 MiB window of unread DATA (~190 MiB, unbounded in the
    number of connections); now the identity's unread bytes stay under PEER_BUDGET (64 MiB), the streams
    past it are reset with ENHANCE_YOUR_CALM and counted."""
    ctx = client_context(signed_svid(sinking_mesh.ca_dir, CLIENT_ID))
    pid = sinking_mesh.b.proc.pid
    rss_before = status_kib(pid, "VmRSS")
    counted_before = _refusals(sinking_mesh, "peer_memory_budget")
    with RssSampler(pid) as rss:
        async with asyncio.timeout(90):
            outcome = await flood(ctx, HBONE, SINK, 12, 4, 8 * 1024 * 1024, hold=20.0, settle_after_reset=1.5)
    assert outcome["answered"] == 48, outcome
    assert outcome["resets_by_code"].get(ENHANCE_YOUR_CALM, 0) > 0, outcome
    assert rss.peak - rss_before < 120 * 1024, (rss_before, rss.peak, outcome)
    assert _refusals(sinking_mesh, "peer_memory_budget") > counted_before
    async with asyncio.timeout(30):
        assert await _legit_connect_seconds(sinking_mesh) < 5


async def test_an_identity_past_its_connection_limit_is_refused_while_others_connect(local_mesh: LocalMesh) -> None:
    """PEER_MAX_CONNECTIONS connections of one identity from one address are served; the next one is closed
    right after its handshake (no SETTINGS) and counted, and another identity still connects (before: no
    limit), and so does the same identity from another client address (before: refused, the limit was the
    identity's across every node)."""
    many = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/many-connections")
    ctx = client_context(signed_svid(local_mesh.ca_dir, many))
    refused_before = _refusals(local_mesh, "peer_connection_limit")
    opened = []
    try:
        async with asyncio.timeout(120):
            for _ in range(PEER_MAX_CONNECTIONS + 1):
                opened.append(await open_attacker(ctx, HBONE))
            for _w, frames, _t in opened:  # each answers with SETTINGS, or closes without a frame
                while not frames.frames and not frames.closed.is_set():
                    frames.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await frames.changed.wait()
        served = [f for _w, f, _t in opened if f.frames]
        assert len(served) == PEER_MAX_CONNECTIONS, (len(served), len(opened))
        assert opened[-1][1].closed.is_set() and not opened[-1][1].frames
        assert _refusals(local_mesh, "peer_connection_limit") == refused_before + 1
        async with asyncio.timeout(30):
            assert await _legit_connect_seconds(local_mesh) < 5
            # The same identity from another client node (its replicas there) is not held to this count.
            headers = [(":method", "CONNECT"), (":authority", ECHO)]
            assert await raw_hbone_status(ctx, HBONE, headers, local_addr=ANOTHER_CLIENT_NODE) == 200
    finally:
        for writer, _frames, task in opened:
            await close_writer(writer)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ---- in-process server with small limits: what is counted per (identity, client address), per server ----
SERVER_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")
LISTEN = ("127.0.172.1", 15008)
TARGET = "127.0.172.9:8080"  # never dialed: the handler answers 200 and never reads


def _client_address(n: int) -> tuple[str, int]:
    return (f"127.0.173.{n}", 0)


@contextlib.asynccontextmanager
async def _server(
    certs: CertificateManager,
    *,
    peer_budget: int = PEER_BUDGET,
    peer_max_connections: int = PEER_MAX_CONNECTIONS,
    max_connections: int = MAX_INBOUND_CONNECTIONS,
) -> AsyncIterator[tuple[HboneServer, list[str]]]:
    """An HboneServer on LISTEN whose tunnels are answered 200 and never read (their DATA stays unread,
    charged to the peer's budget); yields it and the reasons it reported connections refused with."""

    async def hold(tunnel: InboundTunnel) -> None:
        tunnel.stream.respond(STATUS_OK)
        await asyncio.Event().wait()  # until the server aborts

    refused: list[str] = []
    server = HboneServer(
        TlsContexts(certs),
        hold,
        on_connection_limit=refused.append,
        peer_budget=peer_budget,
        peer_max_connections=peer_max_connections,
        max_connections=max_connections,
    )
    listener = await server.listen(listening_socket(*LISTEN), SERVER_ID)
    try:
        yield server, refused
    finally:
        listener.close()
        server.abort()
        await listener.wait_closed()


Attacker = tuple[asyncio.StreamWriter, FrameReader, asyncio.Task[None]]


async def _connect(ctx: ssl.SSLContext, n: int, streams: int = 0) -> Attacker:
    """A connection from client address n with `streams` CONNECTs, once the server answered (SETTINGS and
    every CONNECT's 200) or closed it."""
    block = connect_block(TARGET)
    first = b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, block) for i in range(streams))
    attacker = await open_attacker(ctx, LISTEN, first, local_addr=_client_address(n))
    f = attacker[1]
    await eventually_async(
        lambda: f.closed.is_set() or (f.frames and len(f.answered) == streams), 10, what="the server's answer"
    )
    return attacker


async def _close(opened: list[Attacker]) -> None:
    for writer, _frames, task in opened:
        await close_writer(writer)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _send(attacker: Attacker, streams: int, per_stream: int) -> None:
    """`per_stream` bytes of DATA on each of the first `streams` streams, in 16 KiB frames (within the
    default frame size and initial window, so no flow-control bookkeeping is needed)."""
    chunk = b"d" * 16 * 1024
    out = bytearray()
    for i in range(streams):
        for _ in range(per_stream // len(chunk)):
            out += frame(DATA, 0, 1 + 2 * i, chunk)
    attacker[0].write(bytes(out))


async def test_one_identity_from_another_client_address_connects_and_has_its_own_budget(
    certs: CertificateManager, ca_dir: Path
) -> None:
    """An identity is every replica of a service account on every node: its connection count and memory
    budget are kept per client address, so one address at its connection cap and over its budget (a hostile
    pod, or a busy node) leaves the same identity from another address served with a budget of its own
    (before: that connection was refused, the cap being the identity's across all addresses)."""
    ctx = client_context(signed_svid(ca_dir, CLIENT_ID))
    opened: list[Attacker] = []
    async with _server(certs, peer_max_connections=2, peer_budget=256 * 1024) as (server, refused):
        try:
            async with asyncio.timeout(60):
                for _ in range(2):  # address 1 at its cap, 4 x 48 KiB unread each: 384 KiB > its 256 KiB
                    opened.append(await _connect(ctx, 1, streams=4))
                    _send(opened[-1], 4, 48 * 1024)
                await eventually_async(
                    lambda: any(f.resets.get(ENHANCE_YOUR_CALM) for _w, f, _t in opened), 10, what="a budget reset"
                )
                opened.append(await _connect(ctx, 1))
                assert opened[-1][1].closed.is_set() and not opened[-1][1].frames, "past the cap: closed"
                assert refused == ["peer_connection_limit"]

                opened.append(await _connect(ctx, 2, streams=4))  # same identity, another client node
                second = opened[-1]
                assert second[1].frames and len(second[1].answered) == 4, "served"
                _send(second, 4, 48 * 1024)  # 192 KiB: fits its own budget, not what address 1 left
                first_budget = server.budgets[(CLIENT_ID, "127.0.173.1")]
                second_budget = server.budgets[(CLIENT_ID, "127.0.173.2")]
                assert first_budget.connections == 2 and second_budget.connections == 1
                await eventually_async(lambda: second_budget.unread == 4 * 48 * 1024, 10, what="address 2's bytes")
                assert second_budget.resets == 0 and not second[1].resets
                assert first_budget.resets >= 1 and first_budget.unread + first_budget.parked <= 256 * 1024
                assert refused == ["peer_connection_limit"]
        finally:
            await _close(opened)


async def test_past_the_server_wide_connection_cap_new_connections_are_refused(
    certs: CertificateManager, ca_dir: Path
) -> None:
    """Whatever the identities and addresses, a server holds at most max_connections inbound connections:
    the next is closed right after its handshake and counted with its own reason; once one closes, a new one
    is served again (before: no server-wide cap)."""
    ctx = client_context(signed_svid(ca_dir, CLIENT_ID))
    opened: list[Attacker] = []
    async with _server(certs, max_connections=3) as (server, refused):
        try:
            async with asyncio.timeout(60):
                for n in range(1, 4):  # three client addresses, each far below its own cap
                    opened.append(await _connect(ctx, n))
                assert all(f.frames for _w, f, _t in opened)
                opened.append(await _connect(ctx, 4))
                assert opened[-1][1].closed.is_set() and not opened[-1][1].frames, "past the server's cap: closed"
                assert refused == ["server_connection_limit"]
                assert server.connection_limit_refusals == 1

                await _close(opened[:1])
                await eventually_async(lambda: len(server.connections) == 2, 10, what="the closed connection gone")
                opened.append(await _connect(ctx, 5))
                assert opened[-1][1].frames and not opened[-1][1].closed.is_set(), "served again"
                assert refused == ["server_connection_limit"]
        finally:
            await _close(opened[1:])
