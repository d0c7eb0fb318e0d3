"""`ztunnel node-agent --source kubernetes --kubeconfig F` as a process in a node netns, the fake API server
listening in that netns: it lists only its node's pods, enrolls a pod on the real `ztunnel-cni` ADD, marks it
`ambient.istio.io/redirection: enabled` through the API, and removes the mark on DEL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually_async
from tests.support.kubeapi import FakeKubeApi, namespace, pod
from tests.support.nodeagent import FakeProxy, in_thread, pod_namespaces, run_plugin
from ztunnel.cni.plugin import AgentCall, http_over_unix
from ztunnel.config.kube.status import REDIRECTION_ANNOTATION
from ztunnel.proxy.inpod import InpodClient

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

WEB_IP = "10.244.1.5"


def _status(cni_socket: Path) -> dict[str, Any] | None:
    try:
        return dict(http_over_unix(str(cni_socket), AgentCall("GET", "/v1/status"), 2).body)
    except OSError:
        return None


def _mark(api: FakeKubeApi, name: str) -> str | None:
    obj = api.get("Pod", name, "mesh") or {}
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(REDIRECTION_ANNOTATION)


async def test_the_node_agent_on_the_api_marks_the_pods_it_enrolls(tmp_path: Path) -> None:
    with pod_namespaces(["n1", "web"]) as made:
        node_fd = os.open(f"/var/run/netns/{made['n1']}", os.O_RDONLY)
        try:
            listener = in_thread(node_fd, socket.create_server, ("127.0.0.1", 0))
        finally:
            os.close(node_fd)
        with FakeKubeApi(sock=listener) as api:
            api.put_all(
                [
                    namespace("mesh", {"istio.io/dataplane-mode": "ambient"}),
                    pod("web", "mesh", node="n1", ip=WEB_IP),
                    pod("away", "mesh", node="n2", ip="10.244.2.5"),
                ]
            )
            cni_socket, proxy_socket = tmp_path / "cni.sock", tmp_path / "proxy.sock"
            argv = [
                "ip", "netns", "exec", made["n1"], sys.executable, "-m", "ztunnel", "--log-level", "debug",
                "node-agent", "--node", "n1", "--source", "kubernetes",
                "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
                "--cni-socket", str(cni_socket), "--proxy-socket", str(proxy_socket),
                "--state-dir", str(tmp_path / "state"),
            ]  # fmt: skip
            with open(tmp_path / "agent.log", "wb") as log:
                agent = subprocess.Popen(argv, stdout=log, stderr=log)
            client_task: asyncio.Task[None] | None = None
            try:

                def up() -> bool:
                    assert agent.poll() is None, (tmp_path / "agent.log").read_text()
                    return proxy_socket.exists()

                await eventually_async(lambda: asyncio.to_thread(up), 20, what="the agent's proxy socket")
                client_task = asyncio.create_task(InpodClient(str(proxy_socket), FakeProxy()).run())

                def connected() -> bool:
                    status = _status(cni_socket)
                    return bool(status and status["ready"] and status["proxyConnected"])

                await eventually_async(
                    lambda: asyncio.to_thread(connected), 20, what="the agent ready with the proxy connected"
                )
                pods_lists = [r for r in api.requests if r.path == "/api/v1/pods"]
                assert pods_lists and all(r.query.get("fieldSelector") == "spec.nodeName=n1" for r in pods_lists)

                prev = {"cniVersion": "1.0.0", "ips": [{"address": f"{WEB_IP}/24"}]}
                netns = f"/var/run/netns/{made['web']}"
                call = {"pod": "web", "namespace": "mesh", "netns": netns, "prev_result": prev}
                rc, out, err = await run_plugin(cni_socket, "ADD", **call)  # type: ignore[arg-type]
                assert rc == 0, (out, err)
                await eventually_async(lambda: _mark(api, "web") == "enabled", 5, what="the enrolled pod marked")
                assert _mark(api, "away") is None

                rc, out, err = await run_plugin(cni_socket, "DEL", **call)  # type: ignore[arg-type]
                assert rc == 0, (out, err)
                await eventually_async(lambda: _mark(api, "web") is None, 5, what="the mark removed on DEL")
                assert [p[1:3] for p in api.patches] == [("mesh", "web"), ("mesh", "web")]
            finally:
                if client_task is not None:
                    client_task.cancel()
                    await asyncio.gather(client_task, return_exceptions=True)
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(10)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
