"""ztunnel-py on a real cluster (deploy/ installed; vagrant/ runs this on kind with two workers): pod-to-pod
traffic is mutual TLS on the wire, a policy denies, a node agent or proxy restart never lets traffic around
the mesh, and the seed's greeter walk-through works through a waypoint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e_k8s.kube import (
    SYSTEM_NS,
    TCPDUMP_IMAGE,
    Kube,
    app_pod,
    namespace,
    unique,
    waypoint_objects,
)
from tests.support.eventually import eventually
from tests.support.waypoint_config import GREETER_DENY_ALL, GREETER_GET_HELLO

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@pytest.fixture(scope="session")
def kube() -> Kube:
    k = Kube()
    k.run("rollout", "status", "-n", SYSTEM_NS, "daemonset/ztunnel", "--timeout=300s", timeout=320)
    k.run("rollout", "status", "-n", SYSTEM_NS, "deployment/ztunnel-ca", "--timeout=300s", timeout=320)
    assert len(k.nodes()) >= 2, "the suite needs two schedulable nodes (pods on different nodes)"
    return k


@dataclass
class Mesh:
    ns: str
    outside: str
    server_node: str
    client_node: str
    server_ip: str

    @property
    def url(self) -> str:
        return f"http://{self.server_ip}:8080"


@pytest.fixture(scope="module")
def mesh(kube: Kube) -> Iterator[Mesh]:
    ns, outside = unique("e2e-mesh"), unique("e2e-outside")
    server_node, client_node = kube.nodes()[:2]
    objs = [namespace(ns, AMBIENT), namespace(outside, {})]
    objs += app_pod("server", ns, server_node, sa="server", labels={"app": "server"})
    objs += app_pod("client", ns, client_node, sa="client", labels={"app": "client"}, server=False)
    objs += app_pod("outsider", outside, client_node, sa="outsider", labels={"app": "outsider"}, server=False)
    kube.apply(objs)
    try:
        kube.wait_ready(ns, "app in (server)")
        kube.run("wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", "pod/client", "--timeout=180s")
        kube.run("wait", "-n", outside, "--for=jsonpath={.status.phase}=Running", "pod/outsider", "--timeout=180s")
        server_ip = kube.get("pod", "-n", ns, "server")["status"]["podIP"]
        yield Mesh(ns, outside, server_node, client_node, server_ip)
    finally:
        kube.run("delete", "namespace", ns, outside, "--ignore-not-found", "--wait=false")


def ok(kube: Kube, m: Mesh, path: str = "/") -> bool:
    status, body = kube.http(m.ns, "client", m.url + path)
    return status == 200 and "from server" in body


def test_pods_are_enrolled_and_marked_like_istio(kube: Kube, mesh: Mesh) -> None:
    for pod in ("server", "client"):
        ann = kube.get("pod", "-n", mesh.ns, pod)["metadata"].get("annotations", {})
        assert ann.get("ambient.istio.io/redirection") == "enabled", pod
    assert "ambient.istio.io/redirection" not in kube.get("pod", "-n", mesh.outside, "outsider")["metadata"].get(
        "annotations", {}
    )


def test_pod_to_pod_is_mutual_tls_on_the_wire(kube: Kube, mesh: Mesh) -> None:
    marker = unique("plaintext-marker")
    capture = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "capture", "namespace": mesh.outside},
        "spec": {
            "nodeName": mesh.server_node,
            "hostNetwork": True,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "tcpdump",
                    "image": TCPDUMP_IMAGE,
                    "command": ["timeout", "25", "tcpdump", "-i", "any", "-nn", "-l", "-A", "-s", "0",
                                f"host {mesh.server_ip} and tcp"],
                    "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
                }
            ],
        },
    }
    kube.apply([capture])
    try:
        kube.run("wait", "-n", mesh.outside, "--for=jsonpath={.status.phase}=Running", "pod/capture", "--timeout=120s")
        eventually(
            lambda: "listening on" in kube.run("logs", "-n", mesh.outside, "capture"),
            30,
            interval=0.5,
            what="tcpdump capturing",
        )
        for _ in range(3):
            status, body = kube.http(mesh.ns, "client", f"{mesh.url}/{marker}", "GET", f"x-marker:{marker}")
            assert status == 200 and marker in body

        def finished() -> str:
            out = kube.run("logs", "-n", mesh.outside, "capture")
            return out if "packets captured" in out else ""

        dump = eventually(finished, 60, interval=2, what="the capture finished")
    finally:
        kube.run("delete", "pod", "-n", mesh.outside, "capture", "--ignore-not-found", "--wait=false")
    assert f"{mesh.server_ip}.15008" in dump, "no HBONE (15008) packets to the server pod"
    assert f"{mesh.server_ip}.8080:" not in dump, "plaintext packets to the app port crossed the node"
    assert marker not in dump, "the request travelled in clear text"
    metrics = kube.metrics(mesh.server_node)
    assert 'connection_security_policy="mutual_tls"' in metrics
    assert f'source_principal="spiffe://cluster.local/ns/{mesh.ns}/sa/client"' in metrics


def test_a_policy_denies_and_its_removal_allows_again(kube: Kube, mesh: Mesh) -> None:
    deny = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: {mesh.ns}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/{mesh.ns}/sa/client"]}}
"""
    assert ok(kube, mesh)
    kube.apply(deny)
    try:
        eventually(lambda: kube.http(mesh.ns, "client", mesh.url)[0] == 0, 30, interval=1, what="the DENY applied")
    finally:
        kube.delete(deny)
    eventually(lambda: ok(kube, mesh), 30, interval=1, what="allowed again once the policy is gone")


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: {ns}}}
spec: {{mtls: {{mode: STRICT}}}}
"""


@pytest.mark.parametrize("component", ["node-agent", "proxy"])
def test_a_restart_never_lets_traffic_around_the_mesh(kube: Kube, mesh: Mesh, component: str) -> None:
    """While the server node's agent or proxy restarts, the outsider's plaintext never reaches the app
    (STRICT), and the client's requests either fail or go through the proxy; a pod started meanwhile on that
    node comes up enrolled."""
    kube.apply(STRICT.format(ns=mesh.ns))
    late = unique("late")
    try:
        eventually(lambda: kube.http(mesh.outside, "outsider", mesh.url)[0] != 200, 30, interval=1, what="STRICT")
        before = kube.kill_component(mesh.server_node, component)
        kube.apply(app_pod(late, mesh.ns, mesh.server_node, sa="late", labels={"app": late}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            bypass = kube.http(mesh.outside, "outsider", mesh.url)
            assert bypass[0] != 200, f"plaintext reached the app during the {component} restart: {bypass}"
            status, body = kube.http(mesh.ns, "client", mesh.url)
            assert status in (0, 200, 503), body
            pod = kube.node_pod(mesh.server_node)
            st = next(s for s in pod["status"]["containerStatuses"] if s["name"] == component)
            if st["restartCount"] > before and st.get("ready"):
                break
        kube.restarted(mesh.server_node, component, before)
        eventually(lambda: ok(kube, mesh), 60, interval=1, what=f"traffic back after the {component} restart")
        kube.wait_ready(mesh.ns, f"app={late}")
        ann = kube.get("pod", "-n", mesh.ns, late)["metadata"].get("annotations", {})
        assert ann.get("ambient.istio.io/redirection") == "enabled", "a pod started during the restart is unmeshed"
        assert kube.http(mesh.outside, "outsider", mesh.url)[0] != 200
    finally:
        kube.delete(STRICT.format(ns=mesh.ns))
        kube.run("delete", "pod", "-n", mesh.ns, late, "--ignore-not-found", "--wait=false")


# ---- the greeter walk-through (seed 002) through a waypoint --------------------------------------------------



@pytest.fixture(scope="module")
def greeter(kube: Kube) -> Iterator[str]:
    ns = unique("e2e-greeter")
    a, b = kube.nodes()[:2]
    objs = [namespace(ns, {**AMBIENT, "istio.io/use-waypoint": "waypoint"})]
    objs += waypoint_objects(ns)
    objs += app_pod("greeter-service-v1", ns, a, sa="greeter-service", labels={"app": "greeter-service"}, port=3000)
    objs += app_pod("helloweb", ns, b, sa="helloweb", labels={"app": "helloweb"}, server=False)
    objs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "greeter-service", "namespace": ns, "labels": {"app": "greeter-service"}},
            "spec": {"selector": {"app": "greeter-service"}, "ports": [{"name": "http", "port": 3000}]},
        }
    )
    kube.apply(objs)
    try:
        kube.wait_ready(ns, "gateway.networking.k8s.io/gateway-name=waypoint")
        kube.wait_ready(ns, "app=greeter-service")
        kube.run("wait", "-n", ns, "--for=jsonpath={.status.phase}=Running", "pod/helloweb", "--timeout=180s")
        yield ns
    finally:
        kube.run("delete", "namespace", ns, "--ignore-not-found", "--wait=false")
        kube.run("delete", "clusterrolebinding", f"ztunnel-waypoint-{ns}-waypoint", "--ignore-not-found")


def test_greeter_through_the_waypoint(kube: Kube, greeter: str) -> None:
    ns = greeter
    url = f"http://greeter-service.{ns}.svc.cluster.local:3000"

    def call(path: str, method: str = "GET") -> tuple[int, str]:
        return kube.http(ns, "helloweb", url + path, method)

    eventually(lambda: call("/hello")[0] == 200, 60, interval=1, what="greeter reachable through the waypoint")
    kube.apply(GREETER_DENY_ALL.format(ns=ns))
    try:
        eventually(lambda: call("/hello") == (403, "RBAC: access denied"), 30, interval=1, what="deny-all at L7")
    finally:
        kube.delete(GREETER_DENY_ALL.format(ns=ns))
    kube.apply(GREETER_GET_HELLO.format(ns=ns))
    try:
        eventually(lambda: call("/hello")[0] == 200, 30, interval=1, what="GET */hello allowed")
        assert call("/version")[0] == 403
        assert call("/hello", "POST")[0] == 403
    finally:
        kube.delete(GREETER_GET_HELLO.format(ns=ns))
    # the greeter's pod IP does not answer a client that skips the waypoint
    ip = kube.get("pod", "-n", ns, "greeter-service-v1")["status"]["podIP"]
    assert kube.http(ns, "helloweb", f"http://{ip}:3000/hello")[0] != 200
    log = kube.run("logs", "-n", ns, "-l", "gateway.networking.k8s.io/gateway-name=waypoint", "--tail=200")
    assert "request complete" in log and f"spiffe://cluster.local/ns/{ns}/sa/helloweb" in log
