"""A pod that should be in the mesh but cannot be enrolled fails its CNI ADD, and nothing of ours stays in it.

The real node agent runs in this process (probe SNAT off, so it touches only the pod netns made here) and the
real `ztunnel-cni` plugin calls it, as a runtime would. The proxy side is a scripted SOCK_SEQPACKET peer that
acks or nacks. Codes (DESIGN §4.8): 11 "try again later" while no proxy is connected; 100 (enrollment failed)
when the proxy refuses the pod or the rules cannot be installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.nodeagent import AgentTask, ours, pod_namespaces, run_plugin
from ztunnel.inpod import protocol
from ztunnel.inpod.channel import Channel
from ztunnel.redirect.agent import NodeAgent
from ztunnel.redirect.iptables import IptablesBackend, detect_backend

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

POD_IP = "10.244.1.7"
CLUSTER = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh, uid: uid-web, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n1, serviceAccountName: web}
"""


@dataclass(frozen=True)
class V6RestoreFails(IptablesBackend):
    """The real backend, except that ip6tables-restore fails: IPv4 rules get in, then enrollment breaks."""

    failing_tool: str = ""

    def tool(self, version: int, what: str) -> str:
        if version == 6 and what == "restore":
            return self.failing_tool
        return IptablesBackend.tool(self, version, what)


@dataclass
class ScriptedProxy:
    """The node proxy's side of DESIGN §4.7: says hello, then acks or nacks each message as told."""

    path: str
    nack_adds: bool = True
    adds: list[str] = field(default_factory=list)
    dels: list[str] = field(default_factory=list)
    snapshot_acked: asyncio.Event = field(default_factory=asyncio.Event)
    fds: dict[str, int] = field(default_factory=dict)

    async def run(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.path)
        channel = Channel(sock)
        try:
            await channel.send(protocol.Hello())
            while (msg := await channel.recv()) is not None:
                if isinstance(msg, protocol.AddWorkload):
                    self.adds.append(msg.uid)
                    if self.nack_adds:
                        os.close(msg.netns_fd)
                        await channel.send(protocol.Ack(id=msg.id, ok=False, error="cannot listen in the pod netns"))
                        continue
                    self.fds[msg.uid] = msg.netns_fd
                elif isinstance(msg, protocol.DelWorkload):
                    self.dels.append(msg.uid)
                    if msg.uid in self.fds:
                        os.close(self.fds.pop(msg.uid))
                if isinstance(msg, protocol.AddWorkload | protocol.DelWorkload | protocol.SnapshotSent):
                    await channel.send(protocol.Ack(id=msg.id))
                if isinstance(msg, protocol.SnapshotSent):
                    self.snapshot_acked.set()
        finally:
            channel.close()
            for fd in self.fds.values():
                os.close(fd)


@pytest.fixture
def pod_netns() -> Iterator[str]:
    with pod_namespaces(["web"]) as made:
        yield made["web"]


@dataclass
class Running:
    """The node agent as a task and a scripted proxy, stopped at the end of the test."""

    agent_task: AgentTask
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def agent(self, backend: IptablesBackend) -> NodeAgent:
        return await self.agent_task.start(CLUSTER, backend)

    async def proxy(self, agent: NodeAgent, *, nack_adds: bool) -> ScriptedProxy:
        proxy = ScriptedProxy(str(self.agent_task.proxy_socket), nack_adds=nack_adds)
        self.tasks.append(asyncio.create_task(proxy.run()))
        await asyncio.wait_for(proxy.snapshot_acked.wait(), 10)
        assert agent.proxy.connected
        return proxy

    async def stop(self) -> None:
        for task in reversed(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.agent_task.stop()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    r = Running(AgentTask(tmp_path))
    try:
        yield r
    finally:
        await r.stop()


async def cni_add(tmp: Path, netns: str) -> tuple[int, dict]:
    """The real plugin, as the runtime runs it: (exit code, the JSON it printed)."""
    prev = {"cniVersion": "1.0.0", "ips": [{"address": f"{POD_IP}/24"}]}
    rc, out, err = await run_plugin(
        tmp / "cni.sock", "ADD", pod="web", namespace="mesh", netns=f"/var/run/netns/{netns}", prev_result=prev
    )
    assert out, err
    return rc, json.loads(out)


async def test_no_proxy_connected_fails_the_add_with_try_again_later_and_touches_nothing(
    running: Running, pod_netns: str, tmp_path: Path
) -> None:
    agent = await running.agent(detect_backend())
    assert not agent.proxy.connected
    rc, out = await cni_add(tmp_path, pod_netns)
    assert rc != 0
    assert out["code"] == 11 and "node proxy is not connected" in out["msg"], out
    assert ours(pod_netns) == ""
    assert agent.status()["pods"]["uid-web"]["enrolled"] is False


async def test_proxy_nack_fails_the_add_and_removes_the_rules_then_a_retry_enrolls(
    running: Running, pod_netns: str, tmp_path: Path
) -> None:
    agent = await running.agent(detect_backend())
    proxy = await running.proxy(agent, nack_adds=True)
    rc, out = await cni_add(tmp_path, pod_netns)
    assert rc != 0
    assert out["code"] == 100 and "cannot listen in the pod netns" in out["msg"], out
    assert proxy.adds == ["uid-web"]  # the rules were in when the proxy was asked, and are gone now
    assert ours(pod_netns) == ""
    assert agent.status()["pods"]["uid-web"]["enrolled"] is False
    state = json.loads((tmp_path / "state" / "pods.json").read_text())
    assert state["uid-web"]["enrolled"] is False  # a restarted agent would not think it enrolled

    # the runtime's retry, once the proxy accepts the pod: enrolled with exactly one set of rules
    proxy.nack_adds = False
    rc, out = await cni_add(tmp_path, pod_netns)
    assert rc == 0, out
    assert out == {"cniVersion": "1.0.0", "ips": [{"address": f"{POD_IP}/24"}]}
    assert proxy.adds == ["uid-web", "uid-web"]
    rules = ours(pod_netns)
    assert "ZTUNNEL-OUTPUT" in rules and rules.count("lookup 100") == 2  # one ip rule per family
    assert len(rules.splitlines()) == len(set(rules.splitlines()))


async def test_rules_failing_halfway_fail_the_add_and_leave_no_partial_rules(
    running: Running, pod_netns: str, tmp_path: Path
) -> None:
    real = detect_backend()
    at_failure = tmp_path / "v4-when-v6-failed"
    failing = tmp_path / "ip6tables-restore-fails"
    # runs in the pod's netns (the agent's worker thread is in it): records what IPv4 holds at that moment
    failing.write_text(
        f"#!/bin/sh\n{real.tool(4, 'save')} > {at_failure}\necho 'ip6tables-restore: simulated failure' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    agent = await running.agent(V6RestoreFails(real.name, failing_tool=str(failing)))
    proxy = await running.proxy(agent, nack_adds=False)

    rc, out = await cni_add(tmp_path, pod_netns)
    assert rc != 0
    assert out["code"] == 100 and "simulated failure" in out["msg"], out
    assert "-A ZTUNNEL-OUTPUT" in at_failure.read_text()  # the IPv4 half was in when IPv6 failed...
    assert ours(pod_netns) == ""  # ...and the agent took it out again
    assert proxy.adds == []  # never handed to the proxy
    assert agent.status()["pods"]["uid-web"]["enrolled"] is False
