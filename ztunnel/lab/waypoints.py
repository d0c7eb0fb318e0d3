"""Waypoints in the lab, deployed the way Istio's controller deploys them: a test (or a user) gets one by putting
a `gateway.networking.k8s.io/v1` Gateway with `gatewayClassName: istio-waypoint` in the cluster YAML (`lab up -f`,
`lab apply -f`); `lab delete` of the Gateway removes it.

For each such Gateway the lab adds a Pod to the live config, as the controller's Deployment would: named
`<gateway>-0` in the Gateway's namespace, labelled `gateway.networking.k8s.io/gateway-name: <gateway>`, service
account `<gateway>` (so the CA signs it `spiffe://<td>/ns/<ns>/sa/<gateway>` for the node it runs on, as for any
pod), `istio.io/dataplane-mode: none` (the node agent leaves it alone: a waypoint speaks HBONE itself), owned by
the Gateway (`metadata.ownerReferences`), and running `ztunnel waypoint --name <gateway> --namespace <ns>` with
readiness on `:15021/healthz/ready` (probed like any pod's), metrics on `:15020`, admin on `127.0.0.1:15000`. The
model finds it like any waypoint pod (the label and the identity) and the node proxies send the Service's traffic
to its pod IP.

A Gateway whose namespace already has a pod labelled with its name (a waypoint the user runs by hand) gets none.
Planning is pure: `reconcile` says which pods to add, replace and remove; `cluster` starts and stops them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.loader import to_kube_object
from ztunnel.config.model import GATEWAY_NAME_LABEL, WAYPOINT_GATEWAY_CLASS, KubeObject, Source
from ztunnel.lab.model import LabError, NodeRecord, PodRecord, schedule
from ztunnel.ports import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT

GATEWAY_GROUP = "gateway.networking.k8s.io"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
ISTIO_GATEWAY_NAME_LABEL = "istio.io/gateway-name"  # Istio puts both gateway-name labels on a waypoint's pods
WAYPOINT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"  # inside the pod's own netns: no other proxy there to collide with
CONTAINER = "istio-proxy"

# (namespace, gateway, node) -> the command that runs the waypoint (the lab's CLI, live config and CA flags)
ArgvFor = Callable[[str, str, str], list[str]]


def is_waypoint_gateway(obj: KubeObject) -> bool:
    return (
        obj.kind == "Gateway"
        and obj.api_version.partition("/")[0] == GATEWAY_GROUP
        and obj.spec.get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS
    )


def owner(obj: KubeObject) -> str | None:
    """`namespace/name` of the Gateway that owns a pod the lab deployed, or None for any other object."""
    if obj.kind != "Pod":
        return None
    refs = (obj.body.get("metadata") or {}).get("ownerReferences") or []
    for r in refs:
        if isinstance(r, Mapping) and r.get("kind") == "Gateway" and str(r.get("apiVersion", "")).startswith(
            GATEWAY_GROUP + "/"
        ):
            return f"{obj.namespace}/{r.get('name')}"
    return None


def pod_name(gateway: str) -> str:
    return f"{gateway}-0"


def pod_body(gateway: KubeObject, node: str, argv: Sequence[str]) -> dict[str, Any]:
    """The waypoint pod for GATEWAY on NODE, as the controller's Deployment would make it (status left to the lab)."""
    name = gateway.name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name),
            "namespace": gateway.namespace,
            "labels": {
                GATEWAY_NAME_LABEL: name,
                ISTIO_GATEWAY_NAME_LABEL: name,
                DATAPLANE_MODE_LABEL: "none",
            },
            "ownerReferences": [
                {"apiVersion": gateway.api_version, "kind": "Gateway", "name": name, "controller": True}
            ],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": name,
            "containers": [
                {
                    "name": CONTAINER,
                    "command": list(argv),
                    "ports": [
                        {"containerPort": HBONE_PORT, "name": "mesh", "protocol": "TCP"},
                        {"containerPort": READINESS_PORT, "name": "status-port", "protocol": "TCP"},
                        {"containerPort": METRICS_PORT, "name": "http-envoy-prom", "protocol": "TCP"},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": READINESS_PORT}},
                }
            ],
        },
    }


