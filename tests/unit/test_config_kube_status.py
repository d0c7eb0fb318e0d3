"""The node agent's `ambient.istio.io/redirection: enabled` annotation on enrolled pods, PATCHed to the fake API
server: set on enrollment, removed on un-enrollment, sent once per change, pods of other nodes untouched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually_async
from tests.support.kubeapi import FakeKubeApi, namespace, pod
from ztunnel.config.kube.client import from_kubeconfig
from ztunnel.config.kube.source import KubeConfigSource
from ztunnel.config.kube.status import REDIRECTION_ANNOTATION, PodAnnotator


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as server:
        other = pod("elsewhere", ip="10.1.0.9", node="node-b")
        other["metadata"]["annotations"] = {REDIRECTION_ANNOTATION: "enabled"}  # another node's agent's mark
        server.put_all(
            [namespace("shop"), pod("client", ip="10.1.0.1"), pod("server", ip="10.1.0.2"), other]
        )
        yield server


def _annotation(api: FakeKubeApi, name: str) -> str | None:
    obj = api.get("Pod", name, "shop")
    assert obj is not None
    return (obj["metadata"].get("annotations") or {}).get(REDIRECTION_ANNOTATION)


async def test_enrolled_pods_are_annotated_and_the_mark_is_removed_on_unenrollment(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    source = KubeConfigSource(from_kubeconfig(api.kubeconfig(tmp_path / "kc")), pods_on_node="node-a", sync_timeout=10)
    source.load()
    pods = next(r for r in source.reflectors if r.resource.plural == "pods")
    enrolled: set[tuple[str, str]] = {("shop", "client")}
    annotator = PodAnnotator(source.client, pods, lambda: enrolled, interval=0.02)
    tasks = [asyncio.create_task(source.watch()), asyncio.create_task(annotator.run())]
    try:
        await eventually_async(lambda: _annotation(api, "client") == "enabled", what="the client annotated")
        await eventually_async(
            lambda: pods.store[("shop", "client")]["metadata"].get("annotations", {}).get(REDIRECTION_ANNOTATION),
            what="the annotation seen back through the watch",
        )
        assert _annotation(api, "server") is None
        enrolled.clear()
        await eventually_async(lambda: _annotation(api, "client") is None, what="the annotation removed")
        await eventually_async(lambda: not pods.store[("shop", "client")]["metadata"].get("annotations"), what="seen")
        await asyncio.sleep(0.2)  # a few more rounds: nothing more is sent once the cache agrees
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    assert [(ns, name, p) for _, ns, name, p in api.patches] == [
        ("shop", "client", {"metadata": {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}}),
        ("shop", "client", {"metadata": {"annotations": {REDIRECTION_ANNOTATION: None}}}),
    ]
    assert _annotation(api, "elsewhere") == "enabled"  # not this node's pod: not listed, not touched


def test_only_an_agent_on_the_api_annotates(api: FakeKubeApi, tmp_path: Path) -> None:
    from ztunnel.config.kube.status import pod_annotator
    from ztunnel.config.source import FileConfigSource

    kube = KubeConfigSource(from_kubeconfig(api.kubeconfig(tmp_path / "kc")), pods_on_node="node-a")
    assert pod_annotator(FileConfigSource([tmp_path / "none.yaml"]), set) is None
    annotator = pod_annotator(kube, set)
    assert annotator is not None and annotator.pods.resource.kind == "Pod"
