"""Issue 14's scrape acceptance: `ztunnel lab up --prometheus` runs Debian's Prometheus, which scrapes every node
proxy and waypoint of the lab, and the PromQL of Istio's own Grafana dashboards gets the lab's traffic back.

The module's own lab (`--prometheus --scrape-interval 1`): namespace `demo` in the mesh, a waypoint Gateway, app
`web` behind it (its Service labelled `istio.io/use-waypoint`) with a DENY of `/forbidden` there, app `echo`
reached on its pod IP (L4 only, node proxy to node proxy) and an idle `client`. Traffic is sent in two rounds:
the first creates the series, the second is counted, since `rate()` sees only what a series gains after
Prometheus' first sample of it (a real dashboard loses a new series' first requests the same way).

The dashboard queries are Istio's (manifests/addons/dashboards: the mesh dashboard's "4xxs", "HTTP/gRPC Workloads"
and "TCP Workloads" panels, the ztunnel dashboard's "Bytes Transmitted") with Grafana's `$__rate_interval` written
as `1m`, and the two the issue names.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually
from tests.support.lab_waypoint import applied, gateway_yaml, http, waypoint_pod
from tests.support.labapps import TESTAPP, pod, service, waypoint_gateway
from ztunnel.lab import prometheus

from .conftest import LabHandle, running_lab

pytestmark = pytest.mark.netns  # root + network namespaces; conftest skips with the reason otherwise

CLIENT = "demo/client"
WAYPOINT = waypoint_pod("demo")
WEB = "http://web.demo.svc.cluster.local:8080"
OK, DENIED = 5, 3  # the counted round's requests through the waypoint: 200s and 403s
ECHOES = 4  # the counted round's requests to echo's pod IP

# the two queries, and panels of Istio's mesh and ztunnel dashboards (manifests/addons/dashboards/
# istio-mesh-dashboard.gen.json, ztunnel-dashboard.gen.json) as they write them, split only to fit here;
# `rate_1m` writes Grafana's $__rate_interval as 1m
TCP_BY_WORKLOAD = 'sum(rate(istio_tcp_sent_bytes_total{reporter="destination"}[1m])) by (destination_workload)'
REQUESTS_BY_CODE = 'sum(rate(istio_requests_total{reporter="waypoint"}[1m])) by (response_code)'
MESH_4XX = (  # "4xxs"
    'round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"4.."}[$__rate_interval])), '
    "0.01)or vector(0)"
)
MESH_HTTP_WORKLOADS = (  # "HTTP/gRPC Workloads", its success rate column
    "label_join(sum by (destination_workload,destination_workload_namespace) "
    '(rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[$__rate_interval]))'
    "/sum by (destination_workload,destination_workload_namespace) "
    '(rate(istio_requests_total{reporter=~"source|waypoint"}[$__rate_interval])), '
    '"destination_workload_var", ".", "destination_workload", "destination_workload_namespace")'
)
MESH_TCP_WORKLOADS = (  # "TCP Workloads", its bytes sent column
    "label_join(sum by (destination_workload,destination_workload_namespace,destination_service) "
    '(rate(istio_tcp_sent_bytes_total{reporter=~"source|waypoint"}[$__rate_interval])), '
    '"destination_workload_var", ".", "destination_workload", "destination_workload_namespace")'
)

# the ztunnel dashboard's "Bytes Transmitted" (sent), by node proxy (the `pod` label of its scrape target)
ZTUNNEL_BYTES = 'sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))'


def rate_1m(panel: str) -> str:
    return panel.replace("$__rate_interval", "1m")


DENY_FORBIDDEN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "no-forbidden", "namespace": "demo"},
    "spec": {
        "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/forbidden"]}}]}],
    },
}


def cluster() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        waypoint_gateway("waypoint", "demo"),
        pod("web", "demo", "n2", [TESTAPP, "--name", "web"], ports=[8080]),
        service("web", "demo", "10.96.30.1", {"http": 8080}, labels={"istio.io/use-waypoint": "waypoint"}),
        pod("echo", "demo", "n2", [TESTAPP, "--name", "echo"], ports=[8080]),
        pod("client", "demo", "n1"),
        DENY_FORBIDDEN,
    ]


def query(lab: LabHandle, promql: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus.query(lab.name, promql)
    return result


def by(lab: LabHandle, promql: str, label: str) -> dict[str, float]:
    """An instant query's series as {value of LABEL: sample value}."""
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in query(lab, promql)}


@dataclass
class Traffic:
    lab: LabHandle
    echo: str  # echo's pod IP
    echo_bytes: int  # the bytes echo's answers carried in the counted round (bodies and heads, as curl got them)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    started = time.monotonic()
    args = ("--prometheus", "--scrape-interval", "1")
    with running_lab(f"pm{os.getpid()}", cluster(), tmp_path_factory.mktemp("promlab"), up_args=args) as lab:
        lab.require("ca", "node-agent", "proxy", "cni-plugin")
        echo = lab.pod_ip("demo/echo")
        eventually(lambda: http(lab, CLIENT, f"{WEB}/hello")[0][0] == 200, 30, 0.3, what="web through the waypoint")
        # round 1: the series come into being (and Prometheus takes its first sample of each)
        _round(lab, 1, 1, 1, echo)
        eventually(
            lambda: {"200", "403"} <= set(by(lab, 'istio_requests_total{reporter="waypoint"}', "response_code"))
            and all(
                "echo" in by(lab, f'istio_tcp_sent_bytes_total{{reporter="{side}"}}', "destination_workload")
                for side in ("source", "destination")
            ),
            30,
            0.25,
            what="Prometheus to have scraped the first round's series",
        )
        # round 2: what the dashboards must show
        echo_bytes = _round(lab, OK, DENIED, ECHOES, echo)
        print(f"lab up and two rounds of traffic in {time.monotonic() - started:.1f} s")
        pid = lab.status()["prometheus"]["pid"]
        yield Traffic(lab, echo, echo_bytes)
    # `lab down` stopped it and removed its TSDB with the state dir
    assert not lab.dir.exists()
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    print(f"module in {time.monotonic() - started:.1f} s")


