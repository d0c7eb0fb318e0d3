"""Outbound routing, sans-IO: where does a connection from a local pod to ip:port go?

- a mesh pod: HBONE to `<pod ip>:15008`, expecting the pod's identity (plus its services' SANs);
- a Service ClusterIP: a ready endpoint pod, round-robin, on the mapped target port; none: refuse
  (`routes` also lists the other ready endpoints, in order, for failover when a tunnel cannot be opened);
- a Service that uses a waypoint (DESIGN §4.4): HBONE to a ready waypoint pod's `<ip>:15008`, expecting the
  waypoint's identity, asking for the Service VIP:port as dialled (the waypoint picks the endpoint after its
  L7 decision); no ready waypoint pod: refuse, never straight to an endpoint. A waypoint's own connections
  are not sent back to it;
- a pod or address outside the mesh: plain TCP passthrough.
A mesh destination is never reached in plaintext: if its tunnel fails, the connection fails (a Service first
tries its other ready mesh endpoints, see Outbound). Every decision is made on the destination's canonical
form (`canonical_ip`): `::ffff:<pod ip>` is that pod, and an address without one (a zone id, 0.0.0.0) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.config.model import ClusterConfig, IPAddress, Service, Waypoint, Workload, canonical_ip
from ztunnel.hbone.protocol import Authority
from ztunnel.ports import (
    ADMIN_PORT,
    HBONE_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    PLAINTEXT_INBOUND_PORT,
    READINESS_PORT,
    SOCKS5_PORT,
)

# The proxy's own ports (DESIGN §4.1): never a destination for a proxied connection on a local address.
PROXY_PORTS = frozenset(
    {ADMIN_PORT, OUTBOUND_PORT, PLAINTEXT_INBOUND_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT, SOCKS5_PORT}
)


@dataclass(frozen=True, slots=True)
class HboneRoute:
    destination: Workload
    target: Authority  # what the CONNECT asks for: the pod ip and target port
    proxy_address: tuple[str, int]  # where the destination's HBONE listener is
    expected_identities: tuple[str, ...]
    service: Service | None = None
    waypoint: Waypoint | None = None  # set when `destination` is a pod of this waypoint, `target` the VIP:port


@dataclass(frozen=True, slots=True)
class PassthroughRoute:
    address: tuple[str, int]
    destination: Workload | None = None  # a known pod outside the mesh
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class RefusedRoute:
    reason: str
    service: Service | None = None


Route = HboneRoute | PassthroughRoute | RefusedRoute

_FIXED_ROUTES_LIMIT = 10_000  # bound on cached pod/passthrough routes (passthrough addresses are unbounded)


class OutboundRouter:
    """Decides routes; holds only the round-robin cursors (per service)."""

    def __init__(self, *, hbone_port: int = HBONE_PORT) -> None:
        self.hbone_port = hbone_port
        self._cursor: dict[str, int] = {}
        # Routes that do not rotate (pods, passthrough), per destination, for one config snapshot: the same
        # destinations recur on every connection. Cleared when the snapshot changes.
        self._fixed: dict[tuple[IPAddress, int], Route] = {}
        self._fixed_config: ClusterConfig | None = None

    def route(
        self, config: ClusterConfig, dst: IPAddress | str, dst_port: int, source: Workload | None = None
    ) -> Route:
        return self.routes(config, dst, dst_port, source)[0]

    def routes(
        self, config: ClusterConfig, dst: IPAddress | str, dst_port: int, source: Workload | None = None
    ) -> list[Route]:
        """The route to take, then (for a Service) each other ready endpoint once, in round-robin order.

        `dst` is canonical already when it comes from the outbound edge; text is made canonical here.
        `source`, the local pod connecting: a waypoint's own pod is not routed back to its waypoint."""
        if isinstance(dst, str):
            try:
                dst = canonical_ip(dst)
            except ValueError as e:
                return [RefusedRoute(f"{dst!r} is not a destination address: {e}")]
        if config is not self._fixed_config:
            self._fixed.clear()
            self._fixed_config = config
        else:
            fixed = self._fixed.get((dst, dst_port))
            if fixed is not None:
                return [fixed]
        dst_ip = str(dst)  # the canonical text: the key of the config's indexes by IP
        if dst_ip in config.conflicting_ips:  # fail closed: never guess which pod the user meant
            return [RefusedRoute(f"{dst_ip} is claimed by more than one pod")]
        service = config.service_by_ip(dst_ip)
        if service is not None:
            return self._route_service(config, service, dst_ip, dst_port, source)
        workload = config.workload_by_ip(dst_ip)
        route = (
            PassthroughRoute((dst_ip, dst_port))
            if workload is None
            else self._route_workload(config, workload, dst_ip, dst_port, None)
        )
        if len(self._fixed) >= _FIXED_ROUTES_LIMIT:
            self._fixed.clear()
        self._fixed[(dst, dst_port)] = route
        return [route]

    def _route_workload(
        self, config: ClusterConfig, workload: Workload, ip: str, port: int, service: Service | None
    ) -> Route:
        if not workload.enrolled:
            return PassthroughRoute((ip, port), destination=workload, service=service)
        return HboneRoute(
            destination=workload,
            target=Authority(ip, port),
            proxy_address=(ip, self.hbone_port),
            expected_identities=config.expected_identities(workload),
            service=service,
        )

    def _route_service(
        self, config: ClusterConfig, service: Service, vip: str, port: int, source: Workload | None
    ) -> list[Route]:
        service_port = service.port_for(port)
        if service_port is None:
            return [RefusedRoute(f"service {service.ref} has no port {port}", service)]
        waypoint = config.waypoint_of(service)
        if waypoint is not None and not (source is not None and waypoint.runs(source)):
            return self._route_waypoint(config, service, waypoint, vip, port)
        candidates: list[tuple[Workload, str, int]] = []
        for w in config.endpoints(service):
            if not w.ready or not w.ips:
                continue
            target = config.endpoint_port(service, service_port, w)
            if target is None:
                continue
            candidates.append((w, w.ips[0], target))
        if not candidates:
            return [RefusedRoute(f"service {service.ref} has no ready endpoint for port {port}", service)]
        i = self._cursor.get(service.ref, 0)
        self._cursor[service.ref] = i + 1
        first = i % len(candidates)
        return [
            self._route_workload(config, workload, ip, target_port, service)
            for workload, ip, target_port in candidates[first:] + candidates[:first]
        ]

    def _route_waypoint(
        self, config: ClusterConfig, service: Service, waypoint: Waypoint, vip: str, port: int
    ) -> list[Route]:
        """The Service's waypoint pods, round-robin; the CONNECT asks for the VIP:port the client dialled."""
        pods = [w for w in config.waypoint_endpoints(waypoint) if w.ready and w.ips]
        if not pods:
            return [
                RefusedRoute(
                    f"service {service.ref} uses waypoint {waypoint.ref}, which has no ready pod "
                    "(refused: its traffic is never sent around the waypoint)",
                    service,
                )
            ]
        key = f"waypoint {waypoint.ref}"
        i = self._cursor.get(key, 0)
        self._cursor[key] = i + 1
        first = i % len(pods)
        return [
            HboneRoute(
                destination=pod,
                target=Authority(vip, port),
                proxy_address=(pod.ips[0], self.hbone_port),
                expected_identities=(waypoint.identity,),
                service=service,
                waypoint=waypoint,
            )
            for pod in pods[first:] + pods[:first]
        ]
