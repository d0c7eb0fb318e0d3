"""The node proxies' part of waypoints (DESIGN §4.4, issue 12): a Service that uses a waypoint is sent to the
waypoint's pod over HBONE asking for the VIP as dialled; with no ready waypoint pod it is refused; and the
destination's proxy takes a tunnel to a pod that uses a waypoint from the waypoint's identity only.

The waypoint is a stand-in: an in-test HBONE server with the waypoint's SVID at its pod address (node-wc has
no proxy), recording what it is asked for and echoing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import AppServer, ProxyProcess, SocksRefused, recv_all, socks_connect, start_proxy
from tests.support.echo import echo_tunnel
from tests.support.eventually import eventually
from tests.support.svids import FixedProvider, signed_svid
from ztunnel.hbone.client import HbonePool, PoolKey
from ztunnel.hbone.protocol import Authority, ConnectRequest, HboneError
from ztunnel.hbone.server import HboneServer, InboundTunnel
from ztunnel.hbone.tls_cache import TlsContexts
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.net.listen import listening_socket

CLIENT = "127.0.211.1"  # node-wa
SERVER = "127.0.212.1"  # node-wb
WAYPOINT_POD = "127.0.213.1"  # node-wc: no proxy, the stand-in waypoint listens here on 15008
SERVICE_IP = "10.96.21.1"  # uses waypoint wp
LONELY_IP = "10.96.21.2"  # uses waypoint lonely, which has no pod
PORT = 8080
WAYPOINT = "spiffe://cluster.local/ns/wpt/sa/wp"
SERVER_ID = "spiffe://cluster.local/ns/wpt/sa/server"


def _pod(name: str, node: str, ip: str, labels: str, sa: str) -> str:
    return (
        "---\napiVersion: v1\nkind: Pod\n"
        f"metadata: {{name: {name}, namespace: wpt, uid: wpt-{name}, labels: {labels}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: {sa},"
        f" containers: [{{name: app, ports: [{{containerPort: {PORT}}}]}}]}}\n"
        f"status: {{podIP: {ip}}}\n"
    )


def _gateway(name: str) -> str:
    return (
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: wpt}}\n"
        "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n"
    )


def _service(name: str, ip: str, waypoint: str) -> str:
    return (
        f"---\napiVersion: v1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: wpt, labels: {{istio.io/use-waypoint: {waypoint}}}}}\n"
        f"spec: {{clusterIP: {ip}, selector: {{app: echo}}, ports: [{{port: 80, targetPort: {PORT}}}]}}\n"
    )


CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: wpt, labels: {istio.io/dataplane-mode: ambient}}\n"
    + _pod("client", "node-wa", CLIENT, "{app: client}", "client")
    + _pod("server", "node-wb", SERVER, "{app: echo}", "server")
    + _pod("wp-1", "node-wc", WAYPOINT_POD, "{gateway.networking.k8s.io/gateway-name: wp}", "wp")
    + _gateway("wp")
    + _gateway("lonely")
    + _service("echo", SERVICE_IP, "wp")
    + _service("lonely", LONELY_IP, "lonely")
    # A sidecar-era policy: the node proxy can only reduce it (its ALLOW rule needs L7, so at L4 it denies
    # all); the waypoint enforces it in full with the client's identity, and its tunnels are let through.
    + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: echo-get, namespace: wpt}\n"
    "spec:\n  selector: {matchLabels: {app: echo}}\n  action: ALLOW\n"
    "  rules: [{from: [{source: {principals: [cluster.local/ns/wpt/sa/client]}}],"
    " to: [{operation: {methods: [GET]}}]}]\n"
)


@dataclass
class Mesh:
    a: ProxyProcess
    b: ProxyProcess
    apps: AppServer
    ca_dir: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("waypoint-routing")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    apps = AppServer()
    procs: list[ProxyProcess] = []
    try:
        apps.echo(SERVER, PORT)
        procs.append(start_proxy("node-wa", config, ca_dir, workdir))
        procs.append(start_proxy("node-wb", config, ca_dir, workdir))
        yield Mesh(procs[0], procs[1], apps, ca_dir)
    finally:
        for p in procs:
            p.stop()
        apps.close()


class StandInWaypoint:
    """An HBONE server holding the waypoint's SVID at its pod address; records (caller, authority) per tunnel."""

    def __init__(self, ca_dir: Path) -> None:
        self.server = HboneServer(TlsContexts(FixedProvider(signed_svid(ca_dir, WAYPOINT))), self._handle)
        self.tunnels: list[tuple[str, str]] = []
        self._listener: asyncio.Server | None = None

    async def _handle(self, tunnel: InboundTunnel) -> None:
        assert isinstance(tunnel.request, ConnectRequest)
        self.tunnels.append((tunnel.peer_identity.uri, str(tunnel.request.target)))
        await echo_tunnel(tunnel)

    async def __aenter__(self) -> StandInWaypoint:
        self._listener = await self.server.listen(listening_socket(WAYPOINT_POD, 15008), SpiffeId.parse(WAYPOINT))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        self._listener.close()
        self.server.abort()
        await self._listener.wait_closed()


def _metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in proxy.metrics().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _echo_through(dst: tuple[str, int], message: bytes) -> bytes:
    with socks_connect(CLIENT, dst) as s:
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


async def test_a_service_using_a_waypoint_is_tunnelled_to_the_waypoint_with_the_vip_authority(mesh: Mesh) -> None:
    before = mesh.apps.connections
    async with StandInWaypoint(mesh.ca_dir) as waypoint:
        assert await asyncio.to_thread(_echo_through, (SERVICE_IP, 80), b"via the waypoint") == b"via the waypoint"
    # The waypoint was asked for the VIP:port as dialled, by the client's identity; the app was not reached.
    assert waypoint.tunnels == [("spiffe://cluster.local/ns/wpt/sa/client", f"{SERVICE_IP}:80")]
    assert mesh.apps.connections == before


