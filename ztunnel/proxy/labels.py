"""Istio's connection labels from the proxy's workloads and services (DESIGN §4.9).

Telemetry counts strings; which workload, principal and service a connection belongs to is the proxy's
knowledge, so the mapping from the config model to `ConnectionLabels` lives here.
"""

from __future__ import annotations

from typing import Any, Literal

from ztunnel.config.model import ClusterConfig, Service, Workload
from ztunnel.telemetry.metrics import CHILD_CACHE_LIMIT, UNKNOWN, ConnectionLabels, Reporter, workload_labels

SecurityPolicy = Literal["mutual_tls", "none", "unknown"]  # the connection_security_policy label


def _app_of(workload: Workload) -> str:
    """Istio's canonical service: the canonical-name label, else `app`, else the workload name."""
    return workload.labels.get("service.istio.io/canonical-name") or workload.app


def inbound_service(config: ClusterConfig, workload: Workload, port: int) -> Service | None:
    """The service an inbound connection to `workload` on `port` is counted under, as Istio's ztunnel
    guesses it (the tunnel carries only the pod address): a service whose selector picks the workload and
    that has a port with `port` as its targetPort. When several do, the first by hostname, so every proxy
    and every restart names the same one."""
    matching = [
        s for s in config.services_of(workload) if any(config.endpoint_port(s, p, workload) == port for p in s.ports)
    ]
    return min(matching, key=lambda s: s.hostname, default=None)


def connection_labels(
    *,
    reporter: Reporter,
    source: Workload | None,
    source_principal: str | None,
    destination: Workload | None,
    destination_principal: str | None,
    destination_service: Service | None,
    request_protocol: str = "tcp",
    connection_security_policy: SecurityPolicy = "unknown",
    cache: ConnectionLabelCache | None = None,
) -> ConnectionLabels:
    """Labels for one connection; anything not known is `unknown`, as Istio reports it.

    Principals are full SPIFFE URIs (`spiffe://cluster.local/ns/a/sa/b`), as in Istio's metrics.
    `destination_service` is the service's FQDN (`name.ns.svc.cluster.local`). A proxy passes its
    `ConnectionLabelCache`, which hands out the labels it built before for the same objects.
    """
    key = (
        reporter,
        id(source),
        source_principal,
        id(destination),
        destination_principal,
        id(destination_service),
        request_protocol,
        connection_security_policy,
    )
    if cache is not None:
        hit = cache.get(key, source, destination, destination_service)
        if hit is not None:
            return hit
    labels = ConnectionLabels(
        reporter=reporter,
        source_workload=source.name if source else UNKNOWN,
        source_workload_namespace=source.namespace if source else UNKNOWN,
        source_principal=source_principal or UNKNOWN,
        source_app=_app_of(source) if source else UNKNOWN,
        destination_workload=destination.name if destination else UNKNOWN,
        destination_workload_namespace=destination.namespace if destination else UNKNOWN,
        destination_principal=destination_principal or UNKNOWN,
        destination_app=_app_of(destination) if destination else UNKNOWN,
        destination_service=destination_service.hostname if destination_service else UNKNOWN,
        destination_service_name=destination_service.name if destination_service else UNKNOWN,
        destination_service_namespace=destination_service.namespace if destination_service else UNKNOWN,
        request_protocol=request_protocol or UNKNOWN,
        connection_security_policy=connection_security_policy or UNKNOWN,
        **(workload_labels("source", source.name, source.labels) if source else {}),
        **(workload_labels("destination", destination.name, destination.labels) if destination else {}),
    )
    if cache is not None:
        cache.put(key, source, destination, destination_service, labels)
    return labels


class ConnectionLabelCache:
    """`connection_labels`' memory: the same few (source, destination) pairs recur on every
    connection, and handing out the same object also makes the metric-children lookup an identity hit.

    Workloads are not hashable, so the key holds their ids and the entry the objects themselves (an id
    cannot be reused while they live). Bounded like the metric children.
    """

    def __init__(self, limit: int = CHILD_CACHE_LIMIT) -> None:
        self._limit = limit
        self._entries: dict[tuple[Any, ...], tuple[Any, Any, Any, ConnectionLabels]] = {}
        self._services_config: ClusterConfig | None = None
        self._services: dict[tuple[int, int], tuple[Workload, Service | None]] = {}

    def inbound_service(self, config: ClusterConfig, workload: Workload, port: int) -> Service | None:
        """`inbound_service`, computed once per (workload, port) of a config snapshot: a new snapshot
        starts afresh, since services and their selectors may have changed with it."""
        if config is not self._services_config:
            self._services_config = config
            self._services.clear()
        key = (id(workload), port)
        entry = self._services.get(key)
        if entry is not None and entry[0] is workload:
            return entry[1]
        service = inbound_service(config, workload, port)
        if len(self._services) >= self._limit:
            self._services.clear()
        self._services[key] = (workload, service)
        return service

    def get(
        self, key: tuple[Any, ...], source: Workload | None, destination: Workload | None, service: Service | None
    ) -> ConnectionLabels | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is source and entry[1] is destination and entry[2] is service:
            return entry[3]
        return None

    def put(
        self,
        key: tuple[Any, ...],
        source: Workload | None,
        destination: Workload | None,
        service: Service | None,
        labels: ConnectionLabels,
    ) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (source, destination, service, labels)
