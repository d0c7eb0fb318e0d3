"""The config model: objects from YAML become workloads, services and policies with the right fields."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support.lab_waypoint import SHOP_WAYPOINT
from ztunnel.config import ConfigError, load_documents, load_files
from ztunnel.config.loader import build_config, is_enrolled
from ztunnel.config.source import FileConfigSource

CLUSTER = textwrap.dedent(
    """
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: web-1, namespace: shop, uid: u-web-1, labels: {app: web}}
    spec: {nodeName: a, serviceAccountName: web}
    status: {podIP: 10.244.1.5}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: legacy, namespace: shop, labels: {app: legacy, istio.io/dataplane-mode: none}}
    spec: {nodeName: b}
    status: {podIPs: [{ip: 10.244.2.9}, {ip: "fd00::9"}]}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: solo, namespace: other, labels: {istio.io/dataplane-mode: ambient}}
    spec: {nodeName: b, hostNetwork: false}
    status: {podIP: 10.244.2.10}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: host, namespace: shop}
    spec: {nodeName: a, hostNetwork: true}
    status: {podIP: 172.18.0.2}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      clusterIP: 10.96.0.10
      selector: {app: web}
      ports: [{port: 80, targetPort: 8080, name: http}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: ignored, namespace: shop}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-all, namespace: shop}
    spec: {}
    """
)


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    f = tmp_path / "cluster.yaml"
    f.write_text(CLUSTER)
    return f


def test_pods_become_workloads_with_identity_and_enrollment(cluster_file: Path) -> None:
    cfg = load_files([cluster_file])
    web = cfg.workload("shop", "web-1")
    assert web is not None
    assert web.uid == "u-web-1"
    assert web.identity == "spiffe://cluster.local/ns/shop/sa/web"
    assert web.enrolled is True  # by namespace label
    legacy = cfg.workload("shop", "legacy")
    assert legacy is not None and legacy.enrolled is False  # pod opts out
    assert legacy.identity == "spiffe://cluster.local/ns/shop/sa/default"
    assert legacy.ips == ("10.244.2.9", "fd00::9")
    solo = cfg.workload("other", "solo")
    assert solo is not None and solo.enrolled is True  # by pod label
    host = cfg.workload("shop", "host")
    assert host is not None and host.enrolled is False  # host network never


def test_lookups_by_ip_node_and_service(cluster_file: Path) -> None:
    cfg = load_files([cluster_file])
    assert cfg.workload_by_ip("10.244.1.5").name == "web-1"
    assert cfg.workload_by_ip("fd00:0::9").name == "legacy"
    assert cfg.workload_by_ip("172.18.0.2") is None  # host-network pods are not addressable workloads
    assert [w.name for w in cfg.mesh_workloads_on_node("b")] == ["solo"]
    svc = cfg.service_by_ip("10.96.0.10")
    assert svc is not None and svc.port_for(80).target_port == 8080
    assert [w.name for w in cfg.endpoints(svc)] == ["web-1"]
    assert cfg.identities_on_node("a") == {"spiffe://cluster.local/ns/shop/sa/web"}
    assert set(cfg.nodes) == {"a", "b"}


def test_policy_objects_are_kept_and_other_kinds_skipped(cluster_file: Path) -> None:
    cfg = load_files([cluster_file])
    assert [o.ref for o in cfg.policy_objects] == ["AuthorizationPolicy shop/deny-all"]
    assert cfg.policy_objects[0].source.file == str(cluster_file)


def test_trust_domain_flows_into_identities(cluster_file: Path) -> None:
    cfg = load_files([cluster_file], trust_domain="example.org")
    assert cfg.workload("shop", "web-1").identity == "spiffe://example.org/ns/shop/sa/web"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: Pod\nmetadata: {name: [}", "not valid YAML at line 2"),
        ("- just\n- a list", "expected a Kubernetes object"),
        ("kind: Pod\nmetadata: {}", "metadata.name"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}", "field status.podIPs[0]"),
        (
            "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}",
            "Service default/s: field spec.ports[0]",
        ),
    ],
)
def test_bad_objects_are_reported_with_file_object_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(load_documents(text, "bad.yaml"))
    assert "bad.yaml" in str(err.value)
    assert expected in str(err.value)


def test_enrollment_rules() -> None:
    amb = {"istio.io/dataplane-mode": "ambient"}
    none = {"istio.io/dataplane-mode": "none"}
    assert is_enrolled(amb, {}, False)
    assert is_enrolled({}, amb, False)
    assert not is_enrolled(none, amb, False)
    assert not is_enrolled(amb, amb, True)
    assert not is_enrolled({}, {}, False)


async def test_file_source_keeps_last_good_config_on_bad_edit(cluster_file: Path) -> None:
    source = FileConfigSource([cluster_file])
    seen: list[int] = []
    source.subscribe(lambda cfg: seen.append(len(cfg.workloads)))
    first = source.load()
    assert len(first.workloads) == 4
    cluster_file.write_text(CLUSTER + "---\nkind: Pod\nmetadata: {name: [broken\n")
    assert await source.reload_if_changed() is False
    assert source.current is first and source.last_error is not None
    cluster_file.write_text(CLUSTER.replace("name: web-1", "name: web-2"))
    assert await source.reload_if_changed() is True
    assert seen == [4]
    assert source.current is not None and source.current.workload("shop", "web-2") is not None
    assert source.current.generation == 2


def test_two_pods_with_one_ip_resolve_to_neither_and_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text(
        CLUSTER
        + textwrap.dedent(
            """
            ---
            apiVersion: v1
            kind: Pod
            metadata: {name: imposter, namespace: other, labels: {istio.io/dataplane-mode: ambient}}
            spec: {nodeName: b}
            status: {podIP: 10.244.1.5}
            """
        )
    )
    cfg = load_files([f])
    assert cfg.conflicting_ips == {"10.244.1.5"}
    assert cfg.workload_by_ip("10.244.1.5") is None
    assert cfg.workload_by_ip("10.244.2.10").name == "solo"  # other pods unaffected
    (warning,) = cfg.warnings
    assert "status.podIP 10.244.1.5" in warning and "Pod shop/web-1" in warning and "Pod other/imposter" in warning
    assert str(f) in warning


def test_an_object_defined_twice_is_reported_and_the_later_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(CLUSTER)
    b.write_text(CLUSTER.split("---")[1].replace("uid: u-web-1", "uid: u-web-1b"))
    cfg = load_files([a, b])
    assert cfg.workload("shop", "web-1").uid == "u-web-1b"
    assert any("Pod shop/web-1" in w and str(a) in w and str(b) in w for w in cfg.warnings)


# ---- every read error is a ConfigError naming the file and the reason (issue 10 item 9) ----------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"kind: Namespace\nmetadata: {name: caf\xe9}\n", "not UTF-8 text (byte 0xe9 at offset 36, line 2)"),
        (CLUSTER.encode("utf-16"), "is UTF-16 text, not UTF-8; save it as UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0x89 at offset 0, line 1)"),
        (b"kind: Pod\x00\x00\x00", "holds a NUL byte at offset 9: a binary file"),
        (b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: running\n", "Pod default/p: a field has the wrong"),
        (b"apiVersion: v1\nkind: Pod\nmetadata: {name: p, creationTimestamp: 2024-13-45}\n", "not valid YAML"),
        (b"kind: List\nitems: 7\n", "field items: must be a list of objects"),
    ],
)
def test_any_unreadable_file_is_a_config_error_with_file_and_reason(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_files([f])
    assert str(err.value).startswith(str(f)) and err.value.file == str(f)
    assert expected in str(err.value)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + CLUSTER.encode())
    assert len(load_files([f]).workloads) == 4


def test_yaml_is_parsed_with_libyaml_when_available() -> None:
    import yaml

    from ztunnel.config import loader

    if yaml.__with_libyaml__:
        assert loader.YAML_LOADER is yaml.CSafeLoader


# ---- mistyped security kinds are errors (issue 10 item 12) ------------------------------------------------
@pytest.mark.parametrize(
    ("api_version", "kind", "expected"),
    [
        ("security.istio.io/v1", "AuthorizationPolcy", "did you mean AuthorizationPolicy?"),
        ("security.istio.io/v1beta1", "PeerAuthentcation", "did you mean PeerAuthentication?"),
        ("rbac.istio.io/v1alpha1", "ServiceRol", "did you mean ServiceRole?"),
        ("authentication.istio.io/v1alpha1", "Polcy", "did you mean Policy?"),
        ("security.istio.io/v1", "Gateway", "security.istio.io serves AuthorizationPolicy, PeerAuthentication"),
        ("security.istio.io/v1", "\u201cAuthorizationPolicy\u201d", "quote characters around it"),
    ],
)
def test_an_unknown_kind_in_an_istio_security_group_is_an_error(api_version: str, kind: str, expected: str) -> None:
    text = f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: deny-all, namespace: shop}}\nspec: {{}}\n"
    with pytest.raises(ConfigError) as err:
        load_documents(text, "policy.yaml")
    message = str(err.value)
    assert message.startswith(f"policy.yaml (document 1): {kind} deny-all: field kind: ")
    assert "would be ignored" in message and expected in message


def test_unknown_kinds_of_other_groups_are_still_skipped() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n---\n"
        "apiVersion: example.com/v1\nkind: AuthorizationPolcy\nmetadata: {name: e}\n"
    )
    cfg = build_config(load_documents(text, "other.yaml"))
    assert cfg.policy_objects == ()


def test_a_directory_is_read_with_its_json_files(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    (tmp_path / "extra.json").write_text(
        '{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "from-json", "namespace": "shop"},'
        ' "spec": {"nodeName": "a"}, "status": {"podIP": "10.244.1.77"}}\n'
        '{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Pod",'
        ' "metadata": {"name": "in-list", "namespace": "shop"}, "spec": {"nodeName": "a"}}]}'
    )
    (tmp_path / "README.txt").write_text("not config: {")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ignored.yaml").write_text("kind: [")
    cfg = load_files([tmp_path])
    assert cfg.workload("shop", "from-json") is not None and cfg.workload("shop", "in-list") is not None


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "bad.json"
    f.write_text('{"kind": "Pod",\n "metadata": {"name": }}')
    with pytest.raises(ConfigError) as err:
        load_files([f])
    assert str(err.value).startswith(f"{f}: not valid JSON at line 2, column 23")


WAYPOINT_CONFIG = SHOP_WAYPOINT + """---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: a, serviceAccountName: wp}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-bad, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: a, serviceAccountName: default}
status: {podIP: 10.0.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: b, serviceAccountName: web}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: b, serviceAccountName: db}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: cache-1, namespace: shop, labels: {app: cache}}
spec: {nodeName: b, serviceAccountName: cache}
status: {podIP: 10.0.2.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.11, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop, labels: {istio.io/use-waypoint: nosuch}}
spec: {clusterIP: 10.96.0.12, selector: {app: cache}, ports: [{port: 6379}]}
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: shop, labels: {istio.io/use-waypoint: ingress}}
spec: {clusterIP: 10.96.0.13, selector: {app: front}, ports: [{port: 80}]}
"""


def test_waypoints_come_from_gateways_and_use_waypoint_labels() -> None:
    cfg = build_config(load_documents(WAYPOINT_CONFIG, "mesh.yaml"))
    assert list(cfg.waypoints) == ["shop/wp"]  # the istio-class Gateway is not a waypoint
    wp = cfg.waypoints["shop/wp"]
    assert wp.identity == "spiffe://cluster.local/ns/shop/sa/wp"
    web, db, cache, front = (cfg.service("shop", n) for n in ("web", "db", "cache", "front"))
    assert web is not None and db is not None and cache is not None and front is not None
    assert cfg.waypoint_of(web) == wp  # the namespace's label
    assert cfg.waypoint_of(db) is None  # the Service's `none` wins over the namespace's
    assert cfg.waypoint_of(cache) is None  # names no Gateway: no waypoint, and a warning
    assert cfg.waypoint_of(front) is None  # names a Gateway that is not a waypoint
    # Only the pod running as the Gateway's service account is an endpoint; the other is reported.
    assert [w.name for w in cfg.waypoint_endpoints(wp)] == ["wp-1"]
    pods = {w.name: w for w in cfg.workloads}
    assert cfg.workload_uses_waypoint(pods["web-1"]) and cfg.workload_waypoints(pods["web-1"]) == (wp,)
    assert not cfg.workload_uses_waypoint(pods["db-1"])
    assert not cfg.workload_uses_waypoint(pods["cache-1"])
    assert not cfg.workload_uses_waypoint(pods["wp-1"])
    warnings = "\n".join(cfg.warnings)
    assert (
        "mesh.yaml (document 11): Service shop/cache: label istio.io/use-waypoint=nosuch: "
        "no Gateway shop/nosuch of class istio-waypoint is defined" in warnings
    )
    assert "Service shop/front: label istio.io/use-waypoint=ingress: Gateway shop/ingress is not a waypoint" in warnings
    assert (
        "mesh.yaml (document 5): Pod shop/wp-bad: runs waypoint shop/wp with identity "
        "spiffe://cluster.local/ns/shop/sa/default, not spiffe://cluster.local/ns/shop/sa/wp" in warnings
    )
    assert len(cfg.warnings) == 3


def test_a_service_label_names_a_waypoint_where_its_namespace_names_none() -> None:
    text = WAYPOINT_CONFIG.replace("istio.io/use-waypoint: wp}", "istio.io/use-waypoint: none}", 1)
    text = text.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}",
    )
    cfg = build_config(load_documents(text))
    web = cfg.service("shop", "web")
    assert web is not None and cfg.waypoint_of(web) == cfg.waypoints["shop/wp"]


def test_a_waypoint_gateway_without_the_hbone_listener_is_reported() -> None:
    text = WAYPOINT_CONFIG.replace("listeners: [{name: mesh, port: 15008, protocol: HBONE}]", "listeners: []")
    cfg = build_config(load_documents(text, "mesh.yaml"))
    assert "shop/wp" in cfg.waypoints
    assert any(
        "Gateway shop/wp: field spec.listeners: a waypoint listens on port 15008, protocol HBONE" in w
        for w in cfg.warnings
    )
