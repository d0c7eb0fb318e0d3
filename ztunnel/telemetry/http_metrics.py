"""Istio's HTTP metrics for the waypoint (reporter `waypoint`), under Istio's names and labels.

One update per request, at its end (the request is counted once, with the code it got): a counter and
three histograms (duration in ms, request and response body bytes). The label set is the node proxy's
TCP set (`ConnectionLabels`, DESIGN §4.9, `unknown` for what is not known) plus `response_code` and
`grpc_response_status`; `request_protocol` is `http` or `grpc`.

The four metrics of one label set live in one `RequestSeries` (three sums, three bucket lists; the count is
the duration buckets' sum), exposed by a collector of this module as the samples prometheus-client's Counter
and Histograms give for the same observations (same order, same values, same `_created`): a request costs
three bisects and six additions, where the Counter and Histogram children took a lock per value and walked
the buckets in Python (~3 us of the ~4 a request's telemetry cost).

Strings only: which workload, principal and service a request belongs to is the waypoint's knowledge.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ztunnel.telemetry.metrics import NO_FLAGS, TCP_LABELS, ConnectionLabels

REPORTER_WAYPOINT = "waypoint"
HTTP_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code", "grpc_response_status")

# Envoy's default histogram buckets, which Istio's duration histogram uses (milliseconds).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Body sizes: powers of ten from 1 byte to 1 GB.
SIZE_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))

# Upper bounds as prometheus-client's Histogram keeps them: floats, +Inf last; and their `le` labels.
_DURATION_BOUNDS: tuple[float, ...] = (*(float(b) for b in DURATION_BUCKETS_MS), float("inf"))
_SIZE_BOUNDS: tuple[float, ...] = (*SIZE_BUCKETS, float("inf"))

# prometheus-client's spelling of a bound in `le` ("1.0", "+Inf", "1.8e+06"); its own signature is untyped
_le_label: Callable[[float], str] = floatToGoString

_REQUESTS = ("istio_requests", "Requests the waypoint served, by outcome")
_DURATION = (
    "istio_request_duration_milliseconds",
    "Request duration, from the request head to the end of the response (ms)",
)
_REQUEST_BYTES = ("istio_request_bytes", "Request body size (bytes)")
_RESPONSE_BYTES = ("istio_response_bytes", "Response body size (bytes)")


def request_protocol(content_type: str | None) -> str:
    """`grpc` for a gRPC content type (`application/grpc`, `application/grpc+proto`, ...), else `http`."""
    if content_type and content_type.lower().startswith("application/grpc"):
        return "grpc"
    return "http"


@dataclass(slots=True, eq=False)
class RequestSeries:
    """The four request metrics of one label set: `observe` is the whole per-request update. Written by the event
    loop only; a scrape reads it (ints and floats: a reader sees each value whole)."""

    values: tuple[str, ...]  # in HTTP_LABELS order
    created: float
    duration_sum: float = 0.0
    request_bytes_sum: float = 0.0
    response_bytes_sum: float = 0.0
    duration_buckets: list[int] = field(default_factory=lambda: [0] * len(_DURATION_BOUNDS))
    request_buckets: list[int] = field(default_factory=lambda: [0] * len(_SIZE_BOUNDS))
    response_buckets: list[int] = field(default_factory=lambda: [0] * len(_SIZE_BOUNDS))

    def observe(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        """One finished request. A value goes in the first bucket whose bound it does not exceed (`le`); the
        request count is the duration buckets' sum."""
        self.duration_sum += duration_ms
        self.duration_buckets[bisect_left(_DURATION_BOUNDS, duration_ms)] += 1
        self.request_bytes_sum += request_bytes
        self.request_buckets[bisect_left(_SIZE_BOUNDS, request_bytes)] += 1
        self.response_bytes_sum += response_bytes
        self.response_buckets[bisect_left(_SIZE_BOUNDS, response_bytes)] += 1


