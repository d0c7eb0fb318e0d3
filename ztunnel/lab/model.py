"""What a lab is made of, computed from Kubernetes objects without touching the machine.

Planning is pure so it can be tested without root: node indexes and addresses, pod CIDRs, namespace names,
the pods' processes, and the live config (the user's objects with the status a cluster would fill in).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from ztunnel.config.loader import ConfigError, build_config
from ztunnel.config.model import GATEWAY_NAME_LABEL, WAYPOINT_GATEWAY_CLASS, KubeObject
from ztunnel.errors import ZtunnelError

NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
NETNS_PREFIX = "ztl-"
FABRIC_SUBNET = ipaddress.ip_network("172.30.0.0/24")  # only ever exists inside the lab's own namespaces
FABRIC_GATEWAY = "172.30.0.1"  # the fabric netns' address on its bridge: cluster services (the CA) live here
CA_PORT = 15012
POD_CIDR_TEMPLATE = "10.244.{index}.0/24"
MAX_NODES = 200
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")  # Kubernetes' default service range
SERVICE_DYNAMIC_START = ipaddress.ip_address("10.96.1.1")  # below: the static band, where users pick addresses


class LabError(ZtunnelError):
    """Something the user asked of the lab that cannot be done; the message says what to do instead."""


def check_lab_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LabError(f"lab name {name!r}: use 1 to 12 lowercase letters or digits (it prefixes netns names)")
    return name


def netns_prefix(lab: str) -> str:
    """Every namespace of lab LAB starts with this; names carry no '-' so one lab's prefix never matches another's."""
    return f"{NETNS_PREFIX}{lab}-"


def fabric_netns(lab: str) -> str:
    return f"{netns_prefix(lab)}fabric"


def node_netns(lab: str, node: str) -> str:
    return f"{netns_prefix(lab)}node-{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{netns_prefix(lab)}pod-{namespace}-{pod}"


def object_key(obj: KubeObject) -> tuple[str, str, str]:
    return (obj.kind, obj.namespace, obj.name)


# ---- records kept in the lab's state file ---------------------------------------------------------------


@dataclass
class NodeRecord:
    name: str
    index: int
    netns: str
    address: str  # on the fabric subnet
    pod_cidr: str
    fabric_link: str  # the veth end in the fabric netns (the node's end is eth0)

    @property
    def gateway(self) -> str:
        """The node's own address on its pod bridge (cni0), which the bridge plugin assigns."""
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))


@dataclass
class ContainerSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    ports: list[int] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)  # readinessProbe as written (tcpSocket/httpGet)


@dataclass
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str
    netns: str
    host_network: bool = False
    container_id: str = ""
    ips: list[str] = field(default_factory=list)
    cni_result: dict[str, Any] = field(default_factory=dict)
    containers: list[ContainerSpec] = field(default_factory=list)
    # the kubelet's Ready condition, tracked for waypoint pods: the node proxies send a Service's traffic to one
    # only once its probe passed (it listens). Other pods are Ready with their IP, as the lab always had them: a
    # waypoint's config dump shows which endpoints it has, not whether it has them ready, so the lab could not
    # wait for a waypoint to see an app pod turn Ready.
    ready: bool = True

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PodRecord:
        d = dict(data)
        d["containers"] = [ContainerSpec(**c) for c in d.get("containers", [])]
        return cls(**d)


@dataclass
class ProcessRecord:
    key: str  # "ca", "node/N/proxy", "node/N/node-agent", "pod/NS/NAME/CONTAINER"
    pid: int
    start_time: int  # /proc/PID/stat field 22, so a recycled pid is never mistaken for ours
    argv: list[str]
    netns: str
    log: str


def to_json(obj: Any) -> Any:
    return asdict(obj)


# ---- planning -------------------------------------------------------------------------------------------


def node_address(index: int) -> str:
    return str(FABRIC_SUBNET.network_address + 10 + index)


def plan_node(lab: str, name: str, index: int, pod_cidr: str | None = None) -> NodeRecord:
    if not 1 <= index <= MAX_NODES:
        raise LabError(f"a lab holds at most {MAX_NODES} nodes")
    return NodeRecord(
        name=name,
        index=index,
        netns=node_netns(lab, name),
        address=node_address(index),
        pod_cidr=pod_cidr or POD_CIDR_TEMPLATE.format(index=index),
        fabric_link=f"vn{index}",
    )


