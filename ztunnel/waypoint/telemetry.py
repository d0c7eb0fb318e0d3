"""The waypoint's per-request telemetry: Istio's HTTP metrics (reporter `waypoint`) and one access log line; and
Istio's TCP metrics for the connections it relays as TCP (`WaypointTcpMetrics`), as Istio's waypoint counts them.

Which workload, principal and service a request belongs to is the waypoint's knowledge (its config
snapshot); telemetry counts strings. The labels follow the node proxy's (proxy.labels, DESIGN §4.9:
`unknown` for what is not known, principals as SPIFFE URIs, the service's FQDN), built once per
(snapshot, source, destination, protocol) and handed out again; a request's metric series is one dict hit
per (snapshot, source, destination, protocol, code, gRPC status), then three bisects and six additions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from ztunnel.config.model import ClusterConfig, Service, Workload
from ztunnel.telemetry.accesslog import AccessLog
from ztunnel.telemetry.http_metrics import REPORTER_WAYPOINT, RequestSeries, WaypointMetrics
from ztunnel.telemetry.metrics import (
    CANONICAL_NAME_LABEL,
    CHILD_CACHE_LIMIT,
    NO_FLAGS,
    TCP_LABELS,
    UNKNOWN,
    ConnectionLabels,
    workload_labels,
)


def _app_of(workload: Workload) -> str:
    # the same rule as the node proxy's labels (proxy.labels._app_of): canonical name, else `app`
    return workload.labels.get(CANONICAL_NAME_LABEL) or workload.app


def protocol_of(content_type: bytes) -> str:
    """`request_protocol` of a request's content type as it came (bytes: no decode per request)."""
    return "grpc" if content_type[:16].lower() == b"application/grpc" else "http"


def source_workload(config: ClusterConfig, source_ip: str, principal: str) -> Workload | None:
    """The client's pod: the one at `source_ip`, when it runs as the authenticated `principal` (otherwise the
    address is a node proxy's or a stranger's, and the source workload is unknown)."""
    w = config.workload_by_ip(source_ip)
    return w if w is not None and w.identity == principal else None


def request_labels(
    *, source: Workload | None, source_principal: str, destination: Workload | None, service: Service, protocol: str
) -> ConnectionLabels:
    """Istio's standard labels for a request to `service` (its endpoint `destination`, None when there was none)."""
    return ConnectionLabels(
        reporter=REPORTER_WAYPOINT,
        source_workload=source.name if source else UNKNOWN,
        source_workload_namespace=source.namespace if source else UNKNOWN,
        source_principal=source_principal or UNKNOWN,
        source_app=_app_of(source) if source else UNKNOWN,
        destination_workload=destination.name if destination else UNKNOWN,
        destination_workload_namespace=destination.namespace if destination else UNKNOWN,
        destination_principal=destination.identity if destination else UNKNOWN,
        destination_app=_app_of(destination) if destination else UNKNOWN,
        destination_service=service.hostname,
        destination_service_name=service.name,
        destination_service_namespace=service.namespace,
        request_protocol=protocol,
        connection_security_policy="mutual_tls",  # HBONE in: the client's SVID was verified
        **(workload_labels("source", source.name, source.labels) if source else {}),
        **(workload_labels("destination", destination.name, destination.labels) if destination else {}),
    )


@dataclass(slots=True)
class Outcome:
    """What became of one request, filled in as it is served; `record` reads it at the end."""

    started: float
    status: int = 0  # 0: no response was sent (the client or the upstream went away)
    policy: str | None = None
    reason: str | None = None  # rbac, jwt, no_endpoint, upstream_error, ... (None: allowed)
    destination: Workload | None = None
    service: Service | None = None
    upstream: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    grpc_status: str = ""
    tunnel_status: int = 101  # the code of an allowed Upgrade (101) or CONNECT (2xx) once it relays raw bytes

    def __init__(
        self,
        started: float,
        status: int = 0,
        policy: str | None = None,
        reason: str | None = None,
        destination: Workload | None = None,
        service: Service | None = None,
        upstream: str | None = None,
        request_bytes: int = 0,
        response_bytes: int = 0,
        grpc_status: str = "",
        tunnel_status: int = 101,
    ) -> None:
        """The fields in their order, with their defaults, written out: the __init__ `dataclass` makes is Python even
        when mypyc compiles the class (ztunnel/compiled), and it ran interpreted once a request."""
        self.started, self.status, self.policy, self.reason = started, status, policy, reason
        self.destination, self.service, self.upstream = destination, service, upstream
        self.request_bytes, self.response_bytes = request_bytes, response_bytes
        self.grpc_status, self.tunnel_status = grpc_status, tunnel_status


