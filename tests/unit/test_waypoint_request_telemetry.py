"""The waypoint's per-request telemetry: Istio's HTTP labels from the config, one metric update and one access
log line per request, cached label children."""

from __future__ import annotations

import io
import json
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from ztunnel.config.model import ClusterConfig, Service, ServicePort, Workload
from ztunnel.telemetry.accesslog import MAX_PATH_CHARS, AccessLog
from ztunnel.telemetry.http_metrics import (
    DURATION_BUCKETS_MS,
    HTTP_LABELS,
    SIZE_BUCKETS,
    WaypointMetrics,
    request_protocol,
)
from ztunnel.telemetry.metrics import TCP_LABELS
from ztunnel.waypoint.telemetry import Outcome, RequestTelemetry, protocol_of, request_labels, source_workload


def workload(name: str, ns: str, sa: str, ip: str, **labels: str) -> Workload:
    return Workload(
        uid=f"uid-{name}", name=name, namespace=ns, node="a", service_account=sa, ips=(ip,), labels=labels
    )


SLEEP = workload("sleep-1", "foo", "sleep", "127.0.10.1", app="sleep")
CANONICAL = {"service.istio.io/canonical-name": "hb", "version": "v2"}
HTTPBIN = workload("httpbin-1", "bar", "httpbin", "127.0.20.1", app="httpbin", **CANONICAL)
SVC = Service(name="httpbin", namespace="bar", cluster_ips=("10.96.0.5",), ports=(ServicePort(8000, 80),), selector={})
CONFIG = ClusterConfig(namespaces={}, workloads=(SLEEP, HTTPBIN), services=(SVC,), nodes={})


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_labels_follow_istio_and_the_node_proxy() -> None:
    labels = request_labels(
        source=SLEEP, source_principal=SLEEP.identity, destination=HTTPBIN, service=SVC, protocol="http"
    )
    assert (*TCP_LABELS, "response_code", "grpc_response_status") == HTTP_LABELS
    values = dict(zip(HTTP_LABELS, (*labels.values("-"), "200", ""), strict=True))
    assert values == {
        "reporter": "waypoint",
        "source_workload": "sleep-1",
        "source_workload_namespace": "foo",
        "source_principal": "spiffe://cluster.local/ns/foo/sa/sleep",
        "source_app": "sleep",
        "source_version": "latest",  # no version label: Istio's canonical revision `latest`
        "source_canonical_service": "sleep",
        "source_canonical_revision": "latest",
        "source_cluster": "Kubernetes",
        "destination_workload": "httpbin-1",
        "destination_workload_namespace": "bar",
        "destination_principal": "spiffe://cluster.local/ns/bar/sa/httpbin",
        "destination_app": "hb",  # the canonical name wins over `app`, as in the node proxy's labels
        "destination_version": "v2",
        "destination_service": "httpbin.bar.svc.cluster.local",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "bar",
        "destination_canonical_service": "hb",
        "destination_canonical_revision": "v2",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "response_code": "200",
        "grpc_response_status": "",
    }
    unknown = request_labels(source=None, source_principal="", destination=None, service=SVC, protocol="grpc")
    assert {unknown.source_workload, unknown.source_principal, unknown.destination_workload} == {"unknown"}
    assert {unknown.source_version, unknown.source_canonical_service, unknown.source_cluster} == {"unknown"}
    assert {unknown.destination_canonical_revision, unknown.destination_cluster} == {"unknown"}
    assert (unknown.destination_service_name, unknown.destination_service_namespace) == ("httpbin", "bar")


def test_source_workload_only_with_the_callers_identity() -> None:
    assert source_workload(CONFIG, "127.0.10.1", SLEEP.identity) is SLEEP
    assert source_workload(CONFIG, "127.0.10.1", HTTPBIN.identity) is None  # someone else's address
    assert source_workload(CONFIG, "127.0.99.9", SLEEP.identity) is None  # a node proxy's address


def test_request_protocol_from_content_type() -> None:
    assert request_protocol("application/grpc") == "grpc"
    assert request_protocol("Application/gRPC+proto") == "grpc"
    assert request_protocol("application/json") == "http"
    assert request_protocol(None) == "http"
    # the waypoint's, on the header's bytes: the same answer as on its latin-1 text
    for value in (b"application/grpc", b"Application/gRPC+proto", b"application/grp", b"", b"\xc1pplication/grpc"):
        assert protocol_of(value) == request_protocol(value.decode("latin-1")), value


def test_duration_buckets_are_envoys() -> None:
    assert DURATION_BUCKETS_MS[:3] == (0.5, 1, 5) and DURATION_BUCKETS_MS[-1] == 3600000


