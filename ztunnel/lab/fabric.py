"""The lab's network between nodes (DESIGN §5): a fabric netns with bridge `br0`, each node a netns whose `eth0`
is a veth on that bridge, and routes from every node to the other nodes' pod CIDRs.

Pod networking inside a node is the CNI plugins' job (`lab/pods.py`); this module only joins the nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ztunnel.lab import netns
from ztunnel.lab.model import FABRIC_GATEWAY, FABRIC_SUBNET, NodeRecord, fabric_netns

FABRIC_BRIDGE = "br0"


def build_fabric(lab: str, say: Callable[[str], None]) -> None:
    """The fabric netns and its bridge, where the nodes (and the CA, at the gateway address) meet."""
    fab = fabric_netns(lab)
    netns.add_netns(fab)
    netns.ip(fab, "link", "add", FABRIC_BRIDGE, "type", "bridge")
    netns.ip(fab, "addr", "add", f"{FABRIC_GATEWAY}/{FABRIC_SUBNET.prefixlen}", "dev", FABRIC_BRIDGE)
    netns.ip(fab, "link", "set", FABRIC_BRIDGE, "up")
    say(f"fabric {fab}: bridge {FABRIC_BRIDGE} on {FABRIC_SUBNET}")


def join_node(lab: str, node: NodeRecord) -> None:
    """The node's netns, its `eth0` on the fabric bridge with the node's address, forwarding on."""
    fab = fabric_netns(lab)
    netns.add_netns(node.netns)
    netns.ip(fab, "link", "add", node.fabric_link, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
    netns.ip(fab, "link", "set", node.fabric_link, "master", FABRIC_BRIDGE, "up")
    netns.ip(node.netns, "addr", "add", f"{node.address}/{FABRIC_SUBNET.prefixlen}", "dev", "eth0")
    netns.ip(node.netns, "link", "set", "eth0", "up")
    netns.set_sysctl(node.netns, "net.ipv4.ip_forward", "1")


def route_all(lab: str, nodes: Iterable[NodeRecord]) -> None:
    """Each node reaches every other node's pod CIDR through that node's fabric address, and so does the fabric:
    pods reach the cluster's services there (the CA, as a waypoint pod asks it for its SVID like pods reach
    istiod), and the answers find their way back."""
    nodes = list(nodes)
    fab = fabric_netns(lab)
    for node in nodes:
        netns.ip(fab, "route", "replace", node.pod_cidr, "via", node.address, "dev", FABRIC_BRIDGE)
        for other in nodes:
            if other.name != node.name:
                netns.ip(node.netns, "route", "replace", other.pod_cidr, "via", other.address, "dev", "eth0")
