"""deploy/: every Kustomize overlay renders, equals the Helm chart with the matching values, and every
object validates against the Kubernetes JSON schemas; the install keeps the promises the design makes
(ports of ztunnel/ports.py, least privilege, probes, drain, scraping)."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import (
    DEPLOY,
    HELM,
    Obj,
    crd_errors,
    deploy_render,
    helm_binary_objects,
    helm_objects,
    key,
    kustomize,
    needs_kubectl,
)
from ztunnel import ports

pytestmark = needs_kubectl

NS: dict[str, Any] = {"createNamespace": True}
# (Kustomize dir, the chart's values that give the same objects)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("overlays/default", NS),
    # no image.tag: the chart then runs the node DaemonSet alone on <appVersion>-bpf, and so must the overlay
    ("overlays/ebpf", {**NS, "node": {"redirectMode": "ebpf"}}),
    ("overlays/prometheus-operator", {**NS, "podMonitor": {"enabled": True}}),
    (
        "overlays/dev",
        {**NS, "image": {"tag": "dev", "pullPolicy": "Never"}, "logLevel": "debug", "ca": {"replicas": 1}},
    ),
]
WAYPOINT_VALUES = deploy_render.WAYPOINT_VALUES


@cache
def rendered(path: str) -> tuple[Obj, ...]:
    return tuple(kustomize(path))


def by_key(objs: Any) -> dict[tuple[str, str, str], Obj]:
    out: dict[tuple[str, str, str], Obj] = {}
    for o in objs:
        assert key(o) not in out, f"{key(o)} twice"
        out[key(o)] = o
    return out


def all_objects() -> list[tuple[str, Obj]]:
    out = [(p, o) for p, _ in VARIANTS for o in rendered(p)]
    return out + [("waypoint", o) for o in rendered("waypoint")]


def test_generated_kustomize_files_are_the_chart_rendered() -> None:
    for path, text in deploy_render.expected().items():
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python deploy/tools/render.py"


@pytest.mark.parametrize(("path", "values"), VARIANTS, ids=[p for p, _ in VARIANTS])
def test_helm_and_kustomize_render_the_same_objects(path: str, values: dict[str, Any]) -> None:
    k = by_key(rendered(path))
    h = by_key(helm_objects(values, include_crds=True))
    assert sorted(k) == sorted(h)
    for name, obj in k.items():
        assert obj == h[name], f"{path}: {name} differs from the chart's"


def test_waypoint_template_is_the_charts() -> None:
    base = by_key(helm_objects({}))
    with_waypoint = by_key(helm_objects(WAYPOINT_VALUES))
    k = by_key(rendered("waypoint"))
    assert sorted(k) == sorted(set(with_waypoint) - set(base))
    kinds = {"Gateway", "ServiceAccount", "ClusterRoleBinding", "RoleBinding", "Deployment", "Service"}
    assert {n[0] for n in k} == kinds
    for name, obj in k.items():
        assert obj == with_waypoint[name]


@pytest.mark.skipif(HELM is None, reason="no helm binary here (not in Debian, not on PyPI): helmlite renders the chart")
@pytest.mark.parametrize(("path", "values"), VARIANTS, ids=[p for p, _ in VARIANTS])
def test_real_helm_renders_what_helmlite_does(path: str, values: dict[str, Any], tmp_path: Path) -> None:
    assert by_key(helm_binary_objects(values, tmp_path)) == by_key(helm_objects(values))


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_every_object_validates_against_the_kubernetes_schemas(version: str) -> None:
    import kubernetes_validate

    want = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for where, obj in all_objects():
        if obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            assert crd_errors(obj) == [], f"{where}: {key(obj)}"  # our own CRD's schema
            continue
        if obj["kind"] == "PodMonitor":
            # The Prometheus Operator's CRD is not in the Kubernetes schemas: its required shape, by hand.
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["selector"] and obj["spec"]["podMetricsEndpoints"][0]["port"] == "http-metrics"
            continue
        try:
            kubernetes_validate.validate(obj, want, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {key(obj)} invalid for Kubernetes {want}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked > 100


# ---- what the install promises -----------------------------------------------------------------------------


def objs(path: str = "overlays/default") -> dict[tuple[str, str, str], Obj]:
    return by_key(rendered(path))


def daemonset(path: str = "overlays/default") -> Obj:
    return objs(path)[("DaemonSet", "istio-system", "ztunnel")]


def containers(pod: Obj) -> dict[str, Obj]:
    spec = pod["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def arg(c: Obj, flag: str) -> str:
    args = c["args"]
    assert flag in args, f"{c['name']}: no {flag} in {args}"
    return str(args[args.index(flag) + 1])


def test_node_daemonset_schedules_updates_and_drains_as_promised() -> None:
    ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    c = containers(ds)
    assert list(c) == ["cni-installer", "node-agent", "proxy"]
    assert c["cni-installer"]["restartPolicy"] == "Always"  # a sidecar: started first, stopped last
    proxy = c["proxy"]
    assert arg(proxy, "--admin-addr") == f"127.0.0.1:{ports.ADMIN_PORT}"
    pre_stop = " ".join(proxy["lifecycle"]["preStop"]["exec"]["command"])
    assert f"http://127.0.0.1:{ports.ADMIN_PORT}/quitquitquit" in pre_stop and "method='POST'" in pre_stop
    drain = arg(proxy, "--drain-timeout")
    assert drain.endswith("s") and spec["terminationGracePeriodSeconds"] > int(drain[:-1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/healthz/ready", "port": ports.READINESS_PORT}
    assert arg(proxy, "--readiness-addr") == f"$(POD_IP):{ports.READINESS_PORT}"
    assert arg(proxy, "--metrics-addr") == f"$(POD_IP):{ports.METRICS_PORT}"
    assert arg(proxy, "--inpod-socket") == arg(c["node-agent"], "--proxy-socket")
    assert arg(c["cni-installer"], "--agent-socket") == arg(c["node-agent"], "--cni-socket")


def test_host_mounts_are_the_cni_dirs_netns_agent_socket_and_bpffs_only_in_ebpf_mode() -> None:
    def host_paths(ds: Obj) -> set[str]:
        return {v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"] if "hostPath" in v}

    base = {"/opt/cni/bin", "/etc/cni/net.d", "/var/run/netns", "/var/run/ztunnel", "/run/xtables.lock"}
    assert host_paths(daemonset()) == base
    assert host_paths(daemonset("overlays/ebpf")) == base | {"/sys/fs/bpf", "/lib/modules", "/usr/src"}
    agent = containers(daemonset("overlays/ebpf"))["node-agent"]
    assert arg(agent, "--redirect") == "ebpf"
    assert arg(containers(daemonset())["node-agent"], "--redirect") == "iptables"
    # The proxy gets no host path: netns come to it as file descriptors over the agent's socket.
    mounts = {m["name"] for m in containers(daemonset())["proxy"]["volumeMounts"]}
    assert mounts == {"ztunnel-run", "istio-token", "istio-ca-root-cert", "proxy-tmp"}


def test_capabilities_only_where_needed_and_non_root_elsewhere() -> None:
    caps = {}
    for (kind, _, _), o in {**objs(), **by_key(rendered("waypoint"))}.items():
        if kind not in ("DaemonSet", "Deployment"):
            continue
        for name, c in containers(o).items():
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True, name
            caps[name] = set(sc["capabilities"].get("add", []))
            if kind == "Deployment":
                assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
                assert sc["allowPrivilegeEscalation"] is False, name
    assert caps == {
        "cni-installer": set(),
        "node-agent": {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"},
        "proxy": {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"},
        "ca": set(),
        "waypoint": set(),
    }


def test_every_container_has_requests_limits_and_every_pod_is_scraped() -> None:
    for (kind, _, name), o in {**objs(), **by_key(rendered("waypoint"))}.items():
        if kind not in ("DaemonSet", "Deployment"):
            continue
        for c in containers(o).values():
            for part in ("requests", "limits"):
                assert set(c["resources"][part]) == {"cpu", "memory"}, f"{name}/{c['name']} {part}"
        ann = o["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(ports.METRICS_PORT)
        main = next(c for c in containers(o).values() if c["name"] in ("proxy", "ca", "waypoint"))
        assert {p["containerPort"] for p in main["ports"]} >= {ports.METRICS_PORT, ports.READINESS_PORT}
        assert main["readinessProbe"]["httpGet"]["port"] == ports.READINESS_PORT
        assert main["livenessProbe"]["httpGet"]["port"] == ports.READINESS_PORT
        assert ann["prometheus.io/path"] in ("/metrics", "/stats/prometheus")
    monitors = {n for (k, _, n) in objs("overlays/prometheus-operator") if k == "PodMonitor"}
    assert monitors == {"ztunnel", "ztunnel-ca", "ztunnel-waypoints"}


def test_ca_is_a_deployment_with_service_and_disruption_budget() -> None:
    o = objs()
    dep = o[("Deployment", "istio-system", "ztunnel-ca")]
    assert dep["spec"]["replicas"] >= 2
    svc = o[("Service", "istio-system", "ztunnel-ca")]
    assert svc["spec"]["ports"][0]["port"] == 15012
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    pdb = o[("PodDisruptionBudget", "istio-system", "ztunnel-ca")]
    assert pdb["spec"]["selector"] == dep["spec"]["selector"] and pdb["spec"]["maxUnavailable"] == 1
    ca = containers(dep)["ca"]
    assert arg(ca, "--token-audience") == "istio-ca"
    token = next(v for v in daemonset()["spec"]["template"]["spec"]["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
    assert arg(containers(daemonset())["proxy"], "--ca") == "ztunnel-ca.istio-system.svc:15012"
    assert arg(ca, "--dns-name") == "ztunnel-ca.istio-system.svc"


def rules(kind: str, name: str) -> list[Obj]:
    o = objs()
    ns = "" if kind == "ClusterRole" else "istio-system"
    return list(o[(kind, ns, name)]["rules"])


def verbs_on(rs: list[Obj], resource: str) -> set[str]:
    return {v for r in rs if resource in r["resources"] for v in r["verbs"]}


def test_rbac_is_least_privilege_per_component() -> None:
    for (kind, _, name), o in objs().items():
        for r in o.get("rules", []) if kind in ("ClusterRole", "Role") else []:
            assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"], f"{kind} {name}: wildcard"
    for name in ("ztunnel-proxy", "ztunnel-waypoint"):
        assert {v for r in rules("ClusterRole", name) for v in r["verbs"]} == {"get", "list", "watch"}
    agent = rules("ClusterRole", "ztunnel-node-agent")
    assert verbs_on(agent, "pods") == {"get", "list", "watch", "patch"}
    assert {v for r in agent if "pods" not in r["resources"] for v in r["verbs"]} <= {"get", "list", "watch"}
    ca = rules("ClusterRole", "ztunnel-ca")
    assert verbs_on(ca, "tokenreviews") == {"create"}
    assert verbs_on(ca, "configmaps") == {"create", "get", "update", "patch"}
    assert all(r.get("resourceNames") for r in ca if "configmaps" in r["resources"] and "update" in r["verbs"])
    assert not any("secrets" in r["resources"] for r in ca)  # secrets only through the namespaced Role
    ca_role = rules("Role", "ztunnel-ca")
    assert verbs_on(ca_role, "secrets") == {"create", "get"}
    assert [r["resourceNames"] for r in ca_role if "get" in r["verbs"]] == [["istio-ca-secret"]]
    # nothing else may write anything, or read secrets
    writers = {"ztunnel-node-agent", "ztunnel-ca", "ztunnel-cni-installer"}
    for (kind, _, name), o in objs().items():
        if kind in ("ClusterRole", "Role") and name not in writers:
            assert {v for r in o["rules"] for v in r["verbs"]} <= {"get", "list", "watch"}, name
            assert not any("secrets" in r["resources"] for r in o["rules"]), name
    installer = rules("Role", "ztunnel-cni-installer")
    only_get_own = {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["ztunnel"], "verbs": ["get"]}
    assert installer == [only_get_own]


# Flags the manifests use before a component has them (none now: the Kubernetes source landed); the test
# fails on any other flag a component does not know.
PENDING_FLAGS: set[tuple[str, str]] = set()


@cache
def cli_flags(command: str) -> frozenset[str]:
    p = subprocess.run(
        [sys.executable, "-m", "ztunnel", *command.split(), "--help"], capture_output=True, text=True, check=True
    )
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", p.stdout))


def test_manifest_flags_exist_in_the_cli_or_are_pending() -> None:
    used: set[tuple[str, str]] = set()
    for (kind, _, _), o in {**objs(), **by_key(rendered("waypoint"))}.items():
        if kind not in ("DaemonSet", "Deployment"):
            continue
        for c in containers(o).values():
            if c["command"] != ["ztunnel"]:
                continue
            args = c["args"]
            assert args[:4] == ["--log-level", args[1], "--log-format", args[3]]
            sub = "ca serve" if args[4] == "ca" else args[4]
            assert arg(c, "--source") == "kubernetes", c["name"]
            used |= {(sub, a) for a in args[4:] if a.startswith("--")}
    unknown = {(s, f) for s, f in used if f not in cli_flags(s)}
    assert unknown <= PENDING_FLAGS, f"flags no component knows: {sorted(unknown - PENDING_FLAGS)}"
    stale = PENDING_FLAGS - unknown
    assert not stale - used, f"PENDING_FLAGS lists flags the manifests do not use: {sorted(stale - used)}"


def test_installer_flags_exist() -> None:
    from ztunnel.cni.installer import build_parser

    known = {s for a in build_parser()._actions for s in a.option_strings}
    c = containers(daemonset())["cni-installer"]
    assert c["args"][0] == "install"
    assert {a for a in c["args"] if a.startswith("--")} <= known
    assert arg(c, "--uninstall-on-exit") == "auto" and arg(c, "--daemonset") == daemonset()["metadata"]["name"]


def test_dev_overlay_never_pulls() -> None:
    for (kind, _, _), o in objs("overlays/dev").items():
        if kind in ("DaemonSet", "Deployment"):
            for c in containers(o).values():
                assert c["image"] == "ztunnel-py:dev" and c["imagePullPolicy"] == "Never"


def test_crds_only_when_absent_is_documented_where_it_happens() -> None:
    text = (DEPLOY / "components" / "crds" / "kustomization.yaml").read_text()
    assert "kubectl create -k deploy/crds" in text
    assert "only the absent" in (DEPLOY / "crds" / "kustomization.yaml").read_text()
    assert not [k for k in by_key(rendered("base")) if k[0] == "CustomResourceDefinition"]
    assert len([k for k in objs() if k[0] == "CustomResourceDefinition"]) == 10


def grants(rs: list[Obj], group: str, resource: str) -> set[str]:
    return {v for r in rs if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_roles_cover_what_the_kubernetes_source_lists_and_watches() -> None:
    """Each component's role alone lets it list+watch what ztunnel/config/kube lists for it (so a split of the
    DaemonSet, or a narrower role, is caught here rather than by a component that never becomes ready)."""
    from ztunnel.config.kube.source import MESH_CONFIG, RESOURCES

    def group(api_version: str) -> str:
        return api_version.split("/")[0] if "/" in api_version else ""

    for role in ("ztunnel-proxy", "ztunnel-node-agent", "ztunnel-waypoint"):
        rs = rules("ClusterRole", role)
        for r in RESOURCES:
            for av in r.versions:
                assert {"list", "watch"} <= grants(rs, group(av), r.plural), f"{role}: {r.plural} {av}"
    mesh = rules("Role", "ztunnel-mesh-config")
    assert {"list", "watch"} <= grants(mesh, group(MESH_CONFIG.versions[0]), MESH_CONFIG.plural)
    bindings = [o for (k, _, _), o in objs().items() if k == "RoleBinding"]
    bound = {s["name"] for o in bindings if o["roleRef"]["name"] == "ztunnel-mesh-config" for s in o["subjects"]}
    assert bound == {"ztunnel"}
    wp = by_key(rendered("waypoint"))[("RoleBinding", "istio-system", "ztunnel-waypoint-default-waypoint")]
    assert wp["roleRef"]["name"] == "ztunnel-mesh-config"
    ca = rules("ClusterRole", "ztunnel-ca")
    for plural in ("pods", "namespaces"):  # what `ca serve --source kubernetes` lists
        assert {"list", "watch"} <= grants(ca, "", plural)


def components(objects: dict[tuple[str, str, str], Obj]) -> dict[str, Obj]:
    """The containers running the ztunnel command, by name."""
    out: dict[str, Obj] = {}
    for (kind, _, _), o in objects.items():
        if kind in ("DaemonSet", "Deployment"):
            out |= {n: c for n, c in containers(o).items() if c["command"] == ["ztunnel"]}
    return out


@pytest.mark.parametrize("root", ["istio-system", "mesh-root"])
def test_root_namespace_is_every_components_and_its_role_lives_there(root: str) -> None:
    """Installed outside istio-system (release namespace `ztunnel`), every component that reads policies still
    reads the mesh config of one root namespace and may read it there: flag, Role and RoleBindings name the same
    namespace. The CA reads pods and namespaces only: `ca serve` has no --root-namespace."""
    values: dict[str, Any] = {**WAYPOINT_VALUES, "rootNamespace": root}
    if root == "istio-system":
        del values["rootNamespace"]  # the default is Istio's
    o = by_key(helm_objects(values, namespace="ztunnel"))
    cs = components(o)
    assert set(cs) == {"node-agent", "proxy", "ca", "waypoint"}
    for c in cs.values():
        if c["name"] != "ca":
            assert arg(c, "--root-namespace") == root, c["name"]
    assert "--root-namespace" not in cs["ca"]["args"]
    assert ("Role", root, "ztunnel-mesh-config") in o
    bindings = {k: b for k, b in o.items() if k[0] == "RoleBinding" and b["roleRef"]["name"] == "ztunnel-mesh-config"}
    assert {k[1] for k in bindings} == {root}
    subjects = {(s["namespace"], s["name"]) for b in bindings.values() for s in b["subjects"]}
    assert subjects == {("ztunnel", "ztunnel"), ("default", "waypoint")}
    # everything else stays in the release namespace
    assert ("Role", "ztunnel", "ztunnel-ca") in o and ("DaemonSet", "ztunnel", "ztunnel") in o


def test_ebpf_overlay_runs_the_bcc_image_on_the_node_only() -> None:
    """overlays/ebpf, as the chart: the node DaemonSet's containers on <version>-bpf, the CA on the plain image
    (a Kustomize `images:` tag would switch every object)."""
    o = objs("overlays/ebpf")
    node = containers(o[("DaemonSet", "istio-system", "ztunnel")])
    assert set(node) == {"cni-installer", "node-agent", "proxy"}
    assert {c["image"] for c in node.values()} == {"ztunnel-py:0.1.0-bpf"}
    assert {c["image"] for c in containers(o[("Deployment", "istio-system", "ztunnel-ca")]).values()} == {
        "ztunnel-py:0.1.0"
    }


def test_ebpf_redirect_runs_the_bcc_image_on_the_node_unless_the_tag_is_given() -> None:
    """redirectMode ebpf needs bcc, only in the -bpf build (scripts/build-image.sh --bpf): the node DaemonSet
    switches to it; the CA and waypoints keep the plain image; an explicit image.tag wins."""
    ebpf = by_key(helm_objects({**WAYPOINT_VALUES, "node": {"redirectMode": "ebpf"}}))
    node = containers(ebpf[("DaemonSet", "istio-system", "ztunnel")])
    assert {c["image"] for c in node.values()} == {"ztunnel-py:0.1.0-bpf"}
    others = [c for k, o in ebpf.items() if k[0] == "Deployment" for c in containers(o).values()]
    assert len(others) == 2 and {c["image"] for c in others} == {"ztunnel-py:0.1.0"}
    plain = containers(by_key(helm_objects({}))[("DaemonSet", "istio-system", "ztunnel")])
    assert {c["image"] for c in plain.values()} == {"ztunnel-py:0.1.0"}
    given = by_key(helm_objects({"node": {"redirectMode": "ebpf"}, "image": {"tag": "mine-bpf"}}))
    assert {c["image"] for c in containers(given[("DaemonSet", "istio-system", "ztunnel")]).values()} == {
        "ztunnel-py:mine-bpf"
    }
