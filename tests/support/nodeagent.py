"""What the node-agent tests share: pod network namespaces, the agent as a task, the real CNI plugin run
as a runtime runs it, and a listing of everything of ours inside a pod netns."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ztunnel.config.model import Workload
from ztunnel.config.source import FileConfigSource
from ztunnel.proxy.listeners import WorkloadSockets
from ztunnel.redirect import iptables
from ztunnel.redirect.agent import NodeAgent
from ztunnel.redirect.iptables import IptablesBackend, detect_backend

T = TypeVar("T")
PLUGIN = str(Path(sys.executable).parent / "ztunnel-cni")


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@contextmanager
def pod_namespaces(names: Iterable[str]) -> Iterator[dict[str, str]]:
    """Network namespaces named `zt-<run>-<name>` with loopback up, removed afterwards whatever happens."""
    prefix = f"zt-t{uuid.uuid4().hex[:6]}"
    made = {name: f"{prefix}-{name}" for name in names}
    to_remove = list(made.values())  # the caller may change the dict it gets
    try:
        for ns in to_remove:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield dict(made)
    finally:
        for ns in to_remove:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def ours(ns: str) -> str:
    """Everything of ours in a netns, one line each, tagged with family (and table), so a repeat shows twice:
    iptables (v4 and v6), the policy routing rule and its table 100."""
    out = []
    for family, tool in (("v4", "iptables-save"), ("v6", "ip6tables-save")):
        table = ""
        for line in sh("ip", "netns", "exec", ns, tool).splitlines():
            table = line if line.startswith("*") else table
            if "ZTUNNEL" in line:
                out.append(f"{family} {table} {line.split(' [')[0]}")
    for family in ("-4", "-6"):
        out += [f"{family} {x}" for x in sh("ip", "-n", ns, family, "rule").splitlines() if "lookup 100" in x]
        routes = sh("ip", "-n", ns, family, "route", "show", "table", "100", check=False)  # none: exit 2
        out += [f"{family} {x}" for x in routes.splitlines()]
    return "\n".join(out)


class AgentTask:
    """A NodeAgent for node n1 run as a task in this process, stopped (cancelled, as by SIGTERM) on `stop()`;
    its state dir survives, so starting it again is an agent restart."""

    def __init__(self, tmp: Path, *, run_dir: Path | None = None) -> None:
        self.tmp = tmp
        run = run_dir or tmp
        self.cni_socket = run / "cni.sock"
        self.proxy_socket = run / "proxy.sock"
        self.task: asyncio.Task[None] | None = None
        self.agent: NodeAgent | None = None

    async def start(self, config: str, backend: IptablesBackend | None = None) -> NodeAgent:
        (self.tmp / "cluster.yaml").write_text(config)
        source = FileConfigSource([self.tmp / "cluster.yaml"])
        source.load()
        self.agent = NodeAgent(
            node="n1",
            source=source,
            cni_socket=self.cni_socket,
            proxy_socket=self.proxy_socket,
            state_dir=self.tmp / "state",
            backend=backend or detect_backend(),
            probe_snat=False,
        )
        self.task = asyncio.create_task(self.agent.run())
        await asyncio.wait_for(self.agent.ready.wait(), 10)
        return self.agent

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


async def run_plugin(
    agent_socket: str | Path,
    command: str,
    *,
    pod: str,
    namespace: str,
    netns: str,
    prev_result: Mapping[str, Any],
    version: str = "1.0.0",
) -> tuple[int, bytes, bytes]:
    """The real `ztunnel-cni`, as a container runtime runs it: (exit code, stdout, stderr)."""
    stdin = {
        "cniVersion": version,
        "name": "test",
        "type": "ztunnel-cni",
        "agent_socket": str(agent_socket),
        "prevResult": dict(prev_result),
    }
    env = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"cid-{pod}",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID=k8s-{pod}",
    }
    proc = await asyncio.create_subprocess_exec(
        PLUGIN, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await proc.communicate(json.dumps(stdin).encode())
    return proc.returncode or 0, out, err


CLIENT_IP = "10.98.0.1"  # veth_pair's addresses
POD_IP = "10.98.0.2"


@contextmanager
def veth_pair() -> Iterator[tuple[str, str]]:
    """(client netns, pod netns), wired with a veth pair on 10.98.0.0/24; removed even on failure."""
    with pod_namespaces(["c", "p"]) as made:
        client, pod = made["c"], made["p"]
        sh("ip", "-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", pod)
        for ns, ip in ((client, CLIENT_IP), (pod, POD_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        yield client, pod


def in_thread(fd: int, fn: Callable[..., T], *args: Any) -> T:
    """Run fn inside the netns `fd` on a fresh thread, as the agent does."""
    result: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(iptables.run_in_netns(fd, fn, *args))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


@dataclass
class FakeProxy:
    """Stands in for the node proxy's side of in-pod mode (an `InpodClient` target): records what it is handed
    and owns the sockets, closing each when its workload is removed."""

    added: list[Workload] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    sockets: dict[str, WorkloadSockets] = field(default_factory=dict)

    async def add_workload(self, workload: Workload, sockets: WorkloadSockets) -> None:
        self.added.append(workload)
        self.sockets[workload.uid] = sockets

    async def remove_workload(self, uid: str) -> None:
        self.removed.append(uid)
        self.sockets.pop(uid).close()
