"""A real Prometheus in the lab (`ztunnel lab up --prometheus`): Debian's `prometheus` binary, run by the lab
(not systemd) in the fabric netns, where the CA lives, scraping every node proxy and every waypoint pod the lab
deployed, so Istio's own dashboards' PromQL can be run against the lab's traffic.

It listens on the fabric gateway (`172.30.0.1:9090`, reachable from the nodes and pods too, as an in-cluster
Prometheus is), keeps its TSDB and config under the lab's state dir (`prometheus/`, removed by `lab down` with
the rest) and finds its targets by file service discovery: `up`, `apply` and `delete` rewrite
`prometheus/targets/<job>.json` atomically and Prometheus rereads them (inotify) without a restart. Waypoints
that come and go are scraped or dropped within about 5 s: its discovery hands target changes to the scrapers at
most every 5 s, so the first scrape also comes about 5 s after it starts (measured 4.9 and 6.1 s).

Jobs: `ztunnel` (each node proxy on its node address, labelled as the DaemonSet's pod would be:
`namespace="istio-system"`, `pod="ztunnel-<node>"`, `node`) and `waypoint` (each deployed waypoint pod on its
pod IP: `namespace`, `pod`, `node`, `gateway`).

Planning (the config and the targets) is pure; `start`, `wait_ready` and `write_targets` do the I/O.
"""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from ztunnel.config.model import KubeObject
from ztunnel.lab import netns, probes, procs, waypoints
from ztunnel.lab.model import FABRIC_GATEWAY, LabError, NodeRecord, PodRecord, fabric_netns
from ztunnel.lab.state import LabState, write_atomic
from ztunnel.ports import METRICS_PORT

PROMETHEUS_PORT = 9090  # Prometheus' own default
PROCESS_KEY = "prometheus"
COMPONENT = "prometheus"  # in LabState.components when the lab runs it
DIR = "prometheus"  # under the lab's state dir
JOBS = ("ztunnel", "waypoint")
BINARY = "prometheus"

Waiter = tuple[str, Callable[[], bool], str]


def binary() -> str:
    """The prometheus executable, or a LabError saying how to install it."""
    path = shutil.which(BINARY)
    if path is None:
        raise LabError(
            "--prometheus: the `prometheus` binary is not installed; run scripts/setup.sh as root "
            "(it installs Debian's package: apt-get install --no-install-recommends prometheus)"
        )
    return path


def config_check(scrape_interval: float) -> None:
    """What `lab up --prometheus` checks before it builds anything: the binary is there, the interval valid."""
    binary()
    _duration(scrape_interval)


def address() -> str:
    return f"{FABRIC_GATEWAY}:{PROMETHEUS_PORT}"


def url() -> str:
    return f"http://{address()}"


def directory(state: LabState) -> Path:
    return state.path / DIR


def targets_file(state: LabState, job: str) -> Path:
    return directory(state) / "targets" / f"{job}.json"


def config(state: LabState, scrape_interval: float) -> dict[str, Any]:
    """prometheus.yml: one job per kind of target, each read from its file_sd file."""
    interval = _duration(scrape_interval)
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                # inotify sees a rewritten file at once; the refresh is only the fallback
                "file_sd_configs": [{"files": [str(targets_file(state, job))], "refresh_interval": "10s"}],
            }
            for job in JOBS
        ],
    }


