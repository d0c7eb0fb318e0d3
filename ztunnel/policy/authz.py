"""`security.istio.io` AuthorizationPolicy (v1 and v1beta1): its spec validated and compiled into the model.

A policy is parsed whole or rejected whole (`PolicyError` names file, object and field). Each field's value
list becomes a matcher, each entry a tuple of `Check`s (model.py); the per-layer compilation and the
decisions are compile.py's and evaluation.py's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import KubeObject
from ztunnel.identity.spiffe import strip_scheme
from ztunnel.policy.matchers import (
    CidrSet,
    ClaimMatcher,
    ExactSet,
    HeaderMatcher,
    ListMatcher,
    Matcher,
    PathMatcher,
    PortSet,
    StringSet,
    compile_path_template,
    parse_cidr,
    parse_port,
)
from ztunnel.policy.model import ACTIONS, AuthorizationPolicy, Check, Entry, Rule
from ztunnel.policy.validation import ObjectReader, dry_run_of, parse_selector, parse_target_refs

SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
SOURCE_FIELDS: dict[str, tuple[str, str, bool]] = {
    # field: (kind, attribute, layer7)
    "principals": ("principal", "principal", False),
    "notPrincipals": ("principal", "principal", False),
    "namespaces": ("string", "namespace", False),
    "notNamespaces": ("string", "namespace", False),
    "serviceAccounts": ("service_account", "service_account", False),
    "notServiceAccounts": ("service_account", "service_account", False),
    "ipBlocks": ("cidr", "source_ip", False),
    "notIpBlocks": ("cidr", "source_ip", False),
    "remoteIpBlocks": ("cidr", "remote_ip", True),
    "notRemoteIpBlocks": ("cidr", "remote_ip", True),
    "requestPrincipals": ("string", "request_principal", True),
    "notRequestPrincipals": ("string", "request_principal", True),
}
OPERATION_FIELDS: dict[str, tuple[str, str, bool]] = {
    "ports": ("port", "destination_port", False),
    "notPorts": ("port", "destination_port", False),
    "hosts": ("host", "host", True),
    "notHosts": ("host", "host", True),
    "methods": ("string", "method", True),
    "notMethods": ("string", "method", True),
    "paths": ("path", "path", True),
    "notPaths": ("path", "path", True),
}
# `when` keys: (kind, attribute, layer7). DESIGN §4.5 lists the ones the node proxy enforces.
WHEN_KEYS: dict[str, tuple[str, str, bool]] = {
    "source.ip": ("cidr", "source_ip", False),
    "source.namespace": ("string", "namespace", False),
    "source.principal": ("principal", "principal", False),
    "source.serviceAccount": ("service_account", "service_account", False),
    "destination.ip": ("cidr", "destination_ip", False),
    "destination.port": ("port", "destination_port", False),
    "remote.ip": ("cidr", "remote_ip", True),
    "request.auth.principal": ("string", "request_principal", True),
    "request.auth.audiences": ("list", "audiences", True),
    "request.auth.presenter": ("string", "presenter", True),
    "connection.sni": ("string", "sni", True),
}
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_EXPERIMENTAL_KEY = re.compile(r"^experimental\.envoy\.filters\.[A-Za-z0-9_.]+\[[^\[\]]+\]$")


_MemoKey = tuple[str, tuple[str, ...], str]


@dataclass
class CompileMemo:
    """Matchers and checks already built in a batch of policies: large clusters repeat value lists."""

    matchers: dict[_MemoKey, Matcher] = field(default_factory=dict)  # (kind, values, namespace or "")
    checks: dict[_MemoKey, Check] = field(default_factory=dict)  # (field, values, namespace)


class _PolicyReader(ObjectReader):
    def __init__(self, obj: KubeObject, memo: CompileMemo | None) -> None:
        super().__init__(obj)
        self.memo = memo


# ---------------------------------------------------------------------------------------------------
# Value lists -> matchers
# ---------------------------------------------------------------------------------------------------
def _matcher(r: _PolicyReader, kind: str, values: list[str], path: str, policy_ns: str) -> Matcher:
    """Validated matcher for a value list, from the batch memo when one is given."""
    if r.memo is None:
        return _build_matcher(r, kind, values, path, policy_ns)
    key = (kind, tuple(values), policy_ns if kind == "service_account" else "")
    m = r.memo.matchers.get(key)
    if m is None:
        m = r.memo.matchers[key] = _build_matcher(r, kind, values, path, policy_ns)
    return m


def _build_matcher(r: _PolicyReader, kind: str, values: list[str], path: str, policy_ns: str) -> Matcher:
    for i, v in enumerate(values):
        if v == "":  # Istio rejects these too: an empty value is always a templating mistake
            raise r.error(f"{path}[{i}]", 'empty value not allowed; remove it or write "*" for any value')
    return _BUILDERS[kind](r, values, path, policy_ns)


def _principals(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    return StringSet.compile(strip_scheme(v) for v in values)


def _strings(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    return StringSet.compile(values)


def _hosts(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    """Case-insensitive, against the Host value as sent, port included (Istio: `a.com` misses `a.com:80`)."""
    return StringSet.compile(values, ignore_case=True)


def _list(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    return ListMatcher(StringSet.compile(values))


def _paths(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    templates = []
    for i, v in enumerate(values):
        if "{*" in v:
            try:
                templates.append(compile_path_template(v))
            except ValueError as e:
                raise r.error(f"{path}[{i}]", str(e)) from None
    plain = StringSet.compile(v for v in values if "{*" not in v)
    return PathMatcher(plain, tuple(templates)) if templates else plain


def _service_accounts(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    """NAME (in the policy's namespace) or NAMESPACE/NAME, matched exactly against "ns/sa"."""
    out = set()
    for i, v in enumerate(values):
        parts = v.split("/")
        if len(parts) == 1 and parts[0]:
            out.add(f"{policy_ns}/{parts[0]}")
        elif len(parts) == 2 and all(parts):
            out.add(v)
        else:
            raise r.error(f"{path}[{i}]", f"{v!r} is not a service account; write NAMESPACE/NAME")
    return ExactSet(frozenset(out))


def _cidrs(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    for i, v in enumerate(values):
        try:
            parse_cidr(v)
        except (ValueError, TypeError) as e:
            raise r.error(f"{path}[{i}]", f"{e}; write an address or a CIDR like 10.0.0.0/16") from None
    return CidrSet.compile(values)


def _ports(r: _PolicyReader, values: list[str], path: str, policy_ns: str) -> Matcher:
    ports = set()
    for i, v in enumerate(values):
        try:
            ports.add(parse_port(v))
        except ValueError as e:
            raise r.error(f"{path}[{i}]", str(e)) from None
    return PortSet(frozenset(ports))


_BUILDERS: dict[str, Callable[[_PolicyReader, list[str], str, str], Matcher]] = {
    "principal": _principals,
    "string": _strings,
    "host": _hosts,
    "list": _list,
    "path": _paths,
    "service_account": _service_accounts,
    "cidr": _cidrs,
    "port": _ports,
}


# ---------------------------------------------------------------------------------------------------
# from / to entries, when conditions, rules
# ---------------------------------------------------------------------------------------------------
def _entry(
    r: _PolicyReader, m: Mapping[str, Any], fields: dict[str, tuple[str, str, bool]], path: str, policy_ns: str
) -> Entry:
    r.known_fields(m, fields, path)
    checks: list[Check] = []
    for name, raw in m.items():
        kind, attr, layer7 = fields[name]
        fpath = f"{path}.{name}"
        values = r.port_list(raw, fpath) if kind == "port" else r.str_list(raw, fpath)
        if not values:
            continue
        key = (name, tuple(values), policy_ns)
        check = r.memo.checks.get(key) if r.memo is not None else None
        if check is None:
            matcher = _matcher(r, kind, values, fpath, policy_ns)
            check = Check(name, attr, matcher, name.startswith("not"), layer7)
            if r.memo is not None:
                r.memo.checks[key] = check
        checks.append(check)
    if not checks:
        raise r.error(path, "must not be empty; give at least one field (or drop the entry)")
    return tuple(checks)


def _entries(
    r: _PolicyReader,
    m: Mapping[str, Any],
    part: str,
    key: str,
    fields: dict[str, tuple[str, str, bool]],
    path: str,
    policy_ns: str,
) -> tuple[Entry, ...] | None:
    """`from: [{source: ...}]` or `to: [{operation: ...}]`; None when absent or empty."""
    out = []
    for i, item in enumerate(r.list_of(m.get(part), f"{path}.{part}")):
        ipath = f"{path}.{part}[{i}]"
        item = r.mapping(item, ipath)
        r.known_fields(item, [key], ipath)
        if item.get(key) is None:
            raise r.error(f"{ipath}.{key}", "is required")
        out.append(_entry(r, r.mapping(item[key], f"{ipath}.{key}"), fields, f"{ipath}.{key}", policy_ns))
    return tuple(out) if out else None


def _wrapper(key: str) -> tuple[str, Callable[[StringSet], Matcher]] | None:
    """(attribute, matcher around the value set) for the `when` keys with a name inside: headers, claims."""
    hm = _HEADER_KEY.match(key)
    if hm:
        name = hm.group(1).strip().lower()
        return ("headers", lambda s: HeaderMatcher(name, s)) if name else None
    cm = _CLAIM_KEY.match(key)
    if cm:
        claim_path = tuple(re.findall(r"\[([^\[\]]+)\]", cm.group(1)))
        return "claims", lambda s: ClaimMatcher(claim_path, s)
    if _EXPERIMENTAL_KEY.match(key):
        # Envoy filter metadata never reaches this proxy: the value always reads as absent.
        return "headers", lambda s: HeaderMatcher("\0experimental", s)
    return None


def _condition(r: _PolicyReader, raw: Any, path: str, policy_ns: str) -> list[Check]:
    m = r.mapping(raw, path)
    r.known_fields(m, ["key", "values", "notValues"], path)
    key = m.get("key")
    if not isinstance(key, str) or not key:
        raise r.error(f"{path}.key", "is required: the attribute to test, e.g. source.ip")
    read = r.port_list if key == "destination.port" else r.str_list
    values = read(m.get("values"), f"{path}.values")
    not_values = read(m.get("notValues"), f"{path}.notValues")
    if not values and not not_values:
        raise r.error(path, f"condition on {key} needs values or notValues")

    def build(kind: str, attr: str, layer7: bool) -> list[Check]:
        out = []
        for vals, neg, suffix in ((values, False, "values"), (not_values, True, "notValues")):
            if vals:
                matcher = _matcher(r, kind, vals, f"{path}.{suffix}", policy_ns)
                out.append(Check(f"when[{key}].{suffix}", attr, matcher, neg, layer7))
        return out

    if key in WHEN_KEYS:
        return build(*WHEN_KEYS[key])
    wrapper = _wrapper(key)
    if wrapper is None:
        raise r.error(
            f"{path}.key",
            f"unknown key {key!r}; use one of {', '.join(WHEN_KEYS)}, request.headers[NAME], request.auth.claims[NAME]",
        )
    attr, outer = wrapper
    return [Check(c.field, attr, outer(_as_strings(c.matcher)), c.negate, True) for c in build("string", attr, True)]


def _as_strings(m: Matcher) -> StringSet:
    assert isinstance(m, StringSet), m  # kind "string" always builds one
    return m


def _rule(r: _PolicyReader, raw: Any, path: str, policy_ns: str) -> Rule:
    m = r.mapping(raw, path)
    r.known_fields(m, ["from", "to", "when"], path)
    sources = _entries(r, m, "from", "source", SOURCE_FIELDS, path, policy_ns)
    operations = _entries(r, m, "to", "operation", OPERATION_FIELDS, path, policy_ns)
    conditions: list[Check] = []
    for i, cond in enumerate(r.list_of(m.get("when"), f"{path}.when")):
        conditions.extend(_condition(r, cond, f"{path}.when[{i}]", policy_ns))
    return Rule(sources, operations, tuple(conditions))


# ---------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------
def _action(r: ObjectReader, spec: Mapping[str, Any]) -> str:
    action = spec.get("action", "ALLOW")
    if action is None:
        return "ALLOW"
    if not isinstance(action, str) or action not in ACTIONS:
        raise r.error("spec.action", f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    return action


def _provider(r: ObjectReader, spec: Mapping[str, Any], action: str) -> str | None:
    """The extension provider: required with CUSTOM, refused otherwise."""
    provider = None
    if spec.get("provider") is not None:
        prov = r.mapping(spec["provider"], "spec.provider")
        r.known_fields(prov, ["name"], "spec.provider")
        if not isinstance(prov.get("name"), str) or not prov["name"]:
            raise r.error("spec.provider.name", "is required: the extension provider from the mesh config")
        provider = str(prov["name"])
    if action == "CUSTOM" and provider is None:
        raise r.error("spec.provider", "is required for action CUSTOM")
    if action != "CUSTOM" and provider is not None:
        raise r.error("spec.provider", f"is only allowed with action CUSTOM, not {action}")
    return provider


def parse_authorization_policy(
    obj: KubeObject, *, origin: str = "", memo: CompileMemo | None = None
) -> AuthorizationPolicy:
    """Validate and compile one policy; raises PolicyError. Pass one `memo` for a batch of policies."""
    r = _PolicyReader(obj, memo)
    r.check_api_version()
    spec = r.mapping(obj.body.get("spec"), "spec")
    r.known_fields(spec, SPEC_FIELDS, "spec")
    action = _action(r, spec)
    selector = parse_selector(r, spec)
    target_refs = parse_target_refs(r, spec, obj.namespace, selector)
    provider = _provider(r, spec, action)
    raw_rules = r.list_of(spec.get("rules"), "spec.rules")
    rules = tuple(_rule(r, x, f"spec.rules[{i}]", obj.namespace) for i, x in enumerate(raw_rules))
    return AuthorizationPolicy(
        namespace=obj.namespace,
        name=obj.name,
        action=action,
        selector=selector,
        target_refs=target_refs,
        rules=rules,
        dry_run=dry_run_of(r),
        provider=provider,
        source=obj.source,
        origin=origin,
    )
