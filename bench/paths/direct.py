"""`direct`: plain TCP from the client to the app, the floor every other path is compared with; and
`direct-same-node`, the floor of the same-node paths (lab only)."""

from __future__ import annotations

from bench.paths.base import PathContext, PathKind, PathSetup, unavailable
from bench.settings import ECHO_PORT, HTTP_PORT, IPERF_PORT, SERVER_POD
from bench.topology.lab import LabTopology, netns_exec


def _local() -> PathSetup:
    return PathSetup(
        "direct",
        echo_target=f"{SERVER_POD}:{ECHO_PORT}",
        http_target=f"{SERVER_POD}:{HTTP_PORT}",  # the HTTP paths' floor
        iperf_host=SERVER_POD,
        iperf_port=IPERF_PORT,
        entry="plain TCP to the app",
        iperf_bind=SERVER_POD,
    )


def _in_lab(lab: LabTopology, same_node: bool) -> PathSetup:
    """Between the plain pods: node1 -> node2 over the lab fabric, or both on node1."""
    client, server = lab.pair("plain", same_node)
    ip = server["ips"][0]
    return PathSetup(
        "direct-same-node" if same_node else "direct",
        echo_target=f"{ip}:{ECHO_PORT}",
        iperf_host=ip,
        iperf_port=IPERF_PORT,
        entry="plain pods on node1" if same_node else "plain pods, node1 -> node2 over the lab fabric",
        client_prefix=netns_exec(client["netns"]),
        server_prefix=netns_exec(server["netns"]),
        iperf_bind=ip,
        http_target="" if same_node else f"{ip}:{HTTP_PORT}",  # the HTTP app runs in the plain server pod
    )


def _build(ctx: PathContext) -> PathSetup:
    return _in_lab(ctx.topology, False) if isinstance(ctx.topology, LabTopology) else _local()


def _build_same_node(ctx: PathContext) -> PathSetup:
    if not isinstance(ctx.topology, LabTopology):
        return unavailable("direct-same-node", "needs the lab topology (nodes)")
    return _in_lab(ctx.topology, True)


DIRECT = PathKind("direct", _build)
DIRECT_SAME_NODE = PathKind("direct-same-node", _build_same_node)