def waypoint_args(namespace: str, gateway: str) -> list[str]:
    """`ztunnel waypoint` flags the lab always passes (the CA and config flags come from the mesh)."""
    return [
        "waypoint",
        "--name",
        gateway,
        "--namespace",
        namespace,
        "--readiness-addr",
        f"0.0.0.0:{READINESS_PORT}",
        "--metrics-addr",
        f"0.0.0.0:{METRICS_PORT}",
        "--admin-addr",
        WAYPOINT_ADMIN,
    ]


def _spec_view(body: Mapping[str, Any]) -> Any:
    """What decides whether a deployed pod is still the one wanted: all of it but what the lab fills in."""
    b = copy.deepcopy(dict(body))
    b.pop("status", None)
    meta = b.get("metadata") or {}
    meta.pop("uid", None)
    return b


@dataclass
class Plan:
    objects: list[KubeObject]  # the live objects with the waypoint pods as wanted
    start: list[KubeObject] = field(default_factory=list)  # pods to create (after `stop` for a replaced one)
    stop: list[str] = field(default_factory=list)  # NAMESPACE/NAME of deployed pods to remove
    notes: list[str] = field(default_factory=list)  # what the user should know (a Gateway left to them)


def reconcile(
    objects: Sequence[KubeObject],
    nodes: Mapping[str, NodeRecord],
    pods: Mapping[str, PodRecord],
    argv_for: ArgvFor | str,
    restart: Collection[str] = (),
) -> Plan:
    """The waypoint pods OBJECTS' Gateways call for, against those already deployed (owned by a Gateway).

    `argv_for` a string: why the lab deploys no waypoint (no mesh), said once per Gateway. `restart`: Gateways
    (`ns/name`) whose pod is recreated even if unchanged (a re-applied Gateway whose waypoint is not running)."""
    deployed: dict[str, KubeObject] = {}
    others: list[KubeObject] = []
    for o in objects:
        gateway = owner(o)
        if gateway is None:
            others.append(o)
        else:
            deployed[gateway] = o
    plan = Plan(objects=list(others))
    by_hand = {
        (o.namespace, o.labels[GATEWAY_NAME_LABEL])
        for o in others
        if o.kind == "Pod" and o.labels.get(GATEWAY_NAME_LABEL)
    }
    taken = {(o.namespace, o.name) for o in others if o.kind == "Pod"}
    wanted: dict[str, KubeObject] = {}
    if isinstance(argv_for, str):
        gateways = [f"{o.namespace}/{o.name}" for o in others if is_waypoint_gateway(o)]
        plan.notes += [f"waypoint {ref}: not deployed: {argv_for}" for ref in gateways]
    else:
        load = list(pods.values())
        for gw in (o for o in others if is_waypoint_gateway(o)):
            ref = f"{gw.namespace}/{gw.name}"
            if (gw.namespace, gw.name) in by_hand:
                plan.notes.append(f"waypoint {ref}: pod labelled {GATEWAY_NAME_LABEL}={gw.name} runs it; none deployed")
                continue
            if (gw.namespace, pod_name(gw.name)) in taken:
                raise LabError(
                    f"{gw.source}: {gw.ref}: the lab deploys its waypoint as Pod {gw.namespace}/{pod_name(gw.name)}, "
                    "which is another pod's name; rename that pod or the Gateway"
                )
            old = deployed.get(ref)
            node = str(old.spec.get("nodeName")) if old is not None and old.spec.get("nodeName") else ""
            if node not in nodes:  # like a scheduler: the node with the fewest pods
                node = schedule(to_kube_object(pod_body(gw, "", []), gw.source), nodes, load)
            body = pod_body(gw, node, argv_for(gw.namespace, gw.name, node))
            wanted[ref] = to_kube_object(body, Source(f"waypoint for {gw.ref}", 0))
    for ref, old in deployed.items():
        new = wanted.get(ref)
        if new is None or _spec_view(new.body) != _spec_view(old.body) or ref in restart:
            plan.stop.append(f"{old.namespace}/{old.name}")
    for ref, new in wanted.items():
        old = deployed.get(ref)
        if old is not None and f"{old.namespace}/{old.name}" not in plan.stop:
            plan.objects.append(old)  # unchanged: keeps its live status (IPs)
        else:
            plan.objects.append(new)
            plan.start.append(new)
    return plan
