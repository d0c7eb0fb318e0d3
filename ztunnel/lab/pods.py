"""The lab's pods, as a kubelet and container runtime handle them: each node's CNI config, a sandbox netns per
pod wired by that config's ADD (retried like the kubelet does), the containers' commands, readiness probes
from the node, and on removal CNI DEL with the cached result.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ztunnel.lab import components, netns, probes, procs
from ztunnel.lab.cni import CniInvocationError, PodRef, Runtime, load_network_config, node_conflist, plugin_dirs
from ztunnel.lab.model import FABRIC_SUBNET, LabError, NodeRecord, PodRecord, ips_from_cni_result
from ztunnel.lab.state import LabState, updating, write_atomic, write_live

PRIMARY_CONFLIST = "10-lab.conflist"
CLUSTER_DOMAIN = "cluster.local"


def resolv_conf(rec: PodRecord, node: NodeRecord) -> str:
    """A kubelet's ClusterFirst resolv.conf for the pod.

    The nameserver is the pod's gateway (the node's cni0 address), where nothing listens on port 53: an enrolled
    pod's queries never get there (its nat OUTPUT sends port 53 to the node proxy's 15053 in the pod), and a pod
    outside the mesh gets "connection refused" at once instead of waiting for a resolver that is not there.
    """
    ns = rec.namespace
    return (
        f"search {ns}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
        f"nameserver {node.gateway}\n"
        "options ndots:5\n"
    )


class Pods:
    """Starts, probes and stops one lab's pods."""

    def __init__(self, name: str, dir: Path, say: Callable[[str], None]) -> None:
        self.name = name
        self.dir = dir
        self.say = say

    # ---- the node's CNI configuration ----------------------------------------------------------------------

    @staticmethod
    def _cni_dirs(state: LabState, node: NodeRecord) -> list[str]:
        """CNI_PATH: the node's own bin dir (where the installer put ztunnel-cni), then the system plugins."""
        return plugin_dirs([str(state.node_dir(node.name) / "cni-bin")])

    def install_cni(self, state: LabState, node: NodeRecord) -> None:
        """The node's CNI config: the primary conflist (bridge + host-local) as a cluster's network add-on writes
        it, then ztunnel-cni appended by its installer, as the node agent's DaemonSet does on a real node."""
        net_d = state.node_dir(node.name) / "net.d"
        bin_dir = state.node_dir(node.name) / "cni-bin"
        net_d.mkdir(parents=True, exist_ok=True)
        bin_dir.mkdir(parents=True, exist_ok=True)
        primary = node_conflist(f"ztl-{self.name}", node.pod_cidr, str(state.node_dir(node.name) / "ipam"))
        write_atomic(net_d / PRIMARY_CONFLIST, json.dumps(primary, indent=1) + "\n")
        if not state.components.get("cni-plugin"):
            return
        cni_sock, _ = state.agent_sockets(node.name)
        plugin = components.cni_plugin_path()
        argv = [str(plugin), "install", "--cni-conf-dir", str(net_d), "--cni-bin-dir", str(bin_dir),
                "--agent-socket", str(cni_sock), "--plugin-binary", str(plugin)]  # fmt: skip
        done = netns.netns_exec(node.netns, *argv, check=False)  # the installer runs on the node
        if done.returncode != 0:
            raise LabError(f"node {node.name}: `ztunnel-cni install` failed: {(done.stderr or done.stdout).strip()}")

    @staticmethod
    def conflist(state: LabState, node: NodeRecord) -> dict[str, Any]:
        """What the runtime uses for every ADD and DEL: the node's lexically first config file, read each time."""
        net_d = state.node_dir(node.name) / "net.d"
        return load_network_config(net_d)

    @staticmethod
    def _pod_ref(rec: PodRecord) -> PodRef:
        return PodRef(rec.namespace, rec.name, rec.uid, rec.container_id, str(netns.NETNS_DIR / rec.netns))

    # ---- start ------------------------------------------------------------------------------------------------

    def _wire_pod(self, state: LabState, rec: PodRecord, deadline: float) -> dict[str, Any]:
        """Sandbox netns + loopback + the conflist's ADD, retried (as the kubelet does) until DEADLINE."""
        node = state.nodes[rec.node]
        if rec.host_network:
            return {"ips": [{"address": f"{node.address}/{FABRIC_SUBNET.prefixlen}"}]}
        runtime = Runtime(node.netns, self._cni_dirs(state, node))
        conf = self.conflist(state, node)
        ref = self._pod_ref(rec)
        if not netns.netns_exists(rec.netns):
            netns.add_netns(rec.netns)
        runtime.loopback(ref)
        delay = 0.2
        reported = 0.0
        while True:
            try:
                return runtime.add(conf, ref)
            except CniInvocationError as e:
                now = time.monotonic()
                if now >= deadline:
                    raise LabError(f"pod {rec.ref}: {e}") from e
                if now - reported > 15.0:
                    self.say(f"pod {rec.ref}: {e}; retrying like the kubelet")
                    reported = now
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 1.0)

    def start(self, state: LabState, pods: Sequence[PodRecord], deadline: float) -> None:
        """Nodes set up their pods concurrently (each kubelet is on its own); on one node pods go in order, so
        the same config gives the same pod IPs every time."""
        by_node: dict[str, list[PodRecord]] = {}
        for rec in pods:
            by_node.setdefault(rec.node, []).append(rec)

        def node_worker(recs: list[PodRecord]) -> None:
            for rec in recs:
                self._start_pod(state, rec, deadline)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lab-node") as pool:
            futures = [pool.submit(node_worker, recs) for recs in by_node.values()]
            for f in futures:
                f.result()

    def _start_pod(self, state: LabState, rec: PodRecord, deadline: float) -> None:
        result = self._wire_pod(state, rec, deadline)
        rec.cni_result = result
        rec.ips = ips_from_cni_result(result)
        pod_dir = state.pod_dir(rec.namespace, rec.name)
        pod_dir.mkdir(parents=True, exist_ok=True)
        if not rec.host_network:  # before any container starts: `ip netns exec` mounts it at exec time
            netns.write_resolv_conf(rec.netns, resolv_conf(rec, state.nodes[rec.node]))
        with updating(self.dir) as st:
            st.pods[rec.ref] = rec
            write_live(st)
        state.pods[rec.ref] = rec
        started = []
        for c in rec.containers:
            if not c.argv:
                self.say(f"pod {rec.ref}: container {c.name} has no command; the lab runs commands, not images")
                continue
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": str(pod_dir),
                "HOSTNAME": rec.name,
                "LANG": "C.UTF-8",
                "PYTHONUNBUFFERED": "1",
                **c.env,
            }
            key = f"pod/{rec.namespace}/{rec.name}/{c.name}"
            cwd = c.working_dir or str(pod_dir)
            r = procs.spawn_recorded(self.dir, state, key, c.argv, rec.netns, env=env, cwd=cwd)
            started.append(f"{c.name} pid {r.pid}")
        self.say(
            f"pod {rec.ref} on {rec.node}: {', '.join(rec.ips) or 'no IP'}"
            + (f" ({'; '.join(started)})" if started else "")
        )

    # ---- readiness ----------------------------------------------------------------------------------------------

    @staticmethod
    def _ready(state: LabState, rec: PodRecord) -> bool:
        """Kubelet-style: probes (or declared TCP ports) checked from the node's netns."""
        if not rec.ips:
            return False
        node_ns = state.nodes[rec.node].netns
        for c in rec.containers:
            key = f"pod/{rec.namespace}/{rec.name}/{c.name}"
            if key in state.processes and not procs.is_running(state.processes[key]):
                raise LabError(
                    f"pod {rec.ref}: container {c.name} exited; see {state.processes[key].log}:\n"
                    f"{procs.log_tail(state.processes[key].log)}"
                )
            probe = c.probe
            if probe.get("httpGet"):
                hg = probe["httpGet"]
                port = probes.probe_port(hg.get("port"), c)
                if port and not probes.http_ok(node_ns, rec.ips[0], port, str(hg.get("path", "/"))):
                    return False
            elif probe.get("tcpSocket"):
                port = probes.probe_port(probe["tcpSocket"].get("port"), c)
                if port and not netns.tcp_open(node_ns, rec.ips[0], port):
                    return False
            elif c.argv:
                for port in c.ports:
                    if not netns.tcp_open(node_ns, rec.ips[0], port):
                        return False
        return True

    def wait_ready(self, state: LabState, pods: Sequence[PodRecord], deadline: float) -> None:
        pending = list(pods)

        def check() -> bool:
            pending[:] = [p for p in pending if not self._ready(state, p)]
            return not pending

        if not procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            names = ", ".join(p.ref for p in pending)
            raise LabError(f"timed out waiting for pods to be ready: {names} (see logs in {state.logs})")
        if pods:
            with updating(self.dir) as st:  # Ready: now the Services' (and waypoints') endpoints
                for rec in pods:
                    rec.ready = True
                    if rec.ref in st.pods:
                        st.pods[rec.ref].ready = True
                write_live(st)
            self.say(f"{len(pods)} pod(s) ready (probed from their nodes)")

    # ---- stop ---------------------------------------------------------------------------------------------------

    def stop(self, state: LabState, rec: PodRecord) -> None:
        """As the kubelet: stop the containers, CNI DEL with the cached result, remove the sandbox."""
        keys = [k for k in state.processes if k.startswith(f"pod/{rec.namespace}/{rec.name}/")]
        procs.terminate([state.processes[k] for k in keys])
        if not rec.host_network:
            node = state.nodes.get(rec.node)
            if node and netns.netns_exists(node.netns):
                runtime = Runtime(node.netns, self._cni_dirs(state, node))
                try:
                    runtime.delete(self.conflist(state, node), self._pod_ref(rec), rec.cni_result or None)
                except CniInvocationError as e:
                    self.say(f"pod {rec.ref}: {e} (continuing)")
            # e.g. `lab exec` sessions, or children that left the group; never a component that was only
            # passing through the pod's netns (the proxy opens listeners there with setns)
            components_pids = {r.pid for k, r in state.processes.items() if not k.startswith("pod/")}
            stray = [p for p in netns.pids_in_netns([rec.netns]) if p not in components_pids]
            if stray:
                procs.kill_pids(stray)
            netns.delete_netns(rec.netns)
            netns.remove_resolv_conf(rec.netns)
        shutil.rmtree(state.pod_dir(rec.namespace, rec.name), ignore_errors=True)
        for k in keys:
            state.processes.pop(k, None)
        self.say(f"pod {rec.ref} deleted")
