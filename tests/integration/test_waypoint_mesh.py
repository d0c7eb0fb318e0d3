"""The whole ambient L7 path in local mode, every hop a real process: a client pod's connection to a Service
that uses a waypoint (`istio.io/use-waypoint`) -> the source node proxy (SOCKS5 on the client's pod IP, as
the client) -> HBONE with the client's SVID to the waypoint (`ztunnel waypoint`) -> one decision per HTTP
request under the greeter seed's selector policy (ALLOW GET `*/hello`) -> HBONE with the waypoint's SVID to
the destination node proxy -> the app."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ProxyProcess, SocksRefused, socks_connect, start_proxy
from tests.support.eventually import eventually
from tests.support.lab_waypoint import gateway_yaml
from tests.support.waypoint import KeepAliveApp, gateway_pod, start_waypoint, stop, wait_listening
from tests.support.waypoint_config import GREETER_GET_HELLO

CLIENT_IP = "127.0.166.1"
GREETER_IP = "127.0.166.2"
WAYPOINT_IP = "127.0.166.10"
VIP = "10.96.0.70"
APP_PORT = 8080

CONFIG = f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
{gateway_yaml("default")}---
apiVersion: v1
kind: Pod
metadata: {{name: helloweb, namespace: default, uid: uid-helloweb, labels: {{app: helloweb}}}}
spec: {{nodeName: node-a, serviceAccountName: helloweb}}
status: {{podIP: "{CLIENT_IP}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: greeter, namespace: default, uid: uid-greeter, labels: {{app: greeter-service}}}}
spec:
  nodeName: node-b
  serviceAccountName: greeter
  containers: [{{name: app, ports: [{{containerPort: {APP_PORT}}}]}}]
status: {{podIP: "{GREETER_IP}"}}
---
{gateway_pod("waypoint", "default", WAYPOINT_IP)}---
apiVersion: v1
kind: Service
metadata: {{name: greeter-service, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: {VIP}, selector: {{app: greeter-service}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
---
""" + GREETER_GET_HELLO.format(ns="default")  # the greeter seed's selector policy (ALLOW by default)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    workdir = tmp_path_factory.mktemp("waypoint-mesh")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    procs: list[ProxyProcess] = []
    waypoint: subprocess.Popen[bytes] | None = None
    try:
        procs.append(start_proxy("node-a", config, ca_dir, workdir))
        procs.append(start_proxy("node-b", config, ca_dir, workdir))
        waypoint, log_path = start_waypoint(config, ca_dir, workdir, "--name", "waypoint", "--namespace", "default")
        wait_listening(waypoint, log_path, WAYPOINT_IP)
        yield procs[0], procs[1]
    finally:
        if waypoint is not None:
            stop(waypoint)
        for p in procs:
            p.stop()
        app.close()


def _exchange(s: socket.socket, path: str, method: str = "GET") -> tuple[int, bytes]:
    length = b"Content-Length: 0\r\n" if method == "POST" else b""
    s.sendall(b"%s %s HTTP/1.1\r\nHost: greeter-service\r\n%s\r\n" % (method.encode(), path.encode(), length))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length_value = next(
        int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.strip().lower() == b"content-length"
    )
    while len(body) < length_value:
        chunk = s.recv(65536)
        assert chunk, body
        body += chunk
    return int(lines[0].split(b" ")[1]), body


def test_greeter_through_source_proxy_waypoint_and_destination_proxy(mesh: tuple[ProxyProcess, ProxyProcess]) -> None:
    with socks_connect(CLIENT_IP, (VIP, 80)) as s:
        s.settimeout(10)
        assert _exchange(s, "/hello") == (200, b"hello GET /hello (0 body bytes) #1\n")
        assert _exchange(s, "/version") == (403, b"RBAC: access denied")
        assert _exchange(s, "/hello") == (200, b"hello GET /hello (0 body bytes) #2\n")
    with socks_connect(CLIENT_IP, (VIP, 80)) as s:
        s.settimeout(10)
        assert _exchange(s, "/hello", "POST") == (403, b"RBAC: access denied")


def test_the_pod_ip_does_not_serve_a_client_that_skips_the_waypoint(mesh: tuple[ProxyProcess, ProxyProcess]) -> None:
    """The destination node proxy refuses the direct tunnel (the other half of the split, see README)."""
    with pytest.raises(SocksRefused):
        socks_connect(CLIENT_IP, (GREETER_IP, APP_PORT)).close()


def test_the_client_address_reaches_the_waypoint_log_and_the_destination_proxy(
    mesh: tuple[ProxyProcess, ProxyProcess],
) -> None:
    """The source proxy dials the waypoint from its own address; the client's travels in `forwarded`. The
    waypoint logs it as src.addr and passes it on, and the destination proxy takes it from the pod's waypoint
    (in in-pod mode the app's peer is that address)."""
    _, node_b = mesh
    with socks_connect(CLIENT_IP, (VIP, 80)) as s:
        s.settimeout(10)
        client = f"{CLIENT_IP}:{s.getsockname()[1]}"  # the pod's address (SOCKS5 on it), the client's port
        assert _exchange(s, "/hello")[0] == 200
    waypoint_log = node_b.log_path.parent / "waypoint.log"

    def logged(path: Path, *parts: str) -> bool:
        return any(all(p in line for p in parts) for line in path.read_text(errors="replace").splitlines())

    eventually(lambda: logged(waypoint_log, "request complete", f"src.addr={client} "), 10, what="waypoint line")
    eventually(
        lambda: logged(node_b.log_path, "direction=inbound", f"src.addr={client} ", "sa/waypoint"),
        10,
        what=f"node-b's inbound line from {client}",
    )
