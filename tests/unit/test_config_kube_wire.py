"""The Kubernetes source's sans-IO parts: chunked decoding and event lines however the bytes are split, bounded
lines, the kubeconfig and in-cluster settings, the flags' errors, and (property) any sequence of watch events
applied to a reflector gives the model the file source builds from the resulting objects."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.kubeapi import FakeKubeApi, authz_policy, namespace, pod, service
from ztunnel.config.kube.client import KubeConfigError, from_kubeconfig, in_cluster
from ztunnel.config.kube.source import RESOURCES, KubeConfigSource, make_source
from ztunnel.config.kube.wire import ChunkedDecoder, KubeWireError, LineSplitter, Oversized, strip_object
from ztunnel.config.loader import build_config, load_documents


def _chunked(payload: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for n in sizes:
        part = payload[i : i + n]
        if not part:
            break
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
        i += n
    if i < len(payload):
        out += f"{len(payload) - i:X}\r\n".encode() + payload[i:] + b"\r\n"
    return out + b"0\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10), st.lists(st.integers(1, 40), max_size=20))
def test_chunked_decoding_is_the_same_however_the_bytes_arrive(
    payload: bytes, sizes: list[int], cuts: list[int]
) -> None:
    wire = _chunked(payload, sizes)
    decoder, out, i = ChunkedDecoder(), b"", 0
    for n in [*cuts, len(wire)]:
        out += decoder.feed(wire[i : i + n])
        i += n
    assert decoder.done and out == payload


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-1\r\n", b"5\r\nabcdeXY", b"1" * 2000])
def test_bad_chunking_is_an_error_not_a_guess(bad: bytes) -> None:
    with pytest.raises(KubeWireError):
        ChunkedDecoder().feed(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8), st.lists(st.integers(1, 30)))
def test_lines_are_split_and_bounded_however_the_bytes_arrive(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    splitter, out, i = LineSplitter(max_line=20), [], 0
    for n in [*cuts, len(data)]:
        out += splitter.feed(data[i : i + n])
        i += n
    want: list[bytes | str] = ["big" if len(x) > 20 else x for x in lines if len(x) > 20 or x.strip()]
    assert ["big" if isinstance(x, Oversized) else x for x in out] == want


def test_the_kubeconfig_context_ca_token_and_client_certificate(tmp_path: Path) -> None:
    with FakeKubeApi() as api:
        ca = base64.b64encode(api.ca_pem).decode()
    (tmp_path / "token").write_text("from-file\n")
    doc = {
        "current-context": "b",
        "clusters": [
            {"name": "one", "cluster": {"server": "https://10.0.0.1:6443/prefix", "certificate-authority-data": ca}},
        ],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [
            {"name": "a", "context": {"cluster": "one", "user": "u"}},
            {"name": "b", "context": {"cluster": "one", "user": "u", "namespace": "ops"}},
        ],
    }
    f = tmp_path / "kubeconfig"
    f.write_text(json.dumps(doc))
    ep = from_kubeconfig(f)
    got = (ep.host, ep.port, ep.base_path, ep.namespace, ep.bearer())
    assert got == ("10.0.0.1", 6443, "/prefix", "ops", "from-file")
    doc["current-context"] = "missing"
    f.write_text(json.dumps(doc))
    with pytest.raises(KubeConfigError, match="field contexts: no entry named 'missing'"):
        from_kubeconfig(f)
    doc["current-context"] = "a"
    doc["clusters"][0]["cluster"]["server"] = "10.0.0.1:6443"  # type: ignore[index]
    f.write_text(json.dumps(doc))
    with pytest.raises(KubeConfigError, match=r"cluster\.server: .10\.0\.0\.1:6443. is not an https URL"):
        from_kubeconfig(f)


def test_in_cluster_reads_the_service_account_and_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match=r"KUBERNETES_SERVICE_HOST .* --kubeconfig"):
        in_cluster(tmp_path, {})
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeConfigError, match=r"ca\.crt is missing"):
        in_cluster(tmp_path, env)
    with FakeKubeApi() as api:
        (tmp_path / "ca.crt").write_bytes(api.ca_pem)
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("istio-system")
    ep = in_cluster(tmp_path, env)
    assert (ep.host, ep.port, ep.server_name, ep.namespace, ep.bearer()) == (
        "10.96.0.1",
        443,
        "kubernetes.default.svc",
        "istio-system",
        "sa-token",
    )
    (tmp_path / "token").write_text("rotated")  # projected tokens rotate: read for each request
    assert ep.bearer() == "rotated"


def test_the_flags_say_which_source_is_missing_or_doubled(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match=r"-f FILE .* or --source kubernetes"):
        make_source("file", [], None)
    with pytest.raises(KubeConfigError, match="-f and --source kubernetes exclude each other"):
        make_source("kubernetes", ["x.yaml"], None)
    with pytest.raises(KubeConfigError, match="--kubeconfig is used with --source kubernetes only"):
        make_source("file", ["x.yaml"], "kc")


# ---- property: events applied to the reflectors == the file source's model of the final objects --------------

NAMES = ["a", "b", "c"]
IPS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]


def _object(kind: str, name: str, variant: int) -> dict[str, Any]:
    if kind == "Pod":
        return pod(name, node=f"node-{variant % 2}", ip=IPS[variant % 4], labels={"v": str(variant)}, heavy=variant > 1)
    if kind == "Service":
        return service(name, "shop", f"10.96.0.{variant}", {"app": NAMES[variant % 3]})
    if kind == "Namespace":
        return namespace("shop", {"istio.io/dataplane-mode": "ambient"} if variant % 2 else {})
    rule = {"from": [{"source": {"principals": [f"cluster.local/ns/shop/sa/{NAMES[variant % 3]}"]}}]}
    return authz_policy(name, "shop", {"action": ["ALLOW", "DENY"][variant % 2], "rules": [rule]})


EVENT = st.tuples(
    st.sampled_from(["ADDED", "MODIFIED", "DELETED"]),
    st.sampled_from(["Pod", "Service", "Namespace", "AuthorizationPolicy"]),
    st.sampled_from(NAMES),
    st.integers(0, 5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT, max_size=25))
def test_any_sequence_of_events_gives_the_file_sources_model(events: list[tuple[str, str, str, int]]) -> None:
    kinds = ("Pod", "Service", "Namespace", "AuthorizationPolicy")
    source = KubeConfigSource(from_kubeconfig_stub(), resources=[r for r in RESOURCES if r.kind in kinds])
    by_kind = {r.resource.kind: r for r in source.reflectors}
    for r in source.reflectors:
        r.api_version = r.resource.versions[0]
        r.synced.set()
    truth: dict[tuple[str, str], dict[str, Any]] = {}
    rv = 100
    for kind_of_event, kind, name, variant in events:
        obj = _object(kind, name, variant)
        key = (kind, obj["metadata"]["name"])
        rv += 1
        obj["metadata"]["resourceVersion"] = str(rv)
        obj["metadata"].setdefault("namespace", "shop") if kind != "Namespace" else None
        if kind_of_event == "DELETED":
            truth.pop(key, None)
        else:
            truth[key] = copy.deepcopy(obj)
        assert by_kind[kind].apply(json.dumps({"type": kind_of_event, "object": obj}).encode())
        assert by_kind[kind].resource_version == str(rv)
    got, _ = source.build(source.snapshot())
    text = "\n---\n".join(json.dumps(o) for o in truth.values())
    want = build_config(load_documents(text)) if truth else build_config([])
    strip = lambda cfg: (  # noqa: E731
        sorted((w.ref, w.node, w.ips, dict(w.labels), w.enrolled, w.identity) for w in cfg.workloads),
        sorted((s.ref, s.cluster_ips, dict(s.selector)) for s in cfg.services),
        {k: dict(v.labels) for k, v in cfg.namespaces.items()},
        sorted((o.kind, o.namespace, o.name, json.dumps(o.spec, sort_keys=True)) for o in cfg.policy_objects),
    )
    assert strip(got) == strip(want)


def from_kubeconfig_stub() -> Any:
    from ztunnel.config.kube.client import KubeEndpoint

    return KubeEndpoint("127.0.0.1", 1, None)


def test_stripping_keeps_what_the_model_reads() -> None:
    heavy = pod("p", ip="10.0.0.1", heavy=True)
    heavy["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": "{...}" * 100,
        "networking.istio.io/subject-alt-names": "x",
    }
    heavy["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080, "hostPort": 1}]
    kept = strip_object(heavy, "v1", "Pod")
    assert kept["metadata"]["annotations"] == {"networking.istio.io/subject-alt-names": "x"}
    assert kept["spec"]["containers"] == [{"ports": [{"name": "http", "containerPort": 8080}]}]
    ready = [{"type": "Ready", "status": "True"}]
    assert kept["status"] == {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}], "conditions": ready}
    assert "managedFields" not in kept["metadata"] and "ownerReferences" not in kept["metadata"]
    assert len(json.dumps(kept)) * 4 < len(json.dumps(heavy))
