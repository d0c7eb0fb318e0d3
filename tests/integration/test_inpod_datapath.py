"""In-pod redirection for real, inside network namespaces this test creates (DESIGN §4.6).

A "client" netns and a "pod" netns joined by a veth pair. The pod gets the in-pod rules and the
proxy's listeners (created through setns, served by uvloop from the test's own netns). We check:
rules apply idempotently and remove cleanly; the app's outbound connect lands on 15001 with the
original destination; inbound plaintext lands on 15006, the proxy reaches the app from the client's
own address (IP_TRANSPARENT + connmark return path); 15008 is reached directly.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.nodeagent import CLIENT_IP, POD_IP, in_thread, veth_pair
from ztunnel.config.model import Workload
from ztunnel.inpod import protocol
from ztunnel.inpod.session import ProxySession
from ztunnel.net.netns import current_netns_fd, in_netns, open_netns, socket_in_netns
from ztunnel.proxy.inpod import InpodClient, InpodConnector, pod_sockets
from ztunnel.proxy.listeners import WorkloadSockets, original_destination
from ztunnel.redirect import iptables
from ztunnel.redirect.agent import process_cgroup


def apply_inpod(backend: iptables.IptablesBackend) -> None:
    """The rules, with this process's cgroup as the proxy's (the proxy runs here)."""
    iptables.apply_inpod(backend, proxy_cgroup=process_cgroup()[0])


pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]



def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    with veth_pair() as namespaces:
        yield namespaces


def save_all(ns: str) -> str:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        out.append("\n".join(x for x in sh("ip", "netns", "exec", ns, tool).splitlines() if not x.startswith("#")))
    out.append(sh("ip", "-n", ns, "rule"))
    out.append(sh("ip", "-n", ns, "-6", "rule"))
    for family in ("-4", "-6"):  # (exits 2 while table 100 does not exist)
        out.append(
            subprocess.run(
                ["ip", "-n", ns, family, "route", "show", "table", "100"], capture_output=True, text=True
            ).stdout
        )
    return "\n".join(out)


def rules_only(save: str) -> list[str]:
    """Rules, ip rules and routes; not the (empty) table and built-in chain declarations."""
    return [x for x in save.splitlines() if x and not x.startswith(("*", ":", "COMMIT"))]


def test_rules_apply_twice_identically_and_remove_to_nothing(pair: tuple[str, str]) -> None:
    _, pod = pair
    backend = iptables.detect_backend()
    fd = open_netns(pod)
    try:
        before = save_all(pod)
        in_thread(fd, apply_inpod, backend)
        once = save_all(pod)
        in_thread(fd, apply_inpod, backend)
        twice = save_all(pod)
        assert once == twice
        assert "ZTUNNEL-OUTPUT" in once and "fwmark 0x111/0xfff lookup 100" in once
        assert once.count("local default dev lo") == 2
        assert once.count("-A OUTPUT -j ZTUNNEL-OUTPUT") == 4  # mangle+nat, v4+v6
        in_thread(fd, iptables.remove_inpod, backend)
        assert "ZTUNNEL" not in save_all(pod)
        assert in_thread(fd, iptables.ours, backend).count("ZTUNNEL") == 0
        assert rules_only(save_all(pod)) == rules_only(before)  # (empty tables may remain, as declared)
        after = save_all(pod)
        in_thread(fd, iptables.remove_inpod, backend)  # removing again is a no-op
        assert save_all(pod) == after
    finally:
        os.close(fd)


async def test_socket_made_in_netns_is_served_by_uvloop_from_outside(pair: tuple[str, str]) -> None:
    import uvloop

    _, pod = pair
    fd = open_netns(pod)
    try:
        listener = socket_in_netns(fd, socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((POD_IP, 0))
        listener.listen()
        port = listener.getsockname()[1]

        async def serve() -> bytes:
            loop = asyncio.get_running_loop()
            listener.setblocking(False)
            conn, _ = await loop.sock_accept(listener)
            with conn:
                data = await loop.sock_recv(conn, 100)
                await loop.sock_sendall(conn, data.upper())
            return data

        def client() -> bytes:
            with in_netns(fd):
                c = socket.create_connection((POD_IP, port), timeout=5)
            with c:
                c.sendall(b"hello")
                return c.recv(100)

        async def main() -> tuple[bytes, bytes]:
            server = asyncio.ensure_future(serve())
            reply = await asyncio.to_thread(client)
            return await server, reply

        got, reply = await asyncio.to_thread(uvloop.run, main())
        assert (got, reply) == (b"hello", b"HELLO")
        listener.close()
        # this thread never left its own netns
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(f"/proc/{os.getpid()}/ns/net").st_ino
    finally:
        os.close(fd)


async def test_redirect_outbound_inbound_and_hbone_with_client_ip_preserved(pair: tuple[str, str]) -> None:
    client_ns, pod = pair
    backend = iptables.detect_backend()
    pod_fd = open_netns(pod)
    client_fd = open_netns(client_ns)
    loop = asyncio.get_running_loop()
    in_thread(pod_fd, apply_inpod, backend)
    socks = pod_sockets(pod_fd)
    app = socket_in_netns(pod_fd)
    remote = socket_in_netns(client_fd)
    try:
        app.bind(("0.0.0.0", 8080))
        app.listen()
        app.setblocking(False)
        remote.bind((CLIENT_IP, 9999))
        remote.listen()
        remote.setblocking(False)

        # -- outbound: the app connects out; the proxy's 15001 gets it with the original destination
        def app_connects_out() -> bytes:
            with in_netns(pod_fd):
                c = socket.create_connection((CLIENT_IP, 9999), timeout=5)
            with c:
                return c.recv(100)

        out_task = asyncio.ensure_future(asyncio.to_thread(app_connects_out))
        conn, peer = await asyncio.wait_for(loop.sock_accept(socks.outbound[0]), 5)
        with conn:
            assert original_destination(conn) == (CLIENT_IP, 9999)
            assert peer[0] == POD_IP
            # the proxy's own (marked) connection to that destination is not redirected
            up = await InpodConnector(pod_fd).connect((CLIENT_IP, 9999))
            far, far_peer = await asyncio.wait_for(loop.sock_accept(remote), 5)
            far.close()
            assert far_peer[0] == POD_IP
            up.close()
            await loop.sock_sendall(conn, b"via-15001")
        assert await asyncio.wait_for(out_task, 5) == b"via-15001"

        # -- inbound plaintext: the client connects to the app port; lands on 15006
        def client_connects_in(port: int) -> bytes:
            with in_netns(client_fd):
                c = socket.create_connection((POD_IP, port), timeout=5)
            with c:
                c.sendall(b"ping")
                return c.recv(100)

        in_task = asyncio.ensure_future(asyncio.to_thread(client_connects_in, 8080))
        conn, peer = await asyncio.wait_for(loop.sock_accept(socks.plaintext[0]), 5)
        with conn:
            assert peer[0] == CLIENT_IP
            assert original_destination(conn) == (POD_IP, 8080)
            home = current_netns_fd()  # as the InpodClient holds it: the connector comes back without a lookup
            try:
                upstream = await InpodConnector(pod_fd, home).connect((POD_IP, 8080), source=(peer[0], 0))
                assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(home).st_ino  # back home
            finally:
                os.close(home)
            app_conn, app_peer = await asyncio.wait_for(loop.sock_accept(app), 5)
            with app_conn:
                assert app_peer[0] == CLIENT_IP  # the app sees the real client address
                await loop.sock_sendall(app_conn, b"pong-from-app")
                data = await asyncio.wait_for(upstream.read(), 5)
            assert data == b"pong-from-app"  # the reply found its way back (connmark + table 100)
            upstream.close()
            await loop.sock_recv(conn, 4)
            await loop.sock_sendall(conn, data)
        assert await asyncio.wait_for(in_task, 5) == b"pong-from-app"

        # -- HBONE port is not redirected
        hb_task = asyncio.ensure_future(asyncio.to_thread(client_connects_in, 15008))
        conn, _ = await asyncio.wait_for(loop.sock_accept(socks.hbone[0]), 5)
        with conn:
            assert original_destination(conn) in (None, (POD_IP, 15008))
            await loop.sock_recv(conn, 4)
            await loop.sock_sendall(conn, b"hbone")
        assert await asyncio.wait_for(hb_task, 5) == b"hbone"
    finally:
        socks.close()
        app.close()
        remote.close()
        os.close(pod_fd)
        os.close(client_fd)


class RecordingProxy:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.sockets: dict[str, WorkloadSockets] = {}

    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None:
        self.events.append(("add", workload.uid))
        self.sockets[workload.uid] = sockets

    async def remove_workload(self, uid: str) -> None:
        self.events.append(("remove", uid))
        self.sockets.pop(uid).close()


async def test_inpod_client_replays_new_sandboxes_and_snapshot(pair: tuple[str, str]) -> None:
    first, second = pair
    target = RecordingProxy()
    client = InpodClient("/nonexistent", target)
    session = ProxySession()
    info = {"name": "web", "namespace": "mesh", "ips": [POD_IP], "serviceAccount": "web"}
    try:
        add = protocol.AddWorkload(id=1, uid="u1", workload=info, netns_fd=open_netns(first))
        ack = await client.handle(add, session)
        assert ack == protocol.Ack(id=1)
        assert client.pods["u1"].workload.identity == "spiffe://cluster.local/ns/mesh/sa/web"
        # the same netns again (a replayed snapshot): nothing changes, the extra fd is closed
        await client.handle(protocol.AddWorkload(id=2, uid="u1", workload=info, netns_fd=open_netns(first)), session)
        assert target.events == [("add", "u1")]
        # a new sandbox for the same pod: the old listeners go, new ones come
        await client.handle(protocol.AddWorkload(id=3, uid="u1", workload=info, netns_fd=open_netns(second)), session)
        assert target.events == [("add", "u1"), ("remove", "u1"), ("add", "u1")]
        # after the snapshot, pods the agent did not mention are dropped
        ack = await client.handle(protocol.SnapshotSent(id=4), ProxySession())
        assert ack == protocol.Ack(id=4) and client.synced.is_set()
        assert target.events[-1] == ("remove", "u1") and client.pods == {}
    finally:
        await client.close()
