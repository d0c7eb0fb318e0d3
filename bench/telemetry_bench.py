"""What Istio's metrics cost per request (waypoint) and per connection (node proxy), steady state.

- waypoint: `RequestTelemetry.record` of an allowed request with metrics on and the access log off (labels
  from the cache, one counter and three histogram updates);
- node proxy: `connection_labels` (cached) + `connection_opened` + `connection_closed` with byte counts.

Best of `--rounds` rounds of `--n` iterations each, in µs per iteration. Prints JSON. `--cpu` times with the
process's CPU clock instead of the wall clock: steadier on a shared machine (another process's time slices do not
count), the same figure on an idle one.

    python bench/telemetry_bench.py [--n 50000] [--rounds 5] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from ztunnel.config.model import ClusterConfig, Service, ServicePort, Workload
from ztunnel.proxy.labels import ConnectionLabelCache, connection_labels
from ztunnel.telemetry.http_metrics import WaypointMetrics
from ztunnel.telemetry.metrics import ProxyMetrics
from ztunnel.waypoint.telemetry import Outcome, RequestTelemetry


def _workload(name: str, ns: str, ip: str, **labels: str) -> Workload:
    return Workload(
        uid=f"uid-{name}", name=name, namespace=ns, node="a", service_account=name, ips=(ip,), labels=labels
    )


SLEEP = _workload("sleep", "foo", "10.244.1.5", app="sleep", version="v1")
HTTPBIN = _workload("httpbin", "bar", "10.244.2.7", app="httpbin", version="v2")
SVC = Service(name="httpbin", namespace="bar", cluster_ips=("10.96.0.5",), ports=(ServicePort(8000, 80),), selector={})
CONFIG = ClusterConfig(namespaces={}, workloads=(SLEEP, HTTPBIN), services=(SVC,), nodes={})


def best(fn: object, n: int, rounds: int, clock: Callable[[], float] = time.perf_counter) -> float:
    times = []
    for _ in range(rounds):
        start = clock()
        fn(n)  # type: ignore[operator]
        times.append((clock() - start) / n * 1e6)
    return min(times)


def waypoint_request(n: int) -> None:
    t = RequestTelemetry(WaypointMetrics(CollectorRegistry()), None)
    record = t.record
    for _ in range(n):
        out = Outcome(0.0, status=200, destination=HTTPBIN, service=SVC)
        out.response_bytes = 512
        record(
            CONFIG,
            principal=SLEEP.identity,
            source_ip="10.244.1.5",
            source_addr="10.244.1.5:40000",
            method=b"GET",
            path=b"/get",
            content_type=None,
            outcome=out,
            now=0.001,
        )


def proxy_connection(n: int) -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    cache = ConnectionLabelCache()
    for _ in range(n):
        labels = connection_labels(
            reporter="destination",
            source=SLEEP,
            source_principal=SLEEP.identity,
            destination=HTTPBIN,
            destination_principal=HTTPBIN.identity,
            destination_service=SVC,
            connection_security_policy="mutual_tls",
            cache=cache,
        )
        metrics.connection_opened(labels)
        metrics.connection_closed(labels, 1024, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="time with the process's CPU clock, not the wall clock")
    args = ap.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    result = {
        "waypoint_request_us": round(best(waypoint_request, args.n, args.rounds, clock), 2),
        "proxy_connection_us": round(best(proxy_connection, args.n, args.rounds, clock), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