def _round(lab: LabHandle, ok: int, denied: int, echoes: int, echo_ip: str) -> int:
    answers = http(lab, CLIENT, *[f"{WEB}/hello"] * ok) + http(lab, CLIENT, *[f"{WEB}/forbidden"] * denied)
    assert [code for code, _ in answers] == [200] * ok + [403] * denied, answers
    total = 0
    for _ in range(echoes):
        p = lab.run(CLIENT, "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}", f"http://{echo_ip}:8080/")
        assert p.returncode == 0, p.stderr
        total += int(p.stdout)
    return total


def test_every_node_proxy_and_waypoint_is_scraped(traffic: Traffic) -> None:
    lab = traffic.lab
    st = lab.status()
    prom = st["prometheus"]
    assert prom["url"] == "http://172.30.0.1:9090" and prom["running"] and prom["targets"] == 3
    want = {f"{n['address']}:15020": ("ztunnel", f"ztunnel-{n['name']}") for n in st["nodes"]}
    want[f"{lab.pod_ip(WAYPOINT)}:15020"] = ("waypoint", "waypoint-0")
    assert "istio_tcp_sent_bytes_total{" in lab.metrics("n2")  # on all its addresses: loopback still answers
    up = {r["metric"]["instance"]: (r["metric"]["job"], r["metric"]["pod"], r["value"][1]) for r in query(lab, "up")}
    assert up == {instance: (job, name, "1") for instance, (job, name) in want.items()}


def test_tcp_bytes_by_destination_workload(traffic: Traffic) -> None:
    lab = traffic.lab

    def panels() -> bool:
        values = by(lab, TCP_BY_WORKLOAD, "destination_workload")
        assert values.get("echo", 0) > 0 and values.get("web", 0) > 0, values  # web: from the waypoint's tunnels
        table = by(lab, rate_1m(MESH_TCP_WORKLOADS), "destination_workload_var")
        assert table.get("echo.demo", 0) > 0, table  # the mesh dashboard's TCP Workloads (the client's side)
        pods = by(lab, rate_1m(ZTUNNEL_BYTES), "pod")  # the ztunnel dashboard's Bytes Transmitted, by node proxy
        assert pods.keys() == {"ztunnel-n1", "ztunnel-n2"} and min(pods.values()) > 0, pods
        return True

    eventually(panels, 20, 0.5, what="the TCP bytes panels to show echo and web")
    # what Prometheus holds is what the destination proxy exports: the bytes echo's answers carried, and more
    raw = by(lab, 'sum(istio_tcp_sent_bytes_total{reporter="destination",destination_workload="echo"}) by (job)', "job")
    assert raw["ztunnel"] >= traffic.echo_bytes > 0


def test_requests_by_response_code(traffic: Traffic) -> None:
    lab = traffic.lab

    def panel() -> dict[str, float]:
        codes = by(lab, REQUESTS_BY_CODE, "response_code")
        assert codes.get("200", 0) > 0 and codes.get("403", 0) > 0, codes
        return codes

    eventually(panel, 20, 0.5, what="the requests by response code panel to show 200 and 403")
    assert float(query(lab, rate_1m(MESH_4XX))[0]["value"][1]) > 0
    # 403 is not a 5xx: the HTTP workloads table's success rate of web is 1
    assert by(lab, rate_1m(MESH_HTTP_WORKLOADS), "destination_workload_var") == {"web.demo": 1.0}
    # the counters as the waypoint exports them: both rounds, to the request
    counted = 'sum(istio_requests_total{reporter="waypoint",destination_workload="web"}) by (response_code)'
    eventually(
        lambda: by(lab, counted, "response_code") == {"200": OK + 2.0, "403": DENIED + 1.0},
        10,
        0.25,
        what="Prometheus' counters of web's requests to match what was sent",
    )


def test_a_new_waypoint_is_scraped_and_a_deleted_one_dropped(traffic: Traffic) -> None:
    lab = traffic.lab
    other = gateway_yaml("demo", "second")

    def instances() -> set[str]:
        return {r["metric"]["instance"] for r in query(lab, 'up{job="waypoint"} == 1')}

    def targets() -> set[str]:
        _status, body = prometheus.get(lab.name, "/api/v1/targets?state=active")
        return {t["labels"]["instance"] for t in json.loads(body)["data"]["activeTargets"]}

    with applied(lab, other, waypoint_pod("demo", "second")):
        second = f"{lab.pod_ip(waypoint_pod('demo', 'second'))}:15020"
        eventually(lambda: second in instances(), 20, 0.25, what="the new waypoint to be scraped")
    eventually(lambda: second not in targets(), 20, 0.25, what="the deleted waypoint's target to go")
    assert f"{lab.pod_ip(WAYPOINT)}:15020" in targets()
