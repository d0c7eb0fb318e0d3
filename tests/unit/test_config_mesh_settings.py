"""What the model takes from the mesh config and from hand-written objects that a real API server would not let
through: the mesh config's `pathNormalization`, two Services claiming one cluster IP, and the ports of a
selector-less Service's EndpointSlices."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ztunnel.config import ConfigError, load_documents
from ztunnel.config.loader import build_config, read_mesh
from ztunnel.config.names import endpoint_address
from ztunnel.proxy.labels import inbound_service
from ztunnel.proxy.routing import HboneRoute, OutboundRouter, PassthroughRoute, RefusedRoute


def _mesh_configmap(mesh: str) -> str:
    return textwrap.dedent(
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: istio, namespace: istio-system}
        data:
          mesh: |
        """
    ) + textwrap.indent(textwrap.dedent(mesh), "    ")


# ---- pathNormalization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh", "expected"),
    [
        ("pathNormalization: {normalization: BASE}\n", "BASE"),
        ("pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n", "DECODE_AND_MERGE_SLASHES"),
        ("pathNormalization: {normalization: NONE}\n", "NONE"),
        ("pathNormalization: {normalization: DEFAULT}\n", "MERGE_SLASHES"),  # ours, one step past Istio's BASE
        ("pathNormalization: {}\n", "MERGE_SLASHES"),
        ("trustDomain: cluster.local\n", "MERGE_SLASHES"),
    ],
)
def test_the_mesh_configmap_sets_the_path_normalization(mesh: str, expected: str) -> None:
    cfg = build_config(load_documents(_mesh_configmap(mesh), "mesh.yaml"))
    assert cfg.path_normalization == expected


def test_no_mesh_config_means_merge_slashes() -> None:
    assert build_config([]).path_normalization == "MERGE_SLASHES"


@pytest.mark.parametrize(
    ("mesh", "field", "words"),
    [
        ("pathNormalization: {normalization: MERGE}\n", "data.mesh.pathNormalization.normalization", "'MERGE'"),
        ("pathNormalization: MERGE_SLASHES\n", "data.mesh.pathNormalization", "{normalization: MERGE_SLASHES}"),
    ],
)
def test_a_bad_path_normalization_names_file_object_and_field(mesh: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(load_documents(_mesh_configmap(mesh), "mesh.yaml"))
    text = str(e.value)
    assert "mesh.yaml" in text and "ConfigMap istio-system/istio" in text and f"field {field}" in text
    assert words in text


def test_the_mesh_config_file_sets_the_path_normalization(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("pathNormalization:\n  normalization: BASE\n")
    assert read_mesh(path).path_normalization == "BASE"
    path.write_text("pathNormalization:\n  normalization: base\n")
    with pytest.raises(ConfigError, match=r"mesh.yaml: mesh config: field pathNormalization.normalization: 'base'"):
        read_mesh(path)


# ---- two Services, one cluster IP --------------------------------------------------------------------------------

TWO_SERVICES = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-web, labels: {app: web}}
spec: {nodeName: a, serviceAccountName: web}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: admin-1, namespace: ops, uid: u-admin, labels: {app: admin}}
spec: {nodeName: a, serviceAccountName: admin}
status: {podIP: 10.244.1.6}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: admin, namespace: ops}
spec: {clusterIPs: ["10.96.0.11", "10.96.0.10"], selector: {app: admin}, ports: [{port: 80, targetPort: 9090}]}
"""


def test_two_services_claiming_one_cluster_ip_get_none_of_its_traffic() -> None:
    cfg = build_config(load_documents(TWO_SERVICES, "cluster.yaml"))
    assert cfg.conflicting_service_ips == {"10.96.0.10"}
    assert cfg.service_by_ip("10.96.0.10") is None  # not whichever came last
    assert cfg.service_by_ip("::ffff:10.96.0.10") is None
    admin = cfg.service_by_ip("10.96.0.11")  # its other address is its own
    assert admin is not None and admin.ref == "ops/admin"
    routes = OutboundRouter().routes(cfg, "10.96.0.10", 80)
    assert not any(isinstance(r, HboneRoute) for r in routes)
    (warning,) = [w for w in cfg.warnings if "10.96.0.10" in w]
    assert "Service shop/web (cluster.yaml (document 3))" in warning
    assert "Service ops/admin (cluster.yaml (document 4))" in warning
    assert "refused" in warning


# ---- EndpointSlice ports -----------------------------------------------------------------------------------------

SELECTORLESS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: pg-0, namespace: shop, uid: u-pg, labels: {app: pg}}
spec: {nodeName: a, serviceAccountName: pg}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: pg, port: 5432, targetPort: 5432}
  - {name: metrics, port: 9187, targetPort: 9187}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-outside, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: ["192.0.2.10"]}]
ports: [{name: pg, port: 6432, protocol: TCP}, {name: other, port: 9999}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-pods, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: ["10.244.1.7"]}]
ports: [{name: pg, port: 15432}, {name: metrics, port: 19187}]
"""


def test_a_selectorless_service_dials_its_endpoint_slices_ports_matched_by_name() -> None:
    cfg = build_config(load_documents(SELECTORLESS, "db.yaml"))
    db = cfg.service("shop", "db")
    assert db is not None
    routes = OutboundRouter().routes(cfg, "10.96.0.20", 5432)
    assert {r.address for r in routes if isinstance(r, PassthroughRoute)} == {("192.0.2.10", 6432)}
    assert {(r.target.ip, r.target.port) for r in routes if isinstance(r, HboneRoute)} == {("10.244.1.7", 15432)}
    # metrics: the outside slice lists no port of that name, so only the pod serves it, on its slice's port.
    routes = OutboundRouter().routes(cfg, "10.96.0.20", 9187)
    assert [(type(r).__name__, r.target.port if isinstance(r, HboneRoute) else None) for r in routes] == [
        ("HboneRoute", 19187)
    ]
    assert {endpoint_address(cfg, db, 5432, turn) for turn in range(2)} == {
        ("192.0.2.10", 6432),
        ("10.244.1.7", 15432),
    }
    pod = cfg.workload("shop", "pg-0")
    assert pod is not None
    assert inbound_service(cfg, pod, 15432) == db  # the inbound side counts it under the slice's port too
    assert inbound_service(cfg, pod, 5432) is None


def test_a_slice_with_no_port_of_the_service_ports_name_serves_none() -> None:
    outside_ports = "ports: [{name: pg, port: 6432, protocol: TCP}, {name: other, port: 9999}]"
    text = SELECTORLESS.replace(outside_ports, "ports: []")
    cfg = build_config(load_documents(text, "db.yaml"))
    routes = OutboundRouter().routes(cfg, "10.96.0.20", 5432)
    assert not any(isinstance(r, PassthroughRoute) for r in routes)  # 192.0.2.10 has no pg port: not dialled
    assert not any(isinstance(r, RefusedRoute) for r in routes)


def test_a_bad_slice_port_names_file_object_and_field() -> None:
    text = SELECTORLESS.replace("port: 6432", "port: 70000")
    where = r"db.yaml \(document 4\): EndpointSlice shop/db-outside: field ports\[0\].port"
    with pytest.raises(ConfigError, match=where):
        build_config(load_documents(text, "db.yaml"))
