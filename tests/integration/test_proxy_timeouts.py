"""The per-connection timeouts end a stuck connection with the right answer instead of hanging it:

- a SOCKS5 client that never finishes its handshake is dropped after twice the connect timeout;
- a tunnel whose destination proxy never answers the TLS handshake is refused to the client;
- an app that never accepts the inbound connection gets the client a "connection refused" reply (HBONE 503).

Two node proxies run in-process with a short connect timeout. A black hole is a listening socket whose
accept queue is full: the kernel then drops new SYNs, so a connect to it neither succeeds nor fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.certs import in_process_certs
from tests.support.identity import pod_yaml
from ztunnel.config.loader import load_files
from ztunnel.proxy.listeners import LocalListenerFactory
from ztunnel.proxy.node import LocalWorkloads, NodeProxy, ProxyOptions

CLIENT_IP = "127.0.184.1"  # served by node-t
SERVER_IP = "127.0.184.2"  # served by node-u
UNSERVED_IP = "127.0.184.3"  # a mesh pod on node-v, whose proxy is not running: its 15008 is a black hole
APP_PORT = 7400
TIMEOUT = 0.4  # node-t, the client's proxy
INBOUND_TIMEOUT = 0.2  # node-u: shorter, so its 503 reaches the client before node-t's own timeout

CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: tmo, labels: {istio.io/dataplane-mode: ambient}}\n"
    + pod_yaml("client", "tmo", "node-t", "client", CLIENT_IP, uid="uid-client")
    + pod_yaml("server", "tmo", "node-u", "server", SERVER_IP, uid="uid-server")
    + pod_yaml("unserved", "tmo", "node-v", "unserved", UNSERVED_IP, uid="uid-unserved")
)


def black_hole(ip: str, port: int) -> list[socket.socket]:
    """A listener at ip:port that completes no new connection: its accept queue is full and never drained."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ip, port))
    listener.listen(0)
    held = [listener]
    for _ in range(4):  # a backlog of 0 still queues one; fill it and then some (extra attempts just time out)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((ip, port))
        held.append(s)
    time.sleep(0.05)  # let the handshakes that can complete land in the queue
    return held


@pytest.fixture
async def mesh(tmp_path: Path, ca_dir: Path) -> AsyncIterator[None]:
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(CONFIG)
    config = load_files([config_file])
    async with contextlib.AsyncExitStack() as stack:
        for node, timeout in (("node-t", TIMEOUT), ("node-u", INBOUND_TIMEOUT)):
            certs = await stack.enter_async_context(in_process_certs(ca_dir))
            proxy = NodeProxy(ProxyOptions(node=node, connect_timeout=timeout), certs)
            stack.push_async_callback(proxy.close)
            proxy.apply_config(config)
            await LocalWorkloads(proxy, LocalListenerFactory(hbone_port=15008)).reconcile(config)
        yield


@pytest.fixture
def holes() -> Iterator[None]:
    held = black_hole(UNSERVED_IP, 15008) + black_hole(SERVER_IP, APP_PORT)
    try:
        yield
    finally:
        for s in held:
            s.close()


async def socks_reply(dst: tuple[str, int]) -> tuple[int, float]:
    """SOCKS5 CONNECT through the client pod's proxy: (reply code, seconds it took)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(CLIENT_IP, 15080)
    try:
        writer.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + struct.pack("!H", dst[1]))
        async with asyncio.timeout(10):
            assert await reader.readexactly(2) == b"\x05\x00"
            head = await reader.readexactly(10)
        return head[1], time.monotonic() - started
    finally:
        writer.close()


async def test_a_socks5_client_that_never_sends_its_request_is_dropped(mesh: None) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(CLIENT_IP, 15080)
    try:
        writer.write(b"\x05\x01\x00")  # greeting only
        async with asyncio.timeout(10):
            assert await reader.readexactly(2) == b"\x05\x00"
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass  # dropped with a reset: as good
    finally:
        writer.close()
    assert 2 * TIMEOUT * 0.9 <= time.monotonic() - started < 5


async def test_a_tunnel_whose_destination_proxy_never_answers_is_refused_in_time(mesh: None, holes: None) -> None:
    code, took = await socks_reply((UNSERVED_IP, APP_PORT))
    assert code in (0x01, 0x06)  # general failure (handshake gave up) or TTL expired (connect timeout)
    assert TIMEOUT * 0.9 <= took < 5


async def test_an_app_that_never_accepts_gets_the_client_connection_refused(mesh: None, holes: None) -> None:
    code, took = await socks_reply((SERVER_IP, APP_PORT))
    assert code == 0x05  # the inbound proxy answered 503 when its app connect timed out
    assert INBOUND_TIMEOUT * 0.9 <= took < 5
