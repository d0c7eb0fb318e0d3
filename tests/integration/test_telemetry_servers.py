"""Metrics, admin and readiness servers on 127.0.0.1 port 0, spoken to over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from ztunnel.config.model import Workload
from ztunnel.net.http import MAX_CONNECTIONS
from ztunnel.proxy.labels import connection_labels
from ztunnel.telemetry.http_server import AdminServer, MetricsServer, ReadinessServer
from ztunnel.telemetry.metrics import ProxyMetrics


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()  # the server closes after one response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str, method: str = "GET", extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n")


@pytest.fixture
def root_level() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.level
    yield
    root.setLevel(saved)


async def test_metrics_server_serves_prometheus_text_on_both_paths() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    w = Workload(uid="u", name="sleep", namespace="foo", node="a", service_account="sleep", ips=(), labels={})
    labels = connection_labels(
        reporter="destination",
        source=w,
        source_principal=w.identity,
        destination=None,
        destination_principal=None,
        destination_service=None,
        connection_security_policy="mutual_tls",
    )
    for _ in range(5):
        metrics.connection_opened(labels)
    server = MetricsServer("127.0.0.1", 0, registry)
    await server.start()
    try:
        assert server.port > 0
        for path in ("/metrics", "/stats/prometheus"):
            status, headers, body = await get(server.port, path)
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            text = body.decode()
            line = next(x for x in text.splitlines() if x.startswith("istio_tcp_connections_opened_total{"))
            assert 'reporter="destination"' in line
            assert 'source_principal="spiffe://cluster.local/ns/foo/sa/sleep"' in line
            assert 'destination_workload="unknown"' in line
            assert line.endswith(" 5.0")
            assert "_created" not in text  # Istio's proxies do not export them
        status, _, _ = await get(server.port, "/nope")
        assert status == 404
        status, headers, body = await get(server.port, "/metrics", "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    finally:
        await server.close()


async def test_metrics_server_speaks_openmetrics_when_asked() -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry())
    async with server:
        status, headers, body = await get(server.port, "/metrics", extra=b"Accept: application/openmetrics-text\r\n")
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")


async def test_admin_config_dump_quit_and_logging(root_level: None) -> None:
    quit_called = asyncio.Event()

    async def on_quit() -> None:
        quit_called.set()

    levels: list[str] = []
    server = AdminServer(
        "127.0.0.1",
        0,
        config_dump=lambda: {"workloads": [{"name": "sleep"}], "certificates": []},
        on_quit=on_quit,
        set_log_level=levels.append,
    )
    async with server:
        status, headers, body = await get(server.port, "/config_dump")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"workloads": [{"name": "sleep"}], "certificates": []}

        status, headers, _ = await get(server.port, "/quitquitquit")
        assert status == 405 and headers["allow"] == "POST"
        assert not quit_called.is_set()

        status, _, body = await get(server.port, "/logging?level=debug", "POST")
        assert (status, body) == (200, b"level=debug\n")
        status, _, _ = await get(server.port, "/logging?level=warn")
        assert status == 200
        assert levels == ["debug", "warning"]
        status, _, body = await get(server.port, "/logging?level=loud", "POST")
        assert status == 400 and b"unknown level" in body

        status, _, body = await get(server.port, "/quitquitquit", "POST")
        assert (status, body) == (200, b"OK\n")
        async with asyncio.timeout(5):
            await quit_called.wait()


async def test_admin_default_logging_changes_root_level(root_level: None) -> None:
    async with AdminServer("127.0.0.1", 0, config_dump=dict, on_quit=lambda: None) as server:
        status, _, _ = await get(server.port, "/logging?level=error", "POST")
        assert status == 200
        assert logging.getLogger().level == logging.ERROR
        status, _, body = await get(server.port, "/logging")
        assert (status, body) == (200, b"level=error\n")


async def test_admin_quit_may_close_the_server_itself() -> None:
    closed = asyncio.Event()
    server: AdminServer

    async def drain() -> None:
        await server.close()
        closed.set()

    server = AdminServer("127.0.0.1", 0, config_dump=dict, on_quit=drain)
    await server.start()
    port = server.port
    status, _, _ = await get(port, "/quitquitquit", "POST")
    assert status == 200
    async with asyncio.timeout(5):
        await closed.wait()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_failing_config_dump_is_a_500_and_the_server_keeps_serving() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    async with AdminServer("127.0.0.1", 0, config_dump=broken, on_quit=lambda: None) as server:
        status, _, _ = await get(server.port, "/config_dump")
        assert status == 500
        status, _, _ = await get(server.port, "/")
        assert status == 200


async def test_readiness_reports_state_and_reason() -> None:
    state: list[bool | tuple[bool, str]] = [(False, "certificates for 2 pods pending")]
    async with ReadinessServer("127.0.0.1", 0, lambda: state[0]) as server:
        status, _, body = await get(server.port, "/healthz/ready")
        assert status == 503 and body == b"not ready: certificates for 2 pods pending\n"
        state[0] = True
        status, _, body = await get(server.port, "/healthz/ready")
        assert (status, body) == (200, b"ready\n")
        state[0] = False
        status, _, _ = await get(server.port, "/healthz/ready")
        assert status == 503


async def test_malformed_input_gets_a_status_and_the_server_survives() -> None:
    async with ReadinessServer("127.0.0.1", 0, lambda: True) as server:
        for raw, expected in [
            (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),  # a TLS ClientHello
            (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 200 + b"\r\n", 431),
            (b"GET /healthz/ready HTTP/3.0\r\n\r\n", 505),
        ]:
            status, _, _ = await request(server.port, raw)
            assert status == expected
        # a client that connects and closes at once
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        status, _, _ = await get(server.port, "/healthz/ready")
        assert status == 200


async def test_idle_clients_cannot_exhaust_the_server() -> None:
    async with ReadinessServer("127.0.0.1", 0, lambda: True) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CONNECTIONS + 5)]
        try:
            # excess connections are closed at once rather than queued behind the idle ones
            reader, _ = idle[-1]
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            for _, w in idle:
                w.close()
        async with asyncio.timeout(5):
            while True:
                try:
                    status, _, _ = await get(server.port, "/healthz/ready")
                    break
                except (ConnectionError, IndexError):
                    await asyncio.sleep(0.01)
        assert status == 200


async def test_close_ends_in_flight_requests() -> None:
    server = ReadinessServer("127.0.0.1", 0, lambda: True)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz/ready HTTP/1.1\r\n")  # never finished
    await writer.drain()
    async with asyncio.timeout(5):
        await server.close()
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass  # aborted: also an end
    writer.close()
