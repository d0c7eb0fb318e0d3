"""The deploy/ tests' kit: render Kustomize and the Helm chart, read the CRD schemas as JSON Schema (with the
API server's strict field validation), and pull the seed documents' YAML examples out of their prose.
tests/unit/test_deploy_helpers.py checks these helpers themselves."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "ztunnel-py"
SEEDS = ROOT.parent / "shared" / "seeds"  # the originals: beside the repository in the project's tree, not in CI
SEED_FIXTURES = ROOT / "tests" / "fixtures" / "seeds"  # their policies, vendored: what the tests read
KUBECTL = shutil.which("kubectl")
HELM = shutil.which("helm")

sys.path.insert(0, str(DEPLOY / "tools"))
sys.path.insert(0, str(DEPLOY / "crds"))
import generate as crd_generate  # noqa: E402, F401  (re-exported for the tests)
import helmlite  # noqa: E402
import render as deploy_render  # noqa: E402, F401  (re-exported for the tests)

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")

Obj = dict[str, Any]


def key(o: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = o.get("metadata") or {}
    return (str(o.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))


def kustomize(path: str) -> list[Obj]:
    assert KUBECTL is not None
    p = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0, f"kubectl kustomize deploy/{path} failed:\n{p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def chart_crds() -> list[Obj]:
    out: list[Obj] = []
    for f in sorted((CHART / "crds").glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return out


def helm_objects(
    values: Mapping[str, Any], *, include_crds: bool = False, namespace: str = "istio-system"
) -> list[Obj]:
    """The chart's objects with these values, as `helm template --include-crds` would give them."""
    objs: list[Obj] = helmlite.objects(helmlite.render_chart(CHART, namespace=namespace, values=values))
    return (chart_crds() if include_crds else []) + objs


def helm_binary_objects(values: Mapping[str, Any], tmp: Path, namespace: str = "istio-system") -> list[Obj]:
    assert HELM is not None
    vf = tmp / "values.yaml"
    vf.write_text(yaml.safe_dump(dict(values)))
    p = subprocess.run(
        [HELM, "template", "ztunnel-py", str(CHART), "-n", namespace, "-f", str(vf)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


# ---- CRD schemas as JSON Schema ------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """openAPIV3Schema -> JSON Schema with the API server's behaviour: `nullable` admits null, and an
    object with declared properties refuses unknown fields (kubectl's default --validate=strict), unless
    x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every CRD of deploy/crds."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in sorted((DEPLOY / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for v in spec["versions"]:
                if v["served"]:
                    out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = _strict(
                        copy.deepcopy(v["schema"]["openAPIV3Schema"])
                    )
    return out


def crd_errors(obj: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse `obj` under our CRDs ([] when it accepts it)."""
    import jsonschema

    schema = crd_schemas().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if schema is None:
        return [f"no CRD serves {obj.get('apiVersion')} {obj.get('kind')}"]
    as_json = json.loads(json.dumps(obj))  # what kubectl sends: YAML's integer keys become strings
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(as_json)]


# ---- the seeds' YAML --------------------------------------------------------------------------------------

_TYPOGRAPHIC = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
_START = re.compile(r"^(apiVersion|kind):")
_YAMLISH = re.compile(r"^(\s+\S|- |---\s*$|[A-Za-z_][\w.-]*:(\s|$))")


# Seed 002 indents two examples' `- operation:` one column short of `to:` (not YAML: kubectl refuses it
# too); the test repairs exactly that, and test_seed_repairs_are_still_needed says when it no longer is.
SEED_REPAIRS = (("   - to:\n    - operation:", "   - to:\n     - operation:"),)


def seed_documents(text: str) -> Iterator[Obj]:
    """The Kubernetes objects written in a seed's prose: blocks that start at `apiVersion:`/`kind:` and run
    while lines look like YAML. Typographic quotes (copied from a web page) become straight ones, as a user
    must make them before applying, and SEED_REPAIRS are made."""
    text = text.translate(_TYPOGRAPHIC)
    for bad, good in SEED_REPAIRS:
        text = text.replace(bad, good)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not _START.match(lines[i]):
            i += 1
            continue
        block: list[str] = []
        while i < len(lines):
            line = lines[i]
            if line.startswith("```") or line.strip() == "EOF":
                break
            if line.strip() == "":
                nxt = next((x for x in lines[i + 1 :] if x.strip()), "")
                if not _YAMLISH.match(nxt) or nxt.startswith("```"):
                    break
            elif block and not _YAMLISH.match(line):
                break
            block.append(line)
            i += 1
        for raw in re.split(r"^---\s*$", "\n".join(block), flags=re.M):
            try:
                doc = yaml.safe_load(raw)
            except yaml.YAMLError:
                # The seeds elide parts of some objects with "...": fine for a Service, not for a policy.
                if re.search(r"^apiVersion:\s*\S*(" + "|".join(map(re.escape, CRD_GROUPS)) + ")", raw, re.M):
                    raise
                continue
            if isinstance(doc, dict) and "kind" in doc:
                yield doc


CRD_GROUPS = ("security.istio.io/", "rbac.istio.io/", "authentication.istio.io/", "gateway.networking.k8s.io/")


def extract_seed_policies(seeds: Path = SEEDS) -> list[tuple[str, Obj]]:
    """(seed file:kind/name, object) for every object of a group our CRDs serve, pulled out of the seeds' prose."""
    out: list[tuple[str, Obj]] = []
    for f in sorted(seeds.glob("*.txt")):
        for doc in seed_documents(f.read_text()):
            if str(doc.get("apiVersion", "")).startswith(CRD_GROUPS):
                out.append((f"{f.name[:3]}:{doc['kind']}/{(doc.get('metadata') or {}).get('name')}", doc))
    return out


def vendored_seed_files(seeds: Path = SEEDS) -> dict[str, str]:
    """tests/fixtures/seeds/<file> -> its text, as extracted from the seeds now (the vendored copy lets the
    tests run on a fresh clone, where ../shared/seeds is absent)."""
    by_seed: dict[str, list[Obj]] = {}
    sources = {f.name[:3]: f.name for f in seeds.glob("*.txt")}
    for where, doc in extract_seed_policies(seeds):
        by_seed.setdefault(where[:3], []).append(doc)
    header = (
        "# The policies of the seed {}, extracted (SEED_REPAIRS made) by tests/support/deploy.py;\n"
        "# `.venv/bin/python -m tests.support.deploy` rewrites this file from ../shared/seeds.\n"
    )
    return {
        f"{n}.yaml": header.format(sources[n]) + yaml.safe_dump_all(docs, sort_keys=False)
        for n, docs in sorted(by_seed.items())
    }


def seed_policies() -> list[tuple[str, Obj]]:
    """(seed file:kind/name, object) for every seed policy, from the vendored copy (tests/fixtures/seeds)."""
    out: list[tuple[str, Obj]] = []
    for f in sorted(SEED_FIXTURES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict):
                out.append((f"{f.stem}:{doc['kind']}/{(doc.get('metadata') or {}).get('name')}", doc))
    return out


if __name__ == "__main__":
    SEED_FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, text in vendored_seed_files().items():
        (SEED_FIXTURES / name).write_text(text)
