"""The lab's mesh components as processes: the CA in the fabric netns, a node agent and a proxy in each node's.

Their command lines come from the CLI's own flags (`components.Capabilities`); each is started in its netns,
recorded in the state file, and waited for with a readiness check that fails fast if the process exits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ztunnel.config.loader import ConfigError, build_config
from ztunnel.config.model import POLICY_KINDS
from ztunnel.lab import cgroups, components, netns, probes, procs, waypoints
from ztunnel.lab.model import CA_PORT, FABRIC_GATEWAY, LabError, NodeRecord, ProcessRecord, fabric_netns
from ztunnel.lab.state import LabState, live_objects, load, locked, updating, write_atomic
from ztunnel.ports import ADMIN_PORT, METRICS_PORT, READINESS_PORT

Progress = Callable[[str], None]
Waiter = tuple[str, Callable[[], bool], str]  # (process key, readiness check, what it means when ready)
MESH_COMPONENTS = ("ca", "node-agent", "proxy", "cni-plugin")


def ca_dir(state: LabState) -> Path:
    return state.path / "ca"


def served_uids(node: NodeRecord) -> set[str]:
    """Pods the node's proxy says it serves (admin /config_dump), empty if it cannot be asked."""
    try:
        status, body = netns.http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=2.0)
        dump = json.loads(body) if status == 200 else {}
    except (OSError, ValueError):
        return set()
    served = dump.get("served_workloads") if isinstance(dump, dict) else None
    return {str(w.get("uid")) for w in served or [] if isinstance(w, dict)}


def _running(state: LabState, key: str) -> bool:
    rec = state.processes.get(key)
    return rec is not None and procs.is_running(rec)


def dns_enabled(state: LabState, caps: components.Capabilities) -> bool:
    """Pods' DNS through the node proxy: the agent's capture and the proxy's listener, both or neither (capture
    alone would send pods' queries to a port nobody listens on)."""
    running = bool(state.components.get("node-agent") and state.components.get("proxy"))
    return running and caps.has("node-agent", "--dns-capture") and caps.has("proxy", "--dns", "--dns-upstream")


