"""The Kubernetes config source against a hostile API server (or a man in the middle) and hostile tenants: every
byte from the API and every object a namespace admin can create is an attack (issue 14, review)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually_async
from tests.support.kubeapi import (
    FakeKubeApi,
    authz_policy,
    configmap,
    file_model,
    kube_client,
    kube_source,
    namespace,
    pod,
    reflector_of,
    sample_cluster,
    service,
    watching,
)
from tests.support.labapps import waypoint_gateway
from ztunnel.config.kube import reflector as reflector_module
from ztunnel.config.kube.client import KubeApiError, KubeClient, KubeConfigError, from_kubeconfig
from ztunnel.config.kube.wire import ChunkedDecoder, KubeWireError
from ztunnel.config.model import USE_WAYPOINT_LABEL
from ztunnel.policy.engine import PolicyEngine


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as server:
        yield server


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


# ---- the wire ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [b"0x10", b"+10", b"1_0", b"-5", b" 1 0", b"1" * 17, b""])
def test_a_chunk_size_that_is_not_plain_hex_is_refused(size: bytes) -> None:
    # int(x, 16) takes "0x10", "+10" and "1_0": a lenient reader and a strict proxy in between would frame the
    # stream differently; 17 hex digits is more than any body can be.
    with pytest.raises(KubeWireError, match="bad chunk size"):
        ChunkedDecoder().feed(size + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n")


def test_a_plain_hex_chunk_size_with_an_extension_is_read() -> None:
    d = ChunkedDecoder()
    assert d.feed(b"A;name=value\r\n0123456789\r\n0\r\n\r\n") == b"0123456789" and d.done


async def test_a_watch_whose_answer_never_comes_times_out(api: FakeKubeApi, tmp_path: Path) -> None:
    async def silent(_w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        await api.until_stopped()

    api.raw["pods"] = silent
    client = kube_client(api, tmp_path)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(10):
            async for _ in client.stream_lines("/api/v1/pods?watch=true", idle_timeout=0.5):
                pass
    assert time.monotonic() - started < 5  # the idle bound, not the test's own 10 s


async def test_a_watch_that_drips_a_byte_at_a_time_ends_at_its_deadline(
    api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def drip(w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(600):  # 60 s at most
                w.write(b"1\r\n \r\n")
                await w.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass

    api.put_all(sample_cluster())
    source = kube_source(api, tmp_path)
    source.load()
    api.raw["pods"] = drip
    monkeypatch.setattr(reflector_module, "IDLE_GRACE_S", 0.5)
    pods = reflector_of(source, "pods")
    pods.watch_timeout = (1, 1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(8):
            await pods.watch_once()
    assert time.monotonic() - started < 4  # timeoutSeconds + grace, not the drip's 60 s (nor the test's 8)


async def test_a_list_declaring_10_gb_is_refused_before_reading(api: FakeKubeApi, tmp_path: Path) -> None:
    async def huge(w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10737418240\r\n\r\n{")
        await w.drain()
        await api.until_stopped()

    api.raw["services"] = huge
    with pytest.raises(KubeApiError, match="content-length 10737418240 over the limit"):
        async with asyncio.timeout(5):
            await kube_client(api, tmp_path).get("/api/v1/services")


async def test_a_list_nested_100000_deep_is_refused_not_a_crash(api: FakeKubeApi, tmp_path: Path) -> None:
    async def deep(w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        body = b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()

    api.raw["services"] = deep
    with pytest.raises(KubeApiError, match="not JSON"):
        await kube_client(api, tmp_path).get("/api/v1/services")


def test_insecure_skip_tls_verify_is_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    cfg = api.kubeconfig(tmp_path / "kubeconfig")
    doc = json.loads(cfg.read_text())
    doc["clusters"][0]["cluster"] = {"server": api.url, "insecure-skip-tls-verify": True}
    cfg.write_text(json.dumps(doc))
    with pytest.raises(KubeConfigError, match="insecure-skip-tls-verify"):
        from_kubeconfig(cfg)


async def test_a_man_in_the_middle_without_the_ca_is_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    cfg = api.kubeconfig(tmp_path / "kubeconfig")
    doc = json.loads(cfg.read_text())
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]  # the system CAs: the fake's is not one
    cfg.write_text(json.dumps(doc))
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        await KubeClient(from_kubeconfig(cfg)).get("/api/v1/pods")
    assert not api.requests  # no token was sent to it


# ---- watch events the API should never send -----------------------------------------------------------------


async def _watched(api: FakeKubeApi, tmp_path: Path, **kw: Any) -> Any:
    api.put_all(sample_cluster())
    source = kube_source(api, tmp_path, **kw)
    source.load()
    return source


async def test_events_the_request_did_not_ask_for_are_refused(api: FakeKubeApi, tmp_path: Path) -> None:
    """Another kind on a pods watch, a pod of another node on a node agent's pods watch (field selector), a
    ConfigMap of another namespace or name on the mesh ConfigMap's watch, names with path characters."""
    source = await _watched(api, tmp_path, pods_on_node="node-a")
    pods = reflector_of(source, "pods")
    mesh = next(r for r in source.reflectors if r.resource.plural == "configmaps")
    async with watching(source):
        await eventually_async(
            lambda: api.watch_count("configmaps") == 1 and api.watch_count("pods") == 1, what="the watches open"
        )
        svc = service("client", "shop", "10.96.0.99", {"app": "x"})
        api.send_raw("pods", _event("ADDED", svc))
        api.send_raw("pods", _event("ADDED", pod("elsewhere", node="node-b", ip="10.1.0.50")))
        api.send_raw("pods", _event("MODIFIED", pod("client", node="node-b", ip="10.1.0.1")))
        api.send_raw("pods", _event("ADDED", pod("../../kube-system/pods/x", node="node-a", ip="10.1.0.51")))
        api.send_raw("pods", _event("ADDED", pod("ok", "a/b", node="node-a", ip="10.1.0.52")))
        api.send_raw("pods", _event("ADDED", pod("..", node="node-a", ip="10.1.0.53")))
        tenant_mesh = configmap(
            "istio",
            "shop",
            {"mesh": "extensionProviders:\n- name: evil\n  envoyExtAuthzHttp: {service: e.shop, port: 80}\n"},
        )
        api.send_raw("configmaps", _event("ADDED", tenant_mesh))
        api.put(pod("after", node="node-a", ip="10.1.0.13"))
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "after") is not None,
            what="the next good event",
        )
    cfg = source.current
    assert cfg is not None
    assert pods.stats.refused == 6, pods.stats
    assert mesh.stats.refused == 1 and list(mesh.store) == [("istio-system", "istio")]
    assert cfg.workload("shop", "elsewhere") is None
    assert cfg.workload("shop", "client") is not None and cfg.workload("shop", "client").node == "node-a"  # type: ignore[union-attr]
    assert sorted(w.name for w in cfg.workloads) == ["after", "client", "other"]
    assert set(cfg.extension_providers) == {"authz"}


