"""Service names -> an address to dial (config/names.py), as the cluster DNS and kube-proxy would answer a pod:
the waypoint's JWKS fetches and ext-authz calls use it, since its pod has no mesh DNS."""

from __future__ import annotations

import pytest

from tests.support.waypoint_config import BASE, VIP, config, greeter_pod
from ztunnel.config.names import endpoint_address, resolve, search_path, service_for_host

OTHER = (
    "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: auth}\n"
    "---\napiVersion: v1\nkind: Service\nmetadata: {name: greeter, namespace: auth}\n"
    "spec: {clusterIP: 10.96.0.99, selector: {app: none}, ports: [{port: 80}]}\n"
)
CFG = config(BASE + OTHER)


def test_search_path_is_the_kubelets() -> None:
    assert search_path("greet") == ("greet.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert search_path(None) == ("svc.cluster.local", "cluster.local")


@pytest.mark.parametrize(
    ("host", "namespace", "ref"),
    [
        ("greeter", "greet", "greet/greeter"),  # a short name is the asking namespace's
        ("greeter", "auth", "auth/greeter"),
        ("greeter", None, None),  # no namespace to search in
        ("greeter.greet", "auth", "greet/greeter"),
        ("greeter.auth", None, "auth/greeter"),
        ("greeter.greet.svc", "auth", "greet/greeter"),
        ("Greeter.Greet.svc.cluster.local", None, "greet/greeter"),
        ("greeter.greet.svc.cluster.local.", "auth", "greet/greeter"),
        ("greeter.", "greet", None),  # absolute: no search
        ("greeter.nowhere", "greet", None),
        ("greeter.greet.svc.example.org", None, None),
        ("issuer.example.com", "greet", None),
        (VIP, None, "greet/greeter"),  # a ClusterIP is its Service
        ("10.96.0.99", "greet", "auth/greeter"),
        ("127.0.165.1", None, None),  # a pod IP is no Service
    ],
)
def test_service_for_host(host: str, namespace: str | None, ref: str | None) -> None:
    service = service_for_host(CFG, host, namespace)
    assert (service.ref if service is not None else None) == ref


def test_a_service_becomes_a_ready_endpoint_on_its_target_port() -> None:
    greeter = service_for_host(CFG, "greeter.greet")
    assert greeter is not None
    # the named target port `http` is the pods' 8080; greeter-c is not ready and never picked
    ready = {("127.0.165.1", 8080), ("127.0.165.2", 8080)}
    assert {endpoint_address(CFG, greeter, 80, turn) for turn in range(4)} == ready
    assert endpoint_address(CFG, greeter, 80, 0) != endpoint_address(CFG, greeter, 80, 1)  # a new turn, the next one
    assert endpoint_address(CFG, greeter, 81) == "Service greet/greeter has no port 81"
    empty = service_for_host(CFG, "greeter.auth")
    assert empty is not None and endpoint_address(CFG, empty, 80) == "Service auth/greeter has no ready endpoint"


def test_resolve_answers_cluster_names_and_leaves_the_rest_to_the_system_resolver() -> None:
    ready = {("127.0.165.1", 8080), ("127.0.165.2", 8080)}
    assert resolve(CFG, "greeter", 80, "greet") in ready
    assert resolve(CFG, VIP, 80) in ready
    assert resolve(CFG, "greeter", 80, "auth") == "Service auth/greeter has no ready endpoint"
    assert resolve(CFG, "keycloak.example.com", 443, "greet") is None
    assert resolve(CFG, "localhost", 80, "greet") is None
    only_c = config(
        BASE.replace(greeter_pod("greeter-a", "127.0.165.1"), "").replace(greeter_pod("greeter-b", "127.0.165.2"), "")
    )
    assert resolve(only_c, "greeter.greet.svc.cluster.local", 80) == "Service greet/greeter has no ready endpoint"
