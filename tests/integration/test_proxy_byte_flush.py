"""Long-lived connections show their bytes before they close: the proxy adds open connections' bytes to
istio_tcp_{sent,received}_bytes_total every flush interval (5 s by default, short here), and the close
adds only the rest, so totals are exact."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from tests.support.echo import echo_server
from tests.support.eventually import eventually_async
from ztunnel.config.model import Workload
from ztunnel.identity.manager import CertificateManager
from ztunnel.net.listen import listening_socket
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.proxy.node import NodeProxy, ProxyOptions
from ztunnel.telemetry.metrics import ProxyMetrics

POD_IP = "127.0.183.1"
ECHO_IP = "127.0.183.9"  # outside the mesh: plain passthrough
ECHO_PORT = 7400


def _total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _counted(registry: CollectorRegistry, name: str, want: float) -> None:
    await eventually_async(lambda: _total(registry, name, reporter="source") == want, 5, 0.02, what=f"{name} {want}")


@pytest.fixture
async def echo() -> AsyncIterator[None]:
    async with echo_server(ECHO_IP, ECHO_PORT):
        yield


async def test_open_connections_bytes_are_flushed_periodically_and_totals_stay_exact(
    certs: CertificateManager, echo: None
) -> None:
    registry = CollectorRegistry()
    proxy = NodeProxy(
        ProxyOptions(node="node-f", byte_flush_interval=0.1),
        certs,
        metrics=ProxyMetrics(registry),
    )
    socks = listening_socket(POD_IP, 0)
    socks_port = socks.getsockname()[1]
    workload = Workload(
        uid="uid-flush",
        name="flush",
        namespace="flush",
        node="node-f",
        service_account="flush",
        ips=(POD_IP,),
        labels={},
        enrolled=True,
    )
    await proxy.add_workload(workload, WorkloadSockets(socks5=[socks]))
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(POD_IP, socks_port)
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01" + socket.inet_aton(ECHO_IP) + struct.pack("!H", ECHO_PORT))
        assert (await reader.readexactly(10))[1] == 0

        writer.write(b"a" * 1000)
        assert await reader.readexactly(1000) == b"a" * 1000
        # Still open: the bytes show up anyway.
        await _counted(registry, "istio_tcp_received_bytes_total", 1000)
        await _counted(registry, "istio_tcp_sent_bytes_total", 1000)
        assert _total(registry, "istio_tcp_connections_closed_total") == 0

        writer.write(b"b" * 500)
        assert await reader.readexactly(500) == b"b" * 500
        await _counted(registry, "istio_tcp_received_bytes_total", 1500)

        writer.write(b"c" * 20)
        writer.write_eof()
        assert await reader.read() == b"c" * 20
        writer.close()
        await _counted(registry, "istio_tcp_connections_closed_total", 1)
        # The close adds only what was not flushed: nothing is counted twice.
        assert _total(registry, "istio_tcp_received_bytes_total", reporter="source") == 1520
        assert _total(registry, "istio_tcp_sent_bytes_total", reporter="source") == 1520
    finally:
        if writer is not None:
            writer.close()
        await proxy.close()