async def test_a_resource_version_that_goes_backwards_is_followed(api: FakeKubeApi, tmp_path: Path) -> None:
    """resourceVersions are opaque (the API conventions forbid comparing them): the source resumes from the
    last one it was given, whatever its value, and keeps the event."""
    source = await _watched(api, tmp_path)
    pods = reflector_of(source, "pods")
    async with watching(source):
        await eventually_async(lambda: api.watch_count("pods") == 1, what="the pod watch open")
        old = pod("late", ip="10.1.0.40")
        old["metadata"]["resourceVersion"] = "5"
        api.send_raw("pods", _event("ADDED", old))
        await eventually_async(lambda: ("shop", "late") in pods.store, what="the event kept")
    assert pods.resource_version == "5"


# ---- what tenants can create ------------------------------------------------------------------------------


def test_a_tenant_istio_configmap_is_ignored(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put_all(sample_cluster())
    api.put(namespace("tenant"))
    api.put(
        configmap(
            "istio",
            "tenant",
            {"mesh": "extensionProviders:\n- name: evil\n  envoyExtAuthzHttp: {service: e.tenant, port: 80}\n"},
        )
    )
    cfg = kube_source(api, tmp_path).load()
    assert set(cfg.extension_providers) == {"authz"}
    assert [r.query.get("fieldSelector") for r in api.requests if r.path.endswith("/configmaps")] == [
        "metadata.name=istio"
    ]
    assert all(r.path.startswith("/api/v1/namespaces/istio-system/") for r in api.requests if "configmaps" in r.path)


def test_a_tenant_policy_selecting_another_namespaces_labels_does_not_apply_there(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    api.put_all(sample_cluster())
    api.put(namespace("tenant"))
    deny_all = {"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{}]}
    api.put(authz_policy("grab", "tenant", deny_all))
    cfg = kube_source(api, tmp_path).load()
    engine = PolicyEngine.from_objects(cfg.policy_objects, config=cfg)
    server = cfg.workload("shop", "server")
    assert server is not None
    assert [p.name for p in engine.policies_for(server)] == ["deny-bad"]


def test_a_tenant_waypoint_of_the_same_name_is_not_used_by_another_namespace(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    api.put_all(sample_cluster())
    api.put(namespace("tenant"))
    api.put(waypoint_gateway("waypoint", "tenant", listener="m"))
    svc = service("server", "shop", "10.96.0.10", {"app": "server"})
    svc["metadata"]["labels"] = {USE_WAYPOINT_LABEL: "waypoint"}
    api.put(svc)
    cfg = kube_source(api, tmp_path).load()
    shop_server = cfg.service("shop", "server")
    assert shop_server is not None
    chosen = cfg.waypoint_of(shop_server)
    assert chosen is not None and chosen.ref == "shop/waypoint"
    assert {"shop/waypoint", "tenant/waypoint"} <= set(cfg.waypoints)


# ---- --root-namespace ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["proxy", "--node", "node-a", "--ca-dir", "ca"],
        ["node-agent", "--node", "node-a"],
        ["waypoint", "--name", "waypoint", "--namespace", "shop", "--ca-dir", "ca"],
    ],
)
def test_every_kubernetes_component_takes_root_namespace(
    api: FakeKubeApi, tmp_path: Path, command: list[str]
) -> None:
    """--root-namespace, as Istio's meshConfig.rootNamespace: the mesh ConfigMap is read there and its policies
    apply to every namespace; istio-system is then an ordinary namespace."""
    from ztunnel.cli import build_parser
    from ztunnel.config.kube.source import KubeConfigSource, open_source

    api.put_all(sample_cluster())
    api.put(namespace("mesh-root"))
    api.put(
        configmap(
            "istio",
            "mesh-root",
            {"mesh": "extensionProviders:\n- name: rooted\n  envoyExtAuthzHttp: {service: r.shop, port: 80}\n"},
        )
    )
    port_9 = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9"]}}]}]}
    api.put(authz_policy("mesh-wide", "mesh-root", port_9))
    api.put(authz_policy("not-root", "istio-system", {"action": "DENY", "rules": [{}]}))
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    args = build_parser().parse_args(
        [*command, "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--root-namespace", "mesh-root"]
    )
    source = open_source(args)
    assert isinstance(source, KubeConfigSource)
    source.sync_timeout = 10.0
    cfg = source.load()
    assert cfg.root_namespace == "mesh-root"
    assert set(cfg.extension_providers) == {"rooted"}
    server = cfg.workload("shop", "server")
    assert server is not None
    names = [p.name for p in PolicyEngine.from_config(cfg).policies_for(server)]
    assert sorted(names) == ["deny-bad", "mesh-wide"]  # istio-system's "not-root" is no longer mesh-wide


@pytest.mark.parametrize("source", ["file", "kubernetes"])
def test_ca_serve_refuses_root_namespace_it_would_not_use(
    source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CA reads pods and namespaces only (node authorization), never policies or the mesh config: a
    --root-namespace it accepted would change nothing, so it is refused rather than silently ignored."""
    from ztunnel.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["ca", "serve", "--source", source, "--root-namespace", "mesh-root"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --root-namespace mesh-root" in capsys.readouterr().err


def test_the_file_source_takes_root_namespace_too(tmp_path: Path) -> None:
    from ztunnel.cli import build_parser
    from ztunnel.config.kube.source import open_source

    f = tmp_path / "c.yaml"
    f.write_text(json.dumps(authz_policy("mesh-wide", "mesh-root", {"action": "DENY", "rules": [{}]})))
    argv = ["proxy", "--node", "n", "--ca-dir", "ca", "-f", str(f), "--root-namespace", "mesh-root"]
    args = build_parser().parse_args(argv)
    assert open_source(args).load().root_namespace == "mesh-root"


# ---- EndpointSlices: the endpoints of a Service without a selector -------------------------------------------


def _slice(name: str, ns: str, service_name: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
    }


def _selectorless(name: str, ns: str, ip: str) -> dict[str, Any]:
    svc = service(name, ns, ip, {}, port=5432, target=5432)
    del svc["spec"]["selector"]
    svc["spec"]["ports"][0]["name"] = "pg"  # a slice's port serves the Service port of its name
    return svc


async def test_a_service_without_selector_gets_its_endpoints_from_its_endpoint_slices(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    from ztunnel.proxy.routing import HboneRoute, OutboundRouter, PassthroughRoute

    api.put_all(sample_cluster())
    api.put(namespace("tenant", {"istio.io/dataplane-mode": "ambient"}))
    api.put(pod("victim", "tenant", node="node-b", ip="10.2.0.5"))
    api.put(_selectorless("db", "shop", "10.96.0.20"))
    endpoints = [
        {"addresses": ["10.1.0.2"], "conditions": {"ready": True}},  # shop/server, a mesh pod
        {"addresses": ["192.0.2.10"]},  # outside the cluster (ready when the condition is absent)
        {"addresses": ["192.0.2.11"], "conditions": {"ready": False}},
        {"addresses": ["10.2.0.5"], "conditions": {"ready": True}},  # another namespace's pod: left out
    ]
    api.put(_slice("db-1", "shop", "db", endpoints))
    # A selector Service keeps its pods whatever a slice claims; a tenant's slice for shop's Service is not shop's.
    api.put(_slice("server-x", "shop", "server", [{"addresses": ["192.0.2.99"]}]))
    api.put(_slice("db-evil", "tenant", "db", [{"addresses": ["192.0.2.66"]}]))
    source = kube_source(api, tmp_path)
    cfg = source.load()
    db = cfg.service("shop", "db")
    server = cfg.service("shop", "server")
    assert db is not None and server is not None
    got = {w.ips[0]: (w.ref, w.enrolled, w.ready) for w in cfg.endpoints(db)}
    assert got == {
        "10.1.0.2": ("shop/server", True, True),
        "192.0.2.10": ("shop/db-1/192.0.2.10", False, True),
        "192.0.2.11": ("shop/db-1/192.0.2.11", False, False),
    }
    assert [w.ref for w in cfg.endpoints(server)] == ["shop/server"]
    # The file source builds the same endpoints from the same objects.
    file_cfg = file_model(api, tmp_path)
    file_db = file_cfg.service("shop", "db")
    assert file_db is not None
    assert sorted(w.uid for w in file_cfg.endpoints(file_db)) == sorted(w.uid for w in cfg.endpoints(db))
    # The proxy: the pod by HBONE with the pod's own identity, the outside address passed through.
    routes = OutboundRouter().routes(cfg, "10.96.0.20", 5432)
    kinds = sorted((type(r).__name__, getattr(r, "expected_identities", ())) for r in routes)
    assert kinds == [
        ("HboneRoute", ("spiffe://cluster.local/ns/shop/sa/server",)),
        ("PassthroughRoute", ()),
    ]
    assert {r.address for r in routes if isinstance(r, PassthroughRoute)} == {("192.0.2.10", 5432)}
    assert {r.target.port for r in routes if isinstance(r, HboneRoute)} == {5432}
    # Watched: the slice goes away, so do the endpoints.
    async with watching(source):
        await eventually_async(lambda: api.watch_count("endpointslices") == 1, what="the slice watch open")
        api.delete("EndpointSlice", "db-1", "shop")
        await eventually_async(
            lambda: source.current is not None and source.current.endpoints(db) == (),
            what="the slice's endpoints gone",
        )


def test_a_plain_http_api_server_off_loopback_is_warned_about(
    api: FakeKubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = api.kubeconfig(tmp_path / "kubeconfig")
    doc = json.loads(cfg.read_text())
    for server, warned in (("http://10.96.0.1:8080", True), ("http://127.0.0.1:8001", False)):
        caplog.clear()
        doc["clusters"][0]["cluster"] = {"server": server}
        cfg.write_text(json.dumps(doc))
        assert from_kubeconfig(cfg).tls is None
        assert any("over plain HTTP" in r.getMessage() for r in caplog.records) is warned


async def test_a_list_that_never_stops_paging_is_given_up_not_buffered_for_ever(
    api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pages = [0]

    async def endless(w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        pages[0] += 1
        token = f"page-{pages[0]}"  # a new one every time: never the end
        item = service(f"s{pages[0]}", "shop", "10.96.0.1", {"app": "x"})
        body = json.dumps({"metadata": {"resourceVersion": "1", "continue": token}, "items": [item] * 100}).encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()

    api.put_all(sample_cluster())
    source = kube_source(api, tmp_path)
    source.load()
    services = reflector_of(source, "services")
    api.raw["services"] = endless
    monkeypatch.setattr(reflector_module, "MAX_LIST_OBJECTS", 5_000)
    with pytest.raises(KubeApiError, match="does not stop paging"):
        async with asyncio.timeout(20):
            await services.relist()
    assert 50 <= pages[0] <= 52 and services.store  # the last good list is kept

    async def repeating(w: asyncio.StreamWriter, _q: dict[str, str]) -> None:
        pages[0] += 1
        body = json.dumps({"metadata": {"resourceVersion": "1", "continue": "same"}, "items": []}).encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()

    api.raw["services"] = repeating
    pages[0] = 0
    with pytest.raises(KubeApiError, match="'same' repeated"):
        async with asyncio.timeout(20):
            await services.relist()
    assert pages[0] == 2


async def test_a_watch_that_adds_without_end_fills_the_store_to_the_bound_only(
    api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.put_all(sample_cluster())
    source = kube_source(api, tmp_path)
    source.load()
    services = reflector_of(source, "services")
    monkeypatch.setattr(reflector_module, "MAX_LIST_OBJECTS", 10)
    async with watching(source):
        await eventually_async(lambda: api.watch_count("services") == 1, what="the service watch open")
        for i in range(30):
            api.send_raw("services", _event("ADDED", service(f"flood-{i}", "shop", "10.96.1.1", {"app": "x"})))
        api.send_raw("services", _event("MODIFIED", service("server", "shop", "10.96.0.10", {"app": "moved"})))
        await eventually_async(
            lambda: services.store[("shop", "server")]["spec"]["selector"] == {"app": "moved"},
            what="the last event applied",
        )
    assert len(services.store) == 10 and services.stats.refused == 21  # 1 listed + 9 added, then refused
