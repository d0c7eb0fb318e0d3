"""Istio's HTTP metrics for the waypoint (reporter `waypoint`), under Istio's names and labels.

One update per request, at its end (the request is counted once, with the code it got): a counter and
three histograms (duration in ms, request and response body bytes). The label set is the node proxy's
TCP set (`ConnectionLabels`, DESIGN §4.9, `unknown` for what is not known) plus `response_code` and
`grpc_response_status`; `request_protocol` is `http` or `grpc`. As for the TCP counters, looking up a
labelled child takes a lock and validates the values, so the four children are cached per label tuple.

Strings only: which workload, principal and service a request belongs to is the waypoint's knowledge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ztunnel.telemetry.metrics import CHILD_CACHE_LIMIT, NO_FLAGS, TCP_LABELS, ConnectionLabels

REPORTER_WAYPOINT = "waypoint"
HTTP_LABELS: tuple[str, ...] = (*TCP_LABELS, "response_code", "grpc_response_status")

# Envoy's default histogram buckets, which Istio's duration histogram uses (milliseconds).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Body sizes: powers of ten from 1 byte to 1 GB.
SIZE_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))


def request_protocol(content_type: str | None) -> str:
    """`grpc` for a gRPC content type (`application/grpc`, `application/grpc+proto`, ...), else `http`."""
    if content_type and content_type.lower().startswith("application/grpc"):
        return "grpc"
    return "http"


@dataclass(slots=True)
class _RequestChildren:
    total: Any
    duration: Any
    request_bytes: Any
    response_bytes: Any


class WaypointMetrics:
    """`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
    `istio_response_bytes` of one waypoint, in `registry` (one per test, one per process), and its JWKS fetches."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._total = Counter(
            "istio_requests", "Requests the waypoint served, by outcome", HTTP_LABELS, registry=registry
        )
        self._duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration, from the request head to the end of the response (ms)",
            HTTP_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=registry,
        )
        self._request_bytes = Histogram(
            "istio_request_bytes", "Request body size (bytes)", HTTP_LABELS, buckets=SIZE_BUCKETS, registry=registry
        )
        self._response_bytes = Histogram(
            "istio_response_bytes", "Response body size (bytes)", HTTP_LABELS, buckets=SIZE_BUCKETS, registry=registry
        )
        self._children: dict[tuple[ConnectionLabels, int, str, str], _RequestChildren] = {}
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

    def _of(self, labels: ConnectionLabels, code: int, grpc_status: str, flags: str) -> _RequestChildren:
        key = (labels, code, grpc_status, flags)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= CHILD_CACHE_LIMIT:
                self._children.clear()  # only the lookup cache: the metrics keep their values
            values = (*labels.values(flags), str(code), grpc_status)
            children = self._children[key] = _RequestChildren(
                self._total.labels(*values),
                self._duration.labels(*values),
                self._request_bytes.labels(*values),
                self._response_bytes.labels(*values),
            )
        return children

    def request_done(
        self,
        labels: ConnectionLabels,
        *,
        response_code: int,
        duration: float,
        request_bytes: int,
        response_bytes: int,
        grpc_response_status: str = "",
        response_flags: str = NO_FLAGS,
    ) -> None:
        """Count one finished request; `duration` in seconds, sizes are body bytes. `grpc_response_status`
        is empty for a non-gRPC request, as Istio reports it."""
        c = self._of(labels, response_code, grpc_response_status, response_flags or NO_FLAGS)
        c.total.inc()
        c.duration.observe(duration * 1000.0)
        c.request_bytes.observe(request_bytes)
        c.response_bytes.observe(response_bytes)
