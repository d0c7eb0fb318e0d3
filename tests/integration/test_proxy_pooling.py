"""Connection pooling: many tunnels from one pod share a few TLS connections (≤100 streams each)."""

from __future__ import annotations

import asyncio
import re
import struct

from tests.integration.conftest import ECHO_PORT, NODE_A_CONC_CLIENT, NODE_B_SERVER, LocalMesh

N = 1000


async def _open(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(NODE_A_CONC_CLIENT, 15080)
    writer.write(
        b"\x05\x01\x00" + b"\x05\x01\x00\x01" + bytes(map(int, NODE_B_SERVER.split("."))) + struct.pack("!H", ECHO_PORT)
    )
    head = await reader.readexactly(2 + 10)
    assert head[:2] == b"\x05\x00" and head[3] == 0, head
    msg = b"conn %d" % i
    writer.write(msg)
    assert await reader.readexactly(len(msg)) == msg
    return reader, writer


async def test_thousand_concurrent_tunnels_use_at_most_ten_tls_connections(local_mesh: LocalMesh) -> None:
    conns = await asyncio.gather(*(_open(i) for i in range(N)))
    try:
        dump = await asyncio.to_thread(local_mesh.a.config_dump)
        pooled = [c for c in dump["pool"] if "ns/shop/sa/conc->" in c]
        streams = sum(int(m.group(1)) for c in pooled if (m := re.search(r"streams=(\d+)", c)))
        assert streams == N, pooled
        assert 1 <= len(pooled) <= 10, pooled
    finally:
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
