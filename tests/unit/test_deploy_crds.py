"""The CRDs of deploy/crds: every seed policy (and every policy fixture of the tests) is accepted by their
schemas with the API server's strict field validation, typos and wrong values are refused, the schemas are
structural, and the two copies (Kustomize, Helm crds/) are what deploy/crds/generate.py writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy import (
    CHART,
    CRD_GROUPS,
    DEPLOY,
    ROOT,
    crd_errors,
    crd_generate,
    crd_schemas,
    seed_policies,
)

FIXTURES = ROOT / "tests" / "fixtures" / "policy"


@pytest.mark.parametrize(("where", "obj"), seed_policies(), ids=[w for w, _ in seed_policies()])
def test_every_seed_policy_validates_against_the_crd_schema(where: str, obj: dict[str, Any]) -> None:
    assert crd_errors(obj) == [], where


def test_every_policy_fixture_validates_against_the_crd_schema() -> None:
    checked = 0
    for f in sorted(FIXTURES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(CRD_GROUPS):
                assert crd_errors(doc) == [], f"{f.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}"
                checked += 1
    assert checked >= 30


AP: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "x", "namespace": "default"},
    "spec": {
        "action": "DENY",
        "selector": {"matchLabels": {"app": "a"}},
        "rules": [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}],
                "to": [{"operation": {"ports": ["8080"]}}],
            }
        ],
    },
}


def _with(path: list[Any], value: Any, base: dict[str, Any] = AP) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    cur: Any = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("mutated", "expect"),
    [
        (_with(["spec", "action"], "REJECT"), "spec.action: 'REJECT' is not one of"),
        (_with(["spec", "acton"], "DENY"), "Additional properties are not allowed ('acton'"),
        (_with(["spec", "rules", 0, "from", 0, "source", "principal"], ["x"]), "('principal' was unexpected)"),
        (_with(["spec", "rules", 0, "to", 0, "operation", "ports"], ["http"]), "does not match"),
        (_with(["spec", "rules", 0, "when"], [{"values": ["x"]}]), "'key' is a required property"),
        (_with(["spec", "rules"], {"from": []}), "is not of type 'array'"),
        (_with(["apiVersion"], "security.istio.io/v1alpha3"), "no CRD serves"),
    ],
    ids=["bad-enum", "typo-field", "typo-nested", "named-port", "when-no-key", "rules-not-list", "unserved-version"],
)
def test_typos_and_wrong_values_are_refused(mutated: dict[str, Any], expect: str) -> None:
    assert crd_errors(AP) == []
    errors = crd_errors(mutated)
    assert any(expect in e for e in errors), errors


def test_legacy_and_gateway_kinds_are_checked_too() -> None:
    binding = {
        "apiVersion": "rbac.istio.io/v1alpha1",
        "kind": "ServiceRoleBinding",
        "metadata": {"name": "b", "namespace": "n"},
        "spec": {"subjects": [{"user": "u"}], "roleRef": {"kind": "ServiceRole", "name": "r"}},
    }
    assert crd_errors(binding) == []
    no_name = _with(["spec", "roleRef"], {"kind": "ServiceRole"}, binding)
    assert crd_errors(no_name) == ["spec.roleRef: 'name' is a required property"]
    pa = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": "p"}}
    assert crd_errors({**pa, "spec": {"portLevelMtls": {8080: {"mode": "DISABLE"}}}}) == []
    assert crd_errors({**pa, "spec": {"mtls": {"mode": "strict"}}}) != []
    gw = yaml.safe_load((DEPLOY / "waypoint" / "waypoint.yaml").read_text().split("---\n")[1])
    assert gw["kind"] == "Gateway" and crd_errors(gw) == []
    assert crd_errors(_with(["spec", "listeners"], [], gw)) != []


def _walk(schema: Any, path: str) -> list[str]:
    """Structural-schema rules the API server enforces: every node has a type (unless it preserves
    unknown fields), no $ref/anyOf-only nodes, arrays have items."""
    problems: list[str] = []
    if not isinstance(schema, dict):
        return problems
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if schema.get("type") == "array" and "items" not in schema:
        problems.append(f"{path}: array without items")
    for bad in ("$ref", "definitions", "dependencies", "patternProperties", "propertyNames"):
        if bad in schema:
            problems.append(f"{path}: {bad} is not allowed in a CRD schema")
    for name, sub in (schema.get("properties") or {}).items():
        problems += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        problems += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += _walk(schema["additionalProperties"], f"{path}{{}}")
    return problems


def test_crds_are_structural_and_cover_the_kinds_the_config_loader_reads() -> None:
    from ztunnel.config.loader import SECURITY_GROUP_KINDS

    files = [f for f in sorted((DEPLOY / "crds").glob("*.yaml")) if f.name != "kustomization.yaml"]
    crds = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    for crd in crds:
        spec = crd["spec"]
        assert [v["storage"] for v in spec["versions"]].count(True) == 1, crd["metadata"]["name"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        for v in spec["versions"]:
            assert _walk(v["schema"]["openAPIV3Schema"], crd["metadata"]["name"]) == []
    served = {(av.split("/")[0], kind) for av, kind in crd_schemas()}
    for group, kinds in SECURITY_GROUP_KINDS.items():
        for kind in kinds:
            assert (group, kind) in served, f"no CRD for {group} {kind}"
    assert ("gateway.networking.k8s.io", "Gateway") in served
    assert {av for av, kind in crd_schemas() if kind == "AuthorizationPolicy"} == {
        "security.istio.io/v1",
        "security.istio.io/v1beta1",
    }


def test_crd_files_are_what_generate_writes_and_helm_has_the_same() -> None:
    for path, text in crd_generate.expected().items():
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python deploy/crds/generate.py"
    ours = sorted(p.name for p in (DEPLOY / "crds").glob("*.yaml") if p.name != "kustomization.yaml")
    assert ours == sorted(p.name for p in Path(CHART / "crds").glob("*.yaml"))