class Mesh:
    """Starts, restarts and waits for one lab's CA, node agents and proxies."""

    def __init__(self, name: str, dir: Path, say: Progress, cli: Mapping[str, argparse.ArgumentParser] | None):
        self.name = name
        self.dir = dir
        self.say = say
        self.cli = cli  # the CLI's subcommand table: which components and flags exist

    def capabilities(self) -> components.Capabilities:
        return components.inspect(self.cli)

    # ---- the CA ---------------------------------------------------------------------------------------------

    def spawn_ca(self, state: LabState) -> Waiter:
        ca = ca_dir(state)
        init = netns.run(components.ztunnel_argv("ca", "init", "--dir", str(ca)), check=False)
        if init.returncode != 0:
            raise LabError(f"`ztunnel ca init` failed: {(init.stderr or init.stdout).strip()}")
        tokens = {}
        for node in state.nodes.values():
            tokens[self.node_token(state, node)] = node.name
        tokens_file = ca / "node-tokens.yaml"
        write_atomic(tokens_file, "".join(f"{t}: {n}\n" for t, n in tokens.items()), mode=0o600)
        state.ca_address = f"{FABRIC_GATEWAY}:{CA_PORT}"
        with updating(self.dir) as st:
            st.ca_address = state.ca_address
        argv = components.ztunnel_argv(
            "ca",
            "serve",
            "--dir",
            str(ca),
            "-f",
            str(state.live_config),
            "--listen",
            state.ca_address,
            "--node-tokens",
            str(tokens_file),
        )
        procs.spawn_recorded(self.dir, state, "ca", argv, fabric_netns(self.name))
        fab = fabric_netns(self.name)
        return ("ca", lambda: netns.tcp_open(fab, FABRIC_GATEWAY, CA_PORT), f"CA listening on {state.ca_address}")

    def restart_ca(self, state: LabState, old: ProcessRecord | None, deadline: float) -> None:
        argv = old.argv[4:] if old else []  # drop the `ip netns exec NS` prefix
        procs.spawn_recorded(self.dir, state, "ca", argv, fabric_netns(self.name))
        ready = functools.partial(netns.tcp_open, fabric_netns(self.name), FABRIC_GATEWAY, CA_PORT)
        self.wait_all(state, [("ca", ready, f"CA listening on {state.ca_address}")], deadline)

    def node_token(self, state: LabState, node: NodeRecord) -> str:
        """The node's credential for the CA (local mode: a token file only that node's components read)."""
        path = state.node_dir(node.name) / "token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, token + "\n", mode=0o600)
        return token

    def admit_node(self, state: LabState, node: NodeRecord) -> None:
        """A node added to a running lab: its token goes into the CA's token file (the CA rereads it)."""
        if not state.components.get("ca"):
            return
        tokens_file = ca_dir(state) / "node-tokens.yaml"
        with locked(self.dir):
            text = tokens_file.read_text() if tokens_file.exists() else ""
            write_atomic(tokens_file, text + f"{self.node_token(state, node)}: {node.name}\n", mode=0o600)

    @staticmethod
    def _ca_root(state: LabState) -> Path:
        ca = ca_dir(state)
        for name in ("root-cert.pem", "root.pem", "ca-root.pem", "bundle.pem"):
            if (ca / name).exists():
                return ca / name
        return ca / "root-cert.pem"

    # ---- node agents and proxies ------------------------------------------------------------------------------

    @staticmethod
    def _agent_argv(state: LabState, node: NodeRecord, caps: components.Capabilities) -> list[str]:
        cni_sock, inpod_sock = state.agent_sockets(node.name)
        args = ["node-agent", "--node", node.name]
        for flags, value in (
            (("-f", "--file", "--config"), str(state.live_config)),
            (("--cni-socket",), str(cni_sock)),
            (("--inpod-socket", "--proxy-socket", "--ztunnel-socket"), str(inpod_sock)),
            (("--redirect", "--redirect-mode"), state.redirect),
            (("--state-dir",), str(state.node_dir(node.name) / "agent")),
            (("--bpffs-dir",), str(netns.lab_bpffs(state.path) / node.name)),
        ):
            flag = caps.flag("node-agent", *flags)
            if flag:
                args += [flag, value]
        if dns_enabled(state, caps):
            args.append("--dns-capture")
        return components.ztunnel_argv(*args)

    def _ca_args(self, state: LabState, node: str) -> list[str]:
        """How a component on NODE gets its certificates: the lab's CA with the node's token, or in-process."""
        if state.components.get("ca") and state.ca_address:
            return [
                "--ca",
                state.ca_address,
                "--ca-root",
                str(self._ca_root(state)),
                "--token-file",
                str(state.node_dir(node) / "token"),
            ]
        return ["--ca-dir", str(ca_dir(state))]

    def _proxy_argv(self, state: LabState, node: NodeRecord) -> list[str]:
        _cni_sock, inpod_sock = state.agent_sockets(node.name)
        args = ["proxy", "--node", node.name, "-f", str(state.live_config), "--inpod-socket", str(inpod_sock)]
        args += self._ca_args(state, node.name)
        # metrics on every address of the node, as the DaemonSet's proxy has them on its node IP: a Prometheus
        # (`lab up --prometheus`, in the fabric) scrapes <node address>:15020, and 127.0.0.1 still answers
        args += ["--metrics-addr", f"0.0.0.0:{METRICS_PORT}"]
        if dns_enabled(state, self.capabilities()):
            # names outside the model go to the fabric gateway, where nothing answers port 53: a quick SERVFAIL
            # (the lab has no resolver reachable from the fabric; the machine's may be on its loopback)
            args += ["--dns", "--dns-upstream", f"{FABRIC_GATEWAY}:53"]
        return components.ztunnel_argv(*args)

    def waypoint_argv_for(self, state: LabState) -> waypoints.ArgvFor | str:
        """The command of a waypoint pod (`waypoints.pod_body`): its SVID comes from the lab's CA like the pods'
        on its node (the node's token; the CA signs identities of pods placed on that node). Or why the lab
        deploys no waypoints: it runs no proxies (nothing would send traffic to one), or no `ztunnel waypoint`."""
        if not state.components.get("proxy"):
            return "this lab runs no node proxies (nothing would send traffic to a waypoint)"
        caps = self.capabilities()
        if not caps.has("waypoint", "--readiness-addr", "--metrics-addr", "--admin-addr"):
            return caps.problem or "`ztunnel waypoint` here lacks --readiness-addr, --metrics-addr or --admin-addr"

        def argv(namespace: str, gateway: str, node: str) -> list[str]:
            args = [*waypoints.waypoint_args(namespace, gateway), "-f", str(state.live_config)]
            return components.ztunnel_argv(*args, *self._ca_args(state, node))

        return argv

    def spawn_agents(self, state: LabState, nodes: Sequence[NodeRecord]) -> list[Waiter]:
        if not state.components.get("node-agent"):
            return []
        caps = self.capabilities()
        waiters: list[Waiter] = []
        for node in nodes:
            cni_sock, _ = state.agent_sockets(node.name)
            with contextlib.suppress(FileNotFoundError):
                cni_sock.unlink()
            key = f"node/{node.name}/node-agent"
            procs.spawn_recorded(self.dir, state, key, self._agent_argv(state, node, caps), node.netns)
            ready = functools.partial(probes.unix_connectable, cni_sock)
            waiters.append((key, ready, f"node agent on {node.name} serving {cni_sock}"))
        return waiters

    def spawn_proxies(self, state: LabState, nodes: Sequence[NodeRecord]) -> list[Waiter]:
        if not state.components.get("proxy"):
            return []
        if not state.components.get("ca") and not ca_dir(state).exists():
            init = netns.run(components.ztunnel_argv("ca", "init", "--dir", str(ca_dir(state))), check=False)
            if init.returncode != 0:
                raise LabError(f"`ztunnel ca init` failed: {(init.stderr or init.stdout).strip()}")
        waiters: list[Waiter] = []
        for node in nodes:
            key = f"node/{node.name}/proxy"
            cgroup = cgroups.proxy_cgroup(self.name, node.name)  # iptables mode trusts the mark only from there
            join = cgroups.joiner(cgroup) if cgroup is not None else None
            procs.spawn_recorded(self.dir, state, key, self._proxy_argv(state, node), node.netns, preexec=join)
            ready = functools.partial(probes.http_ok, node.netns, "127.0.0.1", READINESS_PORT, "/healthz/ready")
            waiters.append((key, ready, f"proxy on {node.name} ready (127.0.0.1:{READINESS_PORT} in {node.netns})"))
        return waiters

    def start_node_components(
        self, state: LabState, nodes: Sequence[NodeRecord], deadline: float, only: str | None = None
    ) -> None:
        """Agents first (proxies connect to them), each phase started on all nodes at once and then awaited."""
        if only in (None, "node-agent"):
            self.wait_all(state, self.spawn_agents(state, nodes), deadline)
        if only in (None, "proxy"):
            self.wait_all(state, self.spawn_proxies(state, nodes), deadline)

    # ---- readiness ----------------------------------------------------------------------------------------------

    def wait_all(self, state: LabState, waiters: Sequence[Waiter], deadline: float) -> None:
        """Poll every waiter's readiness check until all pass; fail fast if one of the processes exits."""
        pending = list(waiters)

        def check() -> bool:
            for w in list(pending):
                key, ready, what = w
                rec = state.processes[key]
                if not procs.is_running(rec):
                    raise LabError(f"{key} exited before it was ready; see {rec.log}:\n{procs.log_tail(rec.log)}")
                if ready():
                    pending.remove(w)
                    self.say(f"{key} (pid {rec.pid}) ready: {what}")
            return not pending

        if not procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            key, _, what = pending[0]
            log = state.processes[key].log
            raise LabError(f"timed out waiting for {what}; see {log}:\n{procs.log_tail(log)}")

    def wait_proxies_synced(self, deadline: float, strict: bool = True) -> bool:
        """Wait until every running proxy's config dump shows the live config's pods (with IPs) and policies.

        The proxies poll the live config file; returning before they have read it would let a test race them.
        """
        with locked(self.dir):
            state = load(self.dir)
            objects = live_objects(state)
        want_pods = {f"{p.namespace}/{p.name}": (sorted(p.ips), p.ready or not p.ips) for p in state.pods.values()}
        want_policies = {o.ref for o in objects if o.kind in POLICY_KINDS}
        proxies = [
            (f"proxy on {n.name}", n.netns) for n in state.nodes.values() if _running(state, f"node/{n.name}/proxy")
        ]
        # the waypoints the lab deployed decide HTTP requests by the same policies: they must have them too
        deployed = {f"{o.namespace}/{o.name}" for o in objects if waypoints.owner(o)}
        waypoint_pods = [
            (f"waypoint {ref}", state.pods[ref].netns)
            for ref in sorted(deployed)
            if ref in state.pods
            and _running(state, f"pod/{ref}/{waypoints.CONTAINER}")
        ]
        pending = proxies + waypoint_pods
        endpoints: dict[str, list[str]] | None = None
        if waypoint_pods:
            with contextlib.suppress(ConfigError):  # a bad file: the waypoints keep their config, policies decide
                cfg = build_config(objects)
                endpoints = {s.ref: sorted(w.ref for w in cfg.endpoints(s)) for s in cfg.services}

        def synced(ns: str, waypoint: bool) -> bool:
            try:
                status, body = netns.http_get(ns, "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=2.0)
                dump = json.loads(body)
            except (OSError, ValueError):
                return False
            if status != 200 or not isinstance(dump, dict):
                return False
            if not waypoint:  # a waypoint's dump lists Services and their endpoints, not workloads
                have = {
                    w.get("name"): (sorted(w.get("ips") or []), w.get("ready", True))
                    for w in dump.get("workloads") or []
                }
                if have.keys() != want_pods.keys() or any(have[ref] != ips for ref, ips in want_pods.items()):
                    return False  # also a pod gone (a deleted waypoint: its Services' traffic must stop going there)
            if waypoint and endpoints is not None:  # the Services' endpoints it picks from: the pods with an IP
                have_endpoints = {x.get("name"): sorted(x.get("endpoints") or []) for x in dump.get("services") or []}
                if have_endpoints != endpoints:
                    return False
            known = set(dump.get("policies") or [])
            errors = json.dumps(dump.get("policy_errors") or [])
            return all(ref in known or ref in errors for ref in want_policies)

        def check() -> bool:
            pending[:] = [(n, ns) for n, ns in pending if not synced(ns, n.startswith("waypoint "))]
            return not pending

        if procs.poll_until(check, max(0.0, deadline - time.monotonic())):
            if proxies:
                self.say(f"{len(proxies)} proxy(ies) and {len(waypoint_pods)} waypoint(s) have the live config")
            return True
        late = ", ".join(n for n, _ in pending)
        if strict:
            raise LabError(f"{late}: did not load the live config in time; see the logs in {state.logs}")
        self.say(f"warning: {late}: not loaded the change yet")
        return False
