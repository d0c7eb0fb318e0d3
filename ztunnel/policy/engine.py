"""The one policy engine the proxy, the waypoint and `ztunnel authz check` share. Sans-IO: objects in, decisions out.

Semantics (DESIGN §4.5) are evaluation.py's; at the node proxy (`check_l4`) rules that need L7 attributes
never match in ALLOW policies and are reduced to their L4 part in DENY policies (compile.py). Dry-run
policies only show up in `Decision.dry_run_policies`; AUDIT policies only in `audit_policies`; CUSTOM
policies are for the waypoint (listed in `custom_policies` by `check_l7`, ignored at L4).

Policies are indexed by namespace and by one selector label, and the set that applies to a workload is
compiled once and cached on the engine, so a decision costs the rules of the policies selecting that workload,
not the number of policies in the cluster. An engine is immutable apart from that cache: build a new one per
config snapshot (`PolicyEngine.from_config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from ztunnel.config.model import (
    DEFAULT_PATH_NORMALIZATION,
    WAYPOINT_GATEWAY_CLASS,
    ClusterConfig,
    KubeObject,
    Workload,
    labels_match,
)
from ztunnel.policy.compile import WorkloadPolicies, compile_workload
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes
from ztunnel.policy.evaluation import PeerAuthenticationIndex, decide, match_attributes, plaintext_refused
from ztunnel.policy.load import LoadedPolicies, ParseResults, convert_legacy, load_objects
from ztunnel.policy.model import (
    L4,
    L7,
    AuthorizationPolicy,
    PeerAuthentication,
    PolicyError,
    RejectedPolicy,
    RequestAuthentication,
    SelectedPolicy,
    TargetRef,
)

Attached = TypeVar("Attached", AuthorizationPolicy, RequestAuthentication)
CORE_GROUPS = ("", "core")
GATEWAY_GROUP = "gateway.networking.k8s.io"


class TargetIndex(Generic[Attached]):
    """Policies attached by `targetRefs`, by what they target, as Istio ambient attaches them at a waypoint: a
    Service (requests to its endpoints), a waypoint `Gateway` (requests through that waypoint), or, from the root
    namespace, GatewayClass istio-waypoint (requests through any waypoint). Other targets attach to nothing."""

    def __init__(self, root_namespace: str) -> None:
        self.root_namespace = root_namespace
        self._by: dict[tuple[str, str, str], list[Attached]] = {}

    def __bool__(self) -> bool:
        return bool(self._by)

    def add(self, policy: Attached, refs: Iterable[TargetRef]) -> None:
        for ref in refs:
            key = self._key(policy.namespace, ref)
            if key is not None:
                self._by.setdefault(key, []).append(policy)

    def _key(self, namespace: str, ref: TargetRef) -> tuple[str, str, str] | None:
        if ref.kind == "Service" and ref.group in CORE_GROUPS:
            return ("Service", ref.namespace, ref.name)
        if ref.kind == "Gateway" and ref.group == GATEWAY_GROUP:
            return ("Gateway", ref.namespace, ref.name)
        if ref.kind == "GatewayClass" and ref.group == GATEWAY_GROUP and namespace == self.root_namespace:
            return ("GatewayClass", "", ref.name)
        return None

    def attached(self, workload: Workload, config: ClusterConfig | None, waypoint: str | None) -> list[Attached]:
        """What applies to a request for `workload` at the waypoint `waypoint` ("ns/name"; None: the waypoints of
        the workload's Services, where its requests go)."""
        if not self._by or config is None:
            return []
        found: list[Attached] = []
        for svc in config.services_of(workload):
            found.extend(self._by.get(("Service", svc.namespace, svc.name), ()))
        waypoints = [waypoint] if waypoint is not None else [w.ref for w in config.workload_waypoints(workload)]
        for ref in waypoints:
            ns, _, name = ref.partition("/")
            found.extend(self._by.get(("Gateway", ns, name), ()))
            found.extend(self._by.get(("GatewayClass", "", WAYPOINT_GATEWAY_CLASS), ()))
        return found


class PolicyEngine:
    """Authorization + peer authentication for one config snapshot."""

    def __init__(
        self,
        authorization_policies: Iterable[AuthorizationPolicy] = (),
        peer_authentications: Iterable[PeerAuthentication] = (),
        *,
        rejected: Iterable[RejectedPolicy] = (),
        rejected_peer_authentications: Iterable[PeerAuthentication] = (),
        request_authentications: Iterable[RequestAuthentication] = (),
        errors: Iterable[PolicyError] = (),
        warnings: Iterable[str] = (),
        root_namespace: str = "istio-system",
        config: ClusterConfig | None = None,
        parsed: ParseResults | None = None,
        waypoint: str | None = None,
    ) -> None:
        self.root_namespace = root_namespace
        self.waypoint = waypoint  # "ns/name" of the waypoint deciding with this engine, for Gateway targetRefs
        self.errors: list[PolicyError] = list(errors)
        self.warnings: list[str] = list(warnings)
        self.policies: tuple[AuthorizationPolicy, ...] = tuple(
            sorted(authorization_policies, key=lambda p: (p.namespace, p.name))
        )
        self.rejected: tuple[RejectedPolicy, ...] = tuple(rejected)
        self.request_authentications = tuple(request_authentications)
        self.peer_authentications = tuple(peer_authentications)
        self._config = config
        # The mesh config's pathNormalization: request paths are matched as the waypoint forwards them.
        self.path_normalization = config.path_normalization if config is not None else DEFAULT_PATH_NORMALIZATION
        self._parsed: ParseResults = parsed if parsed is not None else {}
        self._cache: dict[tuple[str, str, str], WorkloadPolicies] = {}
        self._ns_wide: dict[str, list[SelectedPolicy]] = {}
        self._by_label: dict[tuple[str, str, str], list[SelectedPolicy]] = {}
        self._targeted: TargetIndex[AuthorizationPolicy] = TargetIndex(root_namespace)
        for p in self.policies:
            if p.target_refs:
                self._targeted.add(p, p.target_refs)
            else:
                self._index(p)
        self._targeted_request_authentications: TargetIndex[RequestAuthentication] = TargetIndex(root_namespace)
        for ra in self.request_authentications:
            self._targeted_request_authentications.add(ra, ra.target_refs)
        for r in self.rejected:
            self._index(r)
        self._peer = PeerAuthenticationIndex(self.peer_authentications, rejected_peer_authentications, root_namespace)

    def _index(self, p: SelectedPolicy) -> None:
        if not p.selector:
            self._ns_wide.setdefault(p.namespace, []).append(p)
        else:
            k, v = min(p.selector.items())
            self._by_label.setdefault((p.namespace, k, v), []).append(p)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: ClusterConfig, previous: PolicyEngine | None = None, *, waypoint: str | None = None
    ) -> PolicyEngine:
        """Parse every security object of the snapshot (legacy kinds converted first); never raises for bad ones.

        Invalid objects end up in `errors` (report them); their workloads fail closed. Pass the engine of the
        previous snapshot as `previous` to reuse the AuthorizationPolicies that did not change: parsing 10,000
        policies takes seconds, so a proxy should also build engines off its event loop. A waypoint passes its own
        `waypoint` ("ns/name"): policies targeting a waypoint Gateway then apply when it is that one."""
        legacy = convert_legacy(config)
        return cls.from_objects(
            legacy.objects,
            config=config,
            errors=legacy.errors,
            warnings=legacy.notes,
            origins=legacy.origins,
            previous=previous,
            waypoint=waypoint,
        )

    @classmethod
    def from_objects(
        cls,
        objects: Iterable[KubeObject],
        *,
        config: ClusterConfig | None = None,
        root_namespace: str | None = None,
        errors: Iterable[PolicyError] = (),
        warnings: Iterable[str] = (),
        origins: Mapping[int, str] | None = None,
        previous: PolicyEngine | None = None,
        waypoint: str | None = None,
    ) -> PolicyEngine:
        root = root_namespace or (config.root_namespace if config else "istio-system")
        loaded = load_objects(
            objects,
            errors=errors,
            warnings=warnings,
            origins=origins,
            previous=previous._parsed if previous is not None else None,
        )
        return cls.from_loaded(loaded, root_namespace=root, config=config, waypoint=waypoint)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedPolicies,
        *,
        root_namespace: str,
        config: ClusterConfig | None = None,
        waypoint: str | None = None,
    ) -> PolicyEngine:
        return cls(
            loaded.authorization_policies,
            loaded.peer_authentications,
            rejected=loaded.rejected,
            rejected_peer_authentications=loaded.rejected_peer_authentications,
            request_authentications=loaded.request_authentications,
            errors=loaded.errors,
            warnings=loaded.warnings,
            root_namespace=root_namespace,
            config=config,
            parsed=loaded.parsed,
            waypoint=waypoint,
        )

    # ---- policy selection -------------------------------------------------------------------------
    def policies_for(self, workload: Workload, layer: str = L4) -> tuple[SelectedPolicy, ...]:
        """Policies (valid and rejected) that select the workload, by name."""
        ns, root = workload.namespace, self.root_namespace
        found: list[SelectedPolicy] = list(self._ns_wide.get(ns, ()))
        if ns != root:
            found.extend(self._ns_wide.get(root, ()))
        for k, v in workload.labels.items():
            for scope in (ns, root) if ns != root else (ns,):
                for p in self._by_label.get((scope, k, v), ()):
                    if p.selector is not None and labels_match(p.selector, workload.labels):
                        found.append(p)
        if layer == L7:
            found.extend(self._targeted.attached(workload, self._config, self.waypoint))
        unique = list({id(p): p for p in found}.values())
        return tuple(sorted(unique, key=lambda p: (p.namespace, p.name)))

    def _workload_policies(self, w: Workload, layer: str) -> WorkloadPolicies:
        key = (w.uid, w.namespace, layer)
        cached = self._cache.get(key)
        if cached is not None and (cached.labels is w.labels or cached.labels == w.labels):
            return cached
        result = self._cache[key] = compile_workload(w, self.policies_for(w, layer), layer)
        return result

    # ---- decisions ----------------------------------------------------------------------------------
    def check_l4(self, attrs: ConnectionAttributes) -> Decision:
        """Decide as the node proxy: L4 attributes only, PeerAuthentication applied to plaintext."""
        return self._check(attrs, None, L4)

    def check_l7(self, attrs: ConnectionAttributes, request: HttpRequestAttributes) -> Decision:
        """Decide as a waypoint: full rules. CUSTOM matches are listed for the caller to ask the provider."""
        return self._check(attrs, request, L7)

    def check_l4_at_waypoint(self, attrs: ConnectionAttributes) -> Decision:
        """Decide non-HTTP traffic at a waypoint: the policies a waypoint applies (Service targetRefs too) read as
        the node proxy reads rules (L7 parts never match in an ALLOW, and widen a DENY)."""
        w = attrs.destination
        key = (w.uid, w.namespace, "waypoint-l4")
        cached = self._cache.get(key)
        if cached is None or not (cached.labels is w.labels or cached.labels == w.labels):
            cached = self._cache[key] = compile_workload(w, self.policies_for(w, L7), L4)
        return decide(cached, match_attributes(attrs, None))

    def _check(self, attrs: ConnectionAttributes, request: HttpRequestAttributes | None, layer: str) -> Decision:
        w = attrs.destination
        if attrs.source_principal is None:
            mode, pa = self._peer.resolve(w, attrs.destination_port)
            refused = plaintext_refused(w, attrs.destination_port, mode, pa)
            if refused is not None:
                return refused
        return decide(self._workload_policies(w, layer), match_attributes(attrs, request, self.path_normalization))

    def request_authentications_for(self, workload: Workload) -> tuple[RequestAuthentication, ...]:
        """JWT rules a waypoint applies for `workload`: by selector, its namespace's and the root namespace's; by
        targetRefs, those attached to its Services or to the waypoint (see `TargetIndex`)."""
        targeted = self._targeted_request_authentications.attached(workload, self._config, self.waypoint)
        out = []
        for ra in self.request_authentications:
            if ra.target_refs:
                if any(t is ra for t in targeted):
                    out.append(ra)
            elif ra.namespace in (workload.namespace, self.root_namespace) and (
                ra.selector is None or labels_match(ra.selector, workload.labels)
            ):
                out.append(ra)
        return tuple(out)

    # ---- peer authentication ----------------------------------------------------------------------
    def peer_authentication_mode(self, workload: Workload, port: int) -> str:
        """ "STRICT" | "PERMISSIVE" | "DISABLE" for the workload's (target) port; UNSET resolved."""
        return self._peer.resolve(workload, port)[0]

    def peer_authentication_for(self, workload: Workload, port: int) -> tuple[str, str | None]:
        """(mode, "ns/name" of the PeerAuthentication that set it or None for the PERMISSIVE default)."""
        mode, pa = self._peer.resolve(workload, port)
        return mode, pa.key if pa else None


__all__ = ["PolicyEngine", "TargetIndex"]
