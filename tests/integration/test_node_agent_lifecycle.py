"""The node agent, with the in-pod proxy client (a fake proxy target) in this test (DESIGN §4.6-4.8, §7).

1. As a process in a node netns, driven by the real `ztunnel-cni`: enrollment, retries while it is
   down, restart + reconcile, label changes and DEL.
2. In-process (probe SNAT off, so only pod netns made here are touched): after a restart pods are
   found again by netns path or, when the name is gone, by inode through /proc; gone pods are
   forgotten and dropped by the proxy after the snapshot; GC removes what the runtime no longer lists.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually_async
from tests.support.nodeagent import AgentTask, FakeProxy, ours, pod_namespaces, run_plugin, sh
from ztunnel.cni.plugin import AgentCall, http_over_unix
from ztunnel.lab import cgroups
from ztunnel.proxy.inpod import InpodClient
from ztunnel.redirect.agent import process_cgroup

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

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


@dataclass
class Env:
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


async def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """`eventually` for checks that block (the agent's HTTP status, `ip netns exec`): each poll in a thread."""
    return await eventually_async(lambda: asyncio.to_thread(pred), timeout, what=what)


async def cni(env: Env, command: str, pod: str, *, netns: str | None = None, version: str = "1.0.0") -> tuple[int, str]:
    prev = {"cniVersion": version, "ips": [{"address": f"{WEB_IP}/24" if pod == "web" else "10.244.1.9/24"}]}
    rc, out, _ = await run_plugin(
        env.cni_socket,
        command,
        pod=pod,
        namespace="default" if pod == "plain" else "mesh",
        netns=netns if netns is not None else f"/var/run/netns/{env.pods[pod]}",
        prev_result=prev,
        version=version,
    )
    if command == "ADD" and rc == 0:
        assert json.loads(out) == prev  # prevResult passes through untouched
    return rc, out.decode()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Env]:
    with pod_namespaces(["n1", "web", "late", "plain"]) as made:
        node = made.pop("n1")
        env = Env(node, made, tmp_path, tmp_path / "cluster.yaml")
        env.write_config()
        try:
            yield env
        finally:
            env.stop_agent()


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
    await until(
        lambda: WEB_IP not in sh("ip", "netns", "exec", lab.node, "iptables-save", "-t", "nat"),
        "node probe SNAT removed",
    )
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


PODS = ("p1", "p2", "p3")
RECONCILE_CLUSTER = "\n---\n".join(
    f"""apiVersion: v1
kind: Pod
metadata: {{name: {p}, namespace: mesh, uid: uid-{p}, labels: {{istio.io/dataplane-mode: ambient}}}}
spec: {{nodeName: n1}}"""
    for p in PODS
)


@pytest.fixture
def netns_names() -> Iterator[dict[str, str]]:
    with pod_namespaces(PODS) as made:
        yield made


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentTask]:
    a = AgentTask(tmp_path)
    try:
        yield a
    finally:
        await a.stop()


