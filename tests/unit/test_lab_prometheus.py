"""The lab's Prometheus (`lab up --prometheus`): its config and file_sd targets (pure planning, no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.lab_waypoint import gateway_yaml
from ztunnel.config.loader import load_documents
from ztunnel.config.model import KubeObject
from ztunnel.lab import prometheus, waypoints
from ztunnel.lab.cluster import _check_lab_dir
from ztunnel.lab.model import LabError, plan_node, plan_pod
from ztunnel.lab.state import LabState

GATEWAY = gateway_yaml("shop", "wp") + """---
apiVersion: v1
kind: Pod
metadata: {name: by-hand, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: other}}
spec: {nodeName: n1, containers: [{name: main, command: [sleep, infinity]}]}
"""
NODES = {"n1": plan_node("t", "n1", 1), "n2": plan_node("t", "n2", 2)}


def _lab(tmp_path: Path) -> tuple[LabState, list[KubeObject]]:
    """A state with the two nodes, the deployed waypoint pod `shop/wp-0` (with an IP) and a hand-run one."""
    objects = load_documents(GATEWAY)
    plan = waypoints.reconcile(objects, NODES, {}, lambda ns, gw, node: ["ztunnel", "waypoint"])
    state = LabState(name="t", dir=str(tmp_path), components={"proxy": True, prometheus.COMPONENT: True})
    state.nodes = dict(NODES)
    for o in plan.objects:
        if o.kind == "Pod":
            rec = plan_pod("t", o, str(o.spec["nodeName"]))
            rec.ips = ["10.244.2.9"] if o.name == "wp-0" else ["10.244.1.4"]
            state.pods[rec.ref] = rec
    return state, plan.objects


def test_every_node_proxy_and_every_deployed_waypoint_is_a_target(tmp_path: Path) -> None:
    state, objects = _lab(tmp_path)
    groups = prometheus.scrape_targets(state.nodes, state.pods, objects, proxies=True)
    assert groups["ztunnel"] == [
        {"targets": ["172.30.0.11:15020"], "labels": {"namespace": "istio-system", "pod": "ztunnel-n1", "node": "n1"}},
        {"targets": ["172.30.0.12:15020"], "labels": {"namespace": "istio-system", "pod": "ztunnel-n2", "node": "n2"}},
    ]
    node = state.pods["shop/wp-0"].node
    assert groups["waypoint"] == [  # the hand-run one is not the lab's: its metrics address is unknown
        {"targets": ["10.244.2.9:15020"], "labels": {"namespace": "shop", "pod": "wp-0", "node": node, "gateway": "wp"}}
    ]
    # no proxies (--mesh off), no waypoint IP yet: nothing to scrape
    state.pods["shop/wp-0"].ips = []
    assert prometheus.scrape_targets(state.nodes, state.pods, objects, proxies=False) == {"ztunnel": [], "waypoint": []}


def test_the_config_reads_each_job_from_its_file_and_the_files_follow_the_lab(tmp_path: Path) -> None:
    state, objects = _lab(tmp_path)
    cfg = prometheus.config(state, 1.5)
    assert cfg["global"]["scrape_interval"] == cfg["global"]["scrape_timeout"] == "1500ms"
    assert prometheus.config(state, 2)["global"]["scrape_interval"] == "2s"
    files = {j["job_name"]: j["file_sd_configs"][0]["files"] for j in cfg["scrape_configs"]}
    assert files == {job: [str(tmp_path / "prometheus" / "targets" / f"{job}.json")] for job in ("ztunnel", "waypoint")}
    (tmp_path / "prometheus" / "targets").mkdir(parents=True)
    assert prometheus.write_targets(state, objects) == 3
    del state.pods["shop/wp-0"]  # its Gateway deleted: the file is rewritten without it
    assert prometheus.write_targets(state, objects) == 2
    assert json.loads((tmp_path / "prometheus" / "targets" / "waypoint.json").read_text()) == []
    st = prometheus.status(state)
    assert st is not None and st["targets"] == 2 and st["url"] == "http://172.30.0.1:9090" and not st["running"]


def test_a_bad_interval_or_no_binary_is_refused_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabError, match="--scrape-interval 0"):
        prometheus.config_check(0)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(LabError, match=r"scripts/setup.sh.*apt-get install --no-install-recommends prometheus"):
        prometheus.config_check(1)


def test_down_takes_a_lab_dir_with_prometheus_files_for_the_labs_own(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "prometheus" / "data").mkdir(parents=True)
    _check_lab_dir(tmp_path)  # `down` would refuse to remove a dir with foreign files
    (tmp_path / "photos").mkdir()
    with pytest.raises(LabError, match="photos"):
        _check_lab_dir(tmp_path)