def _node_pod_cidr(obj: KubeObject) -> str | None:
    cidr = obj.spec.get("podCIDR")
    if not cidr:
        return None
    try:
        net = ipaddress.ip_network(str(cidr))
    except ValueError as e:
        raise ConfigError(f"{cidr!r} is not a CIDR", source=obj.source, obj=obj.ref, field="spec.podCIDR") from e
    if net.version != 4 or net.prefixlen > 28:
        raise ConfigError("use an IPv4 CIDR of /28 or larger", source=obj.source, obj=obj.ref, field="spec.podCIDR")
    return str(net)


def plan_nodes(lab: str, objects: Sequence[KubeObject], existing: Mapping[str, NodeRecord]) -> dict[str, NodeRecord]:
    """Nodes the objects need: Node objects first, then every pod's spec.nodeName; existing ones keep their index."""
    nodes = dict(existing)
    wanted: list[tuple[str, str | None]] = []
    for o in objects:
        if o.kind == "Node":
            wanted.append((o.name, _node_pod_cidr(o)))
    for o in objects:
        if o.kind == "Pod" and o.spec.get("nodeName"):
            wanted.append((str(o.spec["nodeName"]), None))
    next_index = max((n.index for n in nodes.values()), default=0) + 1
    used = [ipaddress.ip_network(n.pod_cidr) for n in nodes.values()]
    chosen = [(name, ipaddress.ip_network(c)) for name, c in wanted if c and name not in nodes]
    for i, (name, net) in enumerate(chosen):
        for other, other_net in [*((n.name, ipaddress.ip_network(n.pod_cidr)) for n in nodes.values()), *chosen[:i]]:
            if net.overlaps(other_net):
                raise LabError(f"nodes {other} and {name} have overlapping pod CIDRs ({other_net}, {net})")
    used += [net for _, net in chosen]
    for name, cidr in wanted:
        if name in nodes:
            continue
        if not re.match(r"^[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?$", name):
            raise LabError(f"node name {name!r}: use lowercase letters, digits, '-' and '.', at most 42 characters")
        if cidr is None:  # the first free 10.244.K.0/24, so defaults never collide with CIDRs the user chose
            k = next_index
            while any(ipaddress.ip_network(POD_CIDR_TEMPLATE.format(index=k)).overlaps(u) for u in used):
                k += 1
                if k > 255:
                    raise LabError(f"node {name}: no free 10.244.K.0/24 left; give it spec.podCIDR")
            cidr = POD_CIDR_TEMPLATE.format(index=k)
            used.append(ipaddress.ip_network(cidr))
        nodes[name] = plan_node(lab, name, next_index, cidr)
        next_index += 1
    cidrs: dict[str, str] = {}
    for n in nodes.values():
        net = ipaddress.ip_network(n.pod_cidr)
        for other, other_cidr in cidrs.items():
            if net.overlaps(ipaddress.ip_network(other_cidr)):
                raise LabError(f"nodes {other} and {n.name} have overlapping pod CIDRs ({other_cidr}, {n.pod_cidr})")
        cidrs[n.name] = n.pod_cidr
    return nodes


def schedule(pod: KubeObject, nodes: Mapping[str, NodeRecord], pods: Iterable[PodRecord]) -> str:
    """The node a pod runs on: its spec.nodeName, or the node with the fewest pods (like a scheduler)."""
    name = pod.spec.get("nodeName")
    if name:
        return str(name)
    if not nodes:
        raise LabError(
            f"{pod.source}: {pod.ref}: no node to run it on; set spec.nodeName or add a Node object to the lab"
        )
    load = {n: 0 for n in nodes}
    for p in pods:
        if p.node in load:
            load[p.node] += 1
    return min(nodes.values(), key=lambda n: (load[n.name], n.index)).name


