"""Lab planning without root: node addresses and CIDRs, scheduling, the live config, CNI conflists."""

from __future__ import annotations

import pytest
import yaml

from ztunnel.config.loader import ConfigError, load_documents, load_files
from ztunnel.lab.cni import CniInvocationError, PodRef, Runtime, load_network_config, node_conflist
from ztunnel.lab.model import (
    LabError,
    check_lab_name,
    ips_from_cni_result,
    merge_objects,
    netns_prefix,
    node_netns,
    plan_nodes,
    plan_pod,
    remove_objects,
    render_live,
    schedule,
)

CLUSTER = """
apiVersion: v1
kind: Node
metadata: {name: b}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: a
  containers:
  - name: main
    command: [python3, -m, http.server]
    args: ["8080"]
    env: [{name: MODE, value: fast}]
    ports: [{containerPort: 8080}, {containerPort: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: floating}
spec:
  containers: [{name: main, command: [sleep, infinity]}]
"""


def test_lab_names_cannot_collide_by_prefix() -> None:
    assert check_lab_name("it123") == "it123"
    for bad in ("", "a-b", "UPPER", "x" * 13):
        with pytest.raises(LabError):
            check_lab_name(bad)
    assert not node_netns("ab", "n1").startswith(netns_prefix("a"))


def test_nodes_from_node_objects_then_pod_node_names() -> None:
    objs = load_documents(CLUSTER, "c.yaml")
    nodes = plan_nodes("t", objs, {})
    assert [(n.name, n.index, n.address, n.pod_cidr) for n in nodes.values()] == [
        ("b", 1, "172.30.0.11", "10.244.1.0/24"),
        ("a", 2, "172.30.0.12", "10.244.2.0/24"),
    ]
    assert nodes["a"].gateway == "10.244.2.1"
    # existing nodes keep their index when more are planned
    more = plan_nodes("t", [*objs, *load_documents("kind: Node\nmetadata: {name: c}\n")], nodes)
    assert more["c"].index == 3 and more["a"].index == 2


def test_default_pod_cidrs_avoid_chosen_ones_and_chosen_overlaps_are_refused() -> None:
    objs = load_documents(
        "kind: Node\nmetadata: {name: w}\n---\nkind: Node\nmetadata: {name: x}\nspec: {podCIDR: 10.244.1.0/24}\n"
    )
    nodes = plan_nodes("t", objs, {})
    assert nodes["x"].pod_cidr == "10.244.1.0/24" and nodes["w"].pod_cidr == "10.244.2.0/24"
    clash = load_documents("kind: Node\nmetadata: {name: z}\nspec: {podCIDR: 10.244.0.0/16}\n")
    with pytest.raises(LabError, match="overlapping"):
        plan_nodes("t", [*objs, *clash], {})


def test_bad_pod_cidr_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"spec.podCIDR"):
        plan_nodes("t", load_documents("kind: Node\nmetadata: {name: x}\nspec: {podCIDR: nope}\n", "n.yaml"), {})


def test_pods_without_node_go_to_the_least_loaded_node() -> None:
    objs = load_documents(CLUSTER, "c.yaml")
    nodes = plan_nodes("t", objs, {})
    web = plan_pod("t", objs[1], schedule(objs[1], nodes, []))
    assert web.node == "a"
    assert schedule(objs[2], nodes, [web]) == "b"
    assert web.containers[0].argv == ["python3", "-m", "http.server", "8080"]
    assert web.containers[0].env == {"MODE": "fast"}
    assert web.containers[0].ports == [8080]
    assert web.netns == "ztl-t-pod-shop-web"
    with pytest.raises(LabError, match=r"spec\.nodeName"):
        schedule(objs[2], {}, [])


def test_live_config_fills_status_and_stays_loadable(tmp_path) -> None:
    objs = load_documents(CLUSTER, "c.yaml")
    nodes = plan_nodes("t", objs, {})
    web = plan_pod("t", objs[1], "a")
    web.ips = ["10.244.2.5"]
    text = render_live(objs, nodes, {web.ref: web})
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["Node", "Node", "Pod", "Pod"]  # implied node a first
    pod = docs[2]
    assert pod["status"]["podIP"] == "10.244.2.5" and pod["status"]["hostIP"] == "172.30.0.12"
    assert pod["metadata"]["uid"] == web.uid and pod["spec"]["nodeName"] == "a"
    f = tmp_path / "live.yaml"
    f.write_text(text)
    cfg = load_files([f])
    w = cfg.workload("shop", "web")
    assert w is not None and w.ips == ("10.244.2.5",) and w.uid == web.uid
    assert cfg.node_address("a") == "172.30.0.12" and cfg.node_address("b") == "172.30.0.11"
    assert cfg.workload("default", "floating").ips == ()


