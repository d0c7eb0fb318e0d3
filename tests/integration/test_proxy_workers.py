"""`ztunnel proxy --workers 2`: two processes share the pod listeners (SO_REUSEPORT) behind one set of operator
ports; a killed worker is restarted without stopping service; SIGTERM to the supervisor stops every child."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    ZTUNNEL,
    AppServer,
    ProxyProcess,
    socks_echo,
    start_proxy,
)
from tests.support.eventually import eventually

CLIENT = "127.0.170.1"
SERVER = "127.0.180.1"
PORT = 8080
CONNECTIONS = 60

CONFIG = (
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: wrk, labels: {istio.io/dataplane-mode: ambient}}\n"
    "---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: wrk, uid: wrk-server}\n"
    f"spec: {{nodeName: node-x, serviceAccountName: server}}\nstatus: {{podIP: {SERVER}}}\n"
    "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: wrk, uid: wrk-client}\n"
    f"spec: {{nodeName: node-w, serviceAccountName: client}}\nstatus: {{podIP: {CLIENT}}}\n"
)


@dataclass
class Pair:
    w: ProxyProcess  # node-w, --workers 2 (the client pod)
    x: ProxyProcess  # node-x, one process (the server pod)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"


def _worker_pids(p: ProxyProcess) -> dict[int, int]:
    return {w["index"]: w["pid"] for w in p.config_dump()["workers"] if w["pid"]}


@pytest.fixture
def pair(tmp_path: Path, ca_dir: Path) -> Iterator[Pair]:
    apps = AppServer()
    apps.echo(SERVER, PORT)
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    seen: set[int] = set()
    x = start_proxy("node-x", config, ca_dir, tmp_path, "--access-log", "off")
    try:
        w = start_proxy(
            "node-w", config, ca_dir, tmp_path, "--access-log", "off", "--workers", "2", "--drain-timeout", "2s"
        )
        try:
            seen.update(_worker_pids(w).values())
            yield Pair(w, x)
        finally:
            w.stop()
            for pid in seen:  # a failed test must not leave workers behind
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    finally:
        x.stop()
        apps.close()


def _echo_once(payload: bytes = b"ping") -> bytes:
    return socks_echo(CLIENT, (SERVER, PORT), payload)


def _sample(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_two_workers_share_the_load_survive_a_kill_and_stop_together(pair: Pair) -> None:
    dump = pair.w.config_dump()
    assert dump["node"] == "node-w" and len(dump["workers"]) == 2
    pids = _worker_pids(pair.w)
    assert len(pids) == 2 and pair.w.proc.pid not in pids.values()

    for i in range(CONNECTIONS):
        assert _echo_once(b"hello %d" % i) == b"hello %d" % i

    def counted() -> bool:
        m = pair.w.metrics()
        return _sample(m, "istio_tcp_connections_opened_total") == CONNECTIONS

    eventually(counted, 10, what="merged connection counter")
    metrics = pair.w.metrics()
    per_worker = [_sample(metrics, "ztunnel_worker_tcp_connections_opened_total", worker=str(i)) for i in (0, 1)]
    assert sum(per_worker) == CONNECTIONS and all(n > 0 for n in per_worker), per_worker  # the kernel spread them
    assert _sample(metrics, "ztunnel_pods_served") == 1  # every worker serves the pod: max, not sum
    assert _sample(metrics, "ztunnel_worker_up") == 2

    # Kill worker 1: service goes on through worker 0 at once, and worker 1 comes back with a new pid.
    os.kill(pids[1], signal.SIGKILL)
    # Wait for the supervisor to reap it: only then are all its threads gone and its listeners closed (connections
    # the kernel queued on a dying worker's sockets are reset, as with any crash).
    eventually(lambda: _worker_pids(pair.w).get(1) != pids[1], 5, what="worker 1 reaped")
    for i in range(10):
        assert _echo_once(b"after %d" % i) == b"after %d" % i

    def restarted() -> bool:
        workers = {w["index"]: w for w in pair.w.config_dump()["workers"]}
        return workers[1]["pid"] not in (None, pids[1]) and workers[1]["restarts"] == 1 and workers[1]["ready"]

    eventually(restarted, 15, what="worker 1 restarted")
    assert pair.w.ready()
    new_pids = _worker_pids(pair.w)
    assert new_pids[0] == pids[0] and not _alive(pids[1])
    assert _echo_once() == b"ping"

    # SIGTERM to the supervisor drains and stops every worker, then the supervisor itself.
    assert pair.w.stop() == 0
    assert not any(_alive(pid) for pid in new_pids.values())


def test_workers_refuse_in_pod_mode(tmp_path: Path, ca_dir: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    argv = [ZTUNNEL, "proxy", "--node", "node-w", "-f", str(config), "--ca-dir", str(ca_dir), "--workers", "2"]
    out = subprocess.run([*argv, "--inpod-socket", str(tmp_path / "s")], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "local mode only" in out.stderr and "netns" in out.stderr, out.stderr


def test_merged_exposition_sums_counters_and_keeps_per_pod_gauges() -> None:
    from prometheus_client.exposition import generate_latest

    from ztunnel.proxy.workers import merge_expositions

    def worker(opened: int, pool: int) -> str:
        return (
            "# HELP istio_tcp_connections_opened_total Total TCP connections opened\n"
            "# TYPE istio_tcp_connections_opened_total counter\n"
            f'istio_tcp_connections_opened_total{{reporter="source"}} {opened}.0\n'
            "# TYPE ztunnel_pods_served gauge\nztunnel_pods_served 3.0\n"
            f"# TYPE ztunnel_hbone_pool_connections gauge\nztunnel_hbone_pool_connections {pool}.0\n"
            "# TYPE ztunnel_certificate_expiry_timestamp_seconds gauge\n"
            f'ztunnel_certificate_expiry_timestamp_seconds{{identity="a"}} {100 + opened}.0\n'
        )

    class View:
        def collect(self):  # type: ignore[no-untyped-def]
            return merge_expositions([worker(5, 1), worker(7, 2)])

    text = generate_latest(View()).decode()  # type: ignore[arg-type]
    assert 'istio_tcp_connections_opened_total{reporter="source"} 12.0' in text
    assert "ztunnel_pods_served 3.0" in text  # every worker serves every pod: max
    assert "ztunnel_hbone_pool_connections 3.0" in text  # each worker has its own pool: sum
    assert 'ztunnel_certificate_expiry_timestamp_seconds{identity="a"} 105.0' in text  # the earliest expiry