def _duration(seconds: float) -> str:
    """Prometheus' duration syntax (integer units only): 1.5 -> 1500ms."""
    if seconds <= 0:
        raise LabError(f"--scrape-interval {seconds:g}: give a positive number of seconds")
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def scrape_targets(
    nodes: Mapping[str, NodeRecord],
    pods: Mapping[str, PodRecord],
    objects: Sequence[KubeObject],
    proxies: bool,
) -> dict[str, list[dict[str, Any]]]:
    """The file_sd target groups of each job: every node proxy (if the lab runs them) and every waypoint pod the
    lab deployed that has an IP."""
    groups: dict[str, list[dict[str, Any]]] = {job: [] for job in JOBS}
    if proxies:
        for node in sorted(nodes.values(), key=lambda n: n.index):
            groups["ztunnel"].append(
                {
                    "targets": [f"{node.address}:{METRICS_PORT}"],
                    "labels": {"namespace": "istio-system", "pod": f"ztunnel-{node.name}", "node": node.name},
                }
            )
    for o in sorted(objects, key=lambda o: (o.namespace, o.name)):
        gateway = waypoints.owner(o)
        rec = pods.get(f"{o.namespace}/{o.name}") if gateway else None
        if gateway is None or rec is None or not rec.ips:
            continue
        groups["waypoint"].append(
            {
                "targets": [f"{rec.ips[0]}:{METRICS_PORT}"],
                "labels": {
                    "namespace": o.namespace,
                    "pod": o.name,
                    "node": rec.node,
                    "gateway": gateway.partition("/")[2],
                },
            }
        )
    return groups


def write_targets(state: LabState, objects: Sequence[KubeObject]) -> int:
    """Rewrite the target files from the lab's state and live objects; returns how many targets there are."""
    groups = scrape_targets(state.nodes, state.pods, objects, bool(state.components.get("proxy")))
    for job, group in groups.items():
        write_atomic(targets_file(state, job), json.dumps(group, indent=1) + "\n")
    return sum(len(g) for g in groups.values())


def argv(state: LabState) -> list[str]:
    d = directory(state)
    return [
        binary(),
        f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'data'}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address={address()}",
        "--log.level=warn",
    ]


def start(state: LabState, scrape_interval: float, objects: Sequence[KubeObject]) -> Waiter:
    """Write the config and the targets known so far, start Prometheus in the fabric netns (recorded in the state
    file, so `lab down` stops it) and return its readiness check (`/-/ready`)."""
    d = directory(state)
    (d / "targets").mkdir(parents=True, exist_ok=True)
    write_atomic(d / "prometheus.yml", yaml.safe_dump(config(state, scrape_interval), sort_keys=False))
    write_targets(state, objects)
    fab = fabric_netns(state.name)
    procs.spawn_recorded(state.path, state, PROCESS_KEY, argv(state), fab)

    def ready() -> bool:
        return probes.http_ok(fab, FABRIC_GATEWAY, PROMETHEUS_PORT, "/-/ready")

    return PROCESS_KEY, ready, f"Prometheus serving {url()} in {fab}"


def status(state: LabState) -> dict[str, Any] | None:
    """What `lab status` says about it: where to query it and how many targets it has."""
    if not state.components.get(COMPONENT):
        return None
    rec = state.processes.get(PROCESS_KEY)
    targets = 0
    for job in JOBS:
        try:
            targets += len(json.loads(targets_file(state, job).read_text()))
        except (OSError, ValueError):
            pass
    return {
        "url": url(),
        "netns": fabric_netns(state.name),
        "pid": rec.pid if rec else None,
        "running": bool(rec and procs.is_running(rec)),
        "log": rec.log if rec else None,
        "targets": targets,
    }


def get(lab: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """A GET of Prometheus' HTTP API from inside the fabric netns -> (status, body). Its answers are chunked, which
    `netns.http_get` does not read: http.client does, over a socket made in the netns."""
    conn = http.client.HTTPConnection(FABRIC_GATEWAY, PROMETHEUS_PORT, timeout=timeout)
    conn.sock = netns.connect_in(fabric_netns(lab), FABRIC_GATEWAY, PROMETHEUS_PORT, timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def query(lab: str, promql: str, timeout: float = 3.0) -> Any:
    """An instant query -> the `data.result` list (for tests and whoever scripts the lab)."""
    status, body = get(lab, f"/api/v1/query?query={quote(promql)}", timeout)
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise LabError(f"Prometheus query {promql!r}: HTTP {status}: {data.get('error', body[:200])}")
    return data["data"]["result"]
