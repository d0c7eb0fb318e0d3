"""Service endpoint failover: a ClusterIP connection whose chosen endpoint's tunnel cannot be opened (that node's
proxy is not running) goes to the next ready endpoint, never in plaintext (DESIGN §7)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import AppServer, recv_all, socks_connect, start_proxy
from tests.support.eventually import eventually

CLIENT = "127.0.175.1"
UP = "127.0.176.1"  # endpoint on node-fb, whose proxy runs
DOWN = "127.0.177.1"  # endpoint on node-fc, whose proxy is not running
SERVICE_IP = "10.96.7.7"
PORT = 8080


def _pod(name: str, node: str, ip: str, labels: str) -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: fo, uid: fo-{name}, labels: {labels}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: {name}}}\nstatus: {{podIP: {ip}}}\n"
    )


CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: fo, labels: {istio.io/dataplane-mode: ambient}}\n"
    + _pod("client", "node-fa", CLIENT, "{app: client}")
    + _pod("up", "node-fb", UP, "{app: echo}")
    + _pod("down", "node-fc", DOWN, "{app: echo}")
    + "---\napiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: fo}\n"
    f"spec: {{clusterIP: {SERVICE_IP}, selector: {{app: echo}}, ports: [{{port: 80, targetPort: {PORT}}}]}}\n"
)


@pytest.fixture
def apps() -> Iterator[AppServer]:
    a = AppServer()
    a.echo(UP, PORT)
    a.echo(DOWN, PORT)  # the app runs; only its node's proxy does not: plaintext would reach it
    yield a
    a.close()


def test_every_connection_through_the_service_reaches_the_endpoint_whose_proxy_runs(
    tmp_path: Path, ca_dir: Path, apps: AppServer
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    fa = start_proxy("node-fa", config, ca_dir, tmp_path)
    try:
        fb = start_proxy("node-fb", config, ca_dir, tmp_path)
        try:
            for i in range(10):
                with socks_connect(CLIENT, (SERVICE_IP, 80)) as s:
                    msg = b"hello %d" % i
                    s.sendall(msg)
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s) == msg
            # the down endpoint was chosen (round robin) and skipped; the up one served all ten
            eventually(lambda: fb.log().count("direction=inbound") >= 10, what="ten inbound log lines on node-fb")
            eventually(lambda: fa.log().count("direction=outbound") >= 10, what="ten outbound log lines on node-fa")
            assert "trying the next one" in fa.log()
            outbound = [x for x in fa.log().splitlines() if "direction=outbound" in x]
            assert len(outbound) == 10 and all("dst.workload=fo/up" in x for x in outbound)
        finally:
            fb.stop()
    finally:
        fa.stop()
