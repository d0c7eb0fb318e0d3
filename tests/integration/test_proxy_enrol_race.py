"""A connection the kernel accepts on a pod's listener while the proxy is still fetching the pod's certificate
(first enrolment, re-enrolment) is served once the pod is ready, not reset for lack of a record of the pod.

In-pod mode opens the listeners (pod_sockets) before `add_workload` fetches the SVID; the app may connect in
that window (15-35 ms measured in the lab). Here the certificate fetch is held by a hook, the app connects
through the outbound listener meanwhile, and the bytes must reach the app once the fetch completes. The
original destination comes from the eBPF-style map lookup (`outbound_original_dst`), as with sk_lookup.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from tests.integration.test_proxy_redirect_guards import CountingServer
from ztunnel.config.model import Workload
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket
from ztunnel.net.streams import TcpStream
from ztunnel.proxy.listeners import WorkloadSockets, dns_sockets
from ztunnel.proxy.node import NodeProxy, ProxyOptions

POD_IP = "127.0.183.1"
APP_IP = "127.0.183.9"
APP_PORT = 7310


async def test_connection_accepted_while_the_certificate_is_fetched_is_served(certs: CertificateManager) -> None:
    app = await CountingServer().start(APP_IP, APP_PORT)
    node = NodeProxy(ProxyOptions(node="node-r", connect_timeout=2.0), certs)
    release = asyncio.Event()
    fetching = asyncio.Event()
    fetch: Callable[[SpiffeId], Awaitable[object]] = node.contexts.server

    async def slow_server(identity: SpiffeId) -> object:
        fetching.set()
        await release.wait()
        return await fetch(identity)

    node.contexts.server = slow_server  # type: ignore[method-assign]
    workload = Workload(
        uid="uid-racing",
        name="racing",
        namespace="race",
        node="node-r",
        service_account="racing",
        ips=(POD_IP,),
        labels={"app": "racing"},
        enrolled=True,
    )
    # the pod's DNS sockets too, as in-pod mode adds them (--dns): the proxy starts serving them after the
    # outbound listener, which already accepts meanwhile. Their start is held until the proxy has picked the
    # connection up (how the loop interleaves those steps varies; this makes the order the lab saw certain).
    node.enable_dns(None, "cluster.local")
    assert node.dns is not None
    accepted = asyncio.Event()
    transparent = node.outbound.serve_transparent
    serve_dns = node.dns.serve

    async def noting_transparent(uid: str, client: TcpStream) -> None:
        accepted.set()
        await transparent(uid, client)

    async def held_dns(udp: socket.socket, tcp: socket.socket | None, namespace: str | None, *, key: str = "") -> None:
        async with asyncio.timeout(5):
            await accepted.wait()
        await serve_dns(udp, tcp, namespace, key=key)

    node.outbound.serve_transparent = noting_transparent  # type: ignore[method-assign]
    node.dns.serve = held_dns  # type: ignore[method-assign]
    sockets = WorkloadSockets(outbound=[listening_socket(POD_IP, 15001)], dns=[dns_sockets(POD_IP, 15053)])
    sockets.outbound_original_dst = lambda sock: (APP_IP, APP_PORT)
    adding = asyncio.create_task(node.add_workload(workload, sockets))
    try:
        async with asyncio.timeout(5):
            await fetching.wait()
        # the listener is open: the kernel accepts this connection before the pod is served
        reader, writer = await asyncio.open_connection(POD_IP, 15001)
        writer.write(b"early bytes")
        writer.write_eof()
        release.set()
        async with asyncio.timeout(5):
            await adding
            reply = await reader.read()
        writer.close()
        assert reply == b"early bytes"
        assert app.connections == 1
    finally:
        release.set()
        if not adding.done():
            adding.cancel()
        await asyncio.gather(adding, return_exceptions=True)
        await node.close()
        await app.stop()