def _record(t: RequestTelemetry, outcome: Outcome, **kw: object) -> None:
    args: dict[str, object] = {
        "principal": SLEEP.identity,
        "source_ip": "127.0.10.1",
        "source_addr": "127.0.10.1:40000",
        "method": b"GET",
        "path": b"/hello",
        "content_type": None,
        "outcome": outcome,
        "now": 10.25,
    }
    args.update(kw)
    t.record(CONFIG, **args)  # type: ignore[arg-type]


def test_allowed_and_denied_are_counted_once_each_and_logged_with_the_policy() -> None:
    registry = CollectorRegistry()
    out = io.StringIO()
    t = RequestTelemetry(WaypointMetrics(registry), AccessLog("json", out))
    ok = Outcome(10.0, status=200, policy="bar/allow-get", destination=HTTPBIN, service=SVC, upstream="127.0.20.1:8000")
    ok.request_bytes, ok.response_bytes = 0, 1500
    _record(t, ok)
    denied = Outcome(10.0, status=403, policy="bar/deny-post", reason="rbac", destination=HTTPBIN, service=SVC)
    denied.response_bytes = 19
    _record(t, denied, method=b"POST", content_type=b"application/grpc")
    common = {
        "reporter": "waypoint",
        "source_workload": "sleep-1",
        "source_principal": SLEEP.identity,
        "destination_service": "httpbin.bar.svc.cluster.local",
        "destination_workload": "httpbin-1",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "source_workload_namespace": "foo",
        "source_app": "sleep",
        "destination_workload_namespace": "bar",
        "destination_principal": HTTPBIN.identity,
        "destination_app": "hb",
        "grpc_response_status": "",
        "source_version": "latest",
        "source_canonical_service": "sleep",
        "source_canonical_revision": "latest",
        "source_cluster": "Kubernetes",
        "destination_version": "v2",
        "destination_service_name": "httpbin",
        "destination_service_namespace": "bar",
        "destination_canonical_service": "hb",
        "destination_canonical_revision": "v2",
        "destination_cluster": "Kubernetes",
    }
    ok_labels = {**common, "response_code": "200", "request_protocol": "http"}
    denied_labels = {**common, "response_code": "403", "request_protocol": "grpc"}
    assert sample(registry, "istio_requests_total", **ok_labels) == 1
    assert sample(registry, "istio_requests_total", **denied_labels) == 1
    assert sample(registry, "istio_request_duration_milliseconds_count", **ok_labels) == 1
    assert sample(registry, "istio_request_duration_milliseconds_sum", **ok_labels) == 250.0
    assert sample(registry, "istio_request_duration_milliseconds_bucket", **ok_labels, le="250.0") == 1
    assert sample(registry, "istio_request_duration_milliseconds_bucket", **ok_labels, le="100.0") == 0
    assert sample(registry, "istio_response_bytes_sum", **ok_labels) == 1500
    assert sample(registry, "istio_response_bytes_bucket", **ok_labels, le="1000.0") == 0
    assert sample(registry, "istio_response_bytes_bucket", **ok_labels, le="10000.0") == 1
    assert sample(registry, "istio_request_bytes_count", **denied_labels) == 1
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["msg"], r["method"], r["response_code"], r.get("policy"), r.get("reason")) for r in lines] == [
        ("request complete", "GET", 200, "bar/allow-get", None),
        ("request complete", "POST", 403, "bar/deny-post", "rbac"),
    ]
    assert lines[0]["src.workload"] == "foo/sleep-1" and lines[0]["dst.service"] == "httpbin.bar.svc.cluster.local"
    assert lines[0]["upstream"] == "127.0.20.1:8000" and lines[0]["duration_ms"] == 250.0
    assert lines[0]["bytes_sent"] == 1500


def test_children_and_labels_are_cached() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    t = RequestTelemetry(metrics, None)
    for _ in range(3):
        _record(t, Outcome(10.0, status=200, destination=HTTPBIN, service=SVC))
    assert len(metrics._series) == 1 and len(t._series_of) == 1
    first = t.labels(CONFIG, SLEEP.identity, "127.0.10.1", HTTPBIN, SVC, "http")[1]
    assert t.labels(CONFIG, SLEEP.identity, "127.0.10.1", HTTPBIN, SVC, "http")[1] is first
    other = ClusterConfig(namespaces={}, workloads=(SLEEP, HTTPBIN), services=(SVC,), nodes={})
    assert t.labels(other, SLEEP.identity, "127.0.10.1", HTTPBIN, SVC, "http")[1] is not first  # a new snapshot


def test_request_without_a_service_is_logged_not_counted() -> None:
    registry = CollectorRegistry()
    out = io.StringIO()
    t = RequestTelemetry(WaypointMetrics(registry), AccessLog("text", out))
    _record(t, Outcome(10.0, status=503, reason="no_endpoint"), path=b"/a b\n" + b"x" * 5000)
    assert sample(registry, "istio_requests_total", response_code="503") is None
    line = out.getvalue()
    assert line.count("\n") == 1 and "request complete" in line and "reason=no_endpoint" in line
    assert len(line) < MAX_PATH_CHARS + 600  # the client's path is clipped