async def test_a_service_whose_waypoint_has_no_pod_is_refused_not_sent_to_the_app(mesh: Mesh) -> None:
    before_apps, before = mesh.apps.connections, _metric(mesh.a, "ztunnel_connections_refused_total", reason="no_route")
    with pytest.raises(SocksRefused) as refused:
        await asyncio.to_thread(_echo_through, (LONELY_IP, 80), b"hello")
    assert refused.value.code == 4  # host unreachable, as for a Service without endpoints
    eventually(
        lambda: _metric(mesh.a, "ztunnel_connections_refused_total", reason="no_route") == before + 1,
        what="the refusal counted on node-wa",
    )
    assert "uses waypoint wpt/lonely, which has no ready pod" in mesh.a.log()
    assert mesh.apps.connections == before_apps


async def test_dialling_the_pod_ip_skips_no_waypoint_only_the_waypoint_gets_through(mesh: Mesh) -> None:
    before_apps = mesh.apps.connections
    before = _metric(mesh.b, "ztunnel_connections_refused_total", reason="waypoint_bypass")
    with pytest.raises(SocksRefused) as refused:
        await asyncio.to_thread(_echo_through, (SERVER, PORT), b"around the waypoint")
    assert refused.value.code == 2  # not allowed: node-wb answered 401
    eventually(
        lambda: _metric(mesh.b, "ztunnel_connections_refused_total", reason="waypoint_bypass") == before + 1,
        what="the bypass counted on node-wb",
    )
    # Both Services selecting the pod name a waypoint: either waypoint may reach it, nothing else.
    assert "wpt/server uses waypoints wpt/wp, wpt/lonely: only its waypoints may connect to it" in mesh.b.log()
    assert mesh.apps.connections == before_apps
    # The waypoint's identity, tunnelling to the pod as a waypoint does after its decision, is let through.
    pool = HbonePool(TlsContexts(FixedProvider(signed_svid(mesh.ca_dir, WAYPOINT))))
    key = PoolKey(SpiffeId.parse(WAYPOINT), SpiffeId.parse(SERVER_ID), (SERVER, 15008))
    try:
        stream = await pool.connect(key, Authority(SERVER, PORT), expected_identities=[SERVER_ID])
        await stream.write(b"from the waypoint")
        await stream.write_eof()
        received = b""
        while data := await stream.read():
            received += data
        assert received == b"from the waypoint"
        # And any other mesh identity is refused the same way (401), not just the client's proxy.
        other_id = SpiffeId.parse("spiffe://cluster.local/ns/wpt/sa/x")
        other = HbonePool(TlsContexts(FixedProvider(signed_svid(mesh.ca_dir, other_id))))
        try:
            with pytest.raises(HboneError) as denied:
                await other.connect(
                    PoolKey(other_id, SpiffeId.parse(SERVER_ID), (SERVER, 15008)),
                    Authority(SERVER, PORT),
                    expected_identities=[SERVER_ID],
                )
            assert denied.value.status == 401
        finally:
            other.close()
    finally:
        pool.close()
    assert mesh.apps.connections == before_apps + 1


def test_plaintext_to_a_pod_that_uses_a_waypoint_is_refused(mesh: Mesh) -> None:
    before_apps = mesh.apps.connections
    before = _metric(mesh.b, "ztunnel_connections_refused_total", reason="waypoint_bypass")
    try:  # local mode's 15006 delivers to the pod's single containerPort, unless refused (an abort)
        with socket.create_connection((SERVER, 15006), timeout=10) as s:
            s.sendall(b"plaintext")
            s.shutdown(socket.SHUT_WR)
            data = recv_all(s)
    except (ConnectionResetError, BrokenPipeError):
        data = b""
    assert data == b""
    eventually(
        lambda: _metric(mesh.b, "ztunnel_connections_refused_total", reason="waypoint_bypass") == before + 1,
        what="the plaintext bypass counted on node-wb",
    )
    assert "only its waypoints may connect to it, not a plaintext client" in mesh.b.log()
    assert mesh.apps.connections == before_apps


def test_a_config_change_that_puts_a_pod_behind_a_waypoint_closes_its_direct_connections(
    tmp_path: Path, ca_dir: Path
) -> None:
    # Its own proxies, on other pod addresses than the module's mesh (which may still be running).
    client, server = "127.0.214.1", "127.0.215.1"
    after = CONFIG.replace(CLIENT, client).replace(SERVER, server)
    after = after[: after.index("---\napiVersion: security.istio.io/v1")]  # no policy: only the label changes
    config = tmp_path / "cluster.yaml"
    before = after.replace("istio.io/use-waypoint: wp}", "istio.io/use-waypoint: none}").replace(
        "istio.io/use-waypoint: lonely}", "istio.io/use-waypoint: none}"
    )
    config.write_text(before)
    apps = AppServer()
    procs: list[ProxyProcess] = []
    try:
        apps.echo(server, PORT)
        procs.append(start_proxy("node-wa", config, ca_dir, tmp_path))
        procs.append(start_proxy("node-wb", config, ca_dir, tmp_path))
        with socks_connect(client, (server, PORT)) as s:
            s.sendall(b"direct")
            assert s.recv(100) == b"direct"
            config.write_text(after)
            eventually(lambda: "config loaded: generation 2" in procs[1].log(), what="node-wb to load the change")
            s.settimeout(10)
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == b""  # closed by node-wb: the pod is reached through its waypoint from now on
        assert "policy change closed connections" in procs[1].log()
    finally:
        for p in procs:
            p.stop()
        apps.close()
