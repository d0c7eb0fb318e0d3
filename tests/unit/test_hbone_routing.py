"""Outbound routing: mesh pods go through HBONE, services round-robin, the rest passes through."""

from __future__ import annotations

from ztunnel.config.loader import build_config, load_documents
from ztunnel.hbone.protocol import Authority
from ztunnel.proxy.routing import HboneRoute, OutboundRouter, PassthroughRoute, RefusedRoute

CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: b, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: c, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web}}
spec: {nodeName: c, serviceAccountName: web}
status: {podIP: 10.0.3.2, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {app: legacy, istio.io/dataplane-mode: none}}
spec: {nodeName: b}
status: {podIP: 10.0.2.9}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {networking.istio.io/subject-alt-names: "spiffe://cluster.local/ns/shop/sa/web-canary"}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: nothing}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: legacy}, ports: [{port: 80, targetPort: 9000}]}
"""


def config():  # type: ignore[no-untyped-def]
    return build_config(load_documents(CONFIG))


def test_mesh_pod_goes_through_hbone_to_its_pod_address() -> None:
    route = OutboundRouter().route(config(), "10.0.2.1", 8080)
    assert isinstance(route, HboneRoute)
    assert route.target == Authority("10.0.2.1", 8080)
    assert route.proxy_address == ("10.0.2.1", 15008)
    assert route.expected_identities == (
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web-canary",
    )


def test_service_round_robins_over_ready_endpoints_with_named_target_port() -> None:
    router, cfg = OutboundRouter(), config()
    targets = []
    for _ in range(4):
        route = router.route(cfg, "10.96.0.10", 80)
        assert isinstance(route, HboneRoute)
        assert route.service is not None and route.service.name == "web"
        targets.append(route.target)
    assert targets == [Authority("10.0.2.1", 8080), Authority("10.0.3.1", 8080)] * 2  # web-3 is not ready


def test_service_without_endpoints_or_port_is_refused() -> None:
    router, cfg = OutboundRouter(), config()
    assert isinstance(router.route(cfg, "10.96.0.11", 80), RefusedRoute)
    refused = router.route(cfg, "10.96.0.10", 81)
    assert isinstance(refused, RefusedRoute) and "no port 81" in refused.reason


def test_outside_the_mesh_passes_through() -> None:
    router, cfg = OutboundRouter(), config()
    assert router.route(cfg, "192.0.2.1", 443) == PassthroughRoute(("192.0.2.1", 443))
    legacy = router.route(cfg, "10.0.2.9", 9000)
    assert isinstance(legacy, PassthroughRoute) and legacy.destination is not None
    via_service = router.route(cfg, "10.96.0.12", 80)
    assert isinstance(via_service, PassthroughRoute) and via_service.address == ("10.0.2.9", 9000)


def test_an_ip_claimed_by_two_pods_is_refused_not_guessed() -> None:
    from ztunnel.config.loader import build_config, load_documents
    from ztunnel.proxy.routing import OutboundRouter, RefusedRoute

    docs = "\n---\n".join(
        f"kind: Pod\nmetadata: {{name: {n}, namespace: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        f"spec: {{nodeName: b}}\nstatus: {{podIP: 10.244.9.9}}"
        for n, ns in (("real", "a"), ("imposter", "b"))
    )
    route = OutboundRouter().route(build_config(load_documents(docs, "dup.yaml")), "10.244.9.9", 80)
    assert isinstance(route, RefusedRoute) and "more than one pod" in route.reason


def test_service_routes_list_every_ready_endpoint_once_starting_round_robin() -> None:
    router, cfg = OutboundRouter(), config()
    orders = []
    for _ in range(2):
        routes = router.routes(cfg, "10.96.0.10", 80)
        assert all(isinstance(r, HboneRoute) for r in routes)
        orders.append([r.target for r in routes if isinstance(r, HboneRoute)])
    first, second = Authority("10.0.2.1", 8080), Authority("10.0.3.1", 8080)
    assert orders == [[first, second], [second, first]]  # the failover order follows the round robin
    assert router.routes(cfg, "192.0.2.1", 443) == [PassthroughRoute(("192.0.2.1", 443))]


def test_a_new_config_snapshot_is_routed_afresh() -> None:
    """Pod routes are remembered per snapshot; a new snapshot (here: the pod leaves the mesh) is not served stale."""
    router = OutboundRouter()
    before = config()
    assert isinstance(router.route(before, "10.0.2.1", 8080), HboneRoute)
    assert router.route(before, "10.0.2.1", 8080) == router.route(before, "10.0.2.1", 8080)
    after = build_config(
        load_documents(
            CONFIG.replace(
                "{app: web}}\nspec: {nodeName: b", "{app: web, istio.io/dataplane-mode: none}}\nspec: {nodeName: b"
            )
        )
    )
    assert router.route(after, "10.0.2.1", 8080) == PassthroughRoute(
        ("10.0.2.1", 8080), destination=after.workload_by_ip("10.0.2.1")
    )
    assert isinstance(router.route(before, "10.0.2.1", 8080), HboneRoute)  # and back


WAYPOINT_CONFIG = (
    CONFIG.replace(
        "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
        "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}",
    )
    + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: a, serviceAccountName: wp}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: b, serviceAccountName: wp}
status: {podIP: 10.0.2.5}
"""
)


