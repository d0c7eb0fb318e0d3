"""Legacy rbac.istio.io / authentication.istio.io objects -> current ones, used by the engine and `ztunnel convert`."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_policy_support import CLUSTER_YAML, FOO_CLIENT, Conn, decide, engine_of, run_cli

from ztunnel.config.loader import build_config, load_documents
from ztunnel.policy.engine import PolicyEngine
from ztunnel.policy.legacy import CONVERTED_FROM_ANNOTATION, convert_objects

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "policy"
BAR_CLIENT = "spiffe://cluster.local/ns/bar/sa/client"


def rbac(mode: str, **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "rbac.istio.io/v1alpha1",
            "kind": "ClusterRbacConfig",
            "metadata": {"name": "default"},
            "spec": {"mode": mode, **spec},
        }
    )


def role(name: str, rules: list, namespace: str = "foo") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "rbac.istio.io/v1alpha1",
            "kind": "ServiceRole",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"rules": rules},
        }
    )


def binding(name: str, role_name: str, subjects: list, namespace: str = "foo", **spec: object) -> str:
    body = {"subjects": subjects, "roleRef": {"kind": "ServiceRole", "name": role_name}, **spec}
    return yaml.safe_dump(
        {
            "apiVersion": "rbac.istio.io/v1alpha1",
            "kind": "ServiceRoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "spec": body,
        }
    )


def authn(kind: str, name: str, spec: dict, namespace: str = "foo") -> str:
    meta = {"name": name} if kind == "MeshPolicy" else {"name": name, "namespace": namespace}
    return yaml.safe_dump(
        {"apiVersion": "authentication.istio.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}
    )


SERVER_ROLE = role("server-reader", [{"services": ["server.foo.svc.cluster.local"], "methods": ["*"], "ports": [8080]}])
BIND_FOO_CLIENT = binding("bind", "server-reader", [{"user": "cluster.local/ns/foo/sa/client"}])


def test_rbac_off_or_absent_has_no_effect() -> None:
    for extra in ([], [rbac("OFF")]):
        engine, config = engine_of(SERVER_ROLE, BIND_FOO_CLIENT, *extra)
        assert engine.errors == []
        assert decide(engine, config, Conn(source=BAR_CLIENT)).allowed
        assert decide(engine, config, Conn(dest="foo/other")).allowed
    engine, _ = engine_of(SERVER_ROLE, BIND_FOO_CLIENT)
    assert any("RBAC is OFF" in n for n in engine.warnings)


def test_rbac_on_denies_everything_not_granted() -> None:
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, BIND_FOO_CLIENT)
    assert engine.errors == []
    d = decide(engine, config, Conn())
    assert d.allowed and d.policy == "foo/bind-server" and "converted from ServiceRoleBinding foo/bind" in d.reason
    assert not decide(engine, config, Conn(source=BAR_CLIENT)).allowed
    assert not decide(engine, config, Conn(port=9090)).allowed  # role grants port 8080 only
    assert not decide(engine, config, Conn(dest="foo/other")).allowed
    assert not decide(engine, config, Conn(dest="bar/server")).allowed  # ON covers the whole mesh


def test_rbac_on_with_inclusion_namespaces_and_services() -> None:
    engine, config = engine_of(
        rbac("ON_WITH_INCLUSION", inclusion={"namespaces": ["bar"], "services": ["server.foo.svc.cluster.local"]})
    )
    assert not decide(engine, config, Conn()).allowed  # included service
    assert decide(engine, config, Conn(dest="foo/other")).allowed  # not included
    assert not decide(engine, config, Conn(dest="bar/server")).allowed  # included namespace


def test_rbac_on_with_exclusion() -> None:
    engine, config = engine_of(
        rbac("ON_WITH_EXCLUSION", exclusion={"namespaces": ["bar"]}), SERVER_ROLE, BIND_FOO_CLIENT
    )
    assert decide(engine, config, Conn(dest="bar/server", source=None)).allowed  # excluded: RBAC off there
    assert not decide(engine, config, Conn(dest="foo/other")).allowed
    assert decide(engine, config, Conn()).allowed
    engine, config = engine_of(rbac("ON_WITH_EXCLUSION", exclusion={"services": ["server.foo.svc.cluster.local"]}))
    assert decide(engine, config, Conn(source=BAR_CLIENT)).allowed
    assert not decide(engine, config, Conn(dest="foo/other")).allowed


def test_roles_only_apply_where_rbac_is_enabled() -> None:
    # ON_WITH_INCLUSION of namespace bar only: the role in foo must not turn foo/server into deny-by-default
    engine, config = engine_of(
        rbac("ON_WITH_INCLUSION", inclusion={"namespaces": ["bar"]}), SERVER_ROLE, BIND_FOO_CLIENT
    )
    assert decide(engine, config, Conn(source=BAR_CLIENT)).allowed


def test_enforcement_mode_permissive_is_dry_run() -> None:
    engine, config = engine_of(rbac("ON", enforcementMode="PERMISSIVE"))
    d = decide(engine, config, Conn())
    assert d.allowed and d.dry_run_allowed is False


def test_binding_mode_permissive_is_dry_run() -> None:
    engine, config = engine_of(
        rbac("ON"), SERVER_ROLE, binding("bind", "server-reader", [{"user": "*"}], mode="PERMISSIVE")
    )
    d = decide(engine, config, Conn())
    assert not d.allowed and d.dry_run_policies == ("foo/bind-server",)


def test_subject_forms() -> None:
    subjects = [
        {"properties": {"source.namespace": "bar"}},
        {"names": ["cluster.local/ns/foo/sa/client"]},
    ]
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, binding("bind", "server-reader", subjects))
    assert decide(engine, config, Conn(source=BAR_CLIENT, source_ip="10.244.2.10")).allowed
    assert decide(engine, config, Conn()).allowed
    assert not decide(engine, config, Conn(source="spiffe://cluster.local/ns/foo/sa/server")).allowed
    not_names = binding("bind", "server-reader", [{"not_names": ["cluster.local/ns/foo/sa/client"]}])
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, not_names)
    assert not decide(engine, config, Conn()).allowed
    assert decide(engine, config, Conn(source=BAR_CLIENT)).allowed


def test_user_star_and_group() -> None:
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, binding("bind", "server-reader", [{"user": "*"}]))
    assert decide(engine, config, Conn(source=None)).allowed
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, binding("bind", "server-reader", [{"group": "admins"}]))
    assert not decide(engine, config, Conn()).allowed  # group is a JWT claim: L7 only
    assert decide(engine, config, Conn(layer="l7", claims={"groups": "admins"})).allowed


def test_role_methods_paths_constraints() -> None:
    r = role(
        "r",
        [
            {
                "services": ["server"],
                "methods": ["GET", "HEAD"],
                "paths": ["/api/*"],
                "constraints": [
                    {"key": "request.headers[version]", "values": ["v1"]},
                    {"key": "destination.port", "values": ["8080"]},
                ],
            }
        ],
    )
    engine, config = engine_of(rbac("ON"), r, binding("b", "r", [{"user": "*"}]))
    ok = Conn(layer="l7", method="GET", path="/api/x", headers={"version": "v1"})
    assert decide(engine, config, ok).allowed
    assert not decide(engine, config, Conn(layer="l7", method="POST", path="/api/x", headers={"version": "v1"})).allowed
    assert not decide(engine, config, Conn(layer="l7", method="GET", path="/api/x", headers={"version": "v2"})).allowed
    assert not decide(
        engine, config, Conn(layer="l7", method="GET", path="/api/x", headers={"version": "v1"}, port=9090)
    ).allowed


def test_services_star_covers_namespace_and_unknown_service_noted() -> None:
    star = role("all", [{"services": ["*"]}])
    engine, config = engine_of(
        rbac("ON_WITH_INCLUSION", inclusion={"namespaces": ["foo"]}), star, binding("b", "all", [{"user": "*"}])
    )
    assert decide(engine, config, Conn(dest="foo/other")).allowed
    missing = role("m", [{"services": ["nope.foo.svc.cluster.local"]}])
    engine, config = engine_of(rbac("ON"), missing, binding("b", "m", [{"user": "*"}]))
    assert not decide(engine, config, Conn()).allowed
    assert any("'nope.foo.svc.cluster.local' is not defined" in n for n in engine.warnings)


def test_unconvertible_constraint_grants_nothing() -> None:
    r = role("r", [{"services": ["server"], "constraints": [{"key": "destination.user", "values": ["x"]}]}])
    engine, config = engine_of(rbac("ON"), r, binding("b", "r", [{"user": "*"}]))
    assert not decide(engine, config, Conn()).allowed
    assert any("destination.user" in n for n in engine.warnings)


def test_invalid_legacy_objects_are_errors_and_fail_closed() -> None:
    engine, config = engine_of(rbac("MAYBE"))
    assert "ClusterRbacConfig default: field spec.mode: unknown mode 'MAYBE'" in str(engine.errors[0])
    assert not decide(engine, config, Conn()).allowed  # treated as ON
    bad_role = role("r", [{"methods": ["GET"]}])
    engine, config = engine_of(rbac("ON"), bad_role, binding("b", "r", [{"user": "*"}]))
    assert "ServiceRole foo/r: field spec.rules[0].services" in str(engine.errors[0])
    assert not decide(engine, config, Conn()).allowed
    no_subjects = yaml.safe_dump(
        {
            "apiVersion": "rbac.istio.io/v1alpha1",
            "kind": "ServiceRoleBinding",
            "metadata": {"name": "b", "namespace": "foo"},
            "spec": {"roleRef": {"name": "r"}},
        }
    )
    engine, _ = engine_of(rbac("ON"), SERVER_ROLE, no_subjects)
    assert "spec.subjects" in str(engine.errors[0])
    bad_authn = authn("Policy", "default", {"peers": [{"mtls": {"mode": "SOMETIMES"}}]})
    engine, config = engine_of(bad_authn)
    assert "spec.peers[0].mtls.mode" in str(engine.errors[0])
    assert not decide(engine, config, Conn(source=None)).allowed  # STRICT until fixed


def test_authn_policy_modes() -> None:
    cases = [
        ({"peers": [{"mtls": {}}]}, "STRICT"),
        ({"peers": [{"mtls": None}]}, "STRICT"),
        ({"peers": [{"mtls": {"mode": "PERMISSIVE"}}]}, "PERMISSIVE"),
        ({"peers": [{"mtls": {}}], "peerIsOptional": True}, "PERMISSIVE"),
        ({}, "DISABLE"),
    ]
    for spec, mode in cases:
        engine, config = engine_of(authn("Policy", "default", spec))
        w = config.workload("foo", "server")
        assert w and engine.peer_authentication_mode(w, 8080) == mode, spec


def test_mesh_policy_goes_to_root_namespace() -> None:
    engine, config = engine_of(authn("MeshPolicy", "default", {"peers": [{"mtls": {}}]}))
    w = config.workload("bar", "server")
    assert w and engine.peer_authentication_for(w, 80) == ("STRICT", "istio-system/default")


def test_authn_targets_map_to_service_selector_and_target_ports() -> None:
    spec = {"targets": [{"name": "server", "ports": [{"number": 80}]}], "peers": [{"mtls": {}}]}
    engine, config = engine_of(authn("Policy", "svc", spec))
    server, other = config.workload("foo", "server"), config.workload("foo", "other")
    assert server and other
    assert engine.peer_authentication_mode(server, 8080) == "STRICT"  # service port 80 -> targetPort 8080
    assert engine.peer_authentication_mode(server, 9090) == "PERMISSIVE"
    assert engine.peer_authentication_mode(other, 8080) == "PERMISSIVE"


def test_converted_objects_are_annotated_and_valid() -> None:
    objects = load_documents(CLUSTER_YAML, "c.yaml") + load_documents(
        "\n---\n".join([rbac("ON"), SERVER_ROLE, BIND_FOO_CLIENT]), "old.yaml"
    )
    config = build_config(objects)
    result = convert_objects([o for o in objects if o.api_version.startswith("rbac")], config)
    assert result.errors == []
    for obj in result.objects:
        assert obj.api_version == "security.istio.io/v1"
        assert obj.annotations[CONVERTED_FROM_ANNOTATION]
        assert obj.source.file == "old.yaml"
    engine = PolicyEngine.from_objects(result.objects, config=config)
    assert engine.errors == []


def test_convert_command_round_trips_seed000(tmp_path: Path) -> None:
    seed = FIXTURES / "seed000_couchdb.yaml"
    rc, out, err = run_cli(["convert", "-f", str(seed)])
    assert rc == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted((d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("AuthorizationPolicy", "with-istio", "bind-test-app-service-couchdb-role-couchdb"),
        ("AuthorizationPolicy", "with-istio", "rbac-default-deny"),
        ("PeerAuthentication", "with-istio", "default"),
    ]
    allow = next(d for d in docs if d["metadata"]["name"].startswith("bind"))
    assert allow["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "couchdb",
        "app.kubernetes.io/instance": "couchdb",
    }
    assert allow["spec"]["rules"] == [
        {
            "from": [{"source": {"principals": ["cluster.local/ns/with-istio/sa/test-app-test-app-chart"]}}],
            "to": [{"operation": {"methods": ["GET"]}}],
        }
    ]
    # the converted YAML plus the cluster objects decides exactly like the legacy file
    current = tmp_path / "current.yaml"
    current.write_text(out)
    cluster = tmp_path / "cluster.yaml"
    legacy_kinds = {"ClusterRbacConfig", "ServiceRole", "ServiceRoleBinding", "Policy"}
    cluster.write_text(
        yaml.safe_dump_all([d for d in yaml.safe_load_all(seed.read_text()) if d and d["kind"] not in legacy_kinds])
    )
    for args in (["--layer", "l7"], ["--layer", "l7", "--method", "PUT"], []):
        for src in ("pod/with-istio/test-app", "pod/with-istio/intruder", "plaintext"):
            base = [
                "authz",
                "check",
                "--from",
                src,
                "--to",
                "pod/with-istio/couchdb-0",
                "--port",
                "5984",
                "-o",
                "json",
                *args,
            ]
            old = run_cli([*base, "-f", str(seed)])
            new = run_cli([*base, "-f", str(cluster), "-f", str(current)])
            assert old[0] == new[0], (src, args, old, new)


def test_convert_command_notes_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "old.yaml"
    f.write_text(
        authn(
            "Policy",
            "p",
            {
                "peers": [{"mtls": {}}],
                "principalBinding": "USE_ORIGIN",
                "origins": [
                    {
                        "jwt": {
                            "issuer": "https://i",
                            "jwksUri": "https://i/jwks",
                            "trigger_rules": [{"excluded_paths": [{"exact": "/health"}]}],
                        }
                    }
                ],
            },
        )
    )
    rc, out, err = run_cli(["convert", "-f", str(f)])
    assert rc == 0, err
    assert "# note: Policy foo/p: principalBinding USE_ORIGIN has no equivalent" in out
    docs = [d for d in yaml.safe_load_all(out) if d]
    ra = next(d for d in docs if d["kind"] == "RequestAuthentication")
    assert ra["spec"]["jwtRules"] == [{"issuer": "https://i", "jwksUri": "https://i/jwks"}]
    deny = next(d for d in docs if d["kind"] == "AuthorizationPolicy")
    assert deny["spec"]["action"] == "DENY"
    assert deny["spec"]["rules"][0]["to"] == [{"operation": {"notPaths": ["/health"]}}]

    f.write_text(rbac("SOMETIMES"))
    rc, out, err = run_cli(["convert", "-f", str(f)])
    assert rc == 2 and "spec.mode" in err and str(f) in err and out == ""

    f.write_text(CLUSTER_YAML)
    rc, _, err = run_cli(["convert", "-f", str(f)])
    assert rc == 2 and "nothing to convert" in err


def test_principal_prefix_from_converted_binding_matches() -> None:
    engine, config = engine_of(
        rbac("ON"), SERVER_ROLE, binding("b", "server-reader", [{"user": "cluster.local/ns/foo/*"}])
    )
    assert decide(engine, config, Conn(source=FOO_CLIENT)).allowed
    assert not decide(engine, config, Conn(source=BAR_CLIENT)).allowed


def test_subject_constraints_are_anded() -> None:
    both = binding(
        "b",
        "server-reader",
        [{"user": "cluster.local/ns/foo/sa/client", "properties": {"source.principal": "cluster.local/ns/bar/*"}}],
    )
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, both)
    assert not decide(engine, config, Conn()).allowed  # user matches, property does not
    assert not decide(engine, config, Conn(source=BAR_CLIENT)).allowed
    ns_and_ip = binding(
        "b", "server-reader", [{"properties": {"source.namespace": "foo", "source.ip": "10.244.1.0/24"}}]
    )
    engine, config = engine_of(rbac("ON"), SERVER_ROLE, ns_and_ip)
    assert decide(engine, config, Conn()).allowed
    assert not decide(engine, config, Conn(source_ip="10.244.2.10")).allowed


def test_convert_warns_about_l7_rules_the_node_proxy_cannot_enforce(tmp_path: Path) -> None:
    f = tmp_path / "old.yaml"
    l7_role = role(
        "reader", [{"services": ["server.foo.svc.cluster.local"], "methods": ["GET"], "paths": ["/api/*"]}]
    )
    l4_role = role("l4", [{"services": ["server.foo.svc.cluster.local"], "ports": [8080]}])
    f.write_text(
        "---\n".join(
            [
                CLUSTER_YAML,
                rbac("ON"),
                l7_role,
                binding("bind", "reader", [{"user": "cluster.local/ns/foo/sa/client"}]),
                l4_role,
                binding("bind-l4", "l4", [{"user": "cluster.local/ns/foo/sa/other"}]),
            ]
        )
    )
    rc, _, err = run_cli(["convert", "-f", str(f)])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err  # the L4-only role converts without one
    (w,) = warnings
    assert w.startswith("warning: AuthorizationPolicy foo/") and "rule 0 (from ServiceRole" in w
    assert "uses " in w and "methods" in w and "paths" in w
    assert "the node proxy cannot enforce" in w and "never matches" in w and "waypoint" in w
