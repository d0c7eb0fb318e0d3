"""In-pod mode readiness (DESIGN §4.7): `/healthz/ready` waits for the node agent's snapshot and for every pod
it added to be served. A fake agent on a SOCK_SEQPACKET socket drives a real proxy process; the pod is a
network namespace this test creates (and removes, even on failure)."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import start_proxy
from tests.support.eventually import eventually
from ztunnel.inpod import channel, protocol
from ztunnel.net.netns import open_netns, socket_in_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

POD_IP = "10.97.0.2"
CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: ready, labels: {istio.io/dataplane-mode: ambient}}\n"
    "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: ready, uid: ready-web}\n"
    f"spec: {{nodeName: node-i, serviceAccountName: web}}\nstatus: {{podIP: {POD_IP}}}\n"
)


@pytest.fixture
def pod_netns() -> Iterator[str]:
    name = f"zt-rdy-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _recv(sock: socket.socket) -> protocol.Message | None:
    sock.settimeout(20)
    return channel.recv(sock)


def test_ready_only_after_snapshot_and_every_added_pod_served(tmp_path: Path, ca_dir: Path, pod_netns: str) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    agent_path = str(tmp_path / "agent.sock")
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    agent.bind(agent_path)
    agent.listen(1)
    agent.settimeout(20)
    proxy = start_proxy("node-i", config, ca_dir, tmp_path, "--inpod-socket", agent_path, wait_ready=False)
    conn = None
    try:
        conn, _ = agent.accept()
        assert isinstance(_recv(conn), protocol.Hello)
        eventually(lambda: proxy.http(proxy.readiness_port, "/healthz/ready")[0] != 0, what="readiness server up")
        status, body = proxy.http(proxy.readiness_port, "/healthz/ready")
        assert status == 503 and "snapshot" in body

        # the pod is added (listeners in its netns, certificate fetched): still waiting for the snapshot
        fd = open_netns(pod_netns)
        info = {"name": "web", "namespace": "ready", "ips": [POD_IP], "serviceAccount": "web"}
        try:
            channel.send(conn, protocol.AddWorkload(id=1, uid="ready-web", workload=info, netns_fd=fd))
        finally:
            os.close(fd)  # the proxy holds its own copy now
        assert _recv(conn) == protocol.Ack(id=1)
        status, body = proxy.http(proxy.readiness_port, "/healthz/ready")
        assert status == 503 and "snapshot" in body

        channel.send(conn, protocol.SnapshotSent(id=2))
        assert _recv(conn) == protocol.Ack(id=2)
        eventually(proxy.ready, what="ready after snapshot-sent")
        served = proxy.config_dump()
        assert "ready-web" in str(served)
    finally:
        if conn is not None:
            conn.close()
        agent.close()
        proxy.stop()


def test_not_ready_while_an_added_pod_could_not_be_served(tmp_path: Path, ca_dir: Path, pod_netns: str) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    agent_path = str(tmp_path / "agent.sock")
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    agent.bind(agent_path)
    agent.listen(1)
    agent.settimeout(20)
    proxy = start_proxy("node-i", config, ca_dir, tmp_path, "--inpod-socket", agent_path, wait_ready=False)
    conn = None
    blocker = None
    try:
        conn, _ = agent.accept()
        assert isinstance(_recv(conn), protocol.Hello)
        # something else (no SO_REUSEPORT) already holds 15001 in the pod: the proxy cannot listen there
        fd = open_netns(pod_netns)
        try:
            blocker = socket_in_netns(fd)
            blocker.bind(("0.0.0.0", 15001))
            blocker.listen()
            info = {"name": "web", "namespace": "ready", "ips": [POD_IP], "serviceAccount": "web"}
            channel.send(conn, protocol.AddWorkload(id=1, uid="ready-web", workload=info, netns_fd=fd))
        finally:
            os.close(fd)
        ack = _recv(conn)
        assert isinstance(ack, protocol.Ack) and not ack.ok
        channel.send(conn, protocol.SnapshotSent(id=2))
        assert _recv(conn) == protocol.Ack(id=2)
        status, body = proxy.http(proxy.readiness_port, "/healthz/ready")
        assert status == 503 and "ready-web" in body

        # the agent deletes the pod: nothing left to wait for
        channel.send(conn, protocol.DelWorkload(id=3, uid="ready-web"))
        assert _recv(conn) == protocol.Ack(id=3)
        eventually(proxy.ready, what="ready once the failed pod is gone")
    finally:
        if blocker is not None:
            blocker.close()
        if conn is not None:
            conn.close()
        agent.close()
        proxy.stop()
