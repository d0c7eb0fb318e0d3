"""Kubernetes Service names -> an address to dial, from a config snapshot, for the waypoint's own calls.

A waypoint pod is not captured and has no mesh DNS, yet the names it must reach are Service names: a
`jwksUri` such as `http://keycloak:8080/...` or `http://jwks.auth.svc.cluster.local:8000/...`, an
`extensionProviders` service `authz.ns.svc.cluster.local`. This answers them as the cluster DNS would for a
pod of the namespace that wrote the name (its search path `<ns>.svc.<domain> svc.<domain> <domain>`), then does
kube-proxy's part: a Service (found by name or by ClusterIP) becomes one of its ready endpoints, pod IP and
target port, since nothing would route its ClusterIP. A name the snapshot does not know is not answered here
(`None`): the caller falls back to the system resolver, as a pod's DNS forwards names outside the cluster.
"""

from __future__ import annotations

import ipaddress

from ztunnel.config.model import ClusterConfig, Service

CLUSTER_DOMAIN = "cluster.local"
NDOTS = 5  # the kubelet's resolv.conf: a name with fewer dots goes through the search path first


def search_path(namespace: str | None, domain: str = CLUSTER_DOMAIN) -> tuple[str, ...]:
    """The search domains of a pod of `namespace` (none known: the two every pod has)."""
    own = (f"{namespace}.svc.{domain}",) if namespace else ()
    return (*own, f"svc.{domain}", domain)


def service_for_host(
    config: ClusterConfig, host: str, namespace: str | None = None, domain: str = CLUSTER_DOMAIN
) -> Service | None:
    """The Service `host` names for a pod of `namespace`: `name` (in `namespace`), `name.ns`, `name.ns.svc`,
    `name.ns.svc.<domain>` (case-insensitive; a trailing dot means no search), or one of its ClusterIPs."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return config.service_by_ip(host)
    name = host.lower()
    absolute = name.endswith(".")
    name = name.rstrip(".")
    if not name:
        return None
    tries = [] if absolute or name.count(".") >= NDOTS else [f"{name}.{s}" for s in search_path(namespace, domain)]
    tries.append(name)
    suffix = f".svc.{domain}"
    for fqdn in tries:
        if fqdn.endswith(suffix):
            labels = fqdn[: -len(suffix)].split(".")
            if len(labels) == 2:
                service = config.service(labels[1], labels[0])
                if service is not None:
                    return service
    return None


def endpoint_address(config: ClusterConfig, service: Service, port: int, turn: int = 0) -> tuple[str, int] | str:
    """A ready endpoint of `service` for its port `port`: (pod IP, target port), or why there is none. `turn`
    picks among the ready ones in order (a caller that retries passes a new turn to try the next)."""
    service_port = service.port_for(port)
    if service_port is None:
        return f"Service {service.ref} has no port {port}"
    ready: list[tuple[str, int]] = []
    for w in config.endpoints(service):
        target = config.endpoint_port(service, service_port, w) if w.ready and w.ips else None
        if target is not None:
            ready.append((w.ips[0], target))
    if not ready:
        return f"Service {service.ref} has no ready endpoint"
    return ready[turn % len(ready)]


def resolve(
    config: ClusterConfig, host: str, port: int, namespace: str | None = None, turn: int = 0
) -> tuple[str, int] | str | None:
    """Where to dial `host:port` from a pod of `namespace`: a ready endpoint's (pod IP, target port) when `host`
    names a Service of the snapshot, a string saying why that Service cannot be dialled, or None for any other
    host (ask the system resolver)."""
    service = service_for_host(config, host, namespace)
    if service is None:
        return None
    return endpoint_address(config, service, port, turn)
