"""The mesh model built from Kubernetes objects: immutable snapshots with lookup indexes.

A `ClusterConfig` is built once per config change and then shared read-only by the proxy, the CA,
the node agent and the policy engine, so no consumer ever sees half an update.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NONE = "none"  # the label's opt-out value (a Service's `none` overrides its namespace's waypoint)
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"  # on a waypoint's pods, naming their Gateway
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "istio-system"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # an EndpointSlice's Service (same namespace)
# Istio's MeshConfig `pathNormalization.normalization` values (policy.evaluation.normalize_path). Istio's default
# (DEFAULT) is BASE; ours is MERGE_SLASHES, one step stricter, so that `//admin` cannot pass a DENY on `/admin*`
# while most apps serve it as /admin.
PATH_NORMALIZATIONS = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
DEFAULT_PATH_NORMALIZATION = "MERGE_SLASHES"

# Kinds that carry security policy; the policy package parses their specs.
POLICY_KINDS = frozenset(
    {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "ServiceRole",
        "ServiceRoleBinding",
        "ClusterRbacConfig",
        "RbacConfig",
        "Policy",
        "MeshPolicy",
    }
)


@dataclass(frozen=True, slots=True)
class Source:
    """Where an object came from, so errors can name the file and the object."""

    file: str
    index: int  # position of the document in the file, from 0

    def __str__(self) -> str:
        return f"{self.file} (document {self.index + 1})"


@dataclass(frozen=True, slots=True)
class KubeObject:
    """Any Kubernetes object as written by the user, with its origin."""

    api_version: str
    kind: str
    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    body: Mapping[str, Any]
    source: Source

    @property
    def spec(self) -> Mapping[str, Any]:
        spec = self.body.get("spec")
        return spec if isinstance(spec, Mapping) else {}

    @property
    def ref(self) -> str:
        """`Kind namespace/name`, the way errors and logs name an object."""
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod, as the mesh sees it."""

    uid: str
    name: str
    namespace: str
    node: str
    service_account: str
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    host_network: bool = False
    enrolled: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ready: bool = True
    containers: tuple[Mapping[str, Any], ...] = ()

    @property
    def identity(self) -> str:
        """The SPIFFE id the workload's certificate carries."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def app(self) -> str:
        return self.labels.get("app") or self.labels.get("app.kubernetes.io/name") or self.name

    def target_port(self, service_port: int | str) -> int | None:
        """A Service's targetPort on this pod: a number, or the number of the pod's containerPort of that name."""
        if isinstance(service_port, int):
            return service_port
        for container in self.containers:
            for p in container.get("ports") or ():
                if isinstance(p, dict) and p.get("name") == service_port and isinstance(p.get("containerPort"), int):
                    return int(p["containerPort"])
        return None


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""  # spec.ports[].appProtocol: Istio's protocol selection prefers it to the name


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    subject_alt_names: tuple[str, ...] = ()

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port_for(self, port: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == port:
                return p
        return None


@dataclass(frozen=True, slots=True)
class Waypoint:
    """A `Gateway` of class istio-waypoint: the L7 proxy of the Services (or namespaces) that name it."""

    name: str
    namespace: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def identity(self) -> str:
        """Its pods' SPIFFE id: Istio runs a waypoint under a service account named after its Gateway."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.name}"

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def runs(self, workload: Workload) -> bool:
        """Whether `workload` is one of this waypoint's pods (labelled with the Gateway's name, same identity)."""
        return (
            workload.namespace == self.namespace
            and workload.labels.get(GATEWAY_NAME_LABEL) == self.name
            and workload.identity == self.identity
        )


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes equality selector: every selector label present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_COMPATIBLE_PREFIX = bytes(12)  # ::a.b.c.d (RFC 4291 2.5.5.1, deprecated)


class AddressRefused(ValueError):
    """An IP literal that has no single meaning as a destination (a zone id) or means "this host" (0.0.0.0, ::)."""


