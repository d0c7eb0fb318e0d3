"""An inbound HBONE CONNECT's `traceparent` reaches the destination proxy's access log line (DESIGN §4.2, §4.9).

The test is the caller: an HbonePool with the client pod's identity, straight to node-b's HBONE listener."""

from __future__ import annotations

from tests.integration.conftest import ECHO_PORT, NODE_B_SERVER, LocalMesh
from tests.support.eventually import eventually
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/server")


async def test_traceparent_of_an_inbound_tunnel_is_in_its_access_log_line(
    local_mesh: LocalMesh, certs: CertificateManager
) -> None:
    pool = HbonePool(TlsContexts(certs))
    try:
        stream = await pool.connect(
            PoolKey(CLIENT, SERVER, (NODE_B_SERVER, 15008)),
            Authority(NODE_B_SERVER, ECHO_PORT),
            expected_identities=[SERVER.uri],
            traceparent=TRACEPARENT,
            baggage="k=v",
        )
        await stream.write(b"traced")
        assert await stream.read() == b"traced"
        await stream.write_eof()
        while await stream.read():
            pass
    finally:
        pool.close()

    def logged() -> str | None:
        return next((line for line in local_mesh.b.log().splitlines() if f"traceparent={TRACEPARENT}" in line), None)

    eventually(lambda: logged() is not None, what="access log line with the traceparent")
    line = logged()
    assert line is not None and "direction=inbound" in line and f"src.identity={CLIENT.uri}" in line
    # connections without one carry no traceparent field
    assert sum("traceparent=" in x for x in local_mesh.b.log().splitlines()) == 1
