"""A connection the kernel accepts on a pod's listener while the proxy is still fetching the pod's certificate
(first enrolment, re-enrolment) is served once the pod is ready, not reset for lack of a record of the pod.

In-pod mode opens the listeners (pod_sockets) before `add_workload` fetches the SVID; the app may connect in
that window (15-35 ms measured in the lab). Here the certificate fetch is held by a hook, the app connects
through the outbound listener meanwhile, and the bytes must reach the app (a mesh pod on another node, over
HBONE) once the fetch completes. The original destination comes from the eBPF-style map lookup
(`outbound_original_dst`), as with sk_lookup.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.support.certs import in_process_certs
from tests.support.echo import CountingServer
from tests.support.identity import pod_yaml
from ztunnel.config.loader import load_files
from ztunnel.config.model import ClusterConfig
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket
from ztunnel.net.streams import TcpStream
from ztunnel.proxy.listeners import LocalListenerFactory, WorkloadSockets, dns_sockets
from ztunnel.proxy.node import LocalWorkloads, NodeProxy, ProxyOptions
from ztunnel.telemetry.metrics import ProxyMetrics

POD_IP = "127.0.183.1"
APP_IP = "127.0.183.9"
APP_PORT = 7310


CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: race, labels: {istio.io/dataplane-mode: ambient}}\n"
    + pod_yaml("racing", "race", "node-r", "racing", POD_IP, uid="uid-racing")
    + pod_yaml("app", "race", "node-s", "app", APP_IP, uid="uid-app")
)


def _mtls_inbound(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "istio_tcp_connections_opened_total"
        and sample.labels.get("reporter") == "destination"
        and sample.labels.get("connection_security_policy") == "mutual_tls"
    )


@pytest.fixture
def config(tmp_path: Path) -> ClusterConfig:
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(CONFIG)
    return load_files([config_file])


@pytest.fixture
async def app_node(ca_dir: Path, config: ClusterConfig) -> AsyncIterator[CollectorRegistry]:
    """The app's node: its proxy serves the app pod (HBONE on APP_IP:15008); yields its metrics."""
    registry = CollectorRegistry()
    async with in_process_certs(ca_dir) as certs:
        proxy = NodeProxy(ProxyOptions(node="node-s"), certs, metrics=ProxyMetrics(registry))
        try:
            proxy.apply_config(config)
            await LocalWorkloads(proxy, LocalListenerFactory(hbone_port=15008)).reconcile(config)
            yield registry
        finally:
            await proxy.close()


async def test_connection_accepted_while_the_certificate_is_fetched_is_served(
    config: ClusterConfig, certs: CertificateManager, app_node: CollectorRegistry
) -> None:
    app = await CountingServer().start(APP_IP, APP_PORT)
    node = NodeProxy(ProxyOptions(node="node-r", connect_timeout=2.0), certs)
    node.apply_config(config)
    release = asyncio.Event()
    fetching = asyncio.Event()
    fetch: Callable[[SpiffeId], Awaitable[ssl.SSLContext]] = node.contexts.server

    async def slow_server(identity: SpiffeId) -> ssl.SSLContext:
        fetching.set()
        await release.wait()
        return await fetch(identity)

    node.contexts.server = slow_server  # type: ignore[method-assign]
    workload = next(w for w in config.workloads if w.uid == "uid-racing")
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
        assert _mtls_inbound(app_node) == 1  # through the mesh, not passthrough
    finally:
        release.set()
        if not adding.done():
            adding.cancel()
        await asyncio.gather(adding, return_exceptions=True)
        await node.close()
        await app.stop()
