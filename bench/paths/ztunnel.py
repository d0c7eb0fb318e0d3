"""`ztunnel`: client pod -> node proxy of node 1 -> HBONE (HTTP/2 CONNECT in mTLS) -> node proxy of node 2 -> app;
and `ztunnel-same-node` (lab only), both pods on node1 behind its one proxy.

Local topology: this module starts the pair in local mode (SOCKS5 entry; iperf3, which cannot speak SOCKS,
goes through `loadgen.py forward`, a splice(2) forwarder). Lab topology: the lab's own proxies and in-pod
redirection.
"""

from __future__ import annotations

import subprocess

from bench.paths.base import PathContext, PathKind, PathSetup, probe_echo, probe_path, unavailable
from bench.processes import ProcessGroup, http_status, port_open, wait_until
from bench.settings import (
    CLIENT_POD,
    ECHO_PORT,
    FORWARDER,
    IPERF_PORT,
    LOADGEN,
    NODE_A,
    NODE_B,
    PY,
    SERVER_POD,
)
from bench.tools import ztunnel_command, ztunnel_help
from bench.topology.lab import LabTopology, netns_exec
from bench.topology.local import CLUSTER_YAML


def local_pair(group: ProcessGroup, workers: int = 1) -> PathSetup:
    """The proxy pair in local mode; `workers` > 1 runs both proxies with `--workers N` (the scaling figure)."""
    cmd = ztunnel_command()
    if cmd is None:
        return PathSetup("ztunnel", available=False, note="the ztunnel console script is not in the venv")
    help_text = ztunnel_help("proxy")
    if help_text is None:
        return PathSetup("ztunnel", available=False, note="`ztunnel proxy` is not available yet (the CLI lacks it)")
    missing = [f for f in ("--node", "--ca-dir", "--metrics-addr", "--readiness-addr") if f not in help_text]
    if workers > 1 and "--workers" not in help_text:
        missing.append("--workers")
    if missing:
        return PathSetup("ztunnel", available=False, note=f"`ztunnel proxy` lacks {', '.join(missing)}")
    cluster = group.workdir / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML)
    ca_dir = group.workdir / "ca"
    r = subprocess.run(
        [*cmd, "ca", "init", "--dir", str(ca_dir), "--force"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return PathSetup("ztunnel", available=False, note=f"`ztunnel ca init` failed: {r.stderr.strip()[-300:]}")
    path = PathSetup(
        "ztunnel",
        entry=f"SOCKS5 on the client pod ({CLIENT_POD}:15080), HBONE between the proxies",
        iperf_bind=SERVER_POD,
    )
    for node, addr in (("a", NODE_A), ("b", NODE_B)):
        argv = [*cmd, "--log-level", "warning", "proxy", "--node", node, "-f", str(cluster), "--ca-dir", str(ca_dir)]
        argv += ["--metrics-addr", f"{addr}:15020", "--readiness-addr", f"{addr}:15021"]
        if "--admin-addr" in help_text:
            argv += ["--admin-addr", f"{addr}:15000"]
        if "--access-log" in help_text:
            argv += ["--access-log", "off"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        path.proxies[node] = group.start(f"ztunnel-{node}" + (f"-w{workers}" if workers > 1 else ""), argv)
    for node, addr in (("a", NODE_A), ("b", NODE_B)):
        try:
            wait_until(
                lambda addr=addr: http_status(f"http://{addr}:15021/healthz/ready") == 200,  # type: ignore[misc]
                60,
                f"proxy {node} ready",
                path.proxies[node],
            )
        except RuntimeError as e:
            return PathSetup("ztunnel", available=False, note=str(e)[:500])
    socks = f"socks5://{CLIENT_POD}:15080/"
    path.echo_target = f"{socks}{SERVER_POD}:{ECHO_PORT}"
    fwd = group.start(
        "forwarder", [PY, LOADGEN, "forward", f"{FORWARDER}:{IPERF_PORT}", f"{socks}{SERVER_POD}:{IPERF_PORT}"]
    )
    path.helpers.append(fwd)  # stopped with the path, so a rebuilt path can bind the same address
    wait_until(lambda: port_open(FORWARDER, IPERF_PORT), 10, "the SOCKS forwarder", fwd)
    path.iperf_host, path.iperf_port = FORWARDER, IPERF_PORT
    path.note = "entry via SOCKS5 (local mode); iperf3 reaches it through a splice(2) forwarder"
    if not probe_echo(path.echo_target):
        return PathSetup("ztunnel", available=False, note="a test connection through the proxy pair failed")
    return path


def in_lab(lab: LabTopology, same_node: bool = False) -> PathSetup:
    """The mesh pods through in-pod redirection and the lab's node proxies (node1's at both ends with
    SAME_NODE); the proxies are the lab's, so a stalled pair is restarted through `ztunnel lab restart`."""
    name = "ztunnel-same-node" if same_node else "ztunnel"
    lab.refresh()
    client, server = lab.pair("bench", same_node)
    if not (client["enrolled"] and server["enrolled"]):
        return PathSetup(name, available=False, note="the lab did not enroll the bench pods (mesh off?)")
    nodes = ("node1",) if same_node else ("node1", "node2")
    for node in nodes:
        proxy = lab.node(node).get("proxy")
        if not proxy or not proxy.get("running"):
            return PathSetup(name, available=False, note=f"the lab runs no proxy on {node}")
        lab.proxy_pids[node] = int(proxy["pid"])
    ip = server["ips"][0]
    entry = (
        f"mesh pods on node1, in-pod {lab.redirect} redirection, node1's proxy on both ends"
        if same_node
        else f"mesh pods, in-pod {lab.redirect} redirection, HBONE between the node1 and node2 proxies"
    )
    path = PathSetup(
        name,
        echo_target=f"{ip}:{ECHO_PORT}",
        iperf_host=ip,
        iperf_port=IPERF_PORT,
        external_pid_source=lambda: {n: lab.proxy_pids[n] for n in nodes},
        entry=entry,
        client_prefix=netns_exec(client["netns"]),
        server_prefix=netns_exec(server["netns"]),
        iperf_bind=ip,
        restart_hook=lab.restart_proxies,
    )
    if not probe_path(path):
        return PathSetup(name, available=False, note="a test connection through the proxy pair failed")
    return path


def _build(ctx: PathContext) -> PathSetup:
    if isinstance(ctx.topology, LabTopology):
        return in_lab(ctx.topology)
    return local_pair(ctx.group)


def _build_same_node(ctx: PathContext) -> PathSetup:
    if not isinstance(ctx.topology, LabTopology):
        return unavailable("ztunnel-same-node", "needs the lab topology (nodes)")
    return in_lab(ctx.topology, same_node=True)


ZTUNNEL = PathKind("ztunnel", _build)
ZTUNNEL_SAME_NODE = PathKind("ztunnel-same-node", _build_same_node)