async def test_restart_finds_pods_by_path_or_inode_and_forgets_gone_ones(
    agent: AgentTask, netns_names: dict[str, str], tmp_path: Path
) -> None:
    target = FakeProxy()
    client = InpodClient(str(tmp_path / "proxy.sock"), target)
    client_task = asyncio.create_task(client.run())
    holder: subprocess.Popen[bytes] | None = None
    try:
        a1 = await agent.start(RECONCILE_CLUSTER)
        await eventually_async(lambda: a1.proxy.connected and client.synced.is_set(), what="proxy connected")
        for i, p in enumerate(PODS):
            body = {"podName": p, "podNamespace": "mesh", "netns": f"/var/run/netns/{netns_names[p]}"}
            body.update(containerId=f"c-{p}", ips=[f"10.244.1.{10 + i}"])
            assert (await a1.cni_add(body))["enrolled"]
        rules = {p: ours(netns_names[p]) for p in PODS}
        assert all("ZTUNNEL-OUTPUT" in r for r in rules.values())
        await agent.stop()

        # while the agent is down: p2's pod goes away; p3's netns loses its name but a process keeps it
        holder = subprocess.Popen(["ip", "netns", "exec", netns_names["p3"], "sleep", "60"])
        pid_path = f"/proc/{holder.pid}/ns/net"
        await eventually_async(
            lambda: os.stat(pid_path).st_ino == os.stat(f"/var/run/netns/{netns_names['p3']}").st_ino,
            what="holder",
        )
        subprocess.run(["ip", "netns", "del", netns_names["p2"]], check=True)
        subprocess.run(["ip", "netns", "del", netns_names["p3"]], check=True)

        a2 = await agent.start(RECONCILE_CLUSTER)
        assert sorted(a2.pods) == ["uid-p1", "uid-p3"]
        assert a2.pods["uid-p3"].netns == pid_path
        assert ours(netns_names["p1"]) == rules["p1"]  # re-applied idempotently
        await eventually_async(lambda: "uid-p2" in target.removed, what="proxy dropped the gone pod after the snapshot")
        assert sorted(client.pods) == ["uid-p1", "uid-p3"]
        state = json.loads((tmp_path / "state" / "pods.json").read_text())
        assert sorted(state) == ["uid-p1", "uid-p3"]

        # GC: the runtime only lists p1 now -> p3 leaves the mesh, its rules go
        result = await a2.cni_gc({"validAttachments": [{"containerID": "c-p1", "ifname": "eth0"}]})
        assert result["removed"] == ["mesh/p3"]
        in_p3 = subprocess.run(
            ["nsenter", f"--net={pid_path}", "iptables-save"], capture_output=True, text=True, check=True
        ).stdout
        assert "ZTUNNEL" not in in_p3
        assert "uid-p3" in target.removed and sorted(client.pods) == ["uid-p1"]
    finally:
        client_task.cancel()
        await asyncio.gather(client_task, return_exceptions=True)
        if holder is not None:
            holder.kill()
            holder.wait()


# a node proxy with a target that only holds what it is handed (argv: the agent's proxy socket)
PROXY_ELSEWHERE = """
import asyncio, sys
from ztunnel.proxy.inpod import InpodClient

class Target:
    def __init__(self): self.sockets = {}
    async def add_workload(self, workload, sockets): self.sockets[workload.uid] = sockets
    async def remove_workload(self, uid): self.sockets.pop(uid).close()

asyncio.run(InpodClient(sys.argv[1], Target()).run())
"""


async def test_a_proxy_in_another_cgroup_gets_the_pods_rules_rewritten_for_it(lab: Env, tmp_path: Path) -> None:
    """The rules let the proxy's mark through only from the proxy's cgroup (the mark alone needs CAP_NET_RAW):
    a restarted proxy in another cgroup (a new container) is handed the pods only after their rules name it."""
    root = cgroups.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 mount")
    client = InpodClient(str(lab.proxy_socket), FakeProxy())
    task = asyncio.create_task(client.run())
    lab.start_agent()
    try:
        await until(lambda: client.synced.is_set(), "first snapshot")
        assert (await cni(lab, "ADD", "web"))[0] == 0
        assert f'-m cgroup --path "{process_cgroup()[0]}" -j ACCEPT' in ours(lab.pods["web"])
    finally:
        task.cancel()  # this proxy goes; the next one runs in a cgroup of its own
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
    other = root / f"ztunnel-test-{os.getpid()}"
    other.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    argv = [sys.executable, "-c", PROXY_ELSEWHERE, str(lab.proxy_socket)]
    log = (tmp_path / "proxy.log").open("wb")
    elsewhere = subprocess.Popen(argv, stdout=log, stderr=log, env=env, preexec_fn=cgroups.joiner(other))
    try:
        named = f'-m cgroup --path "/{other.relative_to(root)}" -j ACCEPT'
        await until(lambda: named in ours(lab.pods["web"]), "rules naming the new proxy's cgroup")
        await until(lambda: listening_in(lab.pods["web"], 15001), "the new proxy serving the pod")
        assert f'--path "{process_cgroup()[0]}"' not in ours(lab.pods["web"])  # the old cgroup's sockets: no more
    finally:
        elsewhere.kill()
        elsewhere.wait()
        log.close()
        await until(lambda: not (other / "cgroup.procs").read_text().strip(), "the proxy gone from its cgroup")
        other.rmdir()
