"""Non-HTTP traffic at the waypoint process: a port whose Service says TCP (`appProtocol`, or a `tcp-` name), or
whose first bytes are not HTTP, gets the engine's L4 check with the original client's identity and is relayed
byte for byte over HBONE to the endpoint (Istio's protocol selection; a silent client is TCP after the sniff
deadline, so server-first protocols work).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.certs import in_process_certs
from tests.support.echo import echo_server
from tests.support.waypoint import (
    CONFIG,
    GREETER_IP,
    WAYPOINT,
    WAYPOINT_IP,
    Responses,
    client_pool,
    echo_service,
    get,
    proxy_and_waypoint,
    tunnel_to,
)
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority
from ztunnel.hbone.stream import HboneStream
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.streams import StreamClosed

ECHO_VIP = "10.96.0.69"
ECHO_PORT = 9000
BANNER_PORT = 9100
TCP_NAMED, SNIFFED, APP_TCP, SERVER_FIRST = 9000, 9001, 9002, 9100
STRANGER = SpiffeId.parse("spiffe://cluster.local/ns/greet/sa/stranger")
EXTRA = echo_service(
    ECHO_VIP,
    f"port: {TCP_NAMED}, targetPort: {ECHO_PORT}, name: tcp-echo",
    f"port: {SNIFFED}, targetPort: {ECHO_PORT}",
    f"port: {APP_TCP}, targetPort: {ECHO_PORT}, name: http-echo, appProtocol: tcp",
    f"port: {SERVER_FIRST}, targetPort: {BANNER_PORT}",
)
RAW = b"\x00\x01\x02 not http at all \xff\r\n\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp("waypoint-tcp")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG + EXTRA)
    with proxy_and_waypoint(config, ca_dir, workdir) as (_, _, log_path):
        yield log_path


@pytest.fixture
async def client(setup: Path, ca_dir: Path) -> AsyncIterator[HbonePool]:
    async with client_pool(ca_dir) as pool, echo_server(GREETER_IP, ECHO_PORT):
        yield pool


async def _read_all(stream: HboneStream, size: int) -> bytes:
    buf = b""
    with contextlib.suppress(StreamClosed):
        async with asyncio.timeout(10):
            while len(buf) < size:
                chunk = await stream.read()
                if not chunk:
                    break
                buf += chunk
    return buf


@pytest.mark.parametrize("port", [TCP_NAMED, SNIFFED, APP_TCP])
async def test_tcp_is_relayed_byte_for_byte(client: HbonePool, port: int) -> None:
    stream = await tunnel_to(client, ECHO_VIP, port)
    try:
        payload = RAW + bytes(range(256)) * 256  # 64 KiB more, every byte value
        await stream.write(payload)
        assert await _read_all(stream, len(payload)) == payload
        await stream.write_eof()
        async with asyncio.timeout(10):
            assert await stream.read() == b""  # the echo's EOF came back: half-close survived both hops
    finally:
        stream.close()


async def test_app_protocol_tcp_wins_over_an_http_port_name(client: HbonePool) -> None:
    """`http-echo` would be HTTP by its name; `appProtocol: tcp` makes it opaque: the request is echoed back
    unparsed instead of being decided (the greeter policy would deny GET /version)."""
    stream = await tunnel_to(client, ECHO_VIP, APP_TCP)
    try:
        request = get("/version")
        await stream.write(request)
        assert await _read_all(stream, len(request)) == request
    finally:
        stream.close()


async def test_http_on_a_sniffed_port_is_decided_per_request(setup: Path, ca_dir: Path) -> None:
    """The stranger's GET on the sniffed port is answered 403 by the HTTP path (on the `tcp-` port its
    connection would just be closed: see the last test)."""
    async with in_process_certs(ca_dir) as certs:
        pool = HbonePool(TlsContexts(certs))
        try:
            key = PoolKey(STRANGER, WAYPOINT, (WAYPOINT_IP, 15008))
            stream = await pool.connect(key, Authority(ECHO_VIP, SNIFFED), expected_identities=[WAYPOINT.uri])
            try:
                await stream.write(get("/version"))
                status, _, body = await Responses(stream).next()
            finally:
                stream.close()
        finally:
            pool.close()
    assert (status, body) == (403, b"RBAC: access denied")


async def test_server_first_protocol_after_the_sniff_deadline(client: HbonePool) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner from the server\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            writer.write(await reader.read(100))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, GREETER_IP, BANNER_PORT, reuse_address=True)
    try:
        stream = await tunnel_to(client, ECHO_VIP, SERVER_FIRST)
        try:
            async with asyncio.timeout(10):
                assert await stream.read() == b"220 banner from the server\r\n"  # the client sent nothing
            await stream.write(b"QUIT\r\n")
            assert await _read_all(stream, 6) == b"QUIT\r\n"
        finally:
            stream.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_l4_policy_denies_another_identity(setup: Path, ca_dir: Path) -> None:
    async with in_process_certs(ca_dir) as certs, echo_server(GREETER_IP, ECHO_PORT) as (echo, _):
        pool = HbonePool(TlsContexts(certs))
        try:
            key = PoolKey(STRANGER, WAYPOINT, (WAYPOINT_IP, 15008))
            stream = await pool.connect(key, Authority(ECHO_VIP, TCP_NAMED), expected_identities=[WAYPOINT.uri])
            try:
                with contextlib.suppress(StreamClosed):  # the waypoint may have ended the tunnel already
                    await stream.write(RAW)
                assert await _read_all(stream, len(RAW)) == b""
            finally:
                stream.close()
        finally:
            pool.close()
        assert echo.connections == 0
    assert "tcp connection denied" in setup.read_text()
