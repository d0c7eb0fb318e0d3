"""The benchmark's two L7 paths come up as `bench/run --topology local` builds them and enforce the policy they
claim to measure: through the waypoint path (source proxy -> waypoint -> destination proxy) and through
HAProxy's (A -> W -> B, when haproxy is installed) GET /hello is 200 and GET /version, POST /hello are 403,
over HTTP/1.1 and h2c. A short load through each gets only 200s. Timings are never asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.paths.base import PathSetup, http_check
from bench.paths.haproxy_http import setup_haproxy_http
from bench.paths.waypoint import local_waypoint
from bench.processes import ProcessGroup
from bench.settings import HTTP_ALLOWED, HTTP_DENIED, LOADGEN, PY
from bench.topology.local import LocalTopology

pytestmark = pytest.mark.slow


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    with tempfile.TemporaryDirectory(prefix="bench-http-") as d:
        g = ProcessGroup(Path(d))
        try:
            yield g
        finally:
            g.close()


def _loadgen(path: PathSetup, *args: str) -> dict:  # type: ignore[type-arg]
    argv = [PY, LOADGEN, "http", path.http_target, "--host", path.http_host, *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _short_load(path: PathSetup) -> dict:  # type: ignore[type-arg]
    return _loadgen(path, "--conns", "2", "--duration", "0.5", "--warmup", "0.1")


def test_the_waypoint_path_enforces_its_l7_policy_on_one_keep_alive_connection(group: ProcessGroup) -> None:
    path = local_waypoint(group)
    assert path.available, path.note
    assert path.proxies.keys() == {"wa", "wb", "waypoint"}
    checked = _loadgen(path, "--check", ",".join([HTTP_ALLOWED, *HTTP_DENIED, HTTP_ALLOWED]))
    assert [c["status"] for c in checked["checks"]] == [200, 403, 403, 200]
    assert checked["connections"] == 1  # a denied request does not cost the client its connection
    out = _short_load(path)
    assert out["errors"] == 0 and out["requests"] > 0 and out["status"] == {"200": out["requests"]}
    h2 = _loadgen(path, "--h2c", "--check", ",".join([HTTP_ALLOWED, *HTTP_DENIED, HTTP_ALLOWED]))
    assert [c["status"] for c in h2["checks"]] == [200, 403, 403, 200]  # each stream decided on its own
    if shutil.which("h2load"):  # through the path's SOCKS forwarder, as the bench runs it
        r = subprocess.run(
            ["h2load", "-n", "200", "-c", "2", "-m", "4", f"http://{path.h2load_target}/hello"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "200 succeeded" in r.stdout and "200 2xx" in r.stdout, r.stdout


def test_haproxy_w_enforces_the_same_policy(group: ProcessGroup) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (bench/run installs it)")
    LocalTopology(None).start(group)  # the HTTP app on the server pod's address
    path = setup_haproxy_http(group, 1000)
    assert path.available, path.note
    assert http_check(path, [HTTP_ALLOWED, *HTTP_DENIED, HTTP_ALLOWED]) == [200, 403, 403, 200]
    out = _short_load(path)
    assert out["errors"] == 0 and out["status"] == {"200": out["requests"]}
