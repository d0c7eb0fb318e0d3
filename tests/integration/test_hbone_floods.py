"""HTTP/2 floods against a node proxy's HBONE port (issue 10): bounded in count and time, loopback only.

The attacks are bench/attack_bench.py's (which measures their cost); here each must end with the proxy
closing the connection with GOAWAY(ENHANCE_YOUR_CALM), having done little for it, and still serving.
"""

from __future__ import annotations

import asyncio
import time

from bench.attack_bench import ENHANCE_YOUR_CALM, RssSampler, continuation_flood, rapid_reset, status_kib
from tests.integration.conftest import ECHO_PORT, NODE_B_SERVER, LocalMesh, raw_hbone_status
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context
from ztunnel.proxy.certs import SigningProvider

CLIENT_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
HBONE = (NODE_B_SERVER, 15008)
ECHO = f"{NODE_B_SERVER}:{ECHO_PORT}"


async def _legit_connect_seconds(mesh: LocalMesh) -> float:
    ctx = client_context(await SigningProvider.from_dir(mesh.ca_dir).get(CLIENT_ID))
    started = time.monotonic()
    assert await raw_hbone_status(ctx, HBONE, [(":method", "CONNECT"), (":authority", ECHO)]) == 200
    return time.monotonic() - started


async def test_rapid_reset_is_cut_off_without_dialing_the_app(local_mesh: LocalMesh) -> None:
    ctx = client_context(await SigningProvider.from_dir(local_mesh.ca_dir).get(CLIENT_ID))
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
    ctx = client_context(await SigningProvider.from_dir(local_mesh.ca_dir).get(CLIENT_ID))
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
