"""The Kubernetes config source against the fake API server (tests/support/kubeapi.py): the model equals the file
source's for the same objects, and the watch semantics (resume, 410 relist, bookmarks, cuts, readiness, bounded
and refused events, field selectors, errors that name what is wrong)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually, eventually_async
from tests.support.kubeapi import DENY_BAD as DENY
from tests.support.kubeapi import FakeKubeApi, authz_policy, namespace, pod, service
from tests.support.kubeapi import file_model as _file_model
from tests.support.kubeapi import kube_source as _source
from tests.support.kubeapi import model_summary as _summary
from tests.support.kubeapi import reflector_of as _reflector
from tests.support.kubeapi import sample_cluster as _cluster
from tests.support.kubeapi import watching as _watching
from ztunnel.config.kube.client import from_kubeconfig
from ztunnel.config.kube.source import KubeConfigSource
from ztunnel.config.kube.wire import MAX_EVENT_BYTES
from ztunnel.config.loader import ConfigError


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as server:
        yield server


def _loaded(api: FakeKubeApi, tmp_path: Path) -> KubeConfigSource:
    """A source on the sample cluster, its first sync done."""
    api.put_all(_cluster())
    source = _source(api, tmp_path)
    source.load()
    return source


async def _pod_watch_open(api: FakeKubeApi) -> None:
    await eventually_async(lambda: api.watch_count("pods") == 1, what="the pod watch open")


def test_the_first_sync_builds_the_model_the_file_source_builds(api: FakeKubeApi, tmp_path: Path) -> None:
    api.page_size_cap = 2  # several pages per list: they must be joined
    api.put_all(_cluster())
    source = _source(api, tmp_path)
    cfg = source.load()
    assert _summary(cfg) == _summary(_file_model(api, tmp_path))
    assert [w.name for w in cfg.workloads if w.enrolled] == ["client", "server"]
    assert "authz" in cfg.extension_providers and "shop/waypoint" in cfg.waypoints
    assert cfg.workload("shop", "server") is not None and cfg.workload("shop", "server").target_port("http") == 8080  # type: ignore[union-attr]
    # Only what the model reads is kept: no managedFields, env, containerStatuses; the unrelated ConfigMap not listed.
    kept = json.dumps([list(r.store.values()) for r in source.reflectors])
    assert "managedFields" not in kept and "VAR_1" not in kept and "containerStatuses" not in kept
    assert "unrelated" not in kept and "capacity" not in kept


async def test_after_a_sequence_of_watch_events_the_model_equals_the_file_sources(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    source = _loaded(api, tmp_path)
    async with _watching(source):
        served = sum(1 for r in source.reflectors if r.api_version)
        await eventually_async(lambda: api.watch_count() == served, what="every watch open")
        api.put(pod("late", node="node-b", ip="10.1.0.9"))
        moved = pod("client", node="node-b", ip="10.1.0.1", labels={"version": "2"})
        api.put(moved)
        api.delete("Pod", "other", "shop")
        api.put(authz_policy("deny-bad", "shop", {**DENY, "action": "ALLOW"}))
        api.put(namespace("shop", {}))  # the namespace leaves the mesh
        api.delete("Service", "server", "shop")
        api.put(service("late", "shop", "10.96.0.11", {"app": "late"}))
        await eventually_async(
            lambda: source.current is not None
            and source.current.workload("shop", "other") is None
            and source.current.service("shop", "late") is not None,
            what="the events to reach the model",
        )
        await eventually_async(
            lambda: _summary(source.current) == _summary(_file_model(api, tmp_path)),  # type: ignore[arg-type]
            what="the model to equal the file source's",
        )
        assert not any(w.enrolled for w in source.current.workloads)  # type: ignore[union-attr]
        assert _reflector(source, "pods").stats.lists == 1  # events, no relist


async def test_410_gone_relists_and_an_object_deleted_while_disconnected_disappears(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    source = _loaded(api, tmp_path)
    async with _watching(source):
        await _pod_watch_open(api)
    # Disconnected: a pod goes away and etcd compacts past the version the source holds.
    api.delete("Pod", "other", "shop")
    api.put(pod("new", node="node-a", ip="10.1.0.7"))
    api.compact()
    pods = _reflector(source, "pods")
    async with _watching(source):
        await eventually_async(
            lambda: source.current is not None
            and source.current.workload("shop", "other") is None
            and source.current.workload("shop", "new") is not None,
            what="the relist to replace the pods",
        )
    assert pods.stats.gone >= 1 and pods.stats.lists == 2
    assert ("shop", "other") not in pods.store


async def test_a_bookmark_moves_the_resume_point(api: FakeKubeApi, tmp_path: Path) -> None:
    source = _loaded(api, tmp_path)
    pods = _reflector(source, "pods")
    listed = pods.resource_version
    async with _watching(source):
        await _pod_watch_open(api)
        for i in range(5):  # other resources move the cluster's version on
            api.put(service(f"s{i}", "shop", f"10.96.1.{i}", {"app": "x"}))
        mark = api.bookmark()
        await eventually_async(lambda: pods.resource_version == str(mark), what="the bookmark to be taken")
        assert int(listed) < mark and pods.stats.bookmarks == 1
        api.compact(before=mark)  # the list's version is gone now; the bookmark's is not
        before = len(api.watch_requests("pods"))
        api.cut_watches()
        await eventually_async(lambda: len(api.watch_requests("pods")) > before, what="the pod watch again")
        again = api.watch_requests("pods")[before:]
        assert all(r.query["resourceVersion"] == str(mark) for r in again), [r.query for r in again]
        assert all(r.query["allowWatchBookmarks"] == "true" for r in again)
        assert pods.stats.gone == 0 and pods.stats.lists == 1


async def test_a_cut_watch_resumes_from_the_last_version_and_loses_nothing(api: FakeKubeApi, tmp_path: Path) -> None:
    source = _loaded(api, tmp_path)
    pods = _reflector(source, "pods")
    async with _watching(source):
        await _pod_watch_open(api)
        seen = api.put(pod("one", ip="10.1.0.11"))
        await eventually_async(lambda: pods.resource_version == str(seen), what="the event")
        before = len(api.watch_requests("pods"))
        api.cut_watches()
        api.put(pod("two", ip="10.1.0.12"))  # while the watch is being made again
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "two") is not None,
            what="the pod added across the cut",
        )
        resumed = api.watch_requests("pods")[before]
        assert resumed.query["resourceVersion"] == str(seen)
        assert pods.stats.lists == 1 and pods.stats.gone == 0
        timeouts = {int(r.query["timeoutSeconds"]) for r in api.watch_requests("pods")}
        assert all(240 <= t <= 360 for t in timeouts)


def test_not_ready_and_no_model_until_every_list_is_done(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put_all(_cluster())
    hold = api.hold_lists["services"] = threading.Event()
    source = _source(api, tmp_path)
    result: list[Any] = []
    loader = threading.Thread(target=lambda: result.append(source.load()))
    loader.start()
    try:
        eventually(lambda: _reflector(source, "pods").synced.is_set(), what="the pods listed")
        eventually(lambda: any(r.path.endswith("/services") for r in api.requests), what="the services list asked")
        assert not source.ready and source.current is None and not result
    finally:
        hold.set()
        loader.join(15)
    assert source.ready and result and result[0].service("shop", "server") is not None


def test_the_node_agent_lists_only_its_nodes_pods(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put_all(_cluster())
    source = _source(api, tmp_path, pods_on_node="node-a")
    cfg = source.load()
    assert sorted(w.name for w in cfg.workloads) == ["client", "other"]
    asked = [r for r in api.requests if r.path == "/api/v1/pods"]
    assert asked and all(r.query.get("fieldSelector") == "spec.nodeName=node-a" for r in asked)


async def test_oversized_and_garbage_events_are_refused_and_the_watch_goes_on(
    api: FakeKubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _loaded(api, tmp_path)
    pods = _reflector(source, "pods")
    async with _watching(source):
        await _pod_watch_open(api)
        huge = pod("huge", ip="10.1.0.99")
        huge["metadata"]["annotations"] = {"pad": "x" * (MAX_EVENT_BYTES + 10)}
        api.send_raw("pods", json.dumps({"type": "ADDED", "object": huge}).encode() + b"\n")
        api.send_raw("pods", b"this is not json\n")
        api.send_raw("pods", b'{"type": "SQUASHED", "object": {}}\n')
        api.send_raw("pods", b'{"type": "ADDED", "object": {"metadata": {"namespace": "shop"}}}\n')
        api.put(pod("after", ip="10.1.0.13"))
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "after") is not None,
            what="the next good event",
        )
    assert pods.stats.refused == 4 and ("shop", "huge") not in pods.store
    assert pods.stats.watches == 1  # the same watch carried on
    refused = [r.getMessage() for r in caplog.records if "event refused" in r.getMessage()]
    assert any("pods: event refused: larger than the limit" in m for m in refused)
    assert any("not JSON" in m for m in refused) and any("unknown event type 'SQUASHED'" in m for m in refused)


async def test_a_bad_object_is_left_out_and_named_the_rest_applies(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put_all(_cluster())
    api.put(pod("broken", ip="not-an-ip"))
    source = _source(api, tmp_path)
    errors: list[ConfigError] = []
    source.on_rejected(errors.append)
    cfg = source.load()
    assert cfg.workload("shop", "broken") is None and cfg.workload("shop", "client") is not None
    assert len(errors) == 1
    text = str(errors[0])
    assert "kubernetes API (pods v1)" in text and "Pod shop/broken" in text and "field status.podIPs[0]" in text
    assert source.status()["left_out"]["Pod shop/broken"] == text
    async with _watching(source):
        await _pod_watch_open(api)
        api.put(pod("other-change", ip="10.1.0.21"))  # builds again: the bad pod is not reported twice
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "other-change") is not None,
            what="the next build",
        )
        assert len(errors) == 1
        api.put(pod("broken", ip="10.1.0.20"))  # fixed
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "broken") is not None,
            what="the fixed pod",
        )
    assert source.status()["left_out"] == {} and len(errors) == 1


def test_a_wrong_token_fails_the_start_naming_the_resource_and_the_answer(api: FakeKubeApi, tmp_path: Path) -> None:
    endpoint = from_kubeconfig(api.kubeconfig(tmp_path / "kc", token="wrong"))
    source = KubeConfigSource(endpoint, sync_timeout=1.0)
    with pytest.raises(ConfigError) as e:
        source.load()
    assert "pods: GET /api/v1/pods" in str(e.value) and "401 Unauthorized" in str(e.value)
    assert "RBAC" in str(e.value)


def test_v1beta1_is_read_where_v1_is_not_served_and_absent_crds_are_empty(
    api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import kubeapi

    monkeypatch.setitem(kubeapi.SERVED, "security.istio.io/v1", set())
    monkeypatch.setitem(kubeapi.SERVED, "gateway.networking.k8s.io/v1", set())
    api.put(authz_policy("old", "shop", DENY, version="v1beta1"))
    source = _source(api, tmp_path)
    cfg = source.load()
    assert [(o.api_version, o.name) for o in cfg.policy_objects] == [("security.istio.io/v1beta1", "old")]
    assert source.status()["resources"]["gateways"]["apiVersion"] is None and source.ready


async def test_a_crd_removed_while_watched_empties_its_objects(
    api: FakeKubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import kubeapi

    source = _loaded(api, tmp_path)
    assert "shop/waypoint" in source.current.waypoints  # type: ignore[union-attr]
    async with _watching(source):
        await eventually_async(lambda: api.watch_count("gateways") == 1, what="the gateway watch open")
        monkeypatch.setitem(kubeapi.SERVED, "gateway.networking.k8s.io/v1", set())
        api.cut_watches()
        await eventually_async(
            lambda: source.current is not None and not source.current.waypoints, what="the gateways gone"
        )
    assert source.status()["resources"]["gateways"]["apiVersion"] is None


async def test_a_watch_the_server_ends_at_its_timeout_is_renewed_from_the_same_version(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    source = _loaded(api, tmp_path)
    pods = _reflector(source, "pods")
    pods.watch_timeout = (1, 1)  # timeoutSeconds=1: the fake ends the stream after a second
    listed = pods.resource_version
    async with _watching(source):
        await eventually_async(lambda: len(api.watch_requests("pods")) >= 3, what="the watch renewed twice")
    assert {r.query["resourceVersion"] for r in api.watch_requests("pods")} == {listed}
    assert {r.query["timeoutSeconds"] for r in api.watch_requests("pods")} == {"1"}
    assert pods.stats.lists == 1 and pods.stats.errors == 0


async def test_api_errors_are_retried_with_jittered_backoff_and_the_watch_resumes(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    source = _loaded(api, tmp_path)
    pods = _reflector(source, "pods")
    delays = [pods.backoff(n) for n in range(1, 12) for _ in range(20)]
    assert all(0 <= d <= 30 for d in delays) and len(set(delays)) > 100  # full jitter, capped
    assert max(pods.backoff(1) for _ in range(200)) <= 0.4
    async with _watching(source):
        await _pod_watch_open(api)
        seen = api.put(pod("before", ip="10.1.0.31"))
        await eventually_async(lambda: pods.resource_version == str(seen), what="the event")
        api.token = "rotated-on-the-server"  # every request is refused (401) until the token matches again
        api.cut_watches()
        await eventually_async(lambda: pods.stats.errors >= 2, what="refused watches retried")
        assert "401" in pods.stats.last_error
        api.put(pod("during", ip="10.1.0.32"))
        api.token = "test-token"
        await eventually_async(
            lambda: source.current is not None and source.current.workload("shop", "during") is not None,
            30,
            what="the watch resumed",
        )
    assert pods.stats.lists == 1  # resumed from its version, no relist
    assert api.watch_requests("pods")[-1].query["resourceVersion"] == str(seen)
