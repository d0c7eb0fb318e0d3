"""The lab's operations: up, down, apply, delete, restart, kill, status.

Topology (DESIGN §5): a fabric netns holds bridge `br0` (172.30.0.1/24, where the CA listens); each node is a
netns whose `eth0` is a veth on that bridge, with a pod CIDR 10.244.N.0/24 and routes to the other nodes'
CIDRs through their addresses; each pod is a netns wired by the CNI reference plugins run inside its node's
netns. All of it lives in namespaces named `ztl-<lab>-...`; the root netns is never touched.

This module sequences the work; the pieces are `fabric` (the network between nodes), `pods` (CNI and
containers), `mesh` (the CA, node agents and proxies as processes) and `state` (the state dir, live config).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ztunnel.config.loader import ConfigError, read_objects
from ztunnel.config.model import GATEWAY_NAME_LABEL, KubeObject, Workload
from ztunnel.errors import ZtunnelError
from ztunnel.lab import cgroups, components, fabric, netns, procs, prometheus, waypoints
from ztunnel.lab.mesh import MESH_COMPONENTS, Mesh, served_uids
from ztunnel.lab.model import (
    FABRIC_SUBNET,
    LabError,
    NodeRecord,
    PodRecord,
    ProcessRecord,
    check_lab_name,
    fabric_netns,
    merge_objects,
    netns_prefix,
    object_key,
    plan_nodes,
    plan_pod,
    remove_objects,
    schedule,
    validate,
)
from ztunnel.lab.pods import Pods
from ztunnel.lab.state import (
    DEFAULT_ROOT,
    LabState,
    default_dir,
    live_objects,
    load,
    locked,
    save,
    updating,
    write_live,
)
from ztunnel.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise LabError("`ip` (iproute2) is not installed: run scripts/setup.sh as root")


def resolve_dir(name: str | None, state_dir: str | None, creating: bool = False) -> tuple[str, Path]:
    """(lab name, state dir) from --name and --state-dir; a state dir alone names its lab."""
    if state_dir:
        path = Path(state_dir).absolute()
        if name is None:
            try:
                return load(path).name, path
            except LabError:
                if not creating:  # never guess a name: `down` removes namespaces by the name's prefix
                    raise LabError(f"no lab state in {path}; say which lab with --name") from None
        return check_lab_name(name or "lab"), path
    lab = check_lab_name(name or "lab")
    return lab, default_dir(lab)


class Lab:
    """Operations on one lab, identified by its state directory.

    `cli` is the CLI's subcommand table (`ztunnel lab` hands in the one it is registered in): which mesh
    components and flags exist. Without it, `up` runs no mesh component.
    """

    def __init__(
        self,
        name: str,
        dir: Path,
        progress: Progress = _quiet,
        cli: Mapping[str, argparse.ArgumentParser] | None = None,
    ) -> None:
        self.name = name
        self.dir = dir
        self.progress = progress
        self.mesh = Mesh(name, dir, self.say, cli)
        self.pods = Pods(name, dir, self.say)

    def say(self, msg: str) -> None:
        self.progress(f"lab {self.name}: {msg}")

    # ---- up ---------------------------------------------------------------------------------------------

    def up(
        self,
        files: Sequence[str],
        *,
        redirect: str = "iptables",
        mesh: str = "on",
        timeout: float = 90.0,
        scrape: float | None = None,
    ) -> LabState:
        """SCRAPE: run a Prometheus scraping the proxies and waypoints every SCRAPE seconds (`--prometheus`)."""
        require_root()
        if scrape is not None:
            prometheus.config_check(scrape)  # before anything is built: the binary is there, the interval valid
        objects = read_objects(files)
        validate(objects)
        if (self.dir / "state.json").exists():
            try:
                old = load(self.dir)
            except LabError:
                old = None
            if old and any(procs.is_running(p) for p in old.processes.values()):
                raise LabError(
                    f"lab {self.name} is already up ({self.dir}); remove it first with "
                    f"`ztunnel lab down --name {self.name}`"
                )
        if not plan_nodes(self.name, objects, {}):
            raise LabError(
                "the config has no Node objects and no pod sets spec.nodeName: add a Node (kind: Node, "
                "metadata.name) or set spec.nodeName on the pods"
            )
        _check_lab_dir(self.dir)
        leftovers = [n for n in netns.list_netns() if n.startswith(netns_prefix(self.name))]
        if leftovers or self.dir.exists():
            self.say("cleaning up after an earlier run")
            self.down(quiet=True)
        try:
            return self._up(objects, redirect=redirect, mesh=mesh, timeout=timeout, scrape=scrape)
        except (ZtunnelError, OSError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            raise LabError(
                f"{why}\nThe lab is left as it is for inspection (logs in {self.dir / 'logs'}); "
                f"remove it with `ztunnel lab down --name {self.name}`"
            ) from e

    def _up(
        self, objects: Sequence[KubeObject], *, redirect: str, mesh: str, timeout: float, scrape: float | None
    ) -> LabState:
        deadline = time.monotonic() + timeout
        nodes = plan_nodes(self.name, objects, {})
        caps = self.mesh.capabilities()
        state = LabState(name=self.name, dir=str(self.dir), redirect=redirect, mesh=mesh)
        state.components = self._choose_components(caps, mesh)
        if scrape is not None:
            state.components[prometheus.COMPONENT] = True
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        state.logs.mkdir(exist_ok=True)
        pods: list[tuple[KubeObject, PodRecord]] = []
        for o in objects:
            if o.kind == "Pod":
                rec = plan_pod(self.name, o, schedule(o, nodes, [p for _, p in pods]))
                pods.append((o, rec))
        longest = max((len(str(state.agent_sockets(n)[0])) for n in nodes), default=0)
        if longest > 100:
            raise LabError(f"state dir {self.dir} is too long for the agents' unix sockets; use a shorter --state-dir")
        state.nodes = nodes
        state.pods = {rec.ref: rec for _, rec in pods}
        with locked(self.dir):
            save(state)
            write_live(state, objects)

        if redirect == "ebpf":
            netns.mount_bpffs(netns.lab_bpffs(self.dir))
        fabric.build_fabric(self.name, self.say)
        for node in sorted(nodes.values(), key=lambda n: n.index):
            self._build_node(state, node)
        fabric.route_all(self.name, state.nodes.values())
        with locked(self.dir):
            save(state)
        scraper = [prometheus.start(state, scrape, objects)] if scrape is not None else []  # ready in the meantime
        ordered = sorted(nodes.values(), key=lambda n: n.index)
        # The CA and the agents need nothing from each other: start them together, then the proxies.
        first = [self.mesh.spawn_ca(state)] if state.components.get("ca") else []
        self.mesh.wait_all(state, first + self.mesh.spawn_agents(state, ordered), deadline)
        self.mesh.wait_all(state, self.mesh.spawn_proxies(state, ordered), deadline)
        started = [rec for _, rec in pods] + self._deploy_waypoints(state, objects)
        self.pods.start(state, started, deadline)
        self.pods.wait_ready(state, started, deadline)
        self.mesh.wait_proxies_synced(deadline)
        self._refresh_scrape_targets()
        self.mesh.wait_all(state, scraper, deadline)
        with updating(self.dir) as st:
            st.ready = True
            state = st
        self.say(f"ready: {len(state.nodes)} nodes, {len(state.pods)} pods; live config {state.live_config}")
        return state

    def _deploy_waypoints(self, state: LabState, objects: Sequence[KubeObject]) -> list[PodRecord]:
        """At `up`, once the mesh runs (the waypoints' CA flags need it): a pod per waypoint Gateway, in the
        live config before any pod starts."""
        plan = waypoints.reconcile(objects, state.nodes, state.pods, self.mesh.waypoint_argv_for(state))
        recs = [plan_pod(self.name, o, str(o.spec["nodeName"])) for o in plan.start]
        for note in plan.notes:
            self.say(note)
        for rec in recs:
            state.pods[rec.ref] = rec
            self.say(f"waypoint pod {rec.ref} scheduled on {rec.node}")
        with locked(self.dir):
            save(state)
            write_live(state, plan.objects)
        return recs

    def _reconcile_waypoints(
        self, state: LabState, objects: Sequence[KubeObject], restart: Sequence[str] = ()
    ) -> tuple[list[KubeObject], list[PodRecord], list[str]]:
        """Inside an `updating` block of apply/delete: stop waypoint pods whose Gateway is gone or changed, plan
        the new ones (started by the caller once the lock is released). Returns (live objects, new pods, lines)."""
        plan = waypoints.reconcile(objects, state.nodes, state.pods, self.mesh.waypoint_argv_for(state), restart)
        lines = list(plan.notes)
        for ref in plan.stop:
            rec = state.pods.pop(ref, None)
            if rec is not None:
                self.pods.stop(state, rec)
            lines.append(f"Pod {ref} (waypoint) deleted")
        recs = []
        for o in plan.start:
            rec = plan_pod(self.name, o, str(o.spec["nodeName"]))
            state.pods[rec.ref] = rec
            recs.append(rec)
            lines.append(f"Pod {rec.ref} (waypoint) created")
        return plan.objects, recs, lines

    def _choose_components(self, caps: components.Capabilities, mesh: str) -> dict[str, bool]:
        if mesh == "off":
            self.say("mesh off: plain pod networking only (no CA, node agents, proxies or ztunnel-cni)")
            return dict.fromkeys(MESH_COMPONENTS, False)
        reasons = caps.available()
        chosen = {c: not reasons[c] for c in MESH_COMPONENTS}
        # The plugin forwards to the agent, the agent hands pods to the in-pod proxy, and an enrolled pod
        # cannot start without its proxy: without any one of them, none of them runs (plain networking).
        for needed in ("proxy", "node-agent"):
            if not chosen[needed]:
                for dependent in ("cni-plugin", "proxy", "node-agent"):
                    if chosen[dependent] and dependent != needed:
                        chosen[dependent] = False
                        reasons[dependent] = f"needs the {needed}, which is not available ({reasons[needed]})"
        missing = {c: reasons[c] for c in MESH_COMPONENTS if not chosen[c]}
        if mesh == "on" and missing:
            raise LabError(
                "the mesh cannot run (--mesh on, the default): "
                + "; ".join(f"{c}: {r}" for c, r in missing.items())
                + ". Fix that, or pass --mesh auto to build the lab without it (its pods get no mTLS) "
                "or --mesh off for plain pod networking"
            )
        for c, r in missing.items():
            self.say(f"skipping {c}: {r}")
        return chosen

    def _build_node(self, state: LabState, node: NodeRecord) -> None:
        fabric.join_node(self.name, node)
        (state.node_dir(node.name) / "ipam").mkdir(parents=True, exist_ok=True)
        self.pods.install_cni(state, node)
        self.say(f"node {node.name}: netns {node.netns}, eth0 {node.address}, pod CIDR {node.pod_cidr}")

    # ---- apply / delete ------------------------------------------------------------------------------------

    def apply(self, files: Sequence[str], timeout: float = 60.0) -> list[str]:
        require_root()
        changes = read_objects(files)
        deadline = time.monotonic() + timeout
        new_pods: list[PodRecord] = []
        new_nodes: list[NodeRecord] = []
        done: list[str] = []
        with updating(self.dir) as state:
            current = live_objects(state)
            existing = {object_key(o): o for o in current}
            merged = merge_objects(current, changes)
            validate(merged)
            nodes = plan_nodes(self.name, merged, state.nodes)
            new_nodes = [n for k, n in nodes.items() if k not in state.nodes]
            state.nodes = nodes
            for o in changes:
                verb = "configured" if object_key(o) in existing else "created"
                if o.kind == "Pod":
                    ref = f"{o.namespace}/{o.name}"
                    old = state.pods.get(ref)
                    if old is None:
                        rec = plan_pod(self.name, o, schedule(o, state.nodes, state.pods.values()))
                        state.pods[ref] = rec
                        new_pods.append(rec)
                    elif plan_pod(self.name, o, old.node).containers != old.containers:
                        self.say(
                            f"pod {ref}: spec is immutable (like Kubernetes); labels and annotations updated, "
                            f"containers unchanged; delete and re-apply the pod to change them"
                        )
                done.append(f"{o.ref} {verb}")
            restart = [  # a re-applied Gateway brings back a waypoint that is not running, as a Deployment would
                f"{o.namespace}/{o.name}"
                for o in changes
                if waypoints.is_waypoint_gateway(o) and not self._waypoint_running(state, o)
            ]
            merged, waypoint_pods, lines = self._reconcile_waypoints(state, merged, restart)
            new_pods += waypoint_pods
            done += lines
            write_live(state, merged)
        for node in new_nodes:
            self._add_node(node, deadline)
        if new_pods:
            with locked(self.dir):
                state = load(self.dir)
            self.pods.start(state, new_pods, deadline)
            self.pods.wait_ready(state, new_pods, deadline)
        self.mesh.wait_proxies_synced(max(deadline, time.monotonic() + 10.0), strict=False)
        self._refresh_scrape_targets()
        return done

    def _refresh_scrape_targets(self) -> None:
        """Prometheus' targets from the lab as it is now (a waypoint came, went or moved, a node joined)."""
        with locked(self.dir):
            state = load(self.dir)
            if state.components.get(prometheus.COMPONENT):
                prometheus.write_targets(state, live_objects(state))

    def _add_node(self, node: NodeRecord, deadline: float) -> None:
        with locked(self.dir):
            state = load(self.dir)
        self._build_node(state, node)
        fabric.route_all(self.name, state.nodes.values())
        self.mesh.admit_node(state, node)
        self.mesh.start_node_components(state, [node], deadline)

    def delete(self, files: Sequence[str]) -> list[str]:
        require_root()
        gone = read_objects(files)
        done: list[str] = []
        with updating(self.dir) as state:
            current = live_objects(state)
            keys = {object_key(o) for o in current}
            missing = [o.ref for o in gone if object_key(o) not in keys]
            remaining = remove_objects(current, gone)
            validate(remaining)
            removed_pods = [
                state.pods[f"{o.namespace}/{o.name}"]
                for o in gone
                if o.kind == "Pod" and f"{o.namespace}/{o.name}" in state.pods
            ]
            for o in gone:
                if o.kind == "Node" and o.name in state.nodes:
                    raise LabError(
                        f"{o.source}: Node {o.name}: removing a node from a running lab is not supported; "
                        f"take the lab down and up again without it"
                    )
            for rec in removed_pods:
                self.pods.stop(state, rec)
                del state.pods[rec.ref]
            remaining, waypoint_pods, lines = self._reconcile_waypoints(state, remaining)
            write_live(state, remaining)
            done = [f"{o.ref} deleted" for o in gone if object_key(o) in keys]
            for ref in missing:
                done.append(f"{ref} not found")
            done += lines
        if waypoint_pods:  # a pod that ran a waypoint by hand is gone: the lab deploys one now
            deadline = time.monotonic() + 60.0
            with locked(self.dir):
                state = load(self.dir)
            self.pods.start(state, waypoint_pods, deadline)
            self.pods.wait_ready(state, waypoint_pods, deadline)
        self.mesh.wait_proxies_synced(time.monotonic() + 10.0, strict=False)
        self._refresh_scrape_targets()
        return done

    @staticmethod
    def _waypoint_running(state: LabState, gateway: KubeObject) -> bool:
        key = f"pod/{gateway.namespace}/{waypoints.pod_name(gateway.name)}/{waypoints.CONTAINER}"
        rec = state.processes.get(key)
        return rec is None or procs.is_running(rec)  # never deployed: nothing to bring back

    # ---- restart / kill -----------------------------------------------------------------------------------

    def _component_key(self, state: LabState, component: str, node: str | None) -> str:
        if component == "ca":
            if not state.components.get("ca"):
                raise LabError("this lab runs no CA (it was skipped at `lab up`)")
            return "ca"
        if component not in ("proxy", "node-agent"):
            raise LabError(f"unknown component {component!r}: use proxy, node-agent or ca")
        if not node:
            raise LabError(f"{component} runs on every node: say which with --node NAME")
        if node not in state.nodes:
            raise LabError(f"no node {node!r} in lab {self.name}; nodes: {', '.join(sorted(state.nodes))}")
        if not state.components.get(component):
            raise LabError(f"this lab runs no {component} (it was skipped at `lab up`)")
        return f"node/{node}/{component}"

    def kill(self, component: str, node: str | None) -> ProcessRecord:
        with locked(self.dir):
            state = load(self.dir)
        key = self._component_key(state, component, node)
        rec = state.processes.get(key)
        if rec is None:
            raise LabError(f"{key} was never started")
        procs.kill([rec])
        self.say(f"{key} (pid {rec.pid}) killed")
        return rec

    def restart(self, component: str, node: str | None, timeout: float = 60.0) -> ProcessRecord:
        with locked(self.dir):
            state = load(self.dir)
        key = self._component_key(state, component, node)
        old = state.processes.get(key)
        if old is not None:
            procs.terminate([old])
        deadline = time.monotonic() + timeout
        if component == "ca":
            self.mesh.restart_ca(state, old, deadline)
        else:
            assert node is not None
            self.mesh.start_node_components(state, [state.nodes[node]], deadline, only=component)
        return state.processes[key]

    # ---- status / exec ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with locked(self.dir):
            state = load(self.dir)
        try:
            from ztunnel.config.loader import load_files

            cfg = load_files([state.live_config])
        except (ConfigError, OSError):
            cfg = None

        def proc(key: str) -> dict[str, Any] | None:
            r = state.processes.get(key)
            if r is None:
                return None
            return {"pid": r.pid, "running": procs.is_running(r), "netns": r.netns, "log": r.log}

        nodes = []
        served: set[str] = set()
        for n in sorted(state.nodes.values(), key=lambda n: n.index):
            entry: dict[str, Any] = {
                "name": n.name,
                "netns": n.netns,
                "address": n.address,
                "pod_cidr": n.pod_cidr,
                "node_agent": proc(f"node/{n.name}/node-agent"),
                "proxy": proc(f"node/{n.name}/proxy"),
            }
            if entry["proxy"] and entry["proxy"]["running"]:
                served.update(served_uids(n))
            if entry["proxy"]:
                entry["proxy"]["metrics"] = f"http://127.0.0.1:{METRICS_PORT}/metrics (netns {n.netns})"
                entry["proxy"]["readiness"] = f"http://127.0.0.1:{READINESS_PORT}/healthz/ready (netns {n.netns})"
                entry["proxy"]["admin"] = f"http://127.0.0.1:{ADMIN_PORT}/config_dump (netns {n.netns})"
            nodes.append(entry)
        pods = []
        for p in sorted(state.pods.values(), key=lambda p: p.ref):
            w = cfg.workload(p.namespace, p.name) if cfg else None
            pods.append(
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "uid": p.uid,
                    "node": p.node,
                    "netns": p.netns,
                    "ips": p.ips,
                    "host_network": p.host_network,
                    "enrolled": p.uid in served,  # its node proxy serves it (listeners in its netns)
                    "ambient": bool(w and w.enrolled),  # its labels put it in the mesh
                    "identity": w.identity if w else None,
                    "waypoint": _waypoint_of(w),
                    "ports": sorted({port for c in p.containers for port in c.ports}),
                    "containers": {c.name: proc(f"pod/{p.namespace}/{p.name}/{c.name}") for c in p.containers},
                }
            )
        return {
            "name": state.name,
            "dir": state.dir,
            "ready": state.ready,
            "live_config": str(state.live_config),
            "redirect": state.redirect,
            "components": state.components,
            "fabric": {"netns": fabric_netns(self.name), "bridge": fabric.FABRIC_BRIDGE, "subnet": str(FABRIC_SUBNET)},
            "ca": (proc("ca") or {}) | ({"address": state.ca_address} if state.ca_address else {}),
            "nodes": nodes,
            "pods": pods,
            "prometheus": prometheus.status(state),
        }

    def target_netns(self, target: str) -> str:
        with locked(self.dir):
            state = load(self.dir)
        if target == "fabric":
            return fabric_netns(self.name)
        kind, _, name = target.partition("/")
        if kind == "node" and name in state.nodes:
            return state.nodes[name].netns
        if target in state.pods:
            return state.pods[target].netns
        if "/" not in target:
            for p in state.pods.values():
                if p.namespace == "default" and p.name == target:
                    return p.netns
        raise LabError(
            f"no target {target!r} in lab {self.name}: use NAMESPACE/POD ({', '.join(sorted(state.pods))})"
            f" or node/NAME ({', '.join(sorted(state.nodes))}) or fabric"
        )

    # ---- down --------------------------------------------------------------------------------------------------

    def down(self, quiet: bool = False) -> None:
        """Remove every process, netns and file of the lab, from its state file or, after a crash, by prefix."""
        require_root()
        state: LabState | None = None
        with contextlib.suppress(LabError, OSError, KeyError, TypeError):
            state = load(self.dir)
        if state is not None:
            order = sorted(state.processes.values(), key=lambda r: (not r.key.startswith("pod/"), r.key == "ca"))
            pods = [r for r in order if r.key.startswith("pod/")]
            rest = [r for r in order if not r.key.startswith("pod/")]
            procs.terminate(pods, timeout=3.0)
            procs.terminate(rest, timeout=3.0)
        names = [n for n in netns.list_netns() if n.startswith(netns_prefix(self.name))]
        stray = netns.pids_in_netns(names)
        if stray:
            procs.kill_pids(stray)
            procs.poll_until(lambda: not netns.pids_in_netns(names), 3.0)
        # pods first, then nodes (their veths to the fabric go with them), then the fabric
        names.sort(key=lambda n: (0 if "-pod-" in n else 1 if "-node-" in n else 2, n))
        for n in names:
            netns.delete_netns(n)
        for n in netns.etc_netns_dirs(netns_prefix(self.name)):
            netns.remove_resolv_conf(n)  # the pods' resolv.conf files, also those of netns already gone
        netns.unmount_bpffs(netns.lab_bpffs(self.dir))  # eBPF mode: every pinned map and link (programs detach)
        cgroups.remove(self.name)  # the proxies' cgroups (killing what a crash left in them)
        if self.dir.exists():
            _check_lab_dir(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.parent == DEFAULT_ROOT:
                with contextlib.suppress(OSError):
                    DEFAULT_ROOT.rmdir()  # only if no other lab is there
        if not quiet:
            self.say(
                f"down: removed {len(names)} netns"
                + (f", {len(state.processes)} processes" if state else "")
                + f" and {self.dir}"
            )


def _waypoint_of(w: Workload | None) -> str | None:
    """The Gateway (`ns/name`) whose waypoint this pod runs, if it runs one."""
    name = w.labels.get(GATEWAY_NAME_LABEL) if w else None
    return f"{w.namespace}/{name}" if w and name else None


LAB_DIR_ENTRIES = frozenset(
    {"state.json", "lock", "cluster.yaml", "logs", "nodes", "pods", "ca", "cni-bin", "bpffs", prometheus.DIR}
)




def _check_lab_dir(path: Path) -> None:
    """Refuse to take over (or remove) a directory that holds anything but a lab's own files."""
    if not path.is_dir():
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in LAB_DIR_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise LabError(
            f"{path} holds files that are not a lab's ({', '.join(foreign[:5])}); give --state-dir a new directory"
        )