def canonical_ip(value: str | bytes | IPAddress, *, unspecified: bool = False) -> IPAddress:
    """The one form an address takes inside the proxy, so every lookup by IP sees one spelling per host.

    IPv4-mapped (`::ffff:10.0.0.1`) and IPv4-compatible (`::10.0.0.1`) IPv6 addresses become the IPv4
    address they carry: a dual-stack socket reaches that IPv4 host, so a pod or a proxy listener must be
    recognised under either spelling. Text is parsed strictly (dotted quad or RFC 4291 text only: `127.1`,
    `0x7f000001`, `2130706433` and `0177.0.0.1` are not addresses). Refused with AddressRefused: an IPv6
    zone id (`fe80::1%eth0`, names an interface, not a host) and, unless `unspecified` (a listener's bind
    address), 0.0.0.0 and `::`, which a connect() turns into this host. Raises ValueError for anything else
    that is not an IP address.
    """
    if isinstance(value, str):
        return _canonical_text(value, unspecified)
    if isinstance(value, bytes):
        return _canonical(ipaddress.ip_address(value), unspecified)
    return _canonical(value, unspecified)


@functools.lru_cache(maxsize=4096)
def _canonical_text(text: str, unspecified: bool) -> IPAddress:
    """Cached: the same few destinations recur on every connection, and parsing text costs 2-7 us."""
    return _canonical(ipaddress.ip_address(text), unspecified)


def _canonical(addr: IPAddress, unspecified: bool) -> IPAddress:
    if addr.version == 6:
        if addr.scope_id is not None:
            raise AddressRefused(f"{addr} has an IPv6 zone id; address the host without one")
        mapped = addr.ipv4_mapped
        if mapped is not None:
            addr = mapped
        elif addr.packed[:12] == _V4_COMPATIBLE_PREFIX and int(addr) > 1:  # not :: or ::1
            addr = ipaddress.IPv4Address(addr.packed[12:])
    if not unspecified and addr.is_unspecified:
        raise AddressRefused(f"{addr} is the unspecified address (a connection there reaches this host)")
    return addr


def normalize_ip(ip: str) -> str:
    """One spelling per address (`canonical_ip`'s, as text), so lookups by IP never miss on `::1` vs `0:0::1`
    or on `::ffff:10.0.0.1` vs `10.0.0.1`. Raises ValueError for what is not an IP address or has a zone id."""
    return str(canonical_ip(ip, unspecified=True))


def _canonical_texts(ips: Iterable[str]) -> list[str]:
    """`normalize_ip` of each address that has one (the loader refuses the others; a hand-built model may not)."""
    out = []
    for ip in ips:
        try:
            out.append(normalize_ip(ip))
        except ValueError:
            out.append(ip)
    return out


