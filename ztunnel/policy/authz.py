"""`security.istio.io` AuthorizationPolicy (v1 and v1beta1): validation and compilation into matchers.

A policy is parsed whole or rejected whole (`PolicyError` names file, object and field). Compiled rules are
lists of `Check`s so that the node proxy's L4 reduction (DESIGN §4.5) is a filter over checks that are
flagged as needing L7 attributes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.loader import ConfigError
from ztunnel.config.model import KubeObject, Source
from ztunnel.identity.spiffe import strip_scheme
from ztunnel.policy.matchers import CidrSet, IpAddress, StringSet, parse_cidr, parse_port

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
DRY_RUN_ANNOTATION = "istio.io/dry-run"
API_GROUP = "security.istio.io"


class PolicyError(ConfigError):
    """An invalid security object; rejected as a whole. str() is the one-line message for the user."""


# ---------------------------------------------------------------------------------------------------
# Attributes a decision reads
# ---------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class MatchAttributes:
    """Everything a rule can look at, normalised once per decision (principals without spiffe://)."""

    principal: str  # "" when plaintext
    namespace: str
    service_account: str  # "ns/sa" or ""
    source_ip: IpAddress | None
    destination_ip: IpAddress | None
    destination_port: int
    # L7 only (None / empty at the node proxy)
    remote_ip: IpAddress | None = None
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    sni: str | None = None


# ---------------------------------------------------------------------------------------------------
# Matchers that read one attribute
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PortSet:
    ports: frozenset[int]

    def matches(self, value: int | None) -> bool:
        return value in self.ports


@dataclass(frozen=True, slots=True)
class ExactSet:
    values: frozenset[str]

    def matches(self, value: str | None) -> bool:
        return (value or "") in self.values


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    name: str  # lower-case
    values: StringSet

    def matches(self, headers: Mapping[str, str]) -> bool:
        return self.values.matches(headers.get(self.name))


@dataclass(frozen=True, slots=True)
class ClaimMatcher:
    path: tuple[str, ...]
    values: StringSet

    def matches(self, claims: Mapping[str, Any]) -> bool:
        value: Any = claims
        for part in self.path:
            if not isinstance(value, Mapping) or part not in value:
                return False
            value = value[part]
        if isinstance(value, list | tuple):
            return any(self.values.matches(str(v)) for v in value)
        if isinstance(value, bool):
            value = "true" if value else "false"
        return self.values.matches(str(value))


@dataclass(frozen=True, slots=True)
class HostMatcher:
    """Hosts are case-insensitive; a value without a port also matches the host with any port."""

    values: StringSet

    def matches(self, host: str | None) -> bool:
        if not host:
            return self.values.matches(host)
        if self.values.matches(host):
            return True
        if host.startswith("["):
            bare = host[: host.find("]") + 1] if "]" in host else host
        else:
            bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return bare != host and self.values.matches(bare)


@dataclass(frozen=True, slots=True)
class PathMatcher:
    """Paths are matched without the query string or fragment, as Istio does. Istio's path templates
    (`/books/{*}/pages`, `/static/{**}`) match one segment and any remaining segments."""

    values: StringSet
    templates: tuple[re.Pattern[str], ...] = ()

    def matches(self, path: str | None) -> bool:
        if path:
            for sep in ("?", "#"):
                i = path.find(sep)
                if i >= 0:
                    path = path[:i]
        if self.values.matches(path):
            return True
        return bool(path) and any(t.fullmatch(path) for t in self.templates)  # type: ignore[arg-type]


def compile_path_template(value: str) -> re.Pattern[str]:
    """`{*}` = one non-empty segment, `{**}` = the rest (last operator only), as Istio's path templates."""
    parts = re.split(r"(\{\*\*\}|\{\*\})", value)
    if value.count("{**}") > 1 or ("{**}" in value and "{*}" in value.split("{**}", 1)[1]):
        raise ValueError(f"{value!r}: {{**}} must be the last operator of a path template")
    if re.search(r"\{[^}]*\}", re.sub(r"\{\*\*?\}", "", value)) or "*" in re.sub(r"\{\*\*?\}", "", value):
        raise ValueError(f"{value!r}: a path template may only use {{*}} and {{**}}")
    if not value.startswith("/"):
        raise ValueError(f"{value!r}: a path template must start with /")
    out = []
    for part in parts:
        if part == "{*}":
            out.append(r"[^/]+")
        elif part == "{**}":
            out.append(r".+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


Matcher = StringSet | CidrSet | PortSet | ExactSet | HeaderMatcher | ClaimMatcher | HostMatcher | PathMatcher


@dataclass(frozen=True, slots=True)
class Check:
    """One field of an entry: `matcher(attrs.<attr>)`, negated for not* forms."""

    field: str  # as written, e.g. "notPrincipals" or "when[request.headers[x-user]].values"
    attr: str
    matcher: Matcher
    negate: bool
    layer7: bool

    def passes(self, a: MatchAttributes) -> bool:
        return self.matcher.matches(getattr(a, self.attr)) is not self.negate  # type: ignore[arg-type]


def _entries_match(entries: tuple[Entry, ...], a: MatchAttributes) -> bool:
    """Any entry whose checks all pass. Plain loops: this is the hot path of every decision."""
    for entry in entries:
        for c in entry:
            if c.matcher.matches(getattr(a, c.attr)) is c.negate:  # type: ignore[arg-type]
                break
        else:
            return True
    return False


Entry = tuple[Check, ...]  # every check must pass


@dataclass(frozen=True, slots=True)
class Rule:
    """All present parts must match; `from`/`to` match if any entry does. None = part absent."""

    sources: tuple[Entry, ...] | None
    operations: tuple[Entry, ...] | None
    conditions: Entry

    def matches(self, a: MatchAttributes) -> bool:
        if self.sources is not None and not _entries_match(self.sources, a):
            return False
        if self.operations is not None and not _entries_match(self.operations, a):
            return False
        for c in self.conditions:  # noqa: SIM110 - a plain loop is faster on this hot path
            if c.matcher.matches(getattr(a, c.attr)) is c.negate:  # type: ignore[arg-type]
                return False
        return True

    def ports(self) -> frozenset[int] | None:
        """Destination ports the rule can match at all, or None for any: lets the engine skip rules by port."""
        if self.operations is None:
            return None
        out: set[int] = set()
        for e in self.operations:
            sets = [c.matcher.ports for c in e if isinstance(c.matcher, PortSet) and not c.negate]
            if not sets:
                return None
            out |= frozenset.intersection(*sets)
        return frozenset(out)

    @property
    def l7_fields(self) -> tuple[str, ...]:
        out: list[str] = []
        for part in (self.sources or (), self.operations or (), (self.conditions,)):
            for e in part:
                out.extend(c.field for c in e if c.layer7 and c.field not in out)
        return tuple(out)

    def l4_part(self) -> Rule:
        """The rule with its L7 checks dropped: matches at least what the full rule matches."""

        def keep(entries: tuple[Entry, ...] | None) -> tuple[Entry, ...] | None:
            if entries is None:
                return None
            return tuple(tuple(c for c in e if not c.layer7) for e in entries)

        return Rule(keep(self.sources), keep(self.operations), tuple(c for c in self.conditions if not c.layer7))


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str
    kind: str
    name: str
    namespace: str


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: str
    selector: Mapping[str, str] | None  # None = every workload in scope
    target_refs: tuple[TargetRef, ...]
    rules: tuple[Rule, ...]
    dry_run: bool = False
    provider: str | None = None
    source: Source | None = None
    origin: str = ""  # for converted legacy objects: what it came from

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def l4_rules(self) -> tuple[tuple[tuple[int, Rule], ...], tuple[int, ...]]:
        """(rules the node proxy evaluates with their index, indices of ALLOW-like rules dropped for L7)."""
        kept: list[tuple[int, Rule]] = []
        dropped: list[int] = []
        for i, r in enumerate(self.rules):
            if not r.l7_fields:
                kept.append((i, r))
            elif self.action == "DENY":
                kept.append((i, r.l4_part()))
            else:
                dropped.append(i)
        return tuple(kept), tuple(dropped)


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------
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
    "request.auth.audiences": ("claim:aud", "claims", True),
    "request.auth.presenter": ("claim:azp", "claims", True),
    "connection.sni": ("string", "sni", True),
}
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_EXPERIMENTAL_KEY = re.compile(r"^experimental\.envoy\.filters\.[A-Za-z0-9_.]+\[[^\[\]]+\]$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class _Ctx:
    """Where we are in an object, so every error names file, object and field."""

    def __init__(self, obj: KubeObject, memo: dict[tuple[str, tuple[str, ...], str], Matcher] | None = None):
        self.obj = obj
        self.memo = memo  # valid matchers already built in this batch, keyed by (kind, values, namespace)

    def error(self, field_path: str, message: str) -> PolicyError:
        return PolicyError(message, source=self.obj.source, obj=self.obj.ref, field=field_path)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if type(value) is dict:  # the common case, without an ABC check
            return value
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be a mapping, not {_type_name(value)}")
        return value

    def str_list(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"must be a list of strings, not {_type_name(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise self.error(f"{path}[{i}]", f"must be a string, not {_type_name(v)}")
        return value

    def known_fields(self, m: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
        for k in m:
            if k not in allowed:
                raise self.error(
                    f"{path}.{k}" if path else str(k), f"unknown field; expected one of {', '.join(allowed)}"
                )


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def _matcher(ctx: _Ctx, kind: str, values: list[str], path: str, policy_ns: str) -> Matcher:
    """Validated matcher for a value list. Large clusters repeat value lists, so a batch memo skips rework."""
    if ctx.memo is None:
        return _build_matcher(ctx, kind, values, path, policy_ns)
    key = (kind, tuple(values), policy_ns if kind == "service_account" else "")
    m = ctx.memo.get(key)
    if m is None:
        m = ctx.memo[key] = _build_matcher(ctx, kind, values, path, policy_ns)
    return m


def _build_matcher(ctx: _Ctx, kind: str, values: list[str], path: str, policy_ns: str) -> Matcher:
    for i, v in enumerate(values):
        if v == "":  # Istio rejects these too: an empty value is always a templating mistake
            raise ctx.error(f"{path}[{i}]", 'empty value not allowed; remove it or write "*" for any value')
    if kind == "principal":
        return StringSet.compile(strip_scheme(v) for v in values)
    if kind == "string":
        return StringSet.compile(values)
    if kind == "host":
        return HostMatcher(StringSet.compile(values, ignore_case=True))
    if kind == "path":
        templates = []
        for i, v in enumerate(values):
            if "{*" in v:
                try:
                    templates.append(compile_path_template(v))
                except ValueError as e:
                    raise ctx.error(f"{path}[{i}]", str(e)) from None
        plain = [v for v in values if "{*" not in v]
        return PathMatcher(StringSet.compile(plain), tuple(templates))
    if kind == "service_account":
        out = set()
        for i, v in enumerate(values):
            parts = v.split("/")
            if len(parts) == 1 and parts[0]:
                out.add(f"{policy_ns}/{parts[0]}")
            elif len(parts) == 2 and all(parts):
                out.add(v)
            else:
                raise ctx.error(f"{path}[{i}]", f"{v!r} is not a service account; write NAMESPACE/NAME")
        return ExactSet(frozenset(out))
    if kind == "cidr":
        for i, v in enumerate(values):
            try:
                parse_cidr(v)
            except (ValueError, TypeError) as e:
                raise ctx.error(f"{path}[{i}]", f"{e}; write an address or a CIDR like 10.0.0.0/16") from None
        return CidrSet.compile(values)
    if kind == "port":
        ports = set()
        for i, v in enumerate(values):
            try:
                ports.add(parse_port(v))
            except ValueError as e:
                raise ctx.error(f"{path}[{i}]", str(e)) from None
        return PortSet(frozenset(ports))
    if kind.startswith("claim:"):
        return ClaimMatcher((kind[len("claim:") :],), StringSet.compile(values))
    raise AssertionError(kind)


def _port_values(ctx: _Ctx, value: Any, path: str) -> list[str]:
    """Istio writes ports as strings; accept YAML integers too but nothing else."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(path, f"must be a list of port numbers, not {_type_name(value)}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ctx.error(f"{path}[{i}]", f"must be a port number, not {_type_name(v)}")
        out.append(str(v))
    return out


def _entry(
    ctx: _Ctx, m: Mapping[str, Any], fields: dict[str, tuple[str, str, bool]], path: str, policy_ns: str
) -> Entry:
    ctx.known_fields(m, fields, path)
    checks: list[Check] = []
    for name, raw in m.items():
        kind, attr, layer7 = fields[name]
        fpath = f"{path}.{name}"
        values = _port_values(ctx, raw, fpath) if kind == "port" else ctx.str_list(raw, fpath)
        if not values:
            continue
        key = ("check:" + name, tuple(values), policy_ns)
        check = ctx.memo.get(key) if ctx.memo is not None else None
        if check is None:
            matcher = _matcher(ctx, kind, values, fpath, policy_ns)
            check = Check(name, attr, matcher, name.startswith("not"), layer7)
            if ctx.memo is not None:
                ctx.memo[key] = check  # type: ignore[assignment]
        checks.append(check)  # type: ignore[arg-type]
    if not checks:
        raise ctx.error(path, "must not be empty; give at least one field (or drop the entry)")
    return tuple(checks)


def _condition(ctx: _Ctx, m: Any, path: str, policy_ns: str) -> list[Check]:
    m = ctx.mapping(m, path)
    ctx.known_fields(m, ["key", "values", "notValues"], path)
    key = m.get("key")
    if not isinstance(key, str) or not key:
        raise ctx.error(f"{path}.key", "is required: the attribute to test, e.g. source.ip")
    values = ctx.str_list(m.get("values"), f"{path}.values") if key != "destination.port" else []
    not_values = ctx.str_list(m.get("notValues"), f"{path}.notValues") if key != "destination.port" else []
    if key == "destination.port":
        values = _port_values(ctx, m.get("values"), f"{path}.values")
        not_values = _port_values(ctx, m.get("notValues"), f"{path}.notValues")
    if not values and not not_values:
        raise ctx.error(path, f"condition on {key} needs values or notValues")

    def build(kind: str, attr: str, layer7: bool) -> list[Check]:
        out = []
        for vals, neg, suffix in ((values, False, "values"), (not_values, True, "notValues")):
            if vals:
                matcher = _matcher(ctx, kind, vals, f"{path}.{suffix}", policy_ns)
                out.append(Check(f"when[{key}].{suffix}", attr, matcher, neg, layer7))
        return out

    def wrap(attr: str, outer: Any) -> list[Check]:
        return [Check(c.field, attr, outer(c.matcher), c.negate, True) for c in build("string", attr, True)]

    if key in WHEN_KEYS:
        kind, attr, layer7 = WHEN_KEYS[key]
        return build(kind, attr, layer7)
    hm = _HEADER_KEY.match(key)
    if hm:
        name = hm.group(1).strip().lower()
        return wrap("headers", lambda m: HeaderMatcher(name, m))
    cm = _CLAIM_KEY.match(key)
    if cm:
        claim_path = tuple(re.findall(r"\[([^\[\]]+)\]", cm.group(1)))
        return wrap("claims", lambda m: ClaimMatcher(claim_path, m))
    if _EXPERIMENTAL_KEY.match(key):
        # Envoy filter metadata never reaches this proxy: the value always reads as absent.
        return wrap("headers", lambda m: HeaderMatcher("\0experimental", m))
    raise ctx.error(
        f"{path}.key",
        f"unknown key {key!r}; use one of {', '.join(WHEN_KEYS)}, request.headers[NAME], request.auth.claims[NAME]",
    )


def _rule(ctx: _Ctx, raw: Any, path: str, policy_ns: str) -> Rule:
    m = ctx.mapping(raw, path)
    ctx.known_fields(m, ["from", "to", "when"], path)
    sources: list[Entry] = []
    operations: list[Entry] = []
    conditions: list[Check] = []
    for part, key, fields, out in (
        ("from", "source", SOURCE_FIELDS, sources),
        ("to", "operation", OPERATION_FIELDS, operations),
    ):
        items = m.get(part)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ctx.error(f"{path}.{part}", f"must be a list, not {_type_name(items)}")
        for i, item in enumerate(items):
            ipath = f"{path}.{part}[{i}]"
            item = ctx.mapping(item, ipath)
            ctx.known_fields(item, [key], ipath)
            if item.get(key) is None:
                raise ctx.error(f"{ipath}.{key}", "is required")
            out.append(_entry(ctx, ctx.mapping(item[key], f"{ipath}.{key}"), fields, f"{ipath}.{key}", policy_ns))
    when = m.get("when")
    if when is not None:
        if not isinstance(when, list):
            raise ctx.error(f"{path}.when", f"must be a list, not {_type_name(when)}")
        for i, cond in enumerate(when):
            conditions.extend(_condition(ctx, cond, f"{path}.when[{i}]", policy_ns))
    return Rule(tuple(sources) if sources else None, tuple(operations) if operations else None, tuple(conditions))


def parse_selector(ctx: _Ctx, spec: Mapping[str, Any], path: str = "spec.selector") -> Mapping[str, str] | None:
    raw = spec.get("selector")
    if raw is None:
        return None
    sel = ctx.mapping(raw, path)
    ctx.known_fields(sel, ["matchLabels"], path)
    labels = ctx.mapping(sel.get("matchLabels"), f"{path}.matchLabels")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            raise ctx.error(f"{path}.matchLabels", f"{k!r} is not a valid label key")
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ctx.error(f"{path}.matchLabels.{k}", f"must be a string, not {_type_name(v)}")
        out[k] = str(v)
    return out or None


def _target_refs(ctx: _Ctx, spec: Mapping[str, Any], namespace: str) -> tuple[TargetRef, ...]:
    raws: list[tuple[str, Any]] = []
    if spec.get("targetRef") is not None:
        raws.append(("spec.targetRef", spec["targetRef"]))
    tr = spec.get("targetRefs")
    if tr is not None:
        if not isinstance(tr, list):
            raise ctx.error("spec.targetRefs", f"must be a list, not {_type_name(tr)}")
        raws.extend((f"spec.targetRefs[{i}]", r) for i, r in enumerate(tr))
    out = []
    for path, raw in raws:
        m = ctx.mapping(raw, path)
        ctx.known_fields(m, ["group", "kind", "name", "namespace"], path)
        for f in ("kind", "name"):
            if not isinstance(m.get(f), str) or not m[f]:
                raise ctx.error(f"{path}.{f}", "is required")
        out.append(TargetRef(str(m.get("group", "")), m["kind"], m["name"], str(m.get("namespace") or namespace)))
    return tuple(out)


def dry_run_of(ctx: _Ctx, obj: KubeObject) -> bool:
    raw = obj.annotations.get(DRY_RUN_ANNOTATION)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false"):
        raise ctx.error(f"metadata.annotations[{DRY_RUN_ANNOTATION}]", f'must be "true" or "false", not {raw!r}')
    return raw.lower() == "true"


SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")


def parse_authorization_policy(
    obj: KubeObject, *, origin: str = "", memo: dict[tuple[str, tuple[str, ...], str], Matcher] | None = None
) -> AuthorizationPolicy:
    """Validate and compile one policy; raises PolicyError. Pass one `memo` dict for a batch of policies."""
    ctx = _Ctx(obj, memo)
    if not obj.api_version.startswith(f"{API_GROUP}/") or obj.api_version.split("/", 1)[1] not in ("v1", "v1beta1"):
        raise ctx.error("apiVersion", f"{obj.api_version!r} is not served; use security.istio.io/v1 or v1beta1")
    raw_spec = obj.body.get("spec")
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        raise ctx.error("spec", f"must be a mapping, not {_type_name(raw_spec)}")
    spec = raw_spec or {}
    ctx.known_fields(spec, SPEC_FIELDS, "spec")
    action = spec.get("action", "ALLOW")
    if action is None:
        action = "ALLOW"
    if not isinstance(action, str) or action not in ACTIONS:
        raise ctx.error("spec.action", f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    selector = parse_selector(ctx, spec)
    target_refs = _target_refs(ctx, spec, obj.namespace)
    if selector is not None and target_refs:
        raise ctx.error("spec.selector", "cannot be used together with targetRef/targetRefs; keep one")
    provider = None
    if spec.get("provider") is not None:
        prov = ctx.mapping(spec["provider"], "spec.provider")
        ctx.known_fields(prov, ["name"], "spec.provider")
        if not isinstance(prov.get("name"), str) or not prov["name"]:
            raise ctx.error("spec.provider.name", "is required: the extension provider from the mesh config")
        provider = prov["name"]
    if action == "CUSTOM" and provider is None:
        raise ctx.error("spec.provider", "is required for action CUSTOM")
    if action != "CUSTOM" and provider is not None:
        raise ctx.error("spec.provider", f"is only allowed with action CUSTOM, not {action}")
    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        raise ctx.error("spec.rules", f"must be a list, not {_type_name(raw_rules)}")
    rules = tuple(_rule(ctx, r, f"spec.rules[{i}]", obj.namespace) for i, r in enumerate(raw_rules or []))
    return AuthorizationPolicy(
        namespace=obj.namespace,
        name=obj.name,
        action=action,
        selector=selector,
        target_refs=target_refs,
        rules=rules,
        dry_run=dry_run_of(ctx, obj),
        provider=provider,
        source=obj.source,
        origin=origin,
    )


def best_effort_scope(obj: KubeObject) -> tuple[str, Mapping[str, str] | None, bool, bool]:
    """For a rejected policy: (action or "", selector or None, has targetRefs, dry-run) read as far as possible.

    Used to fail closed: the workloads a rejected policy would have selected deny until it is fixed. A
    selector that cannot be read widens the scope to the whole namespace, never narrows it.
    """
    spec = obj.body.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    action = spec.get("action", "ALLOW")
    action = action if isinstance(action, str) and action in ACTIONS else ""
    selector: Mapping[str, str] | None = None
    try:
        selector = parse_selector(_Ctx(obj), spec)
    except PolicyError:
        selector = None
    has_refs = bool(spec.get("targetRef") or spec.get("targetRefs"))
    dry = str(obj.annotations.get(DRY_RUN_ANNOTATION, "")).lower() == "true"
    return action, selector, has_refs, dry
