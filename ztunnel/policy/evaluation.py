"""Decisions over compiled policies (DESIGN §4.5, Istio's documented order): a matching DENY denies; with no
ALLOW policy for the workload the connection is allowed; a matching ALLOW allows; otherwise deny. Dry-run,
AUDIT and CUSTOM matches are listed on the decision, never change it. Also: which PeerAuthentication applies.

This is the per-connection hot path: plain loops, no allocation beyond the attributes and the decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ztunnel.config.model import Workload, labels_match
from ztunnel.identity.spiffe import principal_parts
from ztunnel.policy.compile import CompiledPolicy, WorkloadPolicies
from ztunnel.policy.decision import ConnectionAttributes, Decision, HttpRequestAttributes, MatchAttributes
from ztunnel.policy.matchers import parse_ip
from ztunnel.policy.model import Entry, PeerAuthentication, Rule


# ---------------------------------------------------------------------------------------------------
# Authorization
# ---------------------------------------------------------------------------------------------------
def match_attributes(attrs: ConnectionAttributes, request: HttpRequestAttributes | None) -> MatchAttributes:
    """Everything a rule can read, normalised once per decision."""
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


def _entries_match(entries: tuple[Entry, ...], a: MatchAttributes) -> bool:
    """Any entry whose checks all pass."""
    for entry in entries:
        for c in entry:
            if c.matcher.matches(getattr(a, c.attr)) is c.negate:
                break
        else:
            return True
    return False


def rule_matches(r: Rule, a: MatchAttributes) -> bool:
    if r.sources is not None and not _entries_match(r.sources, a):
        return False
    if r.operations is not None and not _entries_match(r.operations, a):
        return False
    for c in r.conditions:  # noqa: SIM110 - a plain loop is faster on this hot path
        if c.matcher.matches(getattr(a, c.attr)) is c.negate:
            return False
    return True


def first_match(c: CompiledPolicy, a: MatchAttributes) -> int | None:
    """Index of the first rule of the policy that matches, or None."""
    for i, r in c.by_port.get(a.destination_port, c.any_port):
        if rule_matches(r, a):
            return i
    return None


def _evaluate(wp: WorkloadPolicies, a: MatchAttributes) -> Decision:
    if wp.rejected is not None:
        return wp.rejected
    for c in wp.deny:
        i = first_match(c, a)
        if i is not None:
            return c.decisions[i]
    for c in wp.allow:
        i = first_match(c, a)
        if i is not None:
            return c.decisions[i]
    return wp.fallback


def _matching(policies: Iterable[CompiledPolicy], a: MatchAttributes) -> tuple[str, ...]:
    return tuple(c.key for c in policies if first_match(c, a) is not None)


def decide(wp: WorkloadPolicies, a: MatchAttributes) -> Decision:
    """The enforced decision, with the dry-run, AUDIT and CUSTOM policies that matched listed on it."""
    decision = _evaluate(wp, a)
    if not (wp.shadow or wp.audit or wp.custom):
        return decision
    extras: dict[str, Any] = {}
    if wp.shadow is not None:
        extras["dry_run_policies"] = _matching(wp.dry_run, a)
        extras["dry_run_allowed"] = _evaluate(wp.shadow, a).allowed
    if wp.audit:
        extras["audit_policies"] = _matching(wp.audit, a)
    if wp.custom:
        extras["custom_policies"] = _matching(wp.custom, a)
    return Decision(decision.allowed, decision.policy, decision.reason, **extras)


# ---------------------------------------------------------------------------------------------------
# Peer authentication
# ---------------------------------------------------------------------------------------------------
class PeerAuthenticationIndex:
    """Which PeerAuthentication sets the mTLS mode of a workload's port.

    A workload policy (selector) beats the namespace policy beats the mesh policy (root namespace); `UNSET`
    inherits from the next level up; the mesh default is PERMISSIVE. Of two conflicting policies the oldest
    wins; rejected ones come first so that they win (they act as STRICT).
    """

    def __init__(
        self,
        peer_authentications: Iterable[PeerAuthentication],
        rejected: Iterable[PeerAuthentication],
        root_namespace: str,
    ) -> None:
        by_age = sorted(peer_authentications, key=lambda x: (x.created, x.order))
        self._mesh: PeerAuthentication | None = None
        self._ns: dict[str, PeerAuthentication] = {}
        self._selector: dict[str, list[PeerAuthentication]] = {}
        for pa in (*rejected, *by_age):
            if pa.selector:
                self._selector.setdefault(pa.namespace, []).append(pa)
            elif pa.namespace == root_namespace:
                self._mesh = self._mesh or pa
            else:
                self._ns.setdefault(pa.namespace, pa)

    def resolve(self, w: Workload, port: int) -> tuple[str, PeerAuthentication | None]:
        """(mode, the policy that set it or None for the PERMISSIVE default) for the workload's (target) port."""
        for pa in self._selector.get(w.namespace, ()):
            if pa.selector is not None and labels_match(pa.selector, w.labels):
                port_mode = pa.port_modes.get(port, "UNSET")
                if port_mode != "UNSET":
                    return port_mode, pa
                if pa.mode != "UNSET":
                    return pa.mode, pa
                break  # only the oldest matching workload policy counts, as in Istio
        pa_ns = self._ns.get(w.namespace)
        if pa_ns is not None and pa_ns.mode != "UNSET":
            return pa_ns.mode, pa_ns
        if self._mesh is not None and self._mesh.mode != "UNSET":
            return self._mesh.mode, self._mesh
        return "PERMISSIVE", None


def plaintext_refused(w: Workload, port: int, mode: str, pa: PeerAuthentication | None) -> Decision | None:
    """The refusal of a plaintext connection when peer authentication is STRICT; None when it may go on."""
    if mode != "STRICT":
        return None
    who = f"PeerAuthentication {pa.key}" if pa else "the mesh"
    invalid = " (it is invalid, so it is treated as STRICT until fixed)" if pa and pa.origin == "invalid" else ""
    return Decision(
        False,
        pa.key if pa else None,
        f"plaintext connection to {w.ref} port {port} refused: {who} requires mutual TLS (STRICT){invalid}",
    )
