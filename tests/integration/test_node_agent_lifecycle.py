"""The node agent as a process in a node netns, driven by the real `ztunnel-cni`, with the in-pod
proxy client (a fake proxy target) in this test: enrollment, retries, restart + reconcile,
label changes and DEL (DESIGN §4.6-4.8, §7)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ztunnel.cni.plugin import AgentCall, http_over_unix
from ztunnel.config.model import Workload
from ztunnel.proxy.inpod import InpodClient
from ztunnel.proxy.listeners import WorkloadSockets

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

PLUGIN = str(Path(sys.executable).parent / "ztunnel-cni")
WEB_IP = "10.244.1.5"

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: mesh, uid: uid-web, labels: {{app: web, istio.io/dataplane-mode: {web_mode}}}}}
spec: {{nodeName: n1, serviceAccountName: web}}
---
apiVersion: v1
kind: Pod
metadata: {{name: late, namespace: mesh, uid: uid-late}}
spec: {{nodeName: n1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: plain, namespace: default, uid: uid-plain}}
spec: {{nodeName: n1}}
"""


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def ours(ns: str) -> str:
    """Our iptables rules and policy routing in a netns (v4+v6)."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        out += [x for x in sh("ip", "netns", "exec", ns, tool).splitlines() if "ZTUNNEL" in x]
    out += [x for x in sh("ip", "-n", ns, "rule").splitlines() if "lookup 100" in x]
    out += [x for x in sh("ip", "-n", ns, "-6", "rule").splitlines() if "lookup 100" in x]
    return "\n".join(out)


@dataclass
class FakeProxy:
    """Stands in for the node proxy: records what in-pod mode hands it and owns the sockets."""

    added: list[Workload] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    sockets: dict[str, WorkloadSockets] = field(default_factory=dict)

    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None:
        self.added.append(workload)
        self.sockets[workload.uid] = sockets

    async def remove_workload(self, uid: str) -> None:
        self.removed.append(uid)
        self.sockets.pop(uid).close()


@dataclass
class Env:
    prefix: str
    node: str
    pods: dict[str, str]
    tmp: Path
    config: Path
    agent: subprocess.Popen[bytes] | None = None

    @property
    def cni_socket(self) -> str:
        return str(self.tmp / "cni.sock")

    @property
    def proxy_socket(self) -> str:
        return str(self.tmp / "proxy.sock")

    def start_agent(self) -> None:
        log = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        self.agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.node,
                sys.executable,
                "-m",
                "ztunnel",
                "--log-level",
                "debug",
                "node-agent",
                "--node",
                "n1",
                "-f",
                str(self.config),
                "--cni-socket",
                self.cni_socket,
                "--proxy-socket",
                self.proxy_socket,
                "--state-dir",
                str(self.tmp / "state"),
            ],
            stdout=log,
            stderr=log,
        )
        log.close()

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None

    def status(self) -> dict[str, Any] | None:
        try:
            reply = http_over_unix(self.cni_socket, AgentCall("GET", "/v1/status"), 2)
        except OSError:
            return None
        return dict(reply.body)

    def write_config(self, web_mode: str = "ambient") -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(CLUSTER.format(web_mode=web_mode))
        os.replace(tmp, self.config)


async def until(pred, what: str, timeout: float = 10.0) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(pred)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def cni(env: Env, command: str, pod: str, *, netns: str | None = None, version: str = "1.0.0") -> tuple[int, str]:
    namespace = "default" if pod == "plain" else "mesh"
    prev = {"cniVersion": version, "ips": [{"address": f"{WEB_IP}/24" if pod == "web" else "10.244.1.9/24"}]}
    stdin = json.dumps(
        {
            "cniVersion": version,
            "name": "lab",
            "type": "ztunnel-cni",
            "agent_socket": env.cni_socket,
            "prevResult": prev,
        }
    ).encode()
    proc_env = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"cid-{pod}",
        "CNI_NETNS": netns if netns is not None else f"/var/run/netns/{env.pods[pod]}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID=k8s-{pod}",
    }
    proc = await asyncio.create_subprocess_exec(
        PLUGIN, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc_env
    )
    out, _ = await proc.communicate(stdin)
    if command == "ADD" and proc.returncode == 0:
        assert json.loads(out) == prev  # prevResult passes through untouched
    return proc.returncode or 0, out.decode()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Env]:
    prefix = f"zt-d1-{uuid.uuid4().hex[:6]}"
    node = f"{prefix}-n1"
    pods = {name: f"{prefix}-{name}" for name in ("web", "late", "plain")}
    env = Env(prefix, node, pods, tmp_path, tmp_path / "cluster.yaml")
    env.write_config()
    try:
        for ns in (node, *pods.values()):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield env
    finally:
        env.stop_agent()
        for ns in (node, *pods.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
async def proxy(lab: Env) -> AsyncIterator[tuple[FakeProxy, InpodClient]]:
    target = FakeProxy()
    client = InpodClient(lab.proxy_socket, target)
    task = asyncio.create_task(client.run())
    try:
        yield target, client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def listening_in(ns: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True).returncode == 0


async def test_enroll_restart_relabel_and_delete(lab: Env, proxy: tuple[FakeProxy, InpodClient]) -> None:
    target, client = proxy
    lab.start_agent()
    await until(lambda: (s := lab.status()) and s["ready"] and s["proxyConnected"], "agent ready + proxy connected")
    await until(lambda: client.synced.is_set(), "first snapshot")

    # a pod outside the mesh needs nothing from the proxy
    assert (await cni(lab, "ADD", "plain"))[0] == 0
    assert ours(lab.pods["plain"]) == ""

    # an enrolled pod: rules in its netns, listeners inside it, probe SNAT on the node
    rc, out = await cni(lab, "ADD", "web")
    assert rc == 0, out
    assert [w.uid for w in target.added] == ["uid-web"]
    assert target.added[0].ips == (WEB_IP,) and target.added[0].service_account == "web"
    rules_before = ours(lab.pods["web"])
    assert "ZTUNNEL-OUTPUT" in rules_before and "fwmark 0x111/0xfff lookup 100" in rules_before
    assert listening_in(lab.pods["web"], 15008) and listening_in(lab.pods["web"], 15001)
    node_nat = sh("ip", "netns", "exec", lab.node, "iptables-save", "-t", "nat")
    assert (
        f"-A ZTUNNEL-POSTROUTING -d {WEB_IP}/32 -p tcp -m tcp ! --dport 15008 -m owner --socket-exists "
        "-j SNAT --to-source 169.254.7.127" in (node_nat)
    )
    assert (await cni(lab, "CHECK", "web"))[0] == 0

    # agent down: a new mesh pod's ADD fails with "try again later"; running pods keep their rules
    lab.stop_agent()
    rc, out = await cni(lab, "ADD", "late")
    assert rc != 0 and json.loads(out)["code"] == 11
    assert ours(lab.pods["web"]) == rules_before
    lab.start_agent()
    await until(lambda: (s := lab.status()) and s["proxyConnected"], "proxy reconnected to the restarted agent")
    await until(lambda: client.connected, "client connected")
    rc, out = await cni(lab, "ADD", "late")  # the runtime's retry
    assert rc == 0, out
    assert ours(lab.pods["web"]) == rules_before  # re-applied idempotently: nothing lost, nothing doubled
    assert target.removed == []  # the replayed snapshot kept the pod
    assert [w.uid for w in target.added] == ["uid-web", "uid-late"]
    assert len(client.pods) == 2

    # label removed: every rule goes and the proxy drops the pod; label back: enrolled again
    lab.write_config(web_mode="none")
    await until(lambda: ours(lab.pods["web"]) == "", "rules removed after un-labelling")
    await until(lambda: "uid-web" in target.removed, "proxy told to drop the pod")
    assert WEB_IP not in sh("ip", "netns", "exec", lab.node, "iptables-save", "-t", "nat")
    lab.write_config(web_mode="ambient")
    await until(lambda: ours(lab.pods["web"]) == rules_before, "rules back after re-labelling")
    await until(lambda: len(target.added) == 3, "proxy got the pod again")

    # DEL removes everything and is idempotent, also with a missing netns
    assert (await cni(lab, "DEL", "web"))[0] == 0
    assert ours(lab.pods["web"]) == ""
    assert target.removed.count("uid-web") == 2
    assert (await cni(lab, "DEL", "web"))[0] == 0
    assert (await cni(lab, "DEL", "late", netns="/var/run/netns/does-not-exist"))[0] == 0
    assert ours(lab.pods["late"]) == ""
    assert sorted(client.pods) == []