def test_merge_replaces_by_kind_namespace_name_and_remove_drops() -> None:
    objs = load_documents(CLUSTER)
    changed = load_documents(
        "kind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: v2}}\n---\n"
        "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\n"
        "metadata: {name: deny, namespace: shop}\nspec: {}\n"
    )
    merged = merge_objects(objs, changed)
    assert len(merged) == 4 and merged[1].labels == {"app": "v2"} and merged[3].kind == "AuthorizationPolicy"
    assert len(remove_objects(merged, changed[1:])) == 3


def test_conflist_chains_plugins_after_bridge_and_cni_args() -> None:
    conf = node_conflist("net", "10.244.1.0/24", "/d/ipam", [{"type": "ztunnel-cni", "agent_socket": "/s"}])
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "ztunnel-cni"]
    assert conf["plugins"][0]["ipam"]["dataDir"] == "/d/ipam"
    ref = PodRef("ns", "p", "u-1", "c1", "/var/run/netns/x")
    assert "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;" in ref.cni_args() and ref.cni_args().endswith("K8S_POD_UID=u-1")


def test_ips_from_cni_result_ipv4_first() -> None:
    result = {"ips": [{"address": "fd00::5/64"}, {"address": "10.244.1.5/24", "gateway": "10.244.1.1"}]}
    assert ips_from_cni_result(result) == ["10.244.1.5", "fd00::5"]
    assert ips_from_cni_result({}) == []


class RecordingRuntime(Runtime):
    """The runtime's chain logic with plugins replaced by a recorder (no netns, no processes)."""

    def __init__(self, fail: str = "") -> None:
        super().__init__("node-ns", [])
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def _invoke(self, command: str, conf, pod):  # type: ignore[no-untyped-def, override]
        self.calls.append((command, dict(conf)))
        if conf["type"] == self.fail and command == "ADD":
            raise CniInvocationError(conf["type"], command, 11, "agent not ready")
        if conf["type"] == "bridge":
            return {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}], "interfaces": [{"name": "eth0"}]}
        return dict(conf.get("prevResult") or {})


def test_add_threads_prev_result_and_injects_name_and_version() -> None:
    rt = RecordingRuntime()
    conf = node_conflist("net", "10.244.1.0/24", "/d", [{"type": "ztunnel-cni"}])
    result = rt.add(conf, PodRef("ns", "p", "u", "c", "/var/run/netns/p"))
    (c1, bridge), (c2, chained) = rt.calls
    assert (c1, c2) == ("ADD", "ADD")
    assert "prevResult" not in bridge and bridge["name"] == "net" and bridge["cniVersion"] == "1.0.0"
    assert chained["prevResult"]["ips"] == [{"address": "10.244.1.2/24"}] and chained["name"] == "net"
    assert result["ips"][0]["address"] == "10.244.1.2/24"


def test_failed_add_is_torn_down_in_reverse_and_del_gets_the_cached_result() -> None:
    rt = RecordingRuntime(fail="ztunnel-cni")
    conf = node_conflist("net", "10.244.1.0/24", "/d", [{"type": "ztunnel-cni"}])
    with pytest.raises(CniInvocationError) as e:
        rt.add(conf, PodRef("ns", "p", "u", "c", "/var/run/netns/p"))
    assert e.value.code == 11
    assert [(c, x["type"]) for c, x in rt.calls] == [
        ("ADD", "bridge"),
        ("ADD", "ztunnel-cni"),
        ("DEL", "ztunnel-cni"),
        ("DEL", "bridge"),
    ]
    assert rt.calls[2][1]["prevResult"]["ips"]  # DEL sees what ADD got so far


def test_runtime_uses_the_lexically_first_config_and_wraps_a_single_conf(tmp_path) -> None:
    with pytest.raises(CniInvocationError, match="no CNI network config"):
        load_network_config(tmp_path)
    (tmp_path / "20-other.conflist").write_text('{"cniVersion": "1.0.0", "name": "other", "plugins": []}')
    (tmp_path / "10-net.conf").write_text('{"cniVersion": "0.4.0", "name": "n", "type": "bridge", "bridge": "b0"}')
    (tmp_path / "05-x.conflist.ztunnel-backup").write_text("ignored")
    conf = load_network_config(tmp_path)
    assert conf == {"cniVersion": "0.4.0", "name": "n", "plugins": [{"type": "bridge", "bridge": "b0"}]}
    (tmp_path / "01-bad.json").write_text("[1]")
    with pytest.raises(CniInvocationError, match="JSON object"):
        load_network_config(tmp_path)
