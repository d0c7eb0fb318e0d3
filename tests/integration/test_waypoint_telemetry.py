"""The waypoint process's telemetry end to end (issue 12): after one allowed and one denied request through
`ztunnel waypoint --metrics-addr ... --access-log json`, its /metrics has Istio's `istio_requests_total` with
reporter `waypoint` once per request (200 and 403, the client's principal, the Service's FQDN), the duration
histogram counted twice, and the access log a `request complete` line for each with what decided it.

The cluster, the destination node proxy and the app are test_waypoint_local's.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.eventually import eventually
from tests.support.identity import free_port
from tests.support.waypoint import (
    APP_PORT,
    CLIENT,
    CONFIG,
    GREETER_IP,
    KeepAliveApp,
    Responses,
    client_pool,
    get,
    metric_samples,
    one,
    proxy_and_waypoint,
    tunnel,
)
from ztunnel.hbone.client import HbonePool

SERVICE = "greeter.greet.svc.cluster.local"


@dataclass
class Running:
    ca_dir: Path
    log: Path
    metrics_port: int
    admin_port: int


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, ca_dir: Path) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("waypoint-telemetry")
    config = workdir / "cluster.yaml"
    config.write_text(CONFIG)
    app = KeepAliveApp(GREETER_IP, APP_PORT)
    metrics_port, admin_port = free_port(), free_port()
    try:
        with proxy_and_waypoint(
            config,
            ca_dir,
            workdir,
            "--access-log",
            "json",
            *("--metrics-addr", f"127.0.0.1:{metrics_port}", "--admin-addr", f"127.0.0.1:{admin_port}"),
        ) as (_, _, log):
            yield Running(ca_dir, log, metrics_port, admin_port)
    finally:
        app.close()


@pytest.fixture
async def client(running: Running) -> AsyncIterator[HbonePool]:
    async with client_pool(running.ca_dir) as pool:
        yield pool


def _find(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and want <= ls]


def _access_lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == "request complete":
                out.append(record)
    return out


async def test_allowed_and_denied_requests_are_counted_and_logged(running: Running, client: HbonePool) -> None:
    assert (await one(client, get("/hello")))[0] == 200
    assert (await one(client, get("/version")))[0] == 403

    common = {"reporter": "waypoint", "source_principal": CLIENT.uri, "destination_service": SERVICE}

    def counted() -> bool:
        s = metric_samples(running.metrics_port)
        return bool(_find(s, "istio_requests_total", **common, response_code="403"))

    eventually(counted, 10, what="the denied request in the waypoint's metrics")
    s = metric_samples(running.metrics_port)
    assert _find(s, "istio_requests_total", **common, response_code="200", request_protocol="http") == [1.0]
    assert _find(s, "istio_requests_total", **common, response_code="403", request_protocol="http") == [1.0]
    assert _find(s, "istio_requests_total", **common, destination_workload="greeter", grpc_response_status="")
    istio_standard = {  # the rest of Istio's standard labels (the greeter pod has no version label)
        "destination_canonical_service": "greeter-service",
        "destination_canonical_revision": "latest",
        "destination_version": "latest",
        "destination_cluster": "Kubernetes",
        "destination_service_name": "greeter",
        "destination_service_namespace": "greet",
    }
    assert _find(s, "istio_requests_total", **common, **istio_standard, response_code="200") == [1.0]
    assert sum(_find(s, "istio_request_duration_milliseconds_count", **common)) == 2
    assert sum(_find(s, "istio_response_bytes_sum", **common, response_code="200")) > 0

    lines = _access_lines(running.log)
    assert [(r["method"], r["path"], r["response_code"], r.get("reason")) for r in lines] == [
        ("GET", "/hello", 200, None),
        ("GET", "/version", 403, "rbac"),
    ]
    allowed, denied = lines
    for r in lines:
        assert (r["src.identity"], r["dst.service"], r["dst.workload"]) == (CLIENT.uri, SERVICE, "greet/greeter")
    assert allowed["policy"] == "greet/greeter-service"  # the ALLOW that matched
    assert denied["policy"] == "greet/greeter-service"  # the ALLOW that did not match: denied by it
    assert allowed["upstream"] == f"{GREETER_IP}:{APP_PORT}" and "upstream" not in denied
    assert allowed["bytes_sent"] == len(b"hello GET /hello (0 body bytes) #1\n")

    with urllib.request.urlopen(f"http://127.0.0.1:{running.admin_port}/config_dump", timeout=5) as r:
        dump = json.loads(r.read())
    assert dump["waypoint"] == "greet/waypoint" and dump["requests"] == {"allow": 1, "deny": 1}


async def test_an_upgrade_is_counted_101_when_its_relay_ends(running: Running, client: HbonePool) -> None:
    stream = await tunnel(client)
    try:
        await stream.write(
            b"GET /ws/hello HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert (await Responses(stream).next())[0] == 101
        await stream.write_eof()
        async with asyncio.timeout(10):
            while await stream.read():
                pass
    finally:
        stream.close()
    eventually(lambda: any(r["path"] == "/ws/hello" for r in _access_lines(running.log)), 10, what="the access line")
    (line,) = [r for r in _access_lines(running.log) if r["path"] == "/ws/hello"]
    assert line["response_code"] == 101 and line["policy"] == "greet/greeter-service"
    s = metric_samples(running.metrics_port)
    assert _find(s, "istio_requests_total", reporter="waypoint", response_code="101") == [1.0]