def _container_specs(pod: KubeObject) -> list[ContainerSpec]:
    out = []
    for i, c in enumerate(pod.spec.get("containers") or []):
        where = f"spec.containers[{i}]"
        if not isinstance(c, Mapping):
            raise ConfigError("must be a mapping", source=pod.source, obj=pod.ref, field=where)
        command = c.get("command") or []
        args = c.get("args") or []
        if not isinstance(command, list) or not isinstance(args, list):
            raise ConfigError("command and args must be lists of strings", source=pod.source, obj=pod.ref, field=where)
        env = {}
        for e in c.get("env") or []:
            if isinstance(e, Mapping) and e.get("name"):
                env[str(e["name"])] = str(e.get("value", ""))
        ports = [
            int(p["containerPort"])
            for p in c.get("ports") or []
            if isinstance(p, Mapping) and str(p.get("protocol", "TCP")) == "TCP" and p.get("containerPort")
        ]
        probe = c.get("readinessProbe") or {}
        out.append(
            ContainerSpec(
                name=str(c.get("name") or f"c{i}"),
                argv=[str(x) for x in [*command, *args]] if command else [],
                env=env,
                working_dir=str(c.get("workingDir") or ""),
                ports=ports,
                probe=dict(probe) if isinstance(probe, Mapping) else {},
            )
        )
    return out


def plan_pod(lab: str, pod: KubeObject, node: str) -> PodRecord:
    meta = pod.body.get("metadata") or {}
    host_network = bool(pod.spec.get("hostNetwork", False))
    return PodRecord(
        namespace=pod.namespace,
        name=pod.name,
        uid=str(meta.get("uid") or uuid.uuid4()),
        node=node,
        netns=node_netns(lab, node) if host_network else pod_netns(lab, pod.namespace, pod.name),
        host_network=host_network,
        container_id=uuid.uuid4().hex,
        containers=_container_specs(pod),
        ready=GATEWAY_NAME_LABEL not in pod.labels,
    )


def validate(objects: Sequence[KubeObject]) -> None:
    """Build the mesh's own snapshot once so a bad object is reported before anything is created."""
    build_config(objects)


# ---- the live config ------------------------------------------------------------------------------------


def live_body(obj: KubeObject, nodes: Mapping[str, NodeRecord], pods: Mapping[str, PodRecord]) -> dict[str, Any]:
    """The object as a running cluster would show it: pods with uid, node and IPs; nodes with addresses."""
    body: dict[str, Any] = copy.deepcopy(dict(obj.body))
    if obj.kind == "Pod":
        rec = pods.get(f"{obj.namespace}/{obj.name}")
        if rec is None:
            return body
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", obj.namespace)
        meta["uid"] = rec.uid
        spec = body.setdefault("spec", {})
        spec["nodeName"] = rec.node
        status = body.setdefault("status", {})
        node = nodes.get(rec.node)
        if node:
            status["hostIP"] = node.address
        if rec.ips:
            status["podIP"] = rec.ips[0]
            status["podIPs"] = [{"ip": ip} for ip in rec.ips]
            status["phase"] = "Running"
            status["conditions"] = [{"type": "Ready", "status": "True" if rec.ready else "False"}]
        else:
            status.pop("podIP", None)
            status.pop("podIPs", None)
            status.pop("conditions", None)
            status["phase"] = "Pending"
    elif obj.kind == "Node":
        node = nodes.get(obj.name)
        if node:
            body.setdefault("spec", {})["podCIDR"] = node.pod_cidr
            body.setdefault("status", {})["addresses"] = [
                {"type": "InternalIP", "address": node.address},
                {"type": "Hostname", "address": node.name},
            ]
    return body


def node_body(node: NodeRecord) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name},
        "spec": {"podCIDR": node.pod_cidr},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node.address}, {"type": "Hostname", "address": node.name}]
        },
    }


def _wants_cluster_ip(body: Mapping[str, Any]) -> bool:
    spec = body.get("spec") or {}
    return isinstance(spec, Mapping) and not spec.get("clusterIP") and spec.get("type") != "ExternalName"