def _histogram_samples(
    out: list[Sample], name: str, labels: dict[str, str], bounds: list[str], buckets: list[int], total: float
) -> None:
    # as Histogram._child_samples: cumulative buckets, _count, _sum (floats); `_created` is the caller's
    acc = 0.0
    for le, n in zip(bounds, buckets, strict=True):
        acc += n
        out.append(Sample(name + "_bucket", {**labels, "le": le}, acc))
    out.append(Sample(name + "_count", dict(labels), acc))
    out.append(Sample(name + "_sum", dict(labels), total))


class _RequestCollector:
    """Exposes the `RequestSeries` of a `WaypointMetrics` as the Counter and three Histograms they replace."""

    def __init__(self, series: dict[tuple[ConnectionLabels, int, str, str], RequestSeries]) -> None:
        self._series = series
        self._duration_le = [_le_label(b) for b in _DURATION_BOUNDS]
        self._size_le = [_le_label(b) for b in _SIZE_BOUNDS]

    def describe(self) -> list[Metric]:
        """The four metric names (the registry refuses another collector of the same names)."""
        return [
            Metric(*_REQUESTS, "counter"),
            Metric(*_DURATION, "histogram"),
            Metric(*_REQUEST_BYTES, "histogram"),
            Metric(*_RESPONSE_BYTES, "histogram"),
        ]

    def collect(self) -> list[Metric]:
        requests, duration, request_bytes, response_bytes = self.describe()
        created = prometheus_metrics._use_created  # prometheus-client's switch (disable_created_metrics())
        for s in list(self._series.values()):  # a copy: new series may come while a scrape runs
            labels = dict(zip(HTTP_LABELS, s.values, strict=True))
            requests.samples.append(Sample("istio_requests_total", labels, float(sum(s.duration_buckets))))
            if created:
                requests.samples.append(Sample("istio_requests_created", dict(labels), s.created))
            for metric, le, buckets, total in (
                (duration, self._duration_le, s.duration_buckets, s.duration_sum),
                (request_bytes, self._size_le, s.request_buckets, s.request_bytes_sum),
                (response_bytes, self._size_le, s.response_buckets, s.response_bytes_sum),
            ):
                _histogram_samples(metric.samples, metric.name, labels, le, buckets, total)
                if created:
                    metric.samples.append(Sample(metric.name + "_created", dict(labels), s.created))
        return [requests, duration, request_bytes, response_bytes]


class WaypointMetrics:
    """`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
    `istio_response_bytes` of one waypoint, in `registry` (one per test, one per process), and its JWKS fetches."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # the metrics themselves, not a cache: a label set's series lives as long as a Counter's child would
        self._series: dict[tuple[ConnectionLabels, int, str, str], RequestSeries] = {}
        registry.register(_RequestCollector(self._series))
        self._jwks_fetches = Counter(
            "ztunnel_jwks_fetches",
            "Fetches of a RequestAuthentication jwksUri, by result (ok, error: the last good keys stay in use)",
            ("uri", "result"),
            registry=registry,
        )
        self._jwks_last_success = Gauge(
            "ztunnel_jwks_last_success_timestamp_seconds",
            "Unix time of a jwksUri's last good fetch (the age of the keys in use)",
            ("uri",),
            registry=registry,
        )

    def jwks_fetch(self, uri: str, ok: bool) -> None:
        """One fetch of `uri` (the JWKS refresher's `on_fetch` hook)."""
        self._jwks_fetches.labels(uri, "ok" if ok else "error").inc()
        if ok:
            self._jwks_last_success.labels(uri).set(time.time())

    def series(
        self,
        labels: ConnectionLabels,
        response_code: int,
        grpc_response_status: str = "",
        response_flags: str = NO_FLAGS,
    ) -> RequestSeries:
        """The series of one label set, to `observe` finished requests in (duration in ms, body sizes in bytes;
        `grpc_response_status` empty for a non-gRPC request, as Istio reports it). A caller may keep it."""
        key = (labels, response_code, grpc_response_status, response_flags or NO_FLAGS)
        series = self._series.get(key)
        if series is None:
            values = (*labels.values(key[3]), str(response_code), grpc_response_status)
            series = self._series[key] = RequestSeries(values, time.time())
        return series