def test_jwks_fetches_are_counted_by_result_with_the_last_success_time() -> None:
    registry = CollectorRegistry()
    metrics = WaypointMetrics(registry)
    uri = "http://keys.test/jwks"
    metrics.jwks_fetch(uri, True)
    metrics.jwks_fetch(uri, False)
    metrics.jwks_fetch(uri, False)
    assert sample(registry, "ztunnel_jwks_fetches_total", uri=uri, result="ok") == 1
    assert sample(registry, "ztunnel_jwks_fetches_total", uri=uri, result="error") == 2
    last = sample(registry, "ztunnel_jwks_last_success_timestamp_seconds", uri=uri)
    assert last is not None and abs(last - time.time()) < 60


class _Only:
    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> list[Metric]:
        return [m for m in self.registry.collect() if m.name in self.names]


def _reference(registry: CollectorRegistry) -> tuple[Counter, Histogram, Histogram, Histogram]:
    """The four metrics as prometheus-client's own Counter and Histograms, which WaypointMetrics' output must equal."""
    sizes = SIZE_BUCKETS
    return (
        Counter("istio_requests", "Requests the waypoint served, by outcome", HTTP_LABELS, registry=registry),
        Histogram(
            "istio_request_duration_milliseconds",
            "Request duration, from the request head to the end of the response (ms)",
            HTTP_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=registry,
        ),
        Histogram("istio_request_bytes", "Request body size (bytes)", HTTP_LABELS, buckets=sizes, registry=registry),
        Histogram("istio_response_bytes", "Response body size (bytes)", HTTP_LABELS, buckets=sizes, registry=registry),
    )


def _without_created_values(exposition: bytes) -> bytes:
    # `_created` is the wall time a series appeared: its sample stays, its value cannot be compared
    return b"\n".join(line.rsplit(b" ", 1)[0] if b"_created{" in line else line for line in exposition.split(b"\n"))


def test_exposition_is_prometheus_clients_for_the_same_requests() -> None:
    """The metrics are a collector of their own (cheaper per request): the scrape is byte for byte what
    prometheus-client's Counter and Histograms give for the same requests, text and OpenMetrics, bounds included."""
    registry, expected = CollectorRegistry(), CollectorRegistry()
    t = RequestTelemetry(WaypointMetrics(registry), None)
    total, duration, request_bytes, response_bytes = _reference(expected)
    other = ClusterConfig(namespaces={}, workloads=(SLEEP, HTTPBIN), services=(SVC,), nodes={})
    n = 0
    for config in (CONFIG, other):  # a new snapshot: the same label values count on in the same series
        for status, grpc_status, content_type in ((200, "", None), (403, "7", b"application/grpc"), (0, "", None)):
            for destination in (HTTPBIN, None):
                for seconds in (0.0, 0.0004, 0.0005, 0.001, 0.0051, 0.25, 4000.0):
                    for size in (0, 1, 10, 11, 999_999, 10**9, 3 * 10**9):
                        n += 1
                        principal = SLEEP.identity if n % 3 else "spiffe://cluster.local/ns/x/sa/y"
                        out = Outcome(10.0, status=status, destination=destination, service=SVC)
                        out.grpc_status = grpc_status
                        out.request_bytes, out.response_bytes = size, size * 7 % 100_003
                        t.record(
                            config,
                            principal=principal,
                            source_ip="127.0.10.1",
                            source_addr="127.0.10.1:40000",
                            method=b"GET",
                            path=b"/",
                            content_type=content_type,
                            outcome=out,
                            now=10.0 + seconds,
                        )
                        _, labels = t.labels(
                            config, principal, "127.0.10.1", destination, SVC, "grpc" if content_type else "http"
                        )
                        values = (*labels.values("-"), str(status), grpc_status)
                        total.labels(*values).inc()
                        duration.labels(*values).observe(((10.0 + seconds) - 10.0) * 1000.0)  # as `record` has it
                        request_bytes.labels(*values).observe(out.request_bytes)
                        response_bytes.labels(*values).observe(out.response_bytes)
    requests_only = CollectorRegistry()  # the registry's four request metrics, not its TCP and JWKS ones
    names = {"istio_requests", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"}
    requests_only.register(_Only(registry, names))
    for render in (generate_latest, generate_openmetrics):
        got, want = render(requests_only), render(expected)
        assert b'le="1.8e+06"' in got and b"istio_request_bytes_created{" in got
        assert _without_created_values(got) == _without_created_values(want)


def test_the_metric_names_are_taken_in_the_registry() -> None:
    registry = CollectorRegistry()
    WaypointMetrics(registry)
    with pytest.raises(ValueError, match="istio_requests"):
        Counter("istio_requests", "another", registry=registry)

