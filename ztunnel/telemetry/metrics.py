"""Prometheus metrics of the node proxy, under Istio's names so existing dashboards work.

The four `istio_tcp_*` counters carry Istio's standard label set (DESIGN.md §4.9, Istio's "Istio Standard
Metrics": workload, namespace, principal, app, version, canonical service and revision, cluster of either
side; the destination service's host, name and namespace; protocol, flags, security policy). They are updated
once when a connection opens and once when it closes (bytes aggregated per connection), never per
chunk: the relay hot path must not touch a metric. Looking up a labelled child in prometheus-client
takes a lock and validates the label values, so the children are cached per `ConnectionLabels`.

Every metric lives in the `CollectorRegistry` passed in, so tests and several proxies in one process
never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

UNKNOWN = "unknown"
NO_FLAGS = "-"  # Envoy's spelling for "no response flags"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's cluster id when `global.multiCluster.clusterName` is not set
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"

Reporter = Literal["source", "destination"]

# Istio's label set for TCP metrics, in the order the counters declare them.
TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

# Bound on cached label children: the set of (source, destination) pairs is bounded by the cluster,
# but a cache must never grow without limit if something (e.g. many passthrough IPs) is not.
CHILD_CACHE_LIMIT = 10_000


def canonical_service(workload_name: str, labels: Mapping[str, str]) -> str:
    """Istio's canonical service of a workload: its canonical-name label, else `app.kubernetes.io/name`, else
    `app`, else the workload's name."""
    return (
        labels.get(CANONICAL_NAME_LABEL) or labels.get("app.kubernetes.io/name") or labels.get("app") or workload_name
    )


def canonical_revision(labels: Mapping[str, str]) -> str:
    """Istio's canonical revision: its canonical-revision label, else `app.kubernetes.io/version`, else
    `version`, else `latest`."""
    revision = labels.get(CANONICAL_REVISION_LABEL) or labels.get("app.kubernetes.io/version")
    return revision or labels.get("version") or "latest"


def workload_labels(side: Literal["source", "destination"], name: str, labels: Mapping[str, str]) -> dict[str, str]:
    """A known workload's version, canonical service and revision, and cluster, as `ConnectionLabels` keyword
    arguments for `side`. The version is the canonical revision, as Istio's ztunnel reports it."""
    revision = canonical_revision(labels)
    return {
        f"{side}_version": revision,
        f"{side}_canonical_service": canonical_service(name, labels),
        f"{side}_canonical_revision": revision,
        f"{side}_cluster": DEFAULT_CLUSTER,
    }


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """The per-connection part of Istio's standard label set (everything except `response_flags`).

    Plain strings: the proxy fills them from its workloads (`proxy.labels`), once per (source,
    destination) pair. Hashable, and the cache key of the labelled metric children: the hash is computed
    once, since a lookup hashes the key on every request or connection (23 strings).
    """

    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    connection_security_policy: str = UNKNOWN
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self.values("")))

    def __hash__(self) -> int:
        return self._hash

    def values(self, response_flags: str) -> tuple[str, ...]:
        """Label values in `TCP_LABELS` order."""
        return (
            self.reporter,
            self.source_workload,
            self.source_workload_namespace,
            self.source_principal,
            self.source_app,
            self.source_version,
            self.source_canonical_service,
            self.source_canonical_revision,
            self.source_cluster,
            self.destination_workload,
            self.destination_workload_namespace,
            self.destination_principal,
            self.destination_app,
            self.destination_version,
            self.destination_service,
            self.destination_service_name,
            self.destination_service_namespace,
            self.destination_canonical_service,
            self.destination_canonical_revision,
            self.destination_cluster,
            self.request_protocol,
            response_flags,
            self.connection_security_policy,
        )


@dataclass(slots=True)
class _TcpChildren:
    """The labelled children of the four TCP counters for one (labels, response_flags)."""

    opened: Any
    closed: Any
    sent: Any
    received: Any