@dataclass(frozen=True, slots=True)
class ExtAuthzProvider:
    """One `extensionProviders` entry of the mesh config (`envoyExtAuthzGrpc` / `envoyExtAuthzHttp`): the
    external authorizer a CUSTOM AuthorizationPolicy names. Durations are seconds."""

    name: str
    kind: str  # "grpc" | "http"
    service: str  # as written: `name.ns.svc.cluster.local` (or `name.ns`)
    port: int
    timeout: float = 600.0  # Istio's default
    fail_open: bool = False
    status_on_error: int = 403
    path_prefix: str = ""
    include_request_headers: tuple[str, ...] = ()  # lowercase
    include_additional_headers: tuple[tuple[str, str], ...] = ()
    headers_to_upstream_on_allow: tuple[str, ...] = ()  # lowercase
    headers_to_downstream_on_deny: tuple[str, ...] = ()  # lowercase; empty: all of the authorizer's

    @property
    def service_ref(self) -> tuple[str, str] | None:
        """(namespace, name) of the Kubernetes Service `service` names, None for another kind of host."""
        parts = self.service.rstrip(".").split(".")
        if len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"):
            return parts[1], parts[0]
        return None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One address of an EndpointSlice: the endpoints of a Service without a selector (managed by hand, e.g. a
    database outside the cluster), which the model cannot find by labels."""

    slice: str  # the EndpointSlice's name
    ip: str  # canonical text
    ready: bool = True  # conditions.ready; absent means ready, as Kubernetes reads it
    node: str = ""
    ports: tuple[tuple[str, int], ...] = ()  # the slice's ports, (name, number): matched to the Service's by name


@dataclass(frozen=True)
class ClusterConfig:
    """One consistent snapshot of the cluster. Build with `ClusterConfig.build`."""

    namespaces: Mapping[str, Namespace]
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    nodes: Mapping[str, Node]
    policy_objects: tuple[KubeObject, ...] = ()
    waypoints: Mapping[str, Waypoint] = field(default_factory=dict)  # by `namespace/name`
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    generation: int = 0
    warnings: tuple[str, ...] = ()  # problems that did not reject the config, each naming file and object
    extension_providers: Mapping[str, ExtAuthzProvider] = field(default_factory=dict)  # mesh config, by name
    # Service ref -> the addresses of its EndpointSlices (label kubernetes.io/service-name, same namespace); used
    # for Services without a selector only: a selector's endpoints are its pods, whatever the slices say.
    slice_endpoints: Mapping[str, tuple[SliceEndpoint, ...]] = field(default_factory=dict)
    # Mesh config `pathNormalization.normalization`: how the waypoint and `authz check` normalize request paths.
    path_normalization: str = DEFAULT_PATH_NORMALIZATION

    @classmethod
    def empty(cls) -> ClusterConfig:
        return cls(namespaces={}, workloads=(), services=(), nodes={})

    # ---- indexes (computed once per snapshot) -------------------------------------------------
    @cached_property
    def conflicting_ips(self) -> frozenset[str]:
        """IPs claimed by more than one pod: they resolve to no workload, so nothing is decided on a guess."""
        seen: dict[str, str] = {}
        out = set()
        for w in self.workloads:
            if w.host_network:
                continue
            for ip in _canonical_texts(w.ips):
                if ip in seen and seen[ip] != w.uid:
                    out.add(ip)
                seen.setdefault(ip, w.uid)
        return frozenset(out)

    @cached_property
    def _workload_by_ip(self) -> dict[str, Workload]:
        conflicts = self.conflicting_ips
        return {
            ip: w for w in self.workloads if not w.host_network for ip in _canonical_texts(w.ips) if ip not in conflicts
        }

    @cached_property
    def _workload_by_uid(self) -> dict[str, Workload]:
        return {w.uid: w for w in self.workloads}

    @cached_property
    def _workload_by_ref(self) -> dict[str, Workload]:
        return {w.ref: w for w in self.workloads}

    @cached_property
    def conflicting_service_ips(self) -> frozenset[str]:
        """Cluster IPs claimed by more than one Service (an API server refuses it; a file or a hostile source may
        not): they resolve to no Service, as a pod IP claimed twice resolves to no workload, so traffic to them
        is never sent to whichever Service happened to come last."""
        seen: dict[str, str] = {}
        out = set()
        for s in self.services:
            for ip in _canonical_texts(s.cluster_ips):
                if seen.setdefault(ip, s.ref) != s.ref:
                    out.add(ip)
        return frozenset(out)

    @cached_property
    def _service_by_ip(self) -> dict[str, Service]:
        conflicts = self.conflicting_service_ips
        return {ip: s for s in self.services for ip in _canonical_texts(s.cluster_ips) if ip not in conflicts}

    @cached_property
    def _endpoints(self) -> dict[str, tuple[Workload, ...]]:
        # Pods grouped by namespace first: a service only selects in its own, so this is services x pods of one
        # namespace, not x all pods (50 MB config: 27 s -> well under 1 s).
        by_namespace: dict[str, list[Workload]] = {}
        for w in self.workloads:
            if w.ips:
                by_namespace.setdefault(w.namespace, []).append(w)
        out: dict[str, tuple[Workload, ...]] = {}
        for s in self.services:
            if not s.selector:
                out[s.ref] = self._slice_workloads(s)
                continue
            out[s.ref] = tuple(w for w in by_namespace.get(s.namespace, ()) if labels_match(s.selector, w.labels))
        return out

    def _slice_workloads(self, service: Service) -> tuple[Workload, ...]:
        return tuple(w for w, _ in self._slice_endpoints.get(service.ref, ()))

    @cached_property
    def _slice_endpoints(self) -> dict[str, tuple[tuple[Workload, SliceEndpoint], ...]]:
        """Service ref -> a selector-less Service's endpoints from its EndpointSlices, each with the slice address
        it came from (its ports): a pod of the Service's namespace at that address is that pod (its identity is
        what the proxy then expects); an address no pod has is a workload outside the mesh (traffic to it is
        passed through); a pod of another namespace is left out: a tenant's hand-written slice cannot make its
        Service an alias of another namespace's pods."""
        selectorless = {s.ref: s for s in self.services if not s.selector}
        result: dict[str, tuple[tuple[Workload, SliceEndpoint], ...]] = {}
        for ref, entries in self.slice_endpoints.items():
            service = selectorless.get(ref)
            if service is None:
                continue
            out: dict[str, tuple[Workload, SliceEndpoint]] = {}
            for e in entries:
                if e.ip in self.conflicting_ips:
                    continue
                pod = self._workload_by_ip.get(e.ip)
                if pod is not None:
                    if pod.namespace == service.namespace:
                        out.setdefault(pod.uid, (pod, e))
                    continue
                uid = f"endpointslice/{service.namespace}/{e.slice}/{e.ip}"
                outside = Workload(
                    uid=uid,
                    name=f"{e.slice}/{e.ip}",
                    namespace=service.namespace,
                    node=e.node,
                    service_account="",
                    ips=(e.ip,),
                    labels={},
                    trust_domain=self.trust_domain,
                    ready=e.ready,
                )
                out.setdefault(uid, (outside, e))
            result[ref] = tuple(out.values())
        return result

    @cached_property
    def _slice_ports(self) -> dict[tuple[str, str], tuple[tuple[str, int], ...]]:
        return {(ref, w.uid): e.ports for ref, pairs in self._slice_endpoints.items() for w, e in pairs}

    def endpoint_port(self, service: Service, service_port: ServicePort, workload: Workload) -> int | None:
        """The port to dial on `workload` for `service_port` of `service`, or None when it serves none. For a
        Service without a selector it is the port its EndpointSlice lists under the Service port's name (as
        Kubernetes matches them; the Service's targetPort is not used: the slice's author says where the
        endpoint listens); otherwise the targetPort on the pod (a number, or a named containerPort)."""
        if service.selector:
            return workload.target_port(service_port.target_port)
        for name, port in self._slice_ports.get((service.ref, workload.uid), ()):
            if name == service_port.name:
                return port
        return None

    @cached_property
    def _services_of_workload(self) -> dict[str, tuple[Service, ...]]:
        out: dict[str, list[Service]] = {}
        for s in self.services:
            for w in self._endpoints.get(s.ref, ()):
                out.setdefault(w.uid, []).append(s)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def _waypoint_of_service(self) -> dict[str, Waypoint]:
        """Service ref -> its waypoint. The Service's label wins over its namespace's; `none` opts out; a name
        that is no waypoint Gateway of the namespace means no waypoint (the loader warns): the node proxy then
        enforces the L4 part of every policy, reduced so that an L7 rule never widens access (DESIGN §4.5)."""
        out: dict[str, Waypoint] = {}
        for s in self.services:
            name = s.labels.get(USE_WAYPOINT_LABEL)
            if name is None:
                name = self.namespace_labels(s.namespace).get(USE_WAYPOINT_LABEL)
            if not name or name == USE_WAYPOINT_NONE:
                continue
            waypoint = self.waypoints.get(f"{s.namespace}/{name}")
            if waypoint is not None:
                out[s.ref] = waypoint
        return out

    @cached_property
    def _waypoint_endpoints(self) -> dict[str, tuple[Workload, ...]]:
        out: dict[str, list[Workload]] = {ref: [] for ref in self.waypoints}
        for w in self.workloads:
            name = w.labels.get(GATEWAY_NAME_LABEL)
            if name is None or not w.ips:
                continue
            waypoint = self.waypoints.get(f"{w.namespace}/{name}")
            if waypoint is not None and waypoint.runs(w):
                out[waypoint.ref].append(w)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def _waypoints_of_workload(self) -> dict[str, tuple[Waypoint, ...]]:
        """Workload uid -> the waypoints of the Services selecting it (a waypoint's own pods use none)."""
        out: dict[str, list[Waypoint]] = {}
        for ref, waypoint in self._waypoint_of_service.items():
            for w in self._endpoints.get(ref, ()):
                if w.labels.get(GATEWAY_NAME_LABEL) is not None:
                    continue
                chosen = out.setdefault(w.uid, [])
                if waypoint not in chosen:
                    chosen.append(waypoint)
        return {k: tuple(v) for k, v in out.items()}

    # ---- lookups ------------------------------------------------------------------------------
    # Indexes by IP are keyed by `normalize_ip` text: a canonical address's str() finds its entry at once,
    # any other spelling once normalized.
    def workload_by_ip(self, ip: str | IPAddress) -> Workload | None:
        w = self._workload_by_ip.get(str(ip))
        if w is None and isinstance(ip, str):
            try:
                w = self._workload_by_ip.get(normalize_ip(ip))
            except ValueError:
                return None
        return w

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workload_by_uid.get(uid)

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self._workload_by_ref.get(f"{namespace}/{name}")

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node)

    def mesh_workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node and w.enrolled and w.ips)

    def service_by_ip(self, ip: str | IPAddress) -> Service | None:
        s = self._service_by_ip.get(str(ip))
        if s is None and isinstance(ip, str):
            try:
                s = self._service_by_ip.get(normalize_ip(ip))
            except ValueError:
                return None
        return s

    def service(self, namespace: str, name: str) -> Service | None:
        for s in self.services:
            if s.namespace == namespace and s.name == name:
                return s
        return None

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        return self._endpoints.get(service.ref, ())

    def services_of(self, workload: Workload) -> tuple[Service, ...]:
        return self._services_of_workload.get(workload.uid, ())

    def expected_identities(self, workload: Workload) -> tuple[str, ...]:
        """Identities a server may present for `workload` (secure naming, DESIGN §4.2): its own, then the
        subject alt names of its Services."""
        out = [workload.identity]
        for service in self.services_of(workload):
            for san in service.subject_alt_names:
                if san not in out:
                    out.append(san)
        return tuple(out)

    def waypoint_of(self, service: Service) -> Waypoint | None:
        """The waypoint `service`'s traffic goes through, or None."""
        return self._waypoint_of_service.get(service.ref)

    def waypoint_endpoints(self, waypoint: Waypoint) -> tuple[Workload, ...]:
        """The waypoint's pods with an address (ready or not: the router picks the ready ones)."""
        return self._waypoint_endpoints.get(waypoint.ref, ())

    def workload_waypoints(self, workload: Workload) -> tuple[Waypoint, ...]:
        """Waypoints whose Services select `workload` (usually one; two Services may name two)."""
        return self._waypoints_of_workload.get(workload.uid, ())

    def workload_uses_waypoint(self, workload: Workload) -> bool:
        """A workload uses a waypoint when a Service selecting it does: then only that waypoint may reach it."""
        return workload.uid in self._waypoints_of_workload

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self.namespaces.get(namespace)
        return ns.labels if ns else {}

    def identities_on_node(self, node: str) -> frozenset[str]:
        """Identities the CA may sign for a caller proven to be `node`."""
        return frozenset(w.identity for w in self.workloads if w.node == node and not w.host_network)

    def node_address(self, node: str) -> str | None:
        n = self.nodes.get(node)
        return n.addresses[0] if n and n.addresses else None

    def policies_of_kind(self, *kinds: str) -> Iterable[KubeObject]:
        return (o for o in self.policy_objects if o.kind in kinds)
