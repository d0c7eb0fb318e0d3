"""The one policy engine the proxy, the waypoint and `ztunnel authz check` share. Sans-IO: objects in, decisions out.

Semantics (DESIGN §4.5, Istio's documented order): a matching DENY denies; with no ALLOW policy for the
workload the connection is allowed; a matching ALLOW allows; otherwise deny. At the node proxy (`check_l4`)
rules that need L7 attributes never match in ALLOW policies and are reduced to their L4 part in DENY policies.
Dry-run policies only show up in `Decision.dry_run_policies`; AUDIT policies only in `audit_policies`; CUSTOM
policies are for the waypoint (listed in `custom_policies` by `check_l7`, ignored at L4).

Policies are indexed by namespace and by one selector label, and the set that applies to a workload is
compiled once and cached on the engine, so a decision costs the rules of the policies selecting that workload,
not the number of policies in the cluster. An engine is immutable apart from that cache: build a new one per
config snapshot (`PolicyEngine.from_config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.loader import ConfigError
from ztunnel.config.model import ClusterConfig, KubeObject, Workload, labels_match
from ztunnel.identity.spiffe import principal_parts
from ztunnel.policy.authz import (
    AuthorizationPolicy,
    MatchAttributes,
    PolicyError,
    Rule,
    best_effort_scope,
    parse_authorization_policy,
)
from ztunnel.policy.legacy import LEGACY_KINDS, convert_objects
from ztunnel.policy.matchers import parse_ip
from ztunnel.policy.peerauth import (
    PeerAuthentication,
    RequestAuthentication,
    parse_peer_authentication,
    parse_request_authentication,
)

L4 = "l4"
L7 = "l7"


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What the destination side knows about an inbound connection."""

    source_principal: str | None  # full spiffe:// URI, or None for plaintext
    source_ip: str
    destination: Workload
    destination_ip: str
    destination_port: int  # the pod's (target) port
    source_namespace: str | None = None  # derived from the principal when not given


