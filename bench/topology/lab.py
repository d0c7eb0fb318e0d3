"""The lab topology: two nodes of the netns lab (`ztunnel lab up`, root). Pods on node1 talk to pods on node2
over the fabric; mesh pods go through in-pod redirection and the two node proxies. The lab is driven through
the CLI (`ztunnel lab ... --name zb<pid>`), as a user would, and removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench.processes import ProcessGroup, listening, log, wait_until
from bench.settings import ECHO_PORT, HTTP_PORT, LOADGEN, PY
from bench.tools import ztunnel_command, ztunnel_help
from bench.topology import AMBIENT_NAMESPACE_YAML

LAB_YAML = (
    "# The benchmark's two-node lab: a mesh pair (namespace bench) and a plain pair (namespace plain) with\n"
    "# the clients on node1 and the servers on node2. Apps are started by bench/topology/lab.py inside the pods.\n"
    + AMBIENT_NAMESPACE_YAML
)
LAB_YAML += """---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: v1
kind: Node
metadata:
  name: node1
---
apiVersion: v1
kind: Node
metadata:
  name: node2
"""
for _ns in ("bench", "plain"):
    for _role, _node in (("client", "node1"), ("server", "node2"), ("server-local", "node1")):
        LAB_YAML += f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {_role}
  namespace: {_ns}
  labels:
    app: {_role}
spec:
  nodeName: {_node}
  serviceAccountName: {_role}
  containers:
  - name: main
    command: [sleep, infinity]
"""
LAB_PREFIX = "zb"


def lab_available() -> bool:
    """Root, and a CLI with `ztunnel lab up`."""
    return os.geteuid() == 0 and ztunnel_help("lab", "up") is not None


def netns_exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


class LabError(RuntimeError):
    """The lab could not be built; with --topology auto the run falls back to local mode."""


class LabTopology:
    """Two nodes of the netns lab (`ztunnel lab up`): pods on node1 talk to pods on node2 over the
    fabric; mesh pods go through in-pod redirection (`redirect`) and the two node proxies."""

    def __init__(self, redirect: str = "iptables", name: str = "") -> None:
        cmd = ztunnel_command()
        assert cmd is not None
        self.cmd = cmd
        self.name = name or f"{LAB_PREFIX}{os.getpid()}"
        self.siblings: dict[str, LabTopology] = {}  # labs with another redirection, by mode
        self.proxy_pids: dict[str, int] = {}
        self.redirect = redirect
        self.mode = f"netns lab `{self.name}` (two nodes, {redirect} redirection)"
        self.status: dict[str, Any] = {}
        self.up = False

    def _lab(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cmd, "lab", *argv, "--name", self.name], capture_output=True, text=True, timeout=timeout
        )

    def remove_stale(self) -> None:
        """Labs of earlier bench runs whose process is gone (they crashed): take them down."""
        base = Path("/run/ztunnel-lab")
        for d in base.glob(f"{LAB_PREFIX}*") if base.exists() else []:
            pid = d.name[len(LAB_PREFIX) :].rstrip("abcdefghijklmnopqrstuvwxyz")  # a sibling's name ends in a letter
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                subprocess.run([*self.cmd, "lab", "down", "--name", d.name], capture_output=True, timeout=120)

    def refresh(self) -> None:
        r = self._lab("status", "-o", "json", timeout=60)
        self.status = json.loads(r.stdout)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        for p in self.status["pods"]:
            if p["namespace"] == namespace and p["name"] == name:
                return p
        raise RuntimeError(f"the lab has no pod {namespace}/{name}")

    def node(self, name: str) -> dict[str, Any]:
        for n in self.status["nodes"]:
            if n["name"] == name:
                return n
        raise RuntimeError(f"the lab has no node {name}")

    def start(self, group: ProcessGroup) -> None:
        self.remove_stale()
        cluster = group.workdir / "lab-cluster.yaml"
        cluster.write_text(LAB_YAML)
        log(f"building the lab {self.name} (ztunnel lab up)")
        self.up = True
        r = self._lab("up", "-f", str(cluster), "--mesh", "auto", "--redirect", self.redirect, "--timeout", "120")
        if r.returncode != 0:
            raise LabError(f"`ztunnel lab up` failed: {(r.stderr or r.stdout).strip()[-500:]}")
        try:
            self.refresh()
        except (ValueError, subprocess.TimeoutExpired) as e:
            raise LabError(f"`ztunnel lab status` failed: {e}") from e
        for ns in ("bench", "plain"):
            client = self.pod(ns, "client")
            for key, value in (("net.ipv4.tcp_tw_reuse", "1"), ("net.ipv4.ip_local_port_range", "20000 65000")):
                subprocess.run([*netns_exec(client["netns"]), "sysctl", "-q", "-w", f"{key}={value}"], timeout=10)
            for pod in ("server", "server-local"):
                prefix = netns_exec(self.pod(ns, pod)["netns"])
                argv = [*prefix, PY, LOADGEN, "echo-server", f"0.0.0.0:{ECHO_PORT}"]
                echo = group.start(f"echo-{self.name}-{ns}-{pod}", argv)
                wait_until(lambda p=prefix: listening("0.0.0.0", ECHO_PORT, p), 10, f"the echo server in {ns}", echo)
        # the HTTP floor (direct) and haproxy-http's app: the plain server pod
        prefix = netns_exec(self.pod("plain", "server")["netns"])
        http = group.start(f"http-{self.name}-plain", [*prefix, PY, LOADGEN, "http-server", f"0.0.0.0:{HTTP_PORT}"])
        wait_until(lambda: listening("0.0.0.0", HTTP_PORT, prefix), 10, "the HTTP app in plain", http)

    def apply(self, objects: Path) -> subprocess.CompletedProcess[str]:
        """`ztunnel lab apply -f OBJECTS` (a path adding its own pods and policies, e.g. the waypoint's)."""
        return self._lab("apply", "-f", str(objects), "--timeout", "120")

    def sibling(self, redirect: str, group: ProcessGroup) -> LabTopology:
        """A second lab like this one with another redirection (started once, removed with this one)."""
        lab = self.siblings.get(redirect)
        if lab is None:
            lab = self.siblings[redirect] = LabTopology(redirect, name=f"{self.name}{redirect[0]}")
            lab.start(group)
        return lab

    def pair(self, ns: str, same_node: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(client pod, server pod) of namespace NS; the server on node1 too with SAME_NODE."""
        return self.pod(ns, "client"), self.pod(ns, "server-local" if same_node else "server")

    def restart_proxies(self) -> None:
        """Restart both node proxies (a stalled pair); every mesh path then reads the new pids."""
        for node in ("node1", "node2"):
            self._lab("restart", "proxy", "--node", node, timeout=120)
        self.refresh()
        for node in ("node1", "node2"):
            proxy = self.node(node).get("proxy") or {}
            if "pid" in proxy:
                self.proxy_pids[node] = int(proxy["pid"])

    def close(self) -> None:
        for lab in self.siblings.values():
            lab.close()
        if self.up:
            r = self._lab("down", timeout=180)
            if r.returncode != 0:
                log(f"warning: `ztunnel lab down --name {self.name}` failed: {r.stderr.strip()[-300:]}")
