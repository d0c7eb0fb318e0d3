"""One canonical form per address (`canonical_ip`), used by every lookup by IP: the config's indexes and the
outbound router see `::ffff:10.0.0.1` as 10.0.0.1, and refuse what has no single destination."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel.config.loader import build_config, load_documents
from ztunnel.config.model import AddressRefused, canonical_ip, normalize_ip
from ztunnel.proxy.routing import HboneRoute, OutboundRouter, PassthroughRoute, RefusedRoute

V4 = ipaddress.IPv4Address

DOCS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: uid-web, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: mapped, namespace: shop, uid: uid-mapped, labels: {app: mapped}}
spec: {nodeName: n1, serviceAccountName: mapped}
status: {podIP: "::ffff:10.0.2.7"}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.1", V4("10.0.0.1")),
        ("::ffff:10.0.0.1", V4("10.0.0.1")),  # IPv4-mapped
        ("::ffff:a00:1", V4("10.0.0.1")),
        ("0:0:0:0:0:ffff:7f00:1", V4("127.0.0.1")),
        ("::10.0.0.1", V4("10.0.0.1")),  # IPv4-compatible (deprecated)
        ("::7f00:1", V4("127.0.0.1")),
        ("::1", ipaddress.IPv6Address("::1")),  # loopback stays IPv6
        ("0:0::1", ipaddress.IPv6Address("::1")),
        ("2001:DB8::1", ipaddress.IPv6Address("2001:db8::1")),
    ],
)
def test_one_form_per_address(text: str, canonical: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert canonical_ip(text) == canonical
    assert canonical_ip(ipaddress.ip_address(text)) == canonical
    assert canonical_ip(ipaddress.ip_address(text).packed) == canonical
    assert normalize_ip(text) == str(canonical)


@pytest.mark.parametrize("text", ["0.0.0.0", "::", "::ffff:0.0.0.0", "fe80::1%eth0", "::ffff:7f00:1%lo"])
def test_no_single_destination_is_refused(text: str) -> None:
    with pytest.raises(AddressRefused):
        canonical_ip(text)


def test_a_listeners_unspecified_bind_address_is_allowed_when_asked() -> None:
    assert canonical_ip("::ffff:0.0.0.0", unspecified=True) == V4("0.0.0.0")
    assert canonical_ip("::", unspecified=True) == ipaddress.IPv6Address("::")
    with pytest.raises(AddressRefused):
        canonical_ip("fe80::1%eth0", unspecified=True)


@pytest.mark.parametrize("text", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "localhost", "1.2.3.4 ", ""])
def test_only_strict_literals_are_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        canonical_ip(text)


def test_config_lookups_find_every_spelling() -> None:
    cfg = build_config(load_documents(DOCS, "c.yaml"))
    web = cfg.workload("shop", "web")
    mapped = cfg.workload("shop", "mapped")
    assert web is not None and mapped is not None
    for ip in ("10.0.2.1", "::ffff:10.0.2.1", "::ffff:a00:201", V4("10.0.2.1")):
        assert cfg.workload_by_ip(ip) is web, ip
    for ip in ("10.0.2.7", "::ffff:10.0.2.7", V4("10.0.2.7")):  # declared mapped, found by its IPv4 form
        assert cfg.workload_by_ip(ip) is mapped, ip
    for ip in ("10.96.0.10", "::ffff:10.96.0.10", V4("10.96.0.10")):
        service = cfg.service_by_ip(ip)
        assert service is not None and service.name == "web", ip


@pytest.mark.parametrize("dst", ["10.0.2.1", "::ffff:10.0.2.1", "::10.0.2.1", V4("10.0.2.1")])
def test_the_router_sends_every_spelling_of_a_mesh_pod_through_hbone(dst: str | ipaddress.IPv4Address) -> None:
    cfg = build_config(load_documents(DOCS, "c.yaml"))
    route = OutboundRouter().route(cfg, dst, 8080)
    assert isinstance(route, HboneRoute)
    assert route.destination.name == "web"
    assert route.target.ip == "10.0.2.1" and route.proxy_address == ("10.0.2.1", 15008)


def test_the_router_resolves_a_mapped_cluster_ip_and_passes_others_through_canonical() -> None:
    cfg = build_config(load_documents(DOCS, "c.yaml"))
    router = OutboundRouter()
    via_service = router.route(cfg, "::ffff:10.96.0.10", 80)
    assert isinstance(via_service, HboneRoute) and via_service.target.port == 8080
    assert router.route(cfg, "::ffff:192.0.2.1", 443) == PassthroughRoute(("192.0.2.1", 443))


@pytest.mark.parametrize("dst", ["0.0.0.0", "::", "fe80::1%eth0", "not-an-ip"])
def test_the_router_refuses_what_has_no_single_destination(dst: str) -> None:
    cfg = build_config(load_documents(DOCS, "c.yaml"))
    assert isinstance(OutboundRouter().route(cfg, dst, 80), RefusedRoute)