@dataclass(frozen=True, slots=True)
class HttpRequestAttributes:
    """One HTTP request as a waypoint sees it (after JWT validation)."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=dict)
    request_principal: str | None = None  # "<iss>/<sub>" of a validated JWT
    request_claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "namespace/name" of the policy that decided, None when no single policy did
    reason: str
    dry_run_policies: tuple[str, ...] = ()  # dry-run policies that matched (they only log)
    dry_run_allowed: bool | None = None  # the decision if dry-run policies were enforced (None: none applied)
    audit_policies: tuple[str, ...] = ()  # AUDIT policies that matched
    custom_policies: tuple[str, ...] = ()  # CUSTOM policies that matched (the waypoint asks their provider)

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


# ---------------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Rejected:
    """A policy that failed validation: its workloads deny until it is fixed (fail closed)."""

    namespace: str
    name: str
    action: str
    selector: Mapping[str, str] | None
    error: PolicyError

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_Indexed = AuthorizationPolicy | _Rejected


@dataclass(frozen=True, slots=True)
class _Compiled:
    key: str
    rules: tuple[tuple[int, Rule], ...]
    reduced: frozenset[int]  # rule indices reduced to their L4 part (DENY at the node proxy)
    dropped: tuple[int, ...]  # rule indices that can never match at this layer
    l7_fields: Mapping[int, tuple[str, ...]]
    origin: str
    by_port: Mapping[int, tuple[tuple[int, Rule], ...]]  # rules that can match a port, in rule order
    any_port: tuple[tuple[int, Rule], ...]  # rules without a positive port constraint
    decisions: Mapping[int, Decision]  # built once: a decision only picks one

    def first_match(self, a: MatchAttributes) -> int | None:
        for i, r in self.by_port.get(a.destination_port, self.any_port):
            if r.matches(a):
                return i
        return None


@dataclass(frozen=True, slots=True)
class _WorkloadPolicies:
    labels: Mapping[str, str]
    rejected: Decision | None  # set when an invalid policy selects the workload: it denies (fail closed)
    deny: tuple[_Compiled, ...]
    allow: tuple[_Compiled, ...]
    fallback: Decision  # no rule matched
    audit: tuple[_Compiled, ...] = ()
    custom: tuple[_Compiled, ...] = ()
    dry_run: tuple[_Compiled, ...] = ()
    shadow: _WorkloadPolicies | None = None  # dry-run policies treated as enforced


def _compile(p: AuthorizationPolicy, layer: str) -> _Compiled:
    l7 = {i: r.l7_fields for i, r in enumerate(p.rules) if r.l7_fields}
    if layer == L7:
        kept: tuple[tuple[int, Rule], ...] = tuple(enumerate(p.rules))
        dropped: tuple[int, ...] = ()
    else:
        kept, dropped = p.l4_rules()
    reduced = frozenset(i for i, _ in kept if i in l7) if layer == L4 else frozenset()
    ports = [(i, r, r.ports()) for i, r in kept]
    any_port = tuple((i, r) for i, r, pset in ports if pset is None)
    by_port = {
        port: tuple((i, r) for i, r, pset in ports if pset is None or port in pset)
        for port in {port for _, _, pset in ports if pset for port in pset}
    }
    origin = f" (converted from {p.origin})" if p.origin else ""
    decisions = {}
    for i, _ in kept:
        if p.action == "DENY":
            note = f"; only its L4 part was checked ({', '.join(l7[i])} need a waypoint)" if i in reduced else ""
            decisions[i] = Decision(False, p.key, f"denied by DENY policy {p.key} rule {i}{note}{origin}")
        else:
            decisions[i] = Decision(True, p.key, f"allowed by ALLOW policy {p.key} rule {i}{origin}")
    return _Compiled(p.key, kept, reduced, dropped, l7, p.origin, by_port, any_port, decisions)


def _fallback(w: Workload, allow: tuple[_Compiled, ...], layer: str) -> Decision:
    """The decision when no DENY and no ALLOW rule matched."""
    if not allow:
        return Decision(True, None, f"allowed: no ALLOW policy applies to {w.ref}")
    names = [c.key for c in allow]
    reason = f"denied: ALLOW policies apply to {w.ref} but none matched ({_limit(names)})"
    if len(names) == 1 and not allow[0].rules and not allow[0].dropped:
        reason = f"denied: ALLOW policy {names[0]} has no rules, so it denies all traffic to {w.ref}"
    dropped = [(c.key, i, c.l7_fields[i]) for c in allow for i in c.dropped]
    if dropped and layer == L4:
        parts = [f"{k} rule {i} ({', '.join(f)})" for k, i, f in dropped[:3]]
        reason += (
            f"; rules that use L7 attributes never match at the node proxy: {'; '.join(parts)}"
            " - route the traffic through a waypoint or check with --layer l7"
        )
    return Decision(False, names[0] if len(names) == 1 else None, reason)


def _rejected_decision(r: _Rejected, w: Workload) -> Decision:
    what = f"{r.error.reason} ({r.error.field})" if r.error.field else str(r.error)
    return Decision(
        False, r.key, f"AuthorizationPolicy {r.key} is invalid, so {w.ref} denies until it is fixed: {what}"
    )


def _same_object(old: KubeObject, new: KubeObject) -> bool:
    """Unchanged object (same text at the same place), so its parse result can be reused."""
    return old is new or (
        old.body == new.body
        and old.source == new.source
        and old.api_version == new.api_version
        and old.annotations == new.annotations
    )


def _limit(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class PolicyEngine:
    """Authorization + peer authentication for one config snapshot."""

    def __init__(
        self,
        authorization_policies: Iterable[AuthorizationPolicy] = (),
        peer_authentications: Iterable[PeerAuthentication] = (),
        *,
        rejected: Iterable[_Rejected] = (),
        rejected_peer_authentications: Iterable[PeerAuthentication] = (),
        request_authentications: Iterable[RequestAuthentication] = (),
        errors: Iterable[PolicyError] = (),
        warnings: Iterable[str] = (),
        root_namespace: str = "istio-system",
        config: ClusterConfig | None = None,
    ) -> None:
        self.root_namespace = root_namespace
        self.errors: list[PolicyError] = list(errors)
        self.warnings: list[str] = list(warnings)
        self.policies: tuple[AuthorizationPolicy, ...] = tuple(
            sorted(authorization_policies, key=lambda p: (p.namespace, p.name))
        )
        self.rejected: tuple[_Rejected, ...] = tuple(rejected)
        self.request_authentications = tuple(request_authentications)
        self._config = config
        self._ns_wide: dict[str, list[_Indexed]] = {}
        self._by_label: dict[tuple[str, str, str], list[_Indexed]] = {}
        self._by_service: dict[tuple[str, str], list[AuthorizationPolicy]] = {}
        self._cache: dict[tuple[str, str, str], _WorkloadPolicies] = {}
        self._parsed: dict[tuple[str, str], tuple[KubeObject, AuthorizationPolicy | PolicyError]] = {}
        for p in (*self.policies, *self.rejected):
            if isinstance(p, AuthorizationPolicy) and p.target_refs:
                for ref in p.target_refs:
                    if ref.kind == "Service":
                        self._by_service.setdefault((ref.namespace, ref.name), []).append(p)
                continue
            if not p.selector:
                self._ns_wide.setdefault(p.namespace, []).append(p)
            else:
                k, v = min(p.selector.items())
                self._by_label.setdefault((p.namespace, k, v), []).append(p)
        # Peer authentication: rejected ones come first so that they win (they act as STRICT).
        self.peer_authentications = tuple(peer_authentications)
        by_age = sorted(self.peer_authentications, key=lambda x: (x.created, x.order))
        ordered = [*rejected_peer_authentications, *by_age]
        self._pa_mesh: PeerAuthentication | None = None
        self._pa_ns: dict[str, PeerAuthentication] = {}
        self._pa_selector: dict[str, list[PeerAuthentication]] = {}
        for pa in ordered:
            if pa.selector:
                self._pa_selector.setdefault(pa.namespace, []).append(pa)
            elif pa.namespace == root_namespace:
                self._pa_mesh = self._pa_mesh or pa
            else:
                self._pa_ns.setdefault(pa.namespace, pa)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ClusterConfig, previous: PolicyEngine | None = None) -> PolicyEngine:
        """Parse every security object of the snapshot (legacy kinds converted first); never raises for bad ones.

        Invalid objects end up in `errors` (report them); their workloads fail closed. Pass the engine of the
        previous snapshot as `previous` to reuse the AuthorizationPolicies that did not change: parsing 10,000
        policies takes seconds, so a proxy should also build engines off its event loop."""
        objects = list(config.policy_objects)
        errors: list[PolicyError] = []
        warnings: list[str] = []
        origins: dict[int, str] = {}
        if any(o.kind in LEGACY_KINDS for o in objects):
            result = convert_objects(objects, config)
            errors.extend(result.errors)
            warnings.extend(result.notes)
            objects = [o for o in objects if o.kind not in LEGACY_KINDS]
            for obj, origin in result.converted:
                origins[id(obj)] = origin
                objects.append(obj)
        return cls.from_objects(
            objects, config=config, errors=errors, warnings=warnings, origins=origins, previous=previous
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
    ) -> PolicyEngine:
        root = root_namespace or (config.root_namespace if config else "istio-system")
        memo = previous._parsed if previous is not None else {}
        parsed: dict[tuple[str, str], tuple[KubeObject, AuthorizationPolicy | PolicyError]] = {}
        matcher_memo: dict[Any, Any] = {}
        origins = origins or {}
        aps: list[AuthorizationPolicy] = []
        pas: list[PeerAuthentication] = []
        ras: list[RequestAuthentication] = []
        rejected: list[_Rejected] = []
        rejected_pas: list[PeerAuthentication] = []
        errs = list(errors)
        warns = list(warnings)
        for order, obj in enumerate(objects):
            origin = origins.get(id(obj), "")
            try:
                if obj.kind == "AuthorizationPolicy":
                    old = memo.get((obj.namespace, obj.name))
                    reuse = old is not None and _same_object(old[0], obj)
                    if reuse and isinstance(old[1], PolicyError):  # type: ignore[index]
                        parsed[(obj.namespace, obj.name)] = (obj, old[1])  # type: ignore[index]
                        raise old[1]  # type: ignore[index]
                    if reuse and old[1].origin == origin:  # type: ignore[index, union-attr]
                        p = old[1]  # type: ignore[index, assignment]
                    else:
                        try:
                            p = parse_authorization_policy(obj, origin=origin, memo=matcher_memo)
                        except PolicyError as e:
                            parsed[(obj.namespace, obj.name)] = (obj, e)
                            raise
                    parsed[(obj.namespace, obj.name)] = (obj, p)
                    aps.append(p)
                    if p.action == "CUSTOM":
                        warns.append(
                            f"{obj.ref}: action CUSTOM (provider {p.provider}) is enforced by a waypoint, "
                            "not by the node proxy"
                        )
                    if p.target_refs:
                        warns.append(f"{obj.ref}: targetRefs attach the policy to a waypoint; not enforced at L4")
                elif obj.kind == "PeerAuthentication":
                    pas.append(parse_peer_authentication(obj, order=order, origin=origin))
                elif obj.kind == "RequestAuthentication":
                    ras.append(parse_request_authentication(obj))
                else:
                    continue
            except ConfigError as e:
                err = e if isinstance(e, PolicyError) else PolicyError(str(e))
                errs.append(err)
                if obj.kind == "AuthorizationPolicy":
                    action, selector, has_refs, dry = best_effort_scope(obj)
                    if not dry and not has_refs and action != "AUDIT":
                        rejected.append(_Rejected(obj.namespace, obj.name, action or "UNKNOWN", selector, err))
                elif obj.kind == "PeerAuthentication":
                    _, selector, _, _ = best_effort_scope(obj)
                    rejected_pas.append(
                        PeerAuthentication(obj.namespace, obj.name, selector, "STRICT", {}, order=-1, origin="invalid")
                    )
        engine = cls(
            aps,
            pas,
            rejected=rejected,
            rejected_peer_authentications=rejected_pas,
            request_authentications=ras,
            errors=errs,
            warnings=warns,
            root_namespace=root,
            config=config,
        )
        engine._parsed = parsed
        return engine

    # ---- policy selection -------------------------------------------------------------------------
    def policies_for(self, workload: Workload, layer: str = L4) -> tuple[_Indexed, ...]:
        """Policies (valid and rejected) that select the workload, by name."""
        ns, root = workload.namespace, self.root_namespace
        found: list[_Indexed] = list(self._ns_wide.get(ns, ()))
        if ns != root:
            found.extend(self._ns_wide.get(root, ()))
        for k, v in workload.labels.items():
            for scope in (ns, root) if ns != root else (ns,):
                for p in self._by_label.get((scope, k, v), ()):
                    if p.selector is not None and labels_match(p.selector, workload.labels):
                        found.append(p)
        if layer == L7 and self._by_service and self._config is not None:
            for svc in self._config.services_of(workload):
                found.extend(self._by_service.get((svc.namespace, svc.name), ()))
        seen: set[int] = set()
        unique = [p for p in found if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]
        return tuple(sorted(unique, key=lambda p: (p.namespace, p.name)))

    def _workload_policies(self, w: Workload, layer: str) -> _WorkloadPolicies:
        key = (w.uid, w.namespace, layer)
        cached = self._cache.get(key)
        if cached is not None and (cached.labels is w.labels or cached.labels == w.labels):
            return cached
        rejected: list[_Rejected] = []
        buckets: dict[str, list[_Compiled]] = {
            "deny": [],
            "allow": [],
            "audit": [],
            "custom": [],
            "dry_deny": [],
            "dry_allow": [],
        }
        for p in self.policies_for(w, layer):
            if isinstance(p, _Rejected):
                if p.action != "CUSTOM" or layer == L7:
                    rejected.append(p)
                continue
            if p.action == "CUSTOM" and layer == L4:
                continue
            compiled = _compile(p, layer)
            if p.action == "AUDIT":
                buckets["audit"].append(compiled)
            elif p.action == "CUSTOM":
                buckets["custom"].append(compiled)
            elif p.dry_run:
                buckets["dry_deny" if p.action == "DENY" else "dry_allow"].append(compiled)
            else:
                buckets["deny" if p.action == "DENY" else "allow"].append(compiled)
        deny, allow = tuple(buckets["deny"]), tuple(buckets["allow"])
        rejected_decision = _rejected_decision(rejected[0], w) if rejected else None
        shadow = None
        if buckets["dry_deny"] or buckets["dry_allow"]:
            s_deny, s_allow = deny + tuple(buckets["dry_deny"]), allow + tuple(buckets["dry_allow"])
            shadow = _WorkloadPolicies(w.labels, rejected_decision, s_deny, s_allow, _fallback(w, s_allow, layer))
        result = _WorkloadPolicies(
            labels=w.labels,
            rejected=rejected_decision,
            deny=deny,
            allow=allow,
            fallback=_fallback(w, allow, layer),
            audit=tuple(buckets["audit"]),
            custom=tuple(buckets["custom"]),
            dry_run=tuple(buckets["dry_deny"] + buckets["dry_allow"]),
            shadow=shadow,
        )
        self._cache[key] = result
        return result

    # ---- decisions ----------------------------------------------------------------------------------
    def check_l4(self, attrs: ConnectionAttributes) -> Decision:
        """Decide as the node proxy: L4 attributes only, PeerAuthentication applied to plaintext."""
        return self._check(attrs, None, L4)

    def check_l7(self, attrs: ConnectionAttributes, request: HttpRequestAttributes) -> Decision:
        """Decide as a waypoint: full rules. CUSTOM matches are listed for the caller to ask the provider."""
        return self._check(attrs, request, L7)

    def _attributes(self, attrs: ConnectionAttributes, request: HttpRequestAttributes | None) -> MatchAttributes:
        principal, namespace, service_account = principal_parts(attrs.source_principal or "")
        if attrs.source_namespace is not None:
            namespace = attrs.source_namespace
        source_ip = parse_ip(attrs.source_ip)
        a = MatchAttributes(
            principal=principal,
            namespace=namespace,
            service_account=service_account,
            source_ip=source_ip,
            destination_ip=parse_ip(attrs.destination_ip),
            destination_port=attrs.destination_port,
        )
        if request is not None:
            a.remote_ip = source_ip
            a.method = request.method
            a.path = request.path
            headers = {k.lower(): v for k, v in request.headers.items()}
            a.headers = headers
            a.host = request.host or headers.get(":authority") or headers.get("host")
            a.request_principal = request.request_principal
            a.claims = request.request_claims
        return a

    def _check(self, attrs: ConnectionAttributes, request: HttpRequestAttributes | None, layer: str) -> Decision:
        w = attrs.destination
        if attrs.source_principal is None:
            mode, pa = self._peer(w, attrs.destination_port)
            if mode == "STRICT":
                who = f"PeerAuthentication {pa.key}" if pa else "the mesh"
                invalid = ""
                if pa and pa.origin == "invalid":
                    invalid = " (it is invalid, so it is treated as STRICT until fixed)"
                return Decision(
                    False,
                    pa.key if pa else None,
                    f"plaintext connection to {w.ref} port {attrs.destination_port} refused: "
                    f"{who} requires mutual TLS (STRICT){invalid}",
                )
        wp = self._workload_policies(w, layer)
        a = self._attributes(attrs, request)
        decision = self._evaluate(wp, a)
        if not (wp.shadow or wp.audit or wp.custom):
            return decision
        extras: dict[str, Any] = {}
        if wp.shadow is not None:
            extras["dry_run_policies"] = tuple(c.key for c in wp.dry_run if c.first_match(a) is not None)
            extras["dry_run_allowed"] = self._evaluate(wp.shadow, a).allowed
        if wp.audit:
            extras["audit_policies"] = tuple(c.key for c in wp.audit if c.first_match(a) is not None)
        if wp.custom:
            extras["custom_policies"] = tuple(c.key for c in wp.custom if c.first_match(a) is not None)
        return Decision(decision.allowed, decision.policy, decision.reason, **extras)

    @staticmethod
    def _evaluate(wp: _WorkloadPolicies, a: MatchAttributes) -> Decision:
        if wp.rejected is not None:
            return wp.rejected
        for c in wp.deny:
            i = c.first_match(a)
            if i is not None:
                return c.decisions[i]
        for c in wp.allow:
            i = c.first_match(a)
            if i is not None:
                return c.decisions[i]
        return wp.fallback

    def request_authentications_for(self, workload: Workload) -> tuple[RequestAuthentication, ...]:
        """JWT rules a waypoint applies for `workload`: its namespace's and the root namespace's, by selector."""
        out = []
        for ra in self.request_authentications:
            if ra.namespace not in (workload.namespace, self.root_namespace):
                continue
            if ra.selector is None or labels_match(ra.selector, workload.labels):
                out.append(ra)
        return tuple(out)

    # ---- peer authentication ----------------------------------------------------------------------
    def _peer(self, w: Workload, port: int) -> tuple[str, PeerAuthentication | None]:
        for pa in self._pa_selector.get(w.namespace, ()):
            if pa.selector is not None and labels_match(pa.selector, w.labels):
                port_mode = pa.port_modes.get(port, "UNSET")
                if port_mode != "UNSET":
                    return port_mode, pa
                if pa.mode != "UNSET":
                    return pa.mode, pa
                break  # only the oldest matching workload policy counts, as in Istio
        pa_ns = self._pa_ns.get(w.namespace)
        if pa_ns is not None and pa_ns.mode != "UNSET":
            return pa_ns.mode, pa_ns
        if self._pa_mesh is not None and self._pa_mesh.mode != "UNSET":
            return self._pa_mesh.mode, self._pa_mesh
        return "PERMISSIVE", None

    def peer_authentication_mode(self, workload: Workload, port: int) -> str:
        """ "STRICT" | "PERMISSIVE" | "DISABLE" for the workload's (target) port; UNSET resolved."""
        return self._peer(workload, port)[0]

    def peer_authentication_for(self, workload: Workload, port: int) -> tuple[str, str | None]:
        """(mode, "ns/name" of the PeerAuthentication that set it or None for the PERMISSIVE default)."""
        mode, pa = self._peer(workload, port)
        return mode, pa.key if pa else None


__all__ = [
    "L4",
    "L7",
    "ConnectionAttributes",
    "Decision",
    "HttpRequestAttributes",
    "PolicyEngine",
]
