"""The deploy/ tests' own helpers (tests/support/deploy.py): seed extraction, the seed repairs, helmlite."""

from __future__ import annotations

import pytest
import yaml

from tests.support.deploy import (
    SEED_FIXTURES,
    SEED_REPAIRS,
    SEEDS,
    helmlite,
    seed_documents,
    seed_policies,
    vendored_seed_files,
)


def test_seed_extraction_stops_at_prose_and_keeps_empty_fields() -> None:
    text = (
        "Intro text.\n\napiVersion: \u201cauthentication.istio.io/v1alpha1\u201d\nkind: \u201cPolicy\u201d\n"
        "metadata:\n  name: x\nspec:\n  peers:\n\nWhen we use this configuration, things happen.\n"
        "```yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\n```\n"
    )
    docs = list(seed_documents(text))
    assert docs == [
        {
            "apiVersion": "authentication.istio.io/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "x"},
            "spec": {"peers": None},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "y"}},
    ]


def test_seed_policies_cover_every_kind_the_seeds_use() -> None:
    kinds = {k.split(":")[1].split("/")[0] for k, _ in seed_policies()}
    assert {"AuthorizationPolicy", "PeerAuthentication", "Policy", "ServiceRole", "ServiceRoleBinding"} <= kinds
    assert "ClusterRbacConfig" in kinds
    assert len(seed_policies()) >= 20


def test_seed_repairs_make_yaml_of_what_was_not() -> None:
    for bad, good in SEED_REPAIRS:
        with pytest.raises(yaml.YAMLError):
            yaml.safe_load("rules:\n" + bad + "\n        methods: [GET]\n")
        assert yaml.safe_load("rules:\n" + good + "\n        methods: [GET]\n")


def test_the_vendored_seed_policies_are_the_seeds_and_the_repairs_still_needed() -> None:
    """A freshness check (the acceptance is the tests above, on the vendored copy): it needs the originals."""
    if not SEEDS.is_dir():
        pytest.skip(f"the seeds are not at {SEEDS} (a clone outside the project's tree): nothing to compare with")
    vendored = {f.name: f.read_text() for f in SEED_FIXTURES.glob("*.yaml")}
    assert vendored == vendored_seed_files(), "the seeds changed: `.venv/bin/python -m tests.support.deploy`"
    for bad, _ in SEED_REPAIRS:
        assert any(bad in f.read_text() for f in SEEDS.glob("*.txt")), f"no seed has {bad!r} any more: drop the repair"


def test_helmlite_renders_what_go_templates_would() -> None:
    nodes, defines = helmlite.parse(
        '{{- define "t" -}}n={{ .n }}{{- end }}'
        "a:{{ if .x }} yes{{ else if .y }} y{{ else }} no{{ end }}\n"
        "{{- range $i := .l }}\n- {{ $i | quote }}{{ end }}\n"
        "b: {{ .missing | default 3 }} {{ include \"t\" . }} {{ (eq .n 2) }}\n"
        "{{- range $k, $v := .m }} {{ $k }}={{ $v }}{{- end }}\n"
        "c:{{ toYaml .m | nindent 2 }}",
        "t",
    )
    r = helmlite.Renderer(defines, strict=False)
    out = r.render(nodes, {"x": 0, "y": "", "l": ["p", "q"], "n": 2, "m": {"b": 1, "a": 2}}, {"$": {}})
    assert out == 'a: no\n- "p"\n- "q"\nb: 3 n=2 true a=2 b=1\nc:\n  a: 2\n  b: 1'
    with pytest.raises(helmlite.TemplateError, match="no key 'tpyo'"):
        r2 = helmlite.Renderer({}, strict=True)
        r2.render(helmlite.parse("{{ .Values.tpyo }}", "x")[0], {"Values": {}}, {"$": {}})
