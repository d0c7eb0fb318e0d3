"""Redirected connections the proxy must not follow (in-pod mode's original destination, DESIGN §4.6):

- transparent outbound to one of the proxy's own listeners (the pod IP's proxy ports, the admin server
  wherever its flag put it), in any spelling of the address, is refused and counted instead of the proxy
  dialing itself; an address with no single destination (0.0.0.0, ::, a zone id) is refused too;
- plaintext inbound whose original destination is not the pod's own IP, or is a proxy port, is refused
  instead of being relayed from inside the pod.

The original destination normally comes from SO_ORIGINAL_DST after an iptables REDIRECT; here the proxy is
in-process and the lookup is replaced, so each case chooses the destination the kernel would have reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry

from tests.support.echo import CountingServer
from ztunnel.config.model import Workload
from ztunnel.identity.manager import CertificateManager
from ztunnel.net.listen import listening_socket
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.proxy.node import NodeProxy, ProxyOptions
from ztunnel.telemetry.metrics import ProxyMetrics

POD_IP = "127.0.182.1"
OTHER_IP = "127.0.182.9"  # some other host the app did not address
APP_PORT = 7300
ELSEWHERE_PORT = 7200


@pytest.fixture
def original_dst(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """What SO_ORIGINAL_DST reports for the next connections: set `original_dst[0]`."""
    current: list[tuple[str, int]] = [("0.0.0.0", 0)]
    monkeypatch.setattr("ztunnel.proxy.outbound.original_destination", lambda sock: current[0])
    monkeypatch.setattr("ztunnel.proxy.inbound.original_destination", lambda sock: current[0])
    yield current


@pytest.fixture
async def proxy(certs: CertificateManager) -> AsyncIterator[tuple[NodeProxy, CollectorRegistry]]:
    registry = CollectorRegistry()
    p = NodeProxy(
        ProxyOptions(node="node-g", connect_timeout=2.0),
        certs,
        metrics=ProxyMetrics(registry),
    )
    workload = Workload(
        uid="uid-guarded",
        name="guarded",
        namespace="guard",
        node="node-g",
        service_account="guarded",
        ips=(POD_IP,),
        labels={"app": "guarded"},
        enrolled=True,
    )
    sockets = WorkloadSockets(outbound=[listening_socket(POD_IP, 15001)], plaintext=[listening_socket(POD_IP, 15006)])
    await p.add_workload(workload, sockets)
    try:
        yield p, registry
    finally:
        await p.close()


async def _exchange(port: int, payload: bytes = b"hello") -> bytes:
    """Connect to the pod's proxy port, send, half-close, and read everything (b"" when refused)."""
    reader, writer = await asyncio.open_connection(POD_IP, port)
    try:
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(5):
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


def _refused(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("ztunnel_connections_refused_total", {"reason": reason}) or 0.0


async def test_transparent_outbound_to_the_proxys_own_listeners_is_refused_and_counted(
    proxy: tuple[NodeProxy, CollectorRegistry], original_dst: list[tuple[str, int]]
) -> None:
    node, registry = proxy
    elsewhere = await CountingServer().start(OTHER_IP, ELSEWHERE_PORT)
    # The admin server, moved by flag (--admin-addr 127.0.0.1:PORT): a socket the proxy knows it has.
    admin = await CountingServer().start("127.0.0.1", 0)
    try:
        assert admin.server is not None
        admin_port = admin.server.sockets[0].getsockname()[1]
        node.state.add_own_listener("127.0.0.1", admin_port)
        loops = [
            (POD_IP, 15001),
            (POD_IP, 15006),
            (f"::ffff:{POD_IP}", 15006),  # SO_ORIGINAL_DST of an IPv6 socket: the same address, mapped
            ("127.0.0.1", admin_port),
            ("::ffff:127.0.0.1", admin_port),
            ("::ffff:7f00:1", admin_port),
        ]
        for i, dst in enumerate(loops, start=1):
            original_dst[0] = dst
            assert await _exchange(15001) == b"", dst
            assert _refused(registry, "loop") == i, dst
        assert len(node.tracker) == 0
        assert admin.connections == 0 and _refused(registry, "not_local") == 0
        # No single destination: refused as an address, whatever the port.
        for i, dst in enumerate([("0.0.0.0", admin_port), ("::", ELSEWHERE_PORT), ("fe80::1%lo", 80)], start=1):
            original_dst[0] = dst
            assert await _exchange(15001) == b"", dst
            assert _refused(registry, "bad_address") == i, dst
        assert admin.connections == 0
        # Control: an ordinary destination outside the mesh is still relayed, in either spelling.
        for i, ip in enumerate([OTHER_IP, f"::ffff:{OTHER_IP}"], start=1):
            original_dst[0] = (ip, ELSEWHERE_PORT)
            assert await _exchange(15001) == b"hello"
            assert elsewhere.connections == i
        assert _refused(registry, "loop") == len(loops)
    finally:
        await elsewhere.stop()
        await admin.stop()


async def test_plaintext_inbound_not_addressed_to_the_pod_is_refused(
    proxy: tuple[NodeProxy, CollectorRegistry], original_dst: list[tuple[str, int]]
) -> None:
    _, registry = proxy
    servers = [
        await CountingServer().start(OTHER_IP, ELSEWHERE_PORT),
        await CountingServer().start(POD_IP, 15020),
        await CountingServer().start(POD_IP, APP_PORT),
    ]
    elsewhere, proxy_port, app = servers
    try:
        for i, dst in enumerate([(OTHER_IP, ELSEWHERE_PORT), (POD_IP, 15020)], start=1):
            original_dst[0] = dst
            assert await _exchange(15006) == b"", dst
            assert _refused(registry, "not_local") == i
        assert (elsewhere.connections, proxy_port.connections) == (0, 0)
        # Control: addressed to the pod's own IP and app port, it reaches the app.
        original_dst[0] = (POD_IP, APP_PORT)
        assert await _exchange(15006) == b"hello"
        assert app.connections == 1
    finally:
        for s in servers:
            await s.stop()


async def test_with_the_ebpf_map_conntrack_is_not_asked(
    proxy: tuple[NodeProxy, CollectorRegistry], original_dst: list[tuple[str, int]]
) -> None:
    """eBPF redirection (a 15001 connection's destination in the node's map): conntrack, when the pod netns has it
    (any netfilter rule there, e.g. the app's own), reports an un-NATed connection's own address, the proxy's
    15001; the map's answer is the destination, and conntrack is not asked (one lookup per connection, not two)."""
    node, registry = proxy
    elsewhere = await CountingServer().start(OTHER_IP, ELSEWHERE_PORT)
    try:
        node.state.workloads["uid-guarded"].sockets.outbound_original_dst = lambda sock: (OTHER_IP, ELSEWHERE_PORT)
        original_dst[0] = ("127.0.0.1", 15001)
        assert await _exchange(15001) == b"hello"
        assert elsewhere.connections == 1 and _refused(registry, "loop") == 0
    finally:
        await elsewhere.stop()
