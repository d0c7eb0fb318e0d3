"""The lab's operations: up, down, apply, delete, restart, kill, status.

Topology (DESIGN §5): a fabric netns holds bridge `br0` (172.30.0.1/24, where the CA listens); each node is a
netns whose `eth0` is a veth on that bridge, with a pod CIDR 10.244.N.0/24 and routes to the other nodes'
CIDRs through their addresses; each pod is a netns wired by the CNI reference plugins run inside its node's
netns. All of it lives in namespaces named `ztl-<lab>-...`; the root netns is never touched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ztunnel.config.loader import ConfigError, read_objects
from ztunnel.config.model import POLICY_KINDS, KubeObject
from ztunnel.errors import ZtunnelError
from ztunnel.lab import components, netns, procs
from ztunnel.lab.cni import CniError, PodRef, Runtime, load_network_config, node_conflist, plugin_dirs
from ztunnel.lab.model import (
    CA_PORT,
    FABRIC_GATEWAY,
    FABRIC_SUBNET,
    LabError,
    NodeRecord,
    PodRecord,
    ProcessRecord,
    check_lab_name,
    fabric_netns,
    ips_from_cni_result,
    merge_objects,
    netns_prefix,
    object_key,
    plan_nodes,
    plan_pod,
    remove_objects,
    render_live,
    schedule,
    validate,
)
from ztunnel.lab.state import DEFAULT_ROOT, LabState, default_dir, load, locked, save, updating, write_atomic

Progress = Callable[[str], None]
Waiter = tuple[str, Callable[[], bool], str]  # (process key, readiness check, what it means when ready)
FABRIC_BRIDGE = "br0"
PRIMARY_CONFLIST = "10-lab.conflist"
READINESS_PORT = 15021
METRICS_PORT = 15020
ADMIN_PORT = 15000
MESH_COMPONENTS = ("ca", "node-agent", "proxy", "cni-plugin")


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


def _log_path(state: LabState, key: str) -> Path:
    return state.logs / (key.replace("/", "_") + ".log")


class Lab:
    """Operations on one lab, identified by its state directory."""

    def __init__(self, name: str, dir: Path, progress: Progress = _quiet) -> None:
        self.name = name
        self.dir = dir
        self.progress = progress

    def say(self, msg: str) -> None:
        self.progress(f"lab {self.name}: {msg}")

    # ---- up ---------------------------------------------------------------------------------------------

    def up(
        self, files: Sequence[str], *, redirect: str = "iptables", mesh: str = "on", timeout: float = 90.0
    ) -> LabState:
        require_root()
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
            return self._up(objects, redirect=redirect, mesh=mesh, timeout=timeout)
        except (ZtunnelError, OSError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            raise LabError(
                f"{why}\nThe lab is left as it is for inspection (logs in {self.dir / 'logs'}); "
                f"remove it with `ztunnel lab down --name {self.name}`"
            ) from e

    def _up(self, objects: Sequence[KubeObject], *, redirect: str, mesh: str, timeout: float) -> LabState:
        deadline = time.monotonic() + timeout
        nodes = plan_nodes(self.name, objects, {})
        caps = components.inspect()
        state = LabState(name=self.name, dir=str(self.dir), redirect=redirect, mesh=mesh)
        state.components = self._choose_components(caps, mesh)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        state.logs.mkdir(exist_ok=True)
        pods: list[tuple[KubeObject, PodRecord]] = []
        for o in objects:
            if o.kind == "Pod":
                rec = plan_pod(self.name, o, schedule(o, nodes, [p for _, p in pods]))
                pods.append((o, rec))
        longest = max((len(str(self._agent_paths(state, n)[0])) for n in nodes), default=0)
        if longest > 100:
            raise LabError(f"state dir {self.dir} is too long for the agents' unix sockets; use a shorter --state-dir")
        state.nodes = nodes
        state.pods = {rec.ref: rec for _, rec in pods}
        with locked(self.dir):
            save(state)
            self._write_live(state, objects)

        self._build_fabric(state)
        for node in sorted(nodes.values(), key=lambda n: n.index):
            self._build_node(state, node)
        self._route_all(state)
        with locked(self.dir):
            save(state)
        ordered = sorted(nodes.values(), key=lambda n: n.index)
        # The CA and the agents need nothing from each other: start them together, then the proxies.
        first = [self._spawn_ca(state)] if state.components.get("ca") else []
        self._wait_all(state, first + self._spawn_agents(state, ordered), deadline)
        self._wait_all(state, self._spawn_proxies(state, ordered), deadline)
        self._start_pods(state, [rec for _, rec in pods], deadline)
        self._wait_pods_ready(state, [rec for _, rec in pods], deadline)
        self.wait_proxies_synced(deadline)
        with updating(self.dir) as st:
            st.ready = True
            state = st
        self.say(f"ready: {len(state.nodes)} nodes, {len(state.pods)} pods; live config {state.live_config}")
        return state

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

    def _write_live(self, state: LabState, objects: Sequence[KubeObject] | None = None) -> None:
        """Rewrite the live config atomically (the CA, agents and proxies watch it). Call with the lock held."""
        if objects is None:
            objects = self._live_objects(state)
        write_atomic(state.live_config, render_live(objects, state.nodes, state.pods))

    @staticmethod
    def _live_objects(state: LabState) -> list[KubeObject]:
        if not state.live_config.exists():
            return []
        return read_objects([state.live_config])

    # ---- networks ---------------------------------------------------------------------------------------

    def _build_fabric(self, state: LabState) -> None:
        fab = fabric_netns(self.name)
        netns.add_netns(fab)
        netns.ip(fab, "link", "add", FABRIC_BRIDGE, "type", "bridge")
        netns.ip(fab, "addr", "add", f"{FABRIC_GATEWAY}/{FABRIC_SUBNET.prefixlen}", "dev", FABRIC_BRIDGE)
        netns.ip(fab, "link", "set", FABRIC_BRIDGE, "up")
        self.say(f"fabric {fab}: bridge {FABRIC_BRIDGE} on {FABRIC_SUBNET}")

    def _build_node(self, state: LabState, node: NodeRecord) -> None:
        fab = fabric_netns(self.name)
        netns.add_netns(node.netns)
        netns.ip(fab, "link", "add", node.fabric_link, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        netns.ip(fab, "link", "set", node.fabric_link, "master", FABRIC_BRIDGE, "up")
        netns.ip(node.netns, "addr", "add", f"{node.address}/{FABRIC_SUBNET.prefixlen}", "dev", "eth0")
        netns.ip(node.netns, "link", "set", "eth0", "up")
        netns.set_sysctl(node.netns, "net.ipv4.ip_forward", "1")
        node_dir = state.node_dir(node.name)
        (node_dir / "ipam").mkdir(parents=True, exist_ok=True)
        self._install_cni(state, node)
        self.say(f"node {node.name}: netns {node.netns}, eth0 {node.address}, pod CIDR {node.pod_cidr}")

    def _route_all(self, state: LabState) -> None:
        """Each node reaches every other node's pod CIDR through that node's fabric address."""
        for node in state.nodes.values():
            for other in state.nodes.values():
                if other.name != node.name:
                    netns.ip(node.netns, "route", "replace", other.pod_cidr, "via", other.address, "dev", "eth0")

    # ---- the CA and node components ----------------------------------------------------------------------

    def _ca_dir(self, state: LabState) -> Path:
        return state.path / "ca"

    def _spawn_ca(self, state: LabState) -> Waiter:
        ca_dir = self._ca_dir(state)
        init = netns.run(components.ztunnel_argv("ca", "init", "--dir", str(ca_dir)), check=False)
        if init.returncode != 0:
            raise LabError(f"`ztunnel ca init` failed: {(init.stderr or init.stdout).strip()}")
        tokens = {}
        for node in state.nodes.values():
            tokens[self._node_token(state, node)] = node.name
        tokens_file = ca_dir / "node-tokens.yaml"
        write_atomic(tokens_file, "".join(f"{t}: {n}\n" for t, n in tokens.items()), mode=0o600)
        state.ca_address = f"{FABRIC_GATEWAY}:{CA_PORT}"
        with updating(self.dir) as st:
            st.ca_address = state.ca_address
        argv = components.ztunnel_argv(
            "ca",
            "serve",
            "--dir",
            str(ca_dir),
            "-f",
            str(state.live_config),
            "--listen",
            state.ca_address,
            "--node-tokens",
            str(tokens_file),
        )
        self._spawn(state, "ca", argv, fabric_netns(self.name))
        fab = fabric_netns(self.name)
        return ("ca", lambda: netns.tcp_open(fab, FABRIC_GATEWAY, CA_PORT), f"CA listening on {state.ca_address}")

    def _node_token(self, state: LabState, node: NodeRecord) -> str:
        """The node's credential for the CA (local mode: a token file only that node's components read)."""
        path = state.node_dir(node.name) / "token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, token + "\n", mode=0o600)
        return token

    def _agent_paths(self, state: LabState, node: str) -> tuple[Path, Path]:
        d = state.node_dir(node)
        return d / "cni.sock", d / "inpod.sock"

    def _agent_argv(self, state: LabState, node: NodeRecord, caps: components.Capabilities) -> list[str]:
        cni_sock, inpod_sock = self._agent_paths(state, node.name)
        args = ["node-agent", "--node", node.name]
        for flags, value in (
            (("-f", "--file", "--config"), str(state.live_config)),
            (("--cni-socket",), str(cni_sock)),
            (("--inpod-socket", "--proxy-socket", "--ztunnel-socket"), str(inpod_sock)),
            (("--redirect", "--redirect-mode"), state.redirect),
            (("--state-dir",), str(state.node_dir(node.name) / "agent")),
        ):
            flag = caps.flag("node-agent", *flags)
            if flag:
                args += [flag, value]
        return components.ztunnel_argv(*args)

    def _proxy_argv(self, state: LabState, node: NodeRecord, caps: components.Capabilities) -> list[str]:
        _cni_sock, inpod_sock = self._agent_paths(state, node.name)
        args = ["proxy", "--node", node.name, "-f", str(state.live_config), "--inpod-socket", str(inpod_sock)]
        if state.components.get("ca") and state.ca_address:
            args += [
                "--ca",
                state.ca_address,
                "--ca-root",
                str(self._ca_root(state)),
                "--token-file",
                str(state.node_dir(node.name) / "token"),
            ]
        else:
            args += ["--ca-dir", str(self._ca_dir(state))]
        return components.ztunnel_argv(*args)

    def _ca_root(self, state: LabState) -> Path:
        ca_dir = self._ca_dir(state)
        for name in ("root-cert.pem", "root.pem", "ca-root.pem", "bundle.pem"):
            if (ca_dir / name).exists():
                return ca_dir / name
        return ca_dir / "root-cert.pem"

    def _spawn_agents(self, state: LabState, nodes: Sequence[NodeRecord]) -> list[Waiter]:
        if not state.components.get("node-agent"):
            return []
        caps = components.inspect()
        waiters: list[Waiter] = []
        for node in nodes:
            cni_sock, _ = self._agent_paths(state, node.name)
            with contextlib.suppress(FileNotFoundError):
                cni_sock.unlink()
            key = f"node/{node.name}/node-agent"
            self._spawn(state, key, self._agent_argv(state, node, caps), node.netns)
            waiters.append(
                (key, functools.partial(_unix_connectable, cni_sock), f"node agent on {node.name} serving {cni_sock}")
            )
        return waiters

    def _spawn_proxies(self, state: LabState, nodes: Sequence[NodeRecord]) -> list[Waiter]:
        if not state.components.get("proxy"):
            return []
        if not state.components.get("ca") and not self._ca_dir(state).exists():
            init = netns.run(components.ztunnel_argv("ca", "init", "--dir", str(self._ca_dir(state))), check=False)
            if init.returncode != 0:
                raise LabError(f"`ztunnel ca init` failed: {(init.stderr or init.stdout).strip()}")
        caps = components.inspect()
        waiters: list[Waiter] = []
        for node in nodes:
            key = f"node/{node.name}/proxy"
            self._spawn(state, key, self._proxy_argv(state, node, caps), node.netns)
            ready = functools.partial(_http_ok, node.netns, "127.0.0.1", READINESS_PORT, "/healthz/ready")
            waiters.append((key, ready, f"proxy on {node.name} ready (127.0.0.1:{READINESS_PORT} in {node.netns})"))
        return waiters

    def _start_node_components(
        self, state: LabState, nodes: Sequence[NodeRecord], deadline: float, only: str | None = None
    ) -> None:
        """Agents first (proxies connect to them), each phase started on all nodes at once and then awaited."""
        if only in (None, "node-agent"):
            self._wait_all(state, self._spawn_agents(state, nodes), deadline)
        if only in (None, "proxy"):
            self._wait_all(state, self._spawn_proxies(state, nodes), deadline)

    def _spawn(
        self,
        state: LabState,
        key: str,
        argv: list[str],
        ns: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ProcessRecord:
        rec = procs.spawn(key, argv, ns, _log_path(state, key), env=env, cwd=cwd)
        with updating(self.dir) as st:
            st.processes[key] = rec
        state.processes[key] = rec
        return rec

    def _wait_all(self, state: LabState, waiters: Sequence[Waiter], deadline: float) -> None:
        """Poll every waiter's readiness check until all pass; fail fast if one of the processes exits."""
        pending = list(waiters)

        def check() -> bool:
            for w in list(pending):
                key, ready, what = w
                rec = state.processes[key]
                if not procs.is_running(rec):
                    raise LabError(f"{key} exited before it was ready; see {rec.log}:\n{_tail(rec.log)}")
                if ready():
                    pending.remove(w)
                    self.say(f"{key} (pid {rec.pid}) ready: {what}")
            return not pending

        if not procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            key, _, what = pending[0]
            log = state.processes[key].log
            raise LabError(f"timed out waiting for {what}; see {log}:\n{_tail(log)}")

    # ---- pods --------------------------------------------------------------------------------------------

    def _cni_dirs(self, state: LabState, node: NodeRecord) -> list[str]:
        """CNI_PATH: the node's own bin dir (where the installer put ztunnel-cni), then the system plugins."""
        return plugin_dirs([str(state.node_dir(node.name) / "cni-bin")])

    def _install_cni(self, state: LabState, node: NodeRecord) -> None:
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
        cni_sock, _ = self._agent_paths(state, node.name)
        plugin = components.cni_plugin_path()
        argv = [str(plugin), "install", "--cni-conf-dir", str(net_d), "--cni-bin-dir", str(bin_dir),
                "--agent-socket", str(cni_sock), "--plugin-binary", str(plugin)]  # fmt: skip
        done = netns.netns_exec(node.netns, *argv, check=False)  # the installer runs on the node
        if done.returncode != 0:
            raise LabError(f"node {node.name}: `ztunnel-cni install` failed: {(done.stderr or done.stdout).strip()}")

    def conflist(self, state: LabState, node: NodeRecord) -> dict[str, Any]:
        """What the runtime uses for every ADD and DEL: the node's lexically first config file, read each time."""
        net_d = state.node_dir(node.name) / "net.d"
        return load_network_config(net_d)

    def _pod_ref(self, rec: PodRecord) -> PodRef:
        return PodRef(rec.namespace, rec.name, rec.uid, rec.container_id, str(netns.NETNS_DIR / rec.netns))

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
            except CniError as e:
                now = time.monotonic()
                if now >= deadline:
                    raise LabError(f"pod {rec.ref}: {e}") from e
                if now - reported > 15.0:
                    self.say(f"pod {rec.ref}: {e}; retrying like the kubelet")
                    reported = now
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 1.0)

    def _start_pods(self, state: LabState, pods: Sequence[PodRecord], deadline: float) -> None:
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
        with updating(self.dir) as st:
            st.pods[rec.ref] = rec
            self._write_live(st)
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
            r = self._spawn(state, key, c.argv, rec.netns, env=env, cwd=c.working_dir or str(pod_dir))
            started.append(f"{c.name} pid {r.pid}")
        self.say(
            f"pod {rec.ref} on {rec.node}: {', '.join(rec.ips) or 'no IP'}"
            + (f" ({'; '.join(started)})" if started else "")
        )

    def _pod_ready(self, state: LabState, rec: PodRecord) -> bool:
        """Kubelet-style: probes (or declared TCP ports) checked from the node's netns."""
        if not rec.ips:
            return False
        node_ns = state.nodes[rec.node].netns
        for c in rec.containers:
            key = f"pod/{rec.namespace}/{rec.name}/{c.name}"
            if key in state.processes and not procs.is_running(state.processes[key]):
                raise LabError(
                    f"pod {rec.ref}: container {c.name} exited; see {state.processes[key].log}:\n"
                    f"{_tail(state.processes[key].log)}"
                )
            probe = c.probe
            if probe.get("httpGet"):
                hg = probe["httpGet"]
                port = _probe_port(hg.get("port"), c)
                if port and not _http_ok(node_ns, rec.ips[0], port, str(hg.get("path", "/"))):
                    return False
            elif probe.get("tcpSocket"):
                port = _probe_port(probe["tcpSocket"].get("port"), c)
                if port and not netns.tcp_open(node_ns, rec.ips[0], port):
                    return False
            elif c.argv:
                for port in c.ports:
                    if not netns.tcp_open(node_ns, rec.ips[0], port):
                        return False
        return True

    def _wait_pods_ready(self, state: LabState, pods: Sequence[PodRecord], deadline: float) -> None:
        pending = list(pods)

        def check() -> bool:
            pending[:] = [p for p in pending if not self._pod_ready(state, p)]
            return not pending

        if not procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            names = ", ".join(p.ref for p in pending)
            raise LabError(f"timed out waiting for pods to be ready: {names} (see logs in {state.logs})")
        if pods:
            self.say(f"{len(pods)} pod(s) ready (probed from their nodes)")

    def wait_proxies_synced(self, deadline: float, strict: bool = True) -> bool:
        """Wait until every running proxy's config dump shows the live config's pods (with IPs) and policies.

        The proxies poll the live config file; returning before they have read it would let a test race them.
        """
        with locked(self.dir):
            state = load(self.dir)
            objects = self._live_objects(state)
        want_pods = {f"{p.namespace}/{p.name}": sorted(p.ips) for p in state.pods.values()}
        want_policies = {o.ref for o in objects if o.kind in POLICY_KINDS}
        proxies = [
            (n, state.processes[f"node/{n.name}/proxy"])
            for n in state.nodes.values()
            if f"node/{n.name}/proxy" in state.processes and procs.is_running(state.processes[f"node/{n.name}/proxy"])
        ]
        pending = list(proxies)

        def synced(node: NodeRecord) -> bool:
            try:
                status, body = netns.http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=2.0)
                dump = json.loads(body)
            except (OSError, ValueError):
                return False
            if status != 200 or not isinstance(dump, dict):
                return False
            have = {w.get("name"): sorted(w.get("ips") or []) for w in dump.get("workloads") or []}
            if any(have.get(ref) != ips for ref, ips in want_pods.items()):
                return False
            known = set(dump.get("policies") or [])
            errors = json.dumps(dump.get("policy_errors") or [])
            return all(ref in known or ref in errors for ref in want_policies)

        def check() -> bool:
            pending[:] = [(n, r) for n, r in pending if not synced(n)]
            return not pending

        if procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            if proxies:
                self.say(f"{len(proxies)} proxy(ies) have the live config")
            return True
        late = ", ".join(n.name for n, _ in pending)
        if strict:
            raise LabError(f"proxies on {late} did not load the live config in time; see their logs in {state.logs}")
        self.say(f"warning: proxies on {late} have not loaded the change yet")
        return False

    def _stop_pod(self, state: LabState, rec: PodRecord) -> None:
        """As the kubelet: stop the containers, CNI DEL with the cached result, remove the sandbox."""
        keys = [k for k in state.processes if k.startswith(f"pod/{rec.namespace}/{rec.name}/")]
        procs.terminate([state.processes[k] for k in keys])
        if not rec.host_network:
            node = state.nodes.get(rec.node)
            if node and netns.netns_exists(node.netns):
                runtime = Runtime(node.netns, self._cni_dirs(state, node))
                try:
                    runtime.delete(self.conflist(state, node), self._pod_ref(rec), rec.cni_result or None)
                except CniError as e:
                    self.say(f"pod {rec.ref}: {e} (continuing)")
            # e.g. `lab exec` sessions, or children that left the group; never a component that was only
            # passing through the pod's netns (the proxy opens listeners there with setns)
            components_pids = {r.pid for k, r in state.processes.items() if not k.startswith("pod/")}
            stray = [p for p in netns.pids_in_netns([rec.netns]) if p not in components_pids]
            if stray:
                procs.kill_pids(stray)
            netns.delete_netns(rec.netns)
        shutil.rmtree(state.pod_dir(rec.namespace, rec.name), ignore_errors=True)
        for k in keys:
            state.processes.pop(k, None)
        self.say(f"pod {rec.ref} deleted")

    # ---- apply / delete ------------------------------------------------------------------------------------

    def apply(self, files: Sequence[str], timeout: float = 60.0) -> list[str]:
        require_root()
        changes = read_objects(files)
        deadline = time.monotonic() + timeout
        new_pods: list[PodRecord] = []
        new_nodes: list[NodeRecord] = []
        done: list[str] = []
        with updating(self.dir) as state:
            current = self._live_objects(state)
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
            self._write_live(state, merged)
        for node in new_nodes:
            self._add_node(node, deadline)
        if new_pods:
            with locked(self.dir):
                state = load(self.dir)
            self._start_pods(state, new_pods, deadline)
            self._wait_pods_ready(state, new_pods, deadline)
        self.wait_proxies_synced(max(deadline, time.monotonic() + 10.0), strict=False)
        return done

    def _add_node(self, node: NodeRecord, deadline: float) -> None:
        with locked(self.dir):
            state = load(self.dir)
        self._build_node(state, node)
        self._route_all(state)
        if state.components.get("ca"):
            tokens_file = self._ca_dir(state) / "node-tokens.yaml"
            with locked(self.dir):
                text = tokens_file.read_text() if tokens_file.exists() else ""
                write_atomic(tokens_file, text + f"{self._node_token(state, node)}: {node.name}\n", mode=0o600)
        self._start_node_components(state, [node], deadline)

    def delete(self, files: Sequence[str]) -> list[str]:
        require_root()
        gone = read_objects(files)
        done: list[str] = []
        with updating(self.dir) as state:
            current = self._live_objects(state)
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
                self._stop_pod(state, rec)
                del state.pods[rec.ref]
            self._write_live(state, remaining)
            done = [f"{o.ref} deleted" for o in gone if object_key(o) in keys]
            for ref in missing:
                done.append(f"{ref} not found")
        self.wait_proxies_synced(time.monotonic() + 10.0, strict=False)
        return done

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
            argv = old.argv[4:] if old else []  # drop the `ip netns exec NS` prefix
            self._spawn(state, key, argv, fabric_netns(self.name))
            ready = functools.partial(netns.tcp_open, fabric_netns(self.name), FABRIC_GATEWAY, CA_PORT)
            self._wait_all(state, [(key, ready, f"CA listening on {state.ca_address}")], deadline)
        else:
            assert node is not None
            self._start_node_components(state, [state.nodes[node]], deadline, only=component)
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
                served.update(self._served_uids(n))
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
            "fabric": {"netns": fabric_netns(self.name), "bridge": FABRIC_BRIDGE, "subnet": str(FABRIC_SUBNET)},
            "ca": (proc("ca") or {}) | ({"address": state.ca_address} if state.ca_address else {}),
            "nodes": nodes,
            "pods": pods,
        }

    @staticmethod
    def _served_uids(node: NodeRecord) -> set[str]:
        """Pods the node's proxy says it serves (admin /config_dump), empty if it cannot be asked."""
        try:
            status, body = netns.http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=2.0)
            dump = json.loads(body) if status == 200 else {}
        except (OSError, ValueError):
            return set()
        served = dump.get("served_workloads") if isinstance(dump, dict) else None
        return {str(w.get("uid")) for w in served or [] if isinstance(w, dict)}

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


LAB_DIR_ENTRIES = frozenset({"state.json", "lock", "cluster.yaml", "logs", "nodes", "pods", "ca", "cni-bin"})


def _check_lab_dir(path: Path) -> None:
    """Refuse to take over (or remove) a directory that holds anything but a lab's own files."""
    if not path.is_dir():
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in LAB_DIR_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise LabError(
            f"{path} holds files that are not a lab's ({', '.join(foreign[:5])}); give --state-dir a new directory"
        )


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _probe_port(port: Any, c: Any) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return c.ports[0] if c.ports else None


def _http_ok(ns: str, host: str, port: int, path: str) -> bool:
    try:
        status, _ = netns.http_get(ns, host, port, path, timeout=1.0)
    except OSError:
        return False
    return 200 <= status < 400


def _unix_connectable(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
