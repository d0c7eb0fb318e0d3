"""The policies that select one workload, compiled for one layer: rules indexed by port, the node proxy's
L4 reduction applied (DESIGN §4.5), and every decision a rule can lead to built once.

At L4, rules that need L7 attributes never match in ALLOW policies (dropped) and are reduced to their L4
part in DENY policies (a reduced rule matches at least what the full rule matches, so it errs towards deny).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztunnel.config.model import Workload
from ztunnel.policy.decision import Decision
from ztunnel.policy.matchers import PortSet, StringSet
from ztunnel.policy.model import L4, L7, AuthorizationPolicy, Entry, RejectedPolicy, Rule, SelectedPolicy

IndexedRules = tuple[tuple[int, Rule], ...]  # (index in the policy, rule)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    key: str
    rules: IndexedRules
    reduced: frozenset[int]  # rule indices reduced to their L4 part (DENY at the node proxy)
    dropped: tuple[int, ...]  # rule indices that can never match at this layer
    l7_fields: Mapping[int, tuple[str, ...]]
    origin: str
    by_port: Mapping[int, IndexedRules]  # rules that can match a port, in rule order
    any_port: IndexedRules  # rules without a positive port constraint
    decisions: Mapping[int, Decision]  # built once: a decision only picks one
    provider: str | None = None  # CUSTOM: the extension provider the waypoint asks
    # L7: (by_port, any_port) per HTTP method the rules name exactly; "" for any other method. None at L4.
    by_method: Mapping[str, tuple[Mapping[int, IndexedRules], IndexedRules]] | None = None


@dataclass(frozen=True, slots=True)
class WorkloadPolicies:
    labels: Mapping[str, str]
    rejected: Decision | None  # set when an invalid policy selects the workload: it denies (fail closed)
    deny: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]
    fallback: Decision  # no rule matched
    audit: tuple[CompiledPolicy, ...] = ()
    custom: tuple[CompiledPolicy, ...] = ()
    dry_run: tuple[CompiledPolicy, ...] = ()
    shadow: WorkloadPolicies | None = None  # dry-run policies treated as enforced


# ---------------------------------------------------------------------------------------------------
# L4 reduction
# ---------------------------------------------------------------------------------------------------
def rule_ports(r: Rule) -> frozenset[int] | None:
    """Destination ports the rule can match at all, or None for any: lets a decision skip rules by port."""
    if r.operations is None:
        return None
    out: set[int] = set()
    for e in r.operations:
        sets = [c.matcher.ports for c in e if isinstance(c.matcher, PortSet) and not c.negate]
        if not sets:
            return None
        out |= frozenset.intersection(*sets)
    return frozenset(out)


def rule_methods(r: Rule) -> frozenset[str] | None:
    """HTTP methods the rule can match at all (exact `methods` values), or None for any: lets a waypoint's
    decision skip rules by method as it skips them by port."""
    if r.operations is None:
        return None
    out: set[str] = set()
    for e in r.operations:
        sets = []
        for c in e:
            if c.attr == "method" and not c.negate:
                m = c.matcher
                if not isinstance(m, StringSet) or m.prefixes or m.suffixes or m.presence or m.ignore_case:
                    return None
                sets.append(m.exact)
        if not sets:
            return None
        out |= frozenset.intersection(*sets)
    return frozenset(out)


def _port_index(kept: IndexedRules) -> tuple[Mapping[int, IndexedRules], IndexedRules]:
    """(rules that can match each named port, rules without a positive port constraint), in rule order."""
    ports = [(i, r, rule_ports(r)) for i, r in kept]
    any_port = tuple((i, r) for i, r, pset in ports if pset is None)
    by_port = {
        port: tuple((i, r) for i, r, pset in ports if pset is None or port in pset)
        for port in {port for _, _, pset in ports if pset for port in pset}
    }
    return by_port, any_port


def _method_index(kept: IndexedRules) -> dict[str, tuple[Mapping[int, IndexedRules], IndexedRules]]:
    methods = [(i, r, rule_methods(r)) for i, r in kept]
    named = {m for _, _, ms in methods if ms for m in ms}
    index = {m: _port_index(tuple((i, r) for i, r, ms in methods if ms is None or m in ms)) for m in named}
    index[""] = _port_index(tuple((i, r) for i, r, ms in methods if ms is None))
    return index


def l4_part(r: Rule) -> Rule:
    """The rule with its L7 checks dropped: matches at least what the full rule matches."""

    def keep(entries: tuple[Entry, ...] | None) -> tuple[Entry, ...] | None:
        if entries is None:
            return None
        return tuple(tuple(c for c in e if not c.layer7) for e in entries)

    return Rule(keep(r.sources), keep(r.operations), tuple(c for c in r.conditions if not c.layer7))


def l4_rules(p: AuthorizationPolicy) -> tuple[IndexedRules, tuple[int, ...]]:
    """(rules the node proxy evaluates with their index, indices of ALLOW-like rules dropped for L7)."""
    kept: list[tuple[int, Rule]] = []
    dropped: list[int] = []
    for i, r in enumerate(p.rules):
        if not r.l7_fields:
            kept.append((i, r))
        elif p.action == "DENY":
            kept.append((i, l4_part(r)))
        else:
            dropped.append(i)
    return tuple(kept), tuple(dropped)


# ---------------------------------------------------------------------------------------------------
# One policy, one workload
# ---------------------------------------------------------------------------------------------------
def compile_policy(p: AuthorizationPolicy, layer: str) -> CompiledPolicy:
    l7 = {i: r.l7_fields for i, r in enumerate(p.rules) if r.l7_fields}
    if layer == L7:
        kept: IndexedRules = tuple(enumerate(p.rules))
        dropped: tuple[int, ...] = ()
    else:
        kept, dropped = l4_rules(p)
    reduced = frozenset(i for i, _ in kept if i in l7) if layer == L4 else frozenset()
    by_port, any_port = _port_index(kept)
    by_method = _method_index(kept) if layer == L7 else None
    origin = f" (converted from {p.origin})" if p.origin else ""
    decisions = {}
    for i, _ in kept:
        if p.action == "DENY":
            note = f"; only its L4 part was checked ({', '.join(l7[i])} need a waypoint)" if i in reduced else ""
            decisions[i] = Decision(False, p.key, f"denied by DENY policy {p.key} rule {i}{note}{origin}")
        else:
            decisions[i] = Decision(True, p.key, f"allowed by ALLOW policy {p.key} rule {i}{origin}")
    return CompiledPolicy(
        p.key, kept, reduced, dropped, l7, p.origin, by_port, any_port, decisions, p.provider, by_method
    )


def compile_workload(w: Workload, selected: Iterable[SelectedPolicy], layer: str) -> WorkloadPolicies:
    """The policies selecting `w` sorted by what they do at `layer`, compiled."""
    rejected: list[RejectedPolicy] = []
    buckets: dict[str, list[CompiledPolicy]] = {
        "deny": [],
        "allow": [],
        "audit": [],
        "custom": [],
        "dry_deny": [],
        "dry_allow": [],
    }
    for p in selected:
        if isinstance(p, RejectedPolicy):
            if p.action != "CUSTOM" or layer == L7:
                rejected.append(p)
            continue
        if p.action == "CUSTOM" and layer == L4:
            continue
        buckets[_bucket(p)].append(compile_policy(p, layer))
    deny, allow = tuple(buckets["deny"]), tuple(buckets["allow"])
    rejected_decision = _rejected_decision(rejected[0], w) if rejected else None
    shadow = None
    if buckets["dry_deny"] or buckets["dry_allow"]:
        s_deny, s_allow = deny + tuple(buckets["dry_deny"]), allow + tuple(buckets["dry_allow"])
        shadow = WorkloadPolicies(w.labels, rejected_decision, s_deny, s_allow, _fallback(w, s_allow, layer))
    return WorkloadPolicies(
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


def _bucket(p: AuthorizationPolicy) -> str:
    if p.action == "AUDIT":
        return "audit"
    if p.action == "CUSTOM":
        return "custom"
    if p.dry_run:
        return "dry_deny" if p.action == "DENY" else "dry_allow"
    return "deny" if p.action == "DENY" else "allow"


def _fallback(w: Workload, allow: tuple[CompiledPolicy, ...], layer: str) -> Decision:
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


def _rejected_decision(r: RejectedPolicy, w: Workload) -> Decision:
    what = f"{r.error.reason} ({r.error.field})" if r.error.field else str(r.error)
    return Decision(
        False, r.key, f"AuthorizationPolicy {r.key} is invalid, so {w.ref} denies until it is fixed: {what}"
    )


def _limit(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