def allocate_cluster_ips(bodies: Sequence[dict[str, Any]]) -> None:
    """Give each Service without spec.clusterIP one, as the API server does (headless `None` and ExternalName
    excepted): the first free address of the dynamic band 10.96.1.1 and up, so seed YAML without addresses
    gets a VIP the mesh and its DNS know; `merge_objects` keeps it when the Service is applied again."""
    services = [b for b in bodies if b.get("kind") == "Service"]
    used: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for b in services:
        spec = b.get("spec") or {}
        for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])] if isinstance(spec, Mapping) else []:
            with contextlib.suppress(ValueError):
                used.add(ipaddress.ip_address(str(ip)))
    candidate = SERVICE_DYNAMIC_START
    for b in services:
        if not _wants_cluster_ip(b):
            continue
        while candidate in used:
            candidate += 1
        if candidate not in SERVICE_CIDR:
            raise LabError(f"no free ClusterIP left in {SERVICE_CIDR}; set spec.clusterIP on the Services")
        used.add(candidate)
        b.setdefault("spec", {})["clusterIP"] = str(candidate)


def gateway_status(bodies: Sequence[dict[str, Any]]) -> None:
    """A waypoint Gateway's status as its controller reports it: the addresses of its pods (labelled with its
    name: the lab's or a hand-run one) and whether one of them is Ready (`Programmed`)."""
    owned: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for b in bodies:
        meta = b.get("metadata") or {}
        gateway = (meta.get("labels") or {}).get(GATEWAY_NAME_LABEL)
        if b.get("kind") == "Pod" and gateway:
            owned.setdefault((str(meta.get("namespace") or "default"), str(gateway)), []).append(b.get("status") or {})
    for b in bodies:
        meta = b.get("metadata") or {}
        if b.get("kind") != "Gateway" or (b.get("spec") or {}).get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
            continue
        pods = owned.get((str(meta.get("namespace") or "default"), str(meta.get("name"))), [])
        ips = [str(st["podIP"]) for st in pods if st.get("podIP")]
        conditions = [c for st in pods for c in st.get("conditions") or []]
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        b["status"] = {
            "addresses": [{"type": "IPAddress", "value": ip} for ip in ips],
            "conditions": [{"type": "Programmed", "status": "True" if ready else "False"}],
        }


def render_live(objects: Sequence[KubeObject], nodes: Mapping[str, NodeRecord], pods: Mapping[str, PodRecord]) -> str:
    """The live config file: the user's objects (status filled in), plus Node objects for implied nodes."""
    declared_nodes = {o.name for o in objects if o.kind == "Node"}
    bodies = [node_body(n) for n in sorted(nodes.values(), key=lambda n: n.index) if n.name not in declared_nodes]
    bodies += [live_body(o, nodes, pods) for o in objects]
    allocate_cluster_ips(bodies)
    gateway_status(bodies)
    header = "# Written by `ztunnel lab`: the lab's live cluster state. Change it with `ztunnel lab apply|delete`.\n"
    return header + yaml.safe_dump_all(bodies, sort_keys=False, default_flow_style=False)


def merge_objects(current: Sequence[KubeObject], changes: Sequence[KubeObject]) -> list[KubeObject]:
    """`kubectl apply` for a list: replace objects with the same kind/namespace/name, append new ones."""
    index = {object_key(o): i for i, o in enumerate(current)}
    out = list(current)
    for o in changes:
        k = object_key(o)
        if k in index:
            old = out[index[k]]
            if o.kind == "Service" and _wants_cluster_ip(o.body) and not _wants_cluster_ip(old.body):
                body = copy.deepcopy(dict(o.body))  # a Service keeps its ClusterIP (immutable in Kubernetes)
                body.setdefault("spec", {})["clusterIP"] = old.spec["clusterIP"]
                o = dataclasses.replace(o, body=body)
            out[index[k]] = o
        else:
            index[k] = len(out)
            out.append(o)
    return out


def remove_objects(current: Sequence[KubeObject], gone: Sequence[KubeObject]) -> list[KubeObject]:
    keys = {object_key(o) for o in gone}
    return [o for o in current if object_key(o) not in keys]


def ips_from_cni_result(result: Mapping[str, Any]) -> list[str]:
    """Addresses of the result's interface in the pod (CNI 1.0 `ips`, 0.3/0.4 too), IPv4 first."""
    ips = []
    for entry in result.get("ips") or []:
        addr = entry.get("address") if isinstance(entry, Mapping) else None
        if addr:
            ips.append(str(ipaddress.ip_interface(addr).ip))
    return sorted(ips, key=lambda a: ipaddress.ip_address(a).version)
