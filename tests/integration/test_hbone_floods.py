"""HTTP/2 floods against a node proxy's HBONE port (issue 10): bounded in count and time, loopback only.

The attacks are bench/attack_bench.py's (which measures their cost); here each must end with the proxy
closing the connection with GOAWAY(ENHANCE_YOUR_CALM) (or, for stalled streams, resetting what goes over
the peer's memory budget), having done little for it, and still serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from bench.attack_bench import (
    BLAST_PORT,
    ENHANCE_YOUR_CALM,
    SINK_PORT,
    RssSampler,
    blast_app,
    close_writer,
    continuation_flood,
    flood,
    open_attacker,
    rapid_reset,
    sink_app,
    stall,
    status_kib,
)
from tests.integration.conftest import ECHO_PORT, NODE_B_SERVER, LocalMesh, raw_hbone_status
from tests.support.svids import signed_svid
from ztunnel.hbone.protocol import PEER_MAX_CONNECTIONS
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context

CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
HBONE = (NODE_B_SERVER, 15008)
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
    """PEER_MAX_CONNECTIONS connections of one identity are served; the next one is closed right after its
    handshake (no SETTINGS) and counted, and another identity still connects (before: no limit)."""
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
    finally:
        for writer, _frames, task in opened:
            await close_writer(writer)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
