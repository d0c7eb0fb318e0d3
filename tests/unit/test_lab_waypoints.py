"""The lab deploys a waypoint pod per waypoint Gateway, as Istio's controller does (pure planning, no root)."""

from __future__ import annotations

import yaml

from tests.support.lab_waypoint import SHOP_WAYPOINT
from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import KubeObject
from ztunnel.lab import waypoints
from ztunnel.lab.model import merge_objects, plan_node, plan_pod, render_live

CLUSTER = SHOP_WAYPOINT + """---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec: {selector: {app: backend}, ports: [{port: 80}]}
"""

NODES = {"n1": plan_node("t", "n1", 1)}


def argv(ns: str, gw: str, node: str) -> list[str]:
    return ["ztunnel", "waypoint", "--name", gw, "--namespace", ns, "--node-token", node]


def _objects(text: str = CLUSTER) -> list[KubeObject]:
    return load_documents(text)


def test_a_waypoint_gateway_gets_a_pod_the_model_takes_as_its_waypoint() -> None:
    plan = waypoints.reconcile(_objects(), NODES, {}, argv)
    assert [o.name for o in plan.start] == ["wp-0"]  # the ingress Gateway (class istio) gets none
    pod = plan.start[0]
    assert pod.labels[waypoints.DATAPLANE_MODE_LABEL] == "none"  # the node agent leaves it alone
    assert pod.spec["containers"][0]["command"] == argv("shop", "wp", "n1")
    # with the IP the lab fills in, the model finds it as the waypoint's pod, with the Gateway's identity
    live = next(o for o in plan.objects if o.kind == "Pod")
    with_ip = dict(live.body) | {"status": {"podIP": "10.244.1.7"}}
    cfg = build_config([*(o for o in plan.objects if o.kind != "Pod"), *load_documents(yaml.safe_dump(with_ip))])
    wp = cfg.waypoints["shop/wp"]
    (endpoint,) = cfg.waypoint_endpoints(wp)
    assert endpoint.ips == ("10.244.1.7",) and endpoint.identity == "spiffe://cluster.local/ns/shop/sa/wp"
    assert not endpoint.enrolled


def test_unchanged_is_kept_changed_is_replaced_deleted_is_removed() -> None:
    first = waypoints.reconcile(_objects(), NODES, {}, argv)
    again = waypoints.reconcile(first.objects, NODES, {}, argv)
    assert again.start == [] and again.stop == []
    restarted = waypoints.reconcile(first.objects, NODES, {}, argv, restart=["shop/wp"])
    assert restarted.stop == ["shop/wp-0"] and [o.name for o in restarted.start] == ["wp-0"]
    changed = [o for o in first.objects if o.kind != "Gateway" or o.name != "wp"]
    changed += _objects(CLUSTER.split("---")[1].replace("istio-waypoint", "istio"))  # no longer a waypoint
    gone = waypoints.reconcile(changed, NODES, {}, argv)
    assert gone.stop == ["shop/wp-0"] and gone.start == []
    assert not [o for o in gone.objects if o.kind == "Pod"]


def test_no_mesh_no_waypoint_and_a_hand_run_waypoint_is_left_alone() -> None:
    no_mesh = waypoints.reconcile(_objects(), NODES, {}, "this lab runs no node proxies")
    assert no_mesh.start == [] and no_mesh.notes == ["waypoint shop/wp: not deployed: this lab runs no node proxies"]
    by_hand = CLUSTER + """
---
apiVersion: v1
kind: Pod
metadata: {name: mine, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: n1, serviceAccountName: wp}
"""
    plan = waypoints.reconcile(_objects(by_hand), NODES, {}, argv)
    assert plan.start == [] and "runs it" in plan.notes[0]


def test_services_without_a_cluster_ip_get_one_and_keep_it_when_applied_again() -> None:
    objects = _objects()
    live = load_documents(render_live(objects, NODES, {}))
    (svc,) = [o for o in live if o.kind == "Service"]
    assert svc.spec["clusterIP"] == "10.96.1.1"
    merged = merge_objects(live, [o for o in objects if o.kind == "Service"])  # the seed file applied again
    (svc,) = [o for o in merged if o.kind == "Service"]
    assert svc.spec["clusterIP"] == "10.96.1.1"


def test_a_waypoint_pod_is_routed_to_only_once_the_lab_marks_it_ready() -> None:
    plan = waypoints.reconcile(_objects(), NODES, {}, argv)
    rec = plan_pod("t", plan.start[0], "n1")
    rec.ips = ["10.244.1.7"]
    assert not rec.ready  # a new waypoint pod starts unready: its probe decides
    app = plan_pod("t", load_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\n")[0], "n1")
    assert app.ready  # other pods are ready with their IP, as the lab always had them

    def ready_waypoints() -> list[str]:
        cfg = build_config(load_documents(render_live(plan.objects, NODES, {rec.ref: rec})))
        return [w.ref for w in cfg.waypoint_endpoints(cfg.waypoints["shop/wp"]) if w.ready]

    assert ready_waypoints() == []
    rec.ready = True
    assert ready_waypoints() == ["shop/wp-0"]


def test_the_gateway_status_shows_its_waypoint_pods_address_once_ready() -> None:
    plan = waypoints.reconcile(_objects(), NODES, {}, argv)
    rec = plan_pod("t", plan.start[0], "n1")

    def status() -> dict[str, object]:
        live = load_documents(render_live(plan.objects, NODES, {rec.ref: rec}))
        return dict(next(o for o in live if o.kind == "Gateway" and o.name == "wp").body["status"])

    assert status() == {"addresses": [], "conditions": [{"type": "Programmed", "status": "False"}]}
    rec.ips, rec.ready = ["10.244.1.7"], True
    assert status() == {
        "addresses": [{"type": "IPAddress", "value": "10.244.1.7"}],
        "conditions": [{"type": "Programmed", "status": "True"}],
    }
    ingress = next(o for o in load_documents(render_live(plan.objects, NODES, {})) if o.name == "ingress")
    assert "status" not in ingress.body  # another class's Gateway is another controller's