def test_a_service_using_a_waypoint_is_routed_to_its_pods_asking_for_the_vip() -> None:
    router, cfg = OutboundRouter(), build_config(load_documents(WAYPOINT_CONFIG))
    web = cfg.workload("shop", "web-1")
    seen = []
    for _ in range(2):
        routes = router.routes(cfg, "10.96.0.10", 80, web)
        assert all(isinstance(r, HboneRoute) for r in routes) and len(routes) == 2
        route = routes[0]
        assert isinstance(route, HboneRoute)
        assert route.target == Authority("10.96.0.10", 80)  # the VIP as dialled, not an endpoint
        assert route.expected_identities == ("spiffe://cluster.local/ns/shop/sa/wp",)
        assert route.destination.identity == "spiffe://cluster.local/ns/shop/sa/wp"
        assert route.waypoint is not None and route.waypoint.ref == "shop/wp"
        assert route.service is not None and route.service.name == "web"
        seen.append(route.proxy_address)
    assert sorted(seen) == [("10.0.1.5", 15008), ("10.0.2.5", 15008)]
    # A pod address is not a Service: dialled directly it goes to the pod (whose proxy refuses the bypass).
    direct = router.route(cfg, "10.0.2.1", 8080, web)
    assert isinstance(direct, HboneRoute) and direct.waypoint is None


def test_the_waypoints_own_connections_go_to_the_endpoints() -> None:
    router, cfg = OutboundRouter(), build_config(load_documents(WAYPOINT_CONFIG))
    route = router.route(cfg, "10.96.0.10", 80, cfg.workload("shop", "wp-1"))
    assert isinstance(route, HboneRoute) and route.waypoint is None
    assert route.target in (Authority("10.0.2.1", 8080), Authority("10.0.3.1", 8080))


def test_a_service_whose_waypoint_has_no_ready_pod_is_refused_not_sent_to_endpoints() -> None:
    text = WAYPOINT_CONFIG.replace(
        "status: {podIP: 10.0.1.5}", 'status: {podIP: 10.0.1.5, conditions: [{type: Ready, status: "False"}]}'
    )
    text = text.replace("status: {podIP: 10.0.2.5}", "status: {}")
    cfg = build_config(load_documents(text))
    route = OutboundRouter().route(cfg, "10.96.0.10", 80, cfg.workload("shop", "web-1"))
    assert isinstance(route, RefusedRoute)
    assert route.reason == (
        "service shop/web uses waypoint shop/wp, which has no ready pod "
        "(refused: its traffic is never sent around the waypoint)"
    )
