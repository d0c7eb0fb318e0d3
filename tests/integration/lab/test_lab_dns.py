"""Pods resolve the mesh's Service names as in a cluster (issue 12): the lab writes each pod a kubelet-style
resolv.conf, the node agent captures an enrolled pod's port 53 and the node proxy answers it from the model.

The lab is built with `--mesh on`: a missing or broken component fails these tests (never skips them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually

from .conftest import LabHandle

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

SERVICE_IP = "10.96.0.20"  # outside every lab subnet: only the mesh knows it
FQDN = "server.lab.svc.cluster.local"
SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: lab}}
spec: {{clusterIP: {SERVICE_IP}, selector: {{app: server}}, ports: [{{port: 80, targetPort: 8080}}]}}
"""


@pytest.fixture(scope="module")
def service(lab: LabHandle) -> Iterator[str]:
    """The echo server behind a Service for this module, removed again so other modules see the usual lab."""
    lab.require("node-agent", "proxy")
    lab.apply(SERVICE)
    try:
        yield SERVICE_IP
    finally:
        lab.delete(SERVICE)


def getent(lab: LabHandle, target: str, name: str) -> tuple[int, list[str]]:
    """(exit code, addresses) of `getent hosts NAME` in the pod: the libc resolver, as an application uses it."""
    p = lab.run(target, "getent", "hosts", name, timeout=20)
    return p.returncode, [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def test_each_pod_gets_a_kubelet_style_resolv_conf(lab: LabHandle) -> None:
    for target in ("lab/client", "lab/outsider"):
        seen = lab.run(target, "cat", "/etc/resolv.conf", check=True).stdout  # what `ip netns exec` mounts
        assert "search lab.svc.cluster.local svc.cluster.local cluster.local" in seen
        assert "options ndots:5" in seen
        assert Path(f"/etc/netns/{lab.netns(target)}/resolv.conf").read_text() == seen


def test_an_enrolled_pod_resolves_service_names_and_reaches_them(lab: LabHandle, service: str) -> None:
    for name in (FQDN, "server", "server.lab"):  # the search path makes the short forms work, as in a cluster
        eventually(
            lambda name=name: getent(lab, "lab/client", name) == (0, [service]),
            30,
            0.2,
            what=f"{name} to resolve to the Service's ClusterIP in the client pod",
        )
    code, body = lab.curl("lab/client", f"http://{FQDN}:80/", max_time=5)
    assert code == 0, body
    assert body.strip() == f"peer={lab.pod_ip('lab/client')}"  # through the mesh: the server sees the client pod


def test_names_outside_the_model_and_pods_outside_the_mesh_get_no_mesh_address(lab: LabHandle, service: str) -> None:
    eventually(lambda: getent(lab, "lab/client", FQDN)[1] == [service], 30, 0.2, what="the Service to resolve")
    code, addrs = getent(lab, "lab/client", "nothing-here.lab.svc.cluster.local")
    assert code != 0 and addrs == []  # NXDOMAIN (or SERVFAIL from the unreachable upstream), never an address
    code, addrs = getent(lab, "lab/client", "example.com")
    assert code != 0 and service not in addrs
    # the outsider's queries are not captured: its nameserver (the node's bridge address) refuses them at once
    code, addrs = getent(lab, "lab/outsider", FQDN)
    assert code != 0 and addrs == []


LATE_POD = """
apiVersion: v1
kind: Pod
metadata: {name: dnslate, namespace: lab, labels: {app: dnslate}}
spec:
  nodeName: n2
  serviceAccountName: dnslate
  containers: [{name: main, command: [sleep, infinity]}]
"""


def test_a_deleted_pods_resolv_conf_goes_with_it(lab: LabHandle) -> None:
    lab.apply(LATE_POD)
    conf = Path(f"/etc/netns/{lab.netns('lab/dnslate')}/resolv.conf")
    try:
        assert "search lab.svc.cluster.local" in conf.read_text()
    finally:
        lab.delete(LATE_POD)
    assert not conf.parent.exists()
