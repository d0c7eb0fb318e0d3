"""The waypoint process's upkeep: a stale kept-alive upstream is retried once (idempotent requests only), requests
the HTTP parser refuses are counted in istio_requests_total and logged, and a revoked client's open connections
are closed as the node proxy closes them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame

from tests.integration.conftest import ZTUNNEL
from tests.support.certs import in_process_certs
from tests.support.eventually import eventually
from tests.support.identity import free_port
from tests.support.svids import cli_issued
from tests.support.waypoint import (
    APP_PORT,
    CLIENT,
    CONFIG,
    DRAINER,
    DRAINER_IP,
    GREETER_IP,
    SLOW_CHUNKS,
    VIP,
    WAYPOINT_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    get,
    proxy_and_waypoint,
    start_waypoint,
    stop,
    tunnel_to,
    wait_listening,
)
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.net.streams import StreamClosed

STALE_VIP = "10.96.0.70"
STALE_PORT = 8081
EXTRA = f"""\
---
apiVersion: v1
kind: Service
metadata: {{name: stale, namespace: greet}}
spec: {{clusterIP: {STALE_VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: {STALE_PORT}}}]}}
"""
DEADLINE = 15.0  # the CRL is polled every 5 s


@dataclass
class Setup:
    workdir: Path
    ca_dir: Path
    log: Path
    metrics_port: int


class StaleApp:
    """Answers the first request of each connection (keep-alive), then reads the second and closes without an
    answer: what a keep-alive connection that its server just timed out looks like to the proxy in front."""

    def __init__(self) -> None:
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = b"fresh connection %d\n" % n
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("waypoint-lifecycle")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG + EXTRA)
    metrics_port = free_port()
    with proxy_and_waypoint(config, ca_dir, workdir, "--metrics-addr", f"127.0.0.1:{metrics_port}") as (_, _, log):
        yield Setup(workdir, ca_dir, log, metrics_port)


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[tuple[HbonePool, StaleApp]]:
    app = StaleApp()
    server = await asyncio.start_server(app, GREETER_IP, STALE_PORT, reuse_address=True)
    try:
        async with client_pool(setup.ca_dir) as pool:
            yield pool, app
    finally:
        server.close()
        await server.wait_closed()


async def test_stale_keep_alive_upstream_is_retried_once_http1(client: tuple[HbonePool, StaleApp]) -> None:
    pool, app = client
    stream = await tunnel_to(pool, STALE_VIP, 80)
    responses = Responses(stream)
    try:
        await stream.write(get("/hello"))
        first = await responses.next()
        await stream.write(get("/hello"))  # its upstream stream is the kept one, which the app ends unanswered
        second = await responses.next()
    finally:
        stream.close()
    assert (first[0], first[2]) == (200, b"fresh connection 1\n")
    assert (second[0], second[2]) == (200, b"fresh connection 2\n")
    assert app.connections == 2


async def test_stale_upstream_not_retried_for_a_post(client: tuple[HbonePool, StaleApp], setup: Setup) -> None:
    """A POST may have had its effect: the client learns the upstream broke off (502), nothing is sent twice."""
    config = setup.workdir / "cluster.yaml"
    assert "/upload" in config.read_text()  # the greeter policy allows POST /upload
    pool, app = client
    stream = await tunnel_to(pool, STALE_VIP, 80)
    responses = Responses(stream)
    try:
        await stream.write(get("/upload", "POST", b"x"))
        first = await responses.next()
        await stream.write(get("/upload", "POST", b"y"))
        second = await responses.next()
    finally:
        stream.close()
    assert (first[0], second[0], app.connections) == (200, 502, 1)


async def _h2c_gets(stream: HboneStream, paths: list[str]) -> list[tuple[int, bytes]]:
    """GET each path in turn on one h2c connection inside `stream`; (status, body) of each."""
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    got: list[tuple[int, bytes]] = []
    for i, path in enumerate(paths):
        sid = 1 + 2 * i
        request = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "stale")]
        h2c.send_headers(sid, request, end_stream=True)
        await stream.write(h2c.data_to_send())
        status, body, ended = 0, b"", False
        async with asyncio.timeout(10):
            while not ended:
                data = await stream.read()
                assert data, "tunnel closed"
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                        ended = True
                await stream.write(h2c.data_to_send())
        got.append((status, body))
    return got


async def test_stale_keep_alive_upstream_is_retried_once_h2c(client: tuple[HbonePool, StaleApp]) -> None:
    pool, _ = client
    stream = await tunnel_to(pool, STALE_VIP, 80)
    try:
        got = await _h2c_gets(stream, ["/hello", "/hello"])
    finally:
        stream.close()
    assert got == [(200, b"fresh connection 1\n"), (200, b"fresh connection 2\n")]


async def test_h2c_requests_are_counted(client: tuple[HbonePool, StaleApp], setup: Setup) -> None:
    pool, _ = client
    before = _metrics(setup)
    stream = await tunnel_to(pool, STALE_VIP, 80)
    try:
        got = await _h2c_gets(stream, ["/hello", "/version"])
    finally:
        stream.close()
    assert [status for status, _ in got] == [200, 403]

    def counted() -> bool:
        text = _metrics(setup)
        return all(_count(text, code) == _count(before, code) + 1 for code in (200, 403))

    eventually(counted, 10, what="the h2c requests in istio_requests_total")


def _metrics(setup: Setup) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{setup.metrics_port}/stats/prometheus", timeout=5) as r:
        return r.read().decode()


def _count(text: str, code: int) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{") and f'response_code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_parser_refusals_are_counted_and_logged(client: tuple[HbonePool, StaleApp], setup: Setup) -> None:
    pool, _ = client
    before = _metrics(setup)
    smuggle = b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    huge = b"GET /hello HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    for request, status in ((smuggle, 400), (huge, 431)):
        stream = await tunnel_to(pool, STALE_VIP, 80)
        try:
            await stream.write(request)
            assert (await Responses(stream).next())[0] == status
        finally:
            stream.close()

    def counted() -> str | None:
        text = _metrics(setup)
        done = all(_count(text, code) == _count(before, code) + 1 for code in (400, 431))
        return text if done else None

    eventually(counted, 10, what="the refused requests in istio_requests_total")
    eventually(lambda: "request refused by the HTTP parser" in setup.log.read_text(), 10, what="the log line")


async def test_a_revoked_clients_open_connection_is_closed(setup: Setup) -> None:
    serial, ctx = cli_issued(setup.ca_dir, setup.workdir, "revoked-client", CLIENT.uri)
    reader, writer = await asyncio.open_connection(WAYPOINT_IP, 15008, ssl=ctx, server_hostname="")
    outer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    outer.initiate_connection()
    outer.send_headers(1, [(":method", "CONNECT"), (":authority", "10.96.0.65:80")])
    writer.write(outer.data_to_send())
    try:
        async with asyncio.timeout(10):  # the tunnel is answered 200: an open connection the waypoint serves
            status = 0
            while not status:
                data = await reader.read(65536)
                assert data, "the waypoint closed the new connection"
                for ev in outer.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[b":status"])
                writer.write(outer.data_to_send())
        assert status == 200
        subprocess.run(
            [ZTUNNEL, "ca", "revoke", "--dir", str(setup.ca_dir), "--serial", serial], check=True, capture_output=True
        )
        closed = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DEADLINE):
                try:
                    while data := await reader.read(65536):
                        for ev in outer.receive_data(data):
                            if isinstance(ev, h2.events.ConnectionTerminated):
                                closed = True
                        if closed:
                            break
                        writer.write(outer.data_to_send())  # PING ACKs: keepalive is not what closes it
                    closed = True
                except (ssl.SSLError, ConnectionError, OSError, StreamClosed):
                    closed = True
        assert closed, "the revoked client's connection stayed open"
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            await writer.wait_closed()
    assert "closing the HBONE connection of a revoked peer" in setup.log.read_text()


def test_sigterm_sends_h2c_clients_a_graceful_goaway(setup: Setup) -> None:
    """On SIGTERM an h2c client inside a tunnel is told GOAWAY(NO_ERROR, last stream 1) and its open /slow
    response still arrives whole before the waypoint exits."""
    proc, log_path = start_waypoint(
        setup.workdir / "cluster.yaml", setup.ca_dir, setup.workdir, "--name", "drainer", "--namespace", "greet"
    )
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    try:
        wait_listening(proc, log_path, DRAINER_IP)

        async def slow_across_sigterm() -> tuple[list[tuple[int, int]], bytes]:
            async with in_process_certs(setup.ca_dir) as certs:
                pool = HbonePool(TlsContexts(certs))
                try:
                    key = PoolKey(CLIENT, DRAINER, (DRAINER_IP, 15008))
                    stream = await pool.connect(key, Authority(VIP, 80), expected_identities=[DRAINER.uri])
                    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                    h2c.initiate_connection()
                    request = [(":method", "GET"), (":path", "/slow"), (":scheme", "http"), (":authority", "g")]
                    h2c.send_headers(1, request, end_stream=True)
                    await stream.write(h2c.data_to_send())
                    goaways: list[tuple[int, int]] = []
                    body, buf, ended, signalled = b"", b"", False, False
                    async with asyncio.timeout(15):  # frames parsed by hand: h2's client stops at any GOAWAY
                        while not ended:
                            data = await stream.read()
                            assert data, f"tunnel closed; body {len(body)} bytes"
                            buf += data
                            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                                frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
                                frame.parse_body(memoryview(buf[9 : 9 + length]))
                                buf = buf[9 + length :]
                                if isinstance(frame, GoAwayFrame):
                                    goaways.append((frame.error_code, frame.last_stream_id))
                                elif isinstance(frame, DataFrame) and frame.stream_id == 1:
                                    body += frame.data
                                    ended = "END_STREAM" in frame.flags
                            if body and not signalled:
                                proc.terminate()  # the response has started
                                signalled = True
                    stream.close()
                    return goaways, body
                finally:
                    pool.close()

        goaways, body = asyncio.run(slow_across_sigterm())
        assert goaways == [(0, 1)]
        assert body == b"s" * 1024 * SLOW_CHUNKS
        assert proc.wait(15) == 0
    finally:
        stop(proc)
        app.close()