class WaypointTcpMetrics:
    """`istio_tcp_connections_opened_total`, `..._closed_total`, `istio_tcp_sent_bytes_total` and
    `istio_tcp_received_bytes_total` for the connections the waypoint relays as TCP, in the waypoint's registry,
    under the node proxy's names and label set (reporter `waypoint`, request_protocol `tcp`). Bytes are counted
    by the relay in two integers and added here by a periodic flush and at the close: the relay never touches a
    metric. `sent` is
    toward the client (response direction), `received` from it, as Istio counts them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, TCP_LABELS, registry=registry)

        self._opened = counter("istio_tcp_connections_opened", "Total TCP connections opened")
        self._closed = counter("istio_tcp_connections_closed", "Total TCP connections closed")
        self._sent = counter("istio_tcp_sent_bytes", "Bytes sent to the client (response direction) on TCP connections")
        self._received = counter(
            "istio_tcp_received_bytes", "Bytes received from the client (request direction) on TCP connections"
        )
        self._children: dict[ConnectionLabels, tuple[Any, Any, Any, Any]] = {}

    def _of(self, labels: ConnectionLabels) -> tuple[Any, Any, Any, Any]:
        children = self._children.get(labels)
        if children is None:
            if len(self._children) >= CHILD_CACHE_LIMIT:
                self._children.clear()  # only the lookup cache: the counters keep their values
            values = labels.values(NO_FLAGS)
            children = self._children[labels] = (
                self._opened.labels(*values),
                self._closed.labels(*values),
                self._sent.labels(*values),
                self._received.labels(*values),
            )
        return children

    def opened(self, labels: ConnectionLabels) -> None:
        self._of(labels)[0].inc()

    def add_bytes(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        _, _, sent_bytes, received_bytes = self._of(labels)
        if sent:
            sent_bytes.inc(sent)
        if received:
            received_bytes.inc(received)

    def closed(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """The close, with the bytes not flushed yet."""
        _, closed, sent_bytes, received_bytes = self._of(labels)
        closed.inc()
        if sent:
            sent_bytes.inc(sent)
        if received:
            received_bytes.inc(received)


class RequestTelemetry:
    """Counts and logs finished requests; either part may be off (`metrics`/`access_log` None). With `metrics`,
    the TCP connections it relays are counted too (`tcp_opened`, `tcp_closed`)."""

    def __init__(self, metrics: WaypointMetrics | None, access_log: AccessLog | None) -> None:
        self.metrics = metrics
        self.tcp = WaypointTcpMetrics(metrics.registry) if metrics is not None else None
        self.access_log = access_log if access_log is not None and access_log.enabled else None
        self._config: ClusterConfig | None = None
        self._labels: dict[tuple[Any, ...], tuple[Workload | None, Workload | None, Service, ConnectionLabels]] = {}
        self._series_of: dict[tuple[Any, ...], tuple[Workload | None, Service, RequestSeries]] = {}

    def labels(
        self,
        config: ClusterConfig,
        principal: str,
        source_ip: str,
        destination: Workload | None,
        service: Service,
        protocol: str,
    ) -> tuple[Workload | None, ConnectionLabels]:
        if config is not self._config:  # a new snapshot: its workloads and services are new objects
            self._config = config
            self._labels.clear()
            self._series_of.clear()
        key = (principal, source_ip, id(destination), id(service), protocol)
        hit = self._labels.get(key)
        if hit is not None and hit[1] is destination and hit[2] is service:
            return hit[0], hit[3]
        source = source_workload(config, source_ip, principal)
        labels = request_labels(
            source=source, source_principal=principal, destination=destination, service=service, protocol=protocol
        )
        if len(self._labels) >= CHILD_CACHE_LIMIT:
            self._labels.clear()
        self._labels[key] = (source, destination, service, labels)
        return source, labels

    def tcp_opened(
        self, config: ClusterConfig, *, principal: str, source_ip: str, destination: Workload, service: Service
    ) -> ConnectionLabels | None:
        """A TCP connection relayed from now on: counted opened; its labels for `tcp_closed` (None: not counted)."""
        if self.tcp is None:
            return None
        _, labels = self.labels(config, principal, source_ip, destination, service, "tcp")
        self.tcp.opened(labels)
        return labels

    def tcp_bytes(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """Bytes of a still-open `tcp_opened` connection (the periodic flush)."""
        if self.tcp is not None:
            self.tcp.add_bytes(labels, sent, received)

    def tcp_closed(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """The relay of a `tcp_opened` connection ended, having sent `sent` bytes to the client and `received`."""
        if self.tcp is not None:
            self.tcp.closed(labels, sent, received)

    def _new_series(
        self,
        key: tuple[Any, ...],
        config: ClusterConfig,
        principal: str,
        source_ip: str,
        destination: Workload | None,
        service: Service,
        protocol: str,
        outcome: Outcome,
        metrics: WaypointMetrics,
    ) -> RequestSeries:
        """The series of a request unlike any since the snapshot `config` came (`record` finds it under `key`)."""
        _, labels = self.labels(config, principal, source_ip, destination, service, protocol)  # clears on a new config
        series = metrics.series(labels, outcome.status, outcome.grpc_status)
        if len(self._series_of) >= CHILD_CACHE_LIMIT:
            self._series_of.clear()  # only the lookup: the series keep their values in `metrics`
        self._series_of[key] = (destination, service, series)
        return series

    def record(
        self,
        config: ClusterConfig,
        *,
        principal: str,
        source_ip: str,
        source_addr: str,
        method: bytes,
        path: bytes,
        content_type: bytes | None,
        outcome: Outcome,
        now: float | None = None,
    ) -> None:
        """One finished request, counted once and logged once. A request with no `outcome.service` (the
        tunnel's address was not a Service's) has no Istio labels to go under: logged only."""
        duration = (time.monotonic() if now is None else now) - outcome.started
        service = outcome.service
        metrics = self.metrics
        if service is not None and metrics is not None:
            protocol = "http" if content_type is None else protocol_of(content_type)
            destination = outcome.destination
            # one dict hit for a request like an earlier one of this snapshot (same client, endpoint, service,
            # protocol, code and gRPC status); the objects' identity guards against a recycled id()
            key = (principal, source_ip, id(destination), id(service), protocol, outcome.status, outcome.grpc_status)
            hit = self._series_of.get(key) if config is self._config else None
            if hit is not None and hit[0] is destination and hit[1] is service:
                series = hit[2]
            else:
                series = self._new_series(
                    key, config, principal, source_ip, destination, service, protocol, outcome, metrics
                )
            series.observe(duration * 1000.0, outcome.request_bytes, outcome.response_bytes)
        if self.access_log is not None:
            self._log(config, principal, source_ip, source_addr, method, path, content_type, outcome, duration)

    def _log(
        self,
        config: ClusterConfig,
        principal: str,
        source_ip: str,
        source_addr: str,
        method: bytes,
        path: bytes,
        content_type: bytes | None,
        outcome: Outcome,
        duration: float,
    ) -> None:
        """The access log line of a `record`ed request (the source workload from the labels' cache)."""
        access_log = self.access_log
        if access_log is None:
            return
        service, destination = outcome.service, outcome.destination
        if service is not None:
            protocol = "http" if content_type is None else protocol_of(content_type)
            source, _ = self.labels(config, principal, source_ip, destination, service, protocol)
        else:
            source = source_workload(config, source_ip, principal)
        access_log.log_request(
            method=method.decode("latin-1"),
            path=path.decode("latin-1"),
            status=outcome.status,
            duration=duration,
            request_bytes=outcome.request_bytes,
            response_bytes=outcome.response_bytes,
            src_addr=source_addr,
            src_identity=principal,
            src_workload=source.ref if source else None,
            dst_workload=destination.ref if destination else None,
            dst_service=service.hostname if service else None,
            upstream=outcome.upstream,
            policy=outcome.policy,
            reason=outcome.reason,
        )