class ProxyMetrics:
    """All metrics of one node proxy, registered in `registry`.

    TCP byte semantics follow Istio: `sent_bytes` are bytes sent *to the client* (the response
    direction, downstream), `received_bytes` are bytes received *from the client* (the request
    direction). Each reporter counts from its own side of the connection.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._opened = Counter(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            TCP_LABELS,
            registry=registry,
        )
        self._closed = Counter(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            TCP_LABELS,
            registry=registry,
        )
        self._sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction) on TCP connections",
            TCP_LABELS,
            registry=registry,
        )
        self._received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction) on TCP connections",
            TCP_LABELS,
            registry=registry,
        )
        self._children: dict[tuple[ConnectionLabels, str], _TcpChildren] = {}

        # ---- proxy health --------------------------------------------------------------------
        self._config_loaded_at: float | None = None
        self._config_last_load = Gauge(
            "ztunnel_config_last_load_timestamp_seconds",
            "Unix time of the last successful config load (0 before the first)",
            registry=registry,
        )
        self._config_age = Gauge(
            "ztunnel_config_age_seconds",
            "Seconds since the last successful config load (-1 before the first)",
            registry=registry,
        )
        self._config_age.set_function(self._config_age_now)
        self._config_loads = Counter(
            "ztunnel_config_loads",
            "Config loads by result (success or error); on error the last good config stays in use",
            ("result",),
            registry=registry,
        )
        self._pods_served = Gauge(
            "ztunnel_pods_served",
            "Mesh pods of this node the proxy currently serves (listeners open)",
            registry=registry,
        )
        self._pool_connections = Gauge(
            "ztunnel_hbone_pool_connections",
            "Open HBONE (mTLS + HTTP/2) connections in the client pool",
            registry=registry,
        )
        self._tls_failures = Counter(
            "ztunnel_tls_failures",
            "HBONE TLS failures by reason: TLS_FAILURE (handshake), IDENTITY_ERROR (wrong identity or trust domain)",
            ("reason",),
            registry=registry,
        )
        self._handshake_failures = Counter(
            "ztunnel_hbone_handshake_failures",
            "Inbound HBONE connections refused before any tunnel, by reason: the handshake's (expired, "
            "not_yet_valid, self_signed, untrusted, revoked, bad_certificate, no_certificate, peer_alert, "
            "protocol, timeout, closed) or identity (a verified client of another identity or trust domain)",
            ("reason",),
            registry=registry,
        )
        self._refusals = Counter(
            "ztunnel_connections_refused",
            "Connections the proxy refused, by reason (e.g. policy_denied, no_endpoint, bad_request)",
            ("reason",),
            registry=registry,
        )
        self._cert_expiry = Gauge(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "Unix time at which the workload certificate held for an identity expires",
            ("identity",),
            registry=registry,
        )
        self._cert_failures = Counter(
            "ztunnel_certificate_fetch_failures",
            "Failed attempts to obtain or rotate a workload certificate",
            registry=registry,
        )
        self._crl_loads = Counter(
            "ztunnel_crl_loads",
            "CRL polls that changed or kept the CRL, by result: loaded, cleared, rejected (rollback or bad "
            "signature: the one in force stays), error (source unreachable: the one in force stays)",
            ("result",),
            registry=registry,
        )
        self._crl_number = Gauge(
            "ztunnel_crl_number", "CRL number of the CRL in force (0: none)", registry=registry
        )
        self._revoked_closed = Counter(
            "ztunnel_revoked_connections_closed",
            "Open HBONE connections closed because the peer's certificate was revoked, by side",
            ("side",),
            registry=registry,
        )

    # ---- TCP connection metrics (per connection, never per chunk) -----------------------------
    def _tcp(self, labels: ConnectionLabels, response_flags: str) -> _TcpChildren:
        key = (labels, response_flags)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= CHILD_CACHE_LIMIT:
                self._children.clear()  # only the lookup cache: counters keep their values
            values = labels.values(response_flags)
            children = _TcpChildren(
                opened=self._opened.labels(*values),
                closed=self._closed.labels(*values),
                sent=self._sent.labels(*values),
                received=self._received.labels(*values),
            )
            self._children[key] = children
        return children

    def connection_opened(self, labels: ConnectionLabels) -> None:
        self._tcp(labels, NO_FLAGS).opened.inc()

    def connection_closed(
        self, labels: ConnectionLabels, sent_bytes: int, received_bytes: int, response_flags: str = NO_FLAGS
    ) -> None:
        """Count the close and the bytes not yet flushed with `add_bytes`."""
        children = self._tcp(labels, response_flags or NO_FLAGS)
        children.closed.inc()
        if sent_bytes:
            children.sent.inc(sent_bytes)
        if received_bytes:
            children.received.inc(received_bytes)

    def add_bytes(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """Flush bytes of a still-open connection (for long-lived ones), counted with no response flags."""
        children = self._tcp(labels, NO_FLAGS)
        if sent:
            children.sent.inc(sent)
        if received:
            children.received.inc(received)

    # ---- proxy health -------------------------------------------------------------------------
    def _config_age_now(self) -> float:
        loaded = self._config_loaded_at
        return -1.0 if loaded is None else max(0.0, time.time() - loaded)

    def config_loaded(self, at: float | None = None) -> None:
        """A new config snapshot is in use."""
        self._config_loaded_at = time.time() if at is None else at
        self._config_last_load.set(self._config_loaded_at)
        self._config_loads.labels("success").inc()

    def config_load_failed(self) -> None:
        self._config_loads.labels("error").inc()

    def set_pods_served(self, count: int) -> None:
        self._pods_served.set(count)

    def set_pool_connections(self, count: int) -> None:
        self._pool_connections.set(count)

    def tls_failure(self, reason: str) -> None:
        self._tls_failures.labels(reason).inc()

    def handshake_failure(self, reason: str) -> None:
        self._handshake_failures.labels(reason).inc()

    def connection_refused(self, reason: str) -> None:
        self._refusals.labels(reason).inc()

    def set_certificate_expiry(self, identity: str, not_after: float) -> None:
        self._cert_expiry.labels(identity).set(not_after)

    def remove_certificate(self, identity: str) -> None:
        try:
            self._cert_expiry.remove(identity)
        except KeyError:
            pass

    def crl_update(self, result: str, number: int) -> None:
        """One CRL poll that did something (see ztunnel.identity.revocation); `number` is the one in force."""
        self._crl_loads.labels(result).inc()
        self._crl_number.set(number)

    def revoked_connections_closed(self, side: str, count: int) -> None:
        self._revoked_closed.labels(side).inc(count)

    def certificate_fetch_failed(self) -> None:
        self._cert_failures.inc()
