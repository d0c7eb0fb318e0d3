"""Istio's TCP metrics for what the waypoint relays as TCP: a connection to a `tcp-` port, or one whose first bytes
are not HTTP, is counted in `istio_tcp_connections_opened_total` / `_closed_total` and its bytes in
`istio_tcp_received_bytes_total` (from the client, the sniffed first bytes included) / `istio_tcp_sent_bytes_total`
(to it), with reporter `waypoint` and the node proxy's label set (the client's principal, the Service's FQDN, the
endpoint workload, request_protocol tcp, mutual_tls), once the connection closes.

The cluster is the kit's greeter plus an echo Service (a `tcp-` port and an undeclared one) on the greeter pod.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.echo import echo_server
from tests.support.eventually import eventually
from tests.support.identity import free_port
from tests.support.waypoint import (
    CLIENT,
    CONFIG,
    GREETER_IP,
    client_pool,
    echo_service,
    metric_samples,
    metric_sum,
    proxy_and_waypoint,
    tunnel_to,
)
from ztunnel.hbone.client import HbonePool
from ztunnel.net.streams import StreamClosed

ECHO_VIP = "10.96.0.81"
ECHO_PORT = 9000
TCP_NAMED, SNIFFED = 9000, 9001
EXTRA = echo_service(
    ECHO_VIP,
    f"port: {TCP_NAMED}, targetPort: {ECHO_PORT}, name: tcp-echo",
    f"port: {SNIFFED}, targetPort: {ECHO_PORT}",
)
FLUSH = 0.2  # --byte-flush-interval
RAW = b"\x00\x01\x02 not http at all \xff\r\n\r\n"
LABELS = {
    "reporter": "waypoint",
    "source_principal": CLIENT.uri,
    "destination_service": "echo.greet.svc.cluster.local",
    "destination_service_name": "echo",
    "destination_workload": "greeter",
    "destination_principal": "spiffe://cluster.local/ns/greet/sa/greeter",
    "request_protocol": "tcp",
    "connection_security_policy": "mutual_tls",
    "response_flags": "-",
}
NAMES = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
)


@pytest.fixture(scope="module")
def metrics_port(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("waypoint-tcp-metrics")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG + EXTRA)
    port = free_port()
    args = ("--metrics-addr", f"127.0.0.1:{port}", "--byte-flush-interval", f"{FLUSH}s")
    with proxy_and_waypoint(config, ca_dir, workdir, *args):
        yield port


@pytest.fixture
async def client(metrics_port: int, ca_dir: Path) -> AsyncIterator[HbonePool]:
    async with client_pool(ca_dir) as pool, echo_server(GREETER_IP, ECHO_PORT):
        yield pool


def _counts(port: int) -> tuple[float, ...]:
    samples = metric_samples(port)
    return tuple(metric_sum(samples, name, **LABELS) for name in NAMES)


async def _echo(pool: HbonePool, port: int, payload: bytes) -> None:
    """One TCP connection through the waypoint: `payload` out, the same back, then both ends closed."""
    stream = await tunnel_to(pool, ECHO_VIP, port)
    try:
        await stream.write(payload)
        got = b""
        async with asyncio.timeout(10):
            while len(got) < len(payload):
                chunk = await stream.read()
                assert chunk, f"EOF after {len(got)} of {len(payload)} bytes"
                got += chunk
            assert got == payload
            await stream.write_eof()
            with contextlib.suppress(StreamClosed):
                assert await stream.read() == b""
    finally:
        stream.close()


@pytest.mark.parametrize("port", [TCP_NAMED, SNIFFED])
async def test_a_relayed_tcp_connection_is_counted_with_its_bytes(
    client: HbonePool, metrics_port: int, port: int
) -> None:
    before = _counts(metrics_port)
    payload = RAW + bytes(range(256)) * 300  # on the sniffed port RAW is what the sniff read first
    await _echo(client, port, payload)
    n = len(payload)

    def counted() -> bool:
        after = _counts(metrics_port)
        delta = tuple(a - b for a, b in zip(after, before, strict=True))
        assert delta == (1, 1, n, n), f"opened, closed, received, sent: {delta}"
        return True

    eventually(counted, 10, what="the TCP connection in the waypoint's istio_tcp_* metrics")


async def test_an_open_connection_shows_its_bytes_before_it_closes(client: HbonePool, metrics_port: int) -> None:
    """The periodic flush adds an open connection's bytes (the node proxy's --byte-flush-interval); its close adds
    only what was not flushed."""
    before = _counts(metrics_port)
    payload = RAW + b"x" * 100_000
    n = len(payload)
    stream = await tunnel_to(client, ECHO_VIP, TCP_NAMED)
    try:
        await stream.write(payload)
        got = b""
        async with asyncio.timeout(10):
            while len(got) < n:
                chunk = await stream.read()
                assert chunk
                got += chunk

        def flushed() -> bool:
            delta = tuple(a - b for a, b in zip(_counts(metrics_port), before, strict=True))
            assert delta == (1, 0, n, n), f"opened, closed, received, sent: {delta}"
            return True

        eventually(flushed, 10, what="the open connection's bytes flushed")
        await stream.write_eof()
        with contextlib.suppress(StreamClosed):
            async with asyncio.timeout(10):
                assert await stream.read() == b""
    finally:
        stream.close()

    def closed() -> bool:
        delta = tuple(a - b for a, b in zip(_counts(metrics_port), before, strict=True))
        assert delta == (1, 1, n, n), f"opened, closed, received, sent: {delta}"
        return True

    eventually(closed, 10, what="the close counted, its bytes not twice")
