"""`rbac.istio.io/v1alpha1`: ClusterRbacConfig scaffolding, ServiceRole + ServiceRoleBinding -> ALLOW policies.

The RBAC config decides where roles take effect (`Enabled`); a binding then becomes one ALLOW
`AuthorizationPolicy` per target, every (subject, access rule) pair a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ztunnel.config.model import KubeObject, Service
from ztunnel.policy.legacy.emit import Conversion, get_field
from ztunnel.policy.model import PolicyError

RBAC_MODES = ("OFF", "ON", "ON_WITH_INCLUSION", "ON_WITH_EXCLUSION")
RBAC_KINDS = ("ClusterRbacConfig", "RbacConfig")
ROLE_KINDS = ("ServiceRole", "ServiceRoleBinding")

Enabled = Callable[[str, Service | None], bool]  # is RBAC on for (namespace, service or None)?
_Lists = tuple[list[str], list[str]]  # (namespaces, services) of an inclusion/exclusion section
_Source = tuple[dict[str, Any], list[Any]]  # ({"source": ...} or {}, extra `when` conditions)
_Targets = dict[tuple[str, tuple[tuple[str, str], ...]], tuple[dict[str, str] | None, list[Any]]]

# (new field, legacy spellings, value kind) of a ServiceRole access rule
_OPERATION_FIELDS = (
    ("methods", ("methods",), "str"),
    ("notMethods", ("notMethods", "not_methods"), "str"),
    ("paths", ("paths",), "str"),
    ("notPaths", ("notPaths", "not_paths"), "str"),
    ("hosts", ("hosts",), "str"),
    ("notHosts", ("notHosts", "not_hosts"), "str"),
    ("ports", ("ports",), "port"),
    ("notPorts", ("notPorts", "not_ports"), "port"),
)
_STAR_MEANS_ANY = ("methods", "paths", "hosts")
# (new field, legacy spellings) of a binding subject
_SUBJECT_FIELDS = (
    ("principals", ("names",)),
    ("notPrincipals", ("notNames", "not_names")),
    ("namespaces", ("namespaces",)),
    ("notNamespaces", ("notNamespaces", "not_namespaces")),
    ("ipBlocks", ("ips",)),
    ("notIpBlocks", ("notIps", "not_ips")),
)
_PROPERTY_SOURCES = {
    "source.principal": "principals",
    "source.user": "principals",
    "source.namespace": "namespaces",
    "source.ip": "ipBlocks",
    "request.auth.principal": "requestPrincipals",
}
_STAR_IS_ANYONE = ("source.principal", "source.user")
_PROPERTY_CONDITIONS = ("request.auth.audiences", "request.auth.presenter")
# A second value set for one source field is ANDed in v1alpha1, so it becomes this `when` key instead.
_CONDITION_OF = {
    "principals": "source.principal",
    "namespaces": "source.namespace",
    "ipBlocks": "source.ip",
    "requestPrincipals": "request.auth.principal",
}


def _never(namespace: str, service: Service | None) -> bool:
    return False


def _always(namespace: str, service: Service | None) -> bool:
    return True


# ---- ClusterRbacConfig -----------------------------------------------------------------------------
def convert_rbac_config(conv: Conversion, objects: list[KubeObject]) -> Enabled:
    """Emit the default-deny scaffolding of the mesh's RBAC config; returns where RBAC is enabled."""
    cfg = _mesh_rbac_config(conv, objects)
    if cfg is None:
        return _never
    mode = _rbac_mode(conv, cfg)
    dry = (get_field(cfg.spec, "enforcementMode", "enforcement_mode") or "ENFORCED") == "PERMISSIVE"
    inclusion = _scope_lists(conv, cfg, "inclusion")
    exclusion = _scope_lists(conv, cfg, "exclusion")
    if mode == "OFF":
        return _never
    if mode == "ON":
        conv.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", conv.root, {}, dry_run=dry)
        return _always
    if mode == "ON_WITH_INCLUSION":
        return _on_with_inclusion(conv, cfg, inclusion, dry)
    return _on_with_exclusion(conv, cfg, exclusion, dry)


def _mesh_rbac_config(conv: Conversion, objects: list[KubeObject]) -> KubeObject | None:
    """The one RBAC config that counts (ClusterRbacConfig `default` first); the others get a note."""
    configs = [o for o in objects if o.kind in RBAC_KINDS]
    if not configs:
        first = next((o for o in objects if o.kind in ROLE_KINDS), None)
        if first is not None:
            conv.note(first, "no ClusterRbacConfig: RBAC is OFF, so ServiceRoles and bindings have no effect")
        return None
    configs.sort(key=lambda o: (o.kind != "ClusterRbacConfig", o.name != "default"))
    for other in configs[1:]:
        conv.note(other, f"ignored: {configs[0].ref} is the mesh's RBAC config")
    return configs[0]


def _rbac_mode(conv: Conversion, cfg: KubeObject) -> str:
    mode = cfg.spec.get("mode", "OFF")
    if mode is None:
        return "OFF"
    if not isinstance(mode, str) or mode not in RBAC_MODES:
        err = conv.error(cfg, "spec.mode", f"unknown mode {mode!r}; use one of {', '.join(RBAC_MODES)}")
        conv.result.errors.append(err)
        conv.note(cfg, "invalid RBAC config treated as mode ON until fixed")
        return "ON"  # fail closed: everything RBAC-enabled, only explicit grants allow
    return mode


def _scope_lists(conv: Conversion, cfg: KubeObject, key: str) -> _Lists:
    section = cfg.spec.get(key) or {}
    if not isinstance(section, Mapping):
        conv.result.errors.append(conv.error(cfg, f"spec.{key}", "must be a mapping"))
        return [], []
    namespaces = section.get("namespaces") or []
    services = section.get("services") or []
    for fname, val in (("namespaces", namespaces), ("services", services)):
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            conv.result.errors.append(conv.error(cfg, f"spec.{key}.{fname}", "must be a list of strings"))
            return [], []
    return namespaces, services


def _resolve(conv: Conversion, cfg: KubeObject, names: list[str], what: str) -> list[Service]:
    out = []
    for n in names:
        s = conv.service_by_fqdn(n)
        if s is None:
            conv.note(cfg, f"{what} service {n!r} is not defined in the config; skipped")
        else:
            out.append(s)
    return out


def _service_policy(
    conv: Conversion, cfg: KubeObject, s: Service, what: str, name: str, extra: Mapping[str, Any], dry: bool
) -> None:
    """An AuthorizationPolicy selecting the workloads of `s`; a note instead when it has no selector."""
    if not s.selector:
        conv.note(cfg, f"{what} service {s.ref} has no selector; it cannot be mapped to workloads")
        return
    spec = {"selector": {"matchLabels": dict(s.selector)}, **extra}
    conv.emit(cfg, "AuthorizationPolicy", f"{name}-{s.name}", s.namespace, spec, dry_run=dry)


def _on_with_inclusion(conv: Conversion, cfg: KubeObject, inclusion: _Lists, dry: bool) -> Enabled:
    inc_ns, inc_svc = inclusion
    for ns in inc_ns:
        conv.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", ns, {}, dry_run=dry)
    included = _resolve(conv, cfg, inc_svc, "included")
    for s in included:
        if s.namespace not in inc_ns:
            _service_policy(conv, cfg, s, "included", "rbac-default-deny", {}, dry)
    refs = {s.ref for s in included}
    return lambda ns, svc: ns in inc_ns or (svc is not None and svc.ref in refs)


def _on_with_exclusion(conv: Conversion, cfg: KubeObject, exclusion: _Lists, dry: bool) -> Enabled:
    exc_ns, exc_svc = exclusion
    conv.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", conv.root, {}, dry_run=dry)
    for ns in exc_ns:
        conv.emit(cfg, "AuthorizationPolicy", "rbac-excluded", ns, {"rules": [{}]}, dry_run=dry)
    excluded = _resolve(conv, cfg, exc_svc, "excluded")
    for s in excluded:
        _service_policy(conv, cfg, s, "excluded", "rbac-excluded", {"rules": [{}]}, dry)
    refs = {s.ref for s in excluded}
    return lambda ns, svc: ns not in exc_ns and (svc is None or svc.ref not in refs)


# ---- ServiceRole access rules ----------------------------------------------------------------------
@dataclass(frozen=True)
class AccessRule:
    services: list[str]
    operation: dict[str, Any]
    when: list[Any]
    labels: dict[str, str]


def access_rule(conv: Conversion, obj: KubeObject, rule: Any, path: str) -> AccessRule | None:
    """One ServiceRole rule; None when it can never match (or cannot be converted: it grants nothing)."""
    if not isinstance(rule, Mapping):
        raise conv.error(obj, path, "must be a mapping")
    services = rule.get("services")
    if not isinstance(services, list) or not services or not all(isinstance(s, str) for s in services):
        raise conv.error(obj, f"{path}.services", "is required: a list of service names")
    op = _operation(conv, obj, rule, path)
    when: list[Any] = []
    labels: dict[str, str] = {}
    for i, c in enumerate(rule.get("constraints") or []):
        cpath = f"{path}.constraints[{i}]"
        if not isinstance(c, Mapping) or not isinstance(c.get("key"), str):
            raise conv.error(obj, cpath, "needs key and values")
        values = [str(v) for v in (c.get("values") or [])]
        if not _constraint(conv, obj, c["key"], values, cpath, op, when, labels):
            return None
    return AccessRule(services, op, when, labels)


def _operation(conv: Conversion, obj: KubeObject, rule: Mapping[str, Any], path: str) -> dict[str, Any]:
    op: dict[str, Any] = {}
    for new, names, kind in _OPERATION_FIELDS:
        val = get_field(rule, *names)
        if val is None:
            continue
        vpath = f"{path}.{names[-1]}"
        if not isinstance(val, list):
            raise conv.error(obj, vpath, "must be a list")
        vals = _port_list(conv, obj, val, vpath) if kind == "port" else [str(v) for v in val]
        if new in _STAR_MEANS_ANY and "*" in vals:
            continue  # "*" meant "any" in v1alpha1; dropping it keeps the rule enforceable at L4
        if vals:
            op[new] = vals
    return op


def _port_list(conv: Conversion, obj: KubeObject, values: list[Any], path: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).isdigit():
            raise conv.error(obj, f"{path}[{i}]", f"{v!r} is not a port number")
        out.append(str(v))
    return out


def _constraint(
    conv: Conversion,
    obj: KubeObject,
    key: str,
    values: list[str],
    path: str,
    op: dict[str, Any],
    when: list[Any],
    labels: dict[str, str],
) -> bool:
    """Fold one constraint into the rule; False when the rule never matches or cannot be converted."""
    if key == "destination.port" and "ports" not in op:
        op["ports"] = values
    elif key in ("destination.port", "destination.ip") or key.startswith("request.headers["):
        when.append({"key": key, "values": values})  # conditions AND with the rule's own fields
    elif key == "destination.namespace":
        return obj.namespace in values or "*" in values  # else it never matches in its own namespace
    elif key.startswith("destination.labels[") and key.endswith("]") and len(values) == 1:
        labels[key[len("destination.labels[") : -1]] = values[0]
    else:
        conv.note(obj, f"constraint {key!r} at {path} cannot be converted; that rule grants nothing")
        return False
    return True


# ---- ServiceRoleBinding subjects -------------------------------------------------------------------
class _Subject:
    def __init__(self) -> None:
        self.source: dict[str, list[str]] = {}
        self.when: list[Any] = []

    def add(self, key: str, value: Any) -> None:
        vals = [str(v) for v in (value if isinstance(value, list) else [value])]
        if key in self.source and key in _CONDITION_OF:
            self.when.append({"key": _CONDITION_OF[key], "values": vals})
            return
        self.source.setdefault(key, []).extend(vals)

    def add_property(self, key: str, value: Any) -> bool:
        """Fold one `properties` entry in; False when it has no equivalent."""
        if key in _PROPERTY_SOURCES:
            if not (key in _STAR_IS_ANYONE and value == "*"):
                self.add(_PROPERTY_SOURCES[key], value)
        elif key.startswith(("request.headers[", "request.auth.claims[")) or key in _PROPERTY_CONDITIONS:
            self.when.append({"key": key, "values": [str(value)]})
        else:
            return False
        return True


def subject(conv: Conversion, obj: KubeObject, subj: Any, path: str) -> _Source | None:
    """A binding subject as a rule's `from` part and extra conditions; None when it cannot be converted."""
    if not isinstance(subj, Mapping):
        raise conv.error(obj, path, "must be a mapping")
    s = _Subject()
    user = subj.get("user")
    if user is not None and user != "*":
        s.add("principals", user)
    group = subj.get("group")
    if group is not None and group != "*":
        s.when.append({"key": "request.auth.claims[groups]", "values": [str(group)]})
    for new, names in _SUBJECT_FIELDS:
        val = get_field(subj, *names)
        if val:
            s.add(new, val)
    props = subj.get("properties") or {}
    if not isinstance(props, Mapping):
        raise conv.error(obj, f"{path}.properties", "must be a mapping")
    for key, value in props.items():
        if not s.add_property(key, value):
            conv.note(obj, f"subject property {key!r} at {path} cannot be converted; that subject is dropped")
            return None
    return ({"source": s.source} if s.source else {}), s.when


# ---- roles and bindings ----------------------------------------------------------------------------
def convert_roles(conv: Conversion, objects: list[KubeObject], enabled: Enabled) -> None:
    """Validate every ServiceRole (an invalid one grants nothing), then convert every binding."""
    roles = {(o.namespace, o.name): o for o in objects if o.kind == "ServiceRole"}
    invalid: set[tuple[str, str]] = set()
    for key, r in list(roles.items()):
        try:
            _check_role(conv, r)
        except PolicyError as e:
            conv.result.errors.append(e)
            del roles[key]
            invalid.add(key)
    for b in (o for o in objects if o.kind == "ServiceRoleBinding"):
        try:
            _binding(conv, b, roles, invalid, enabled)
        except PolicyError as e:
            conv.result.errors.append(e)


def _check_role(conv: Conversion, role: KubeObject) -> None:
    rules = role.spec.get("rules")
    if not isinstance(rules, list):
        raise conv.error(role, "spec.rules", "is required: a list of access rules")
    for i, rule in enumerate(rules):
        access_rule(conv, role, rule, f"spec.rules[{i}]")


def _binding(
    conv: Conversion,
    b: KubeObject,
    roles: Mapping[tuple[str, str], KubeObject],
    invalid: set[tuple[str, str]],
    enabled: Enabled,
) -> None:
    subjects = b.spec.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        raise conv.error(b, "spec.subjects", "is required: a list of subjects (user, group, properties)")
    role = _role_rules(conv, b, roles, invalid)
    if role is None:
        return
    role_rules, role_obj, rules_path = role
    froms = [f for i, s in enumerate(subjects) if (f := subject(conv, b, s, f"spec.subjects[{i}]")) is not None]
    # (service name or "" for the namespace, extra labels) -> (selector or None, rules)
    targets: _Targets = {}
    for i, raw in enumerate(role_rules):
        ar = access_rule(conv, role_obj, raw, f"{rules_path}[{i}]")
        if ar is None:
            continue
        for svc_name, selector in _rule_scopes(conv, b, role_obj, ar, enabled):
            entry = targets.setdefault((svc_name, tuple(sorted(ar.labels.items()))), (selector, []))
            entry[1].extend(_rules(ar, froms))
    _emit_binding_policies(conv, b, targets, dry=b.spec.get("mode") == "PERMISSIVE")


def _role_rules(
    conv: Conversion, b: KubeObject, roles: Mapping[tuple[str, str], KubeObject], invalid: set[tuple[str, str]]
) -> tuple[list[Any], KubeObject, str] | None:
    """(access rules, the object holding them, their path) of a binding; None when it grants nothing."""
    spec = b.spec
    if spec.get("actions") is not None:
        return spec["actions"], b, "spec.actions"
    ref = get_field(spec, "roleRef", "role_ref")
    if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str):
        raise conv.error(b, "spec.roleRef", "is required: {kind: ServiceRole, name: ...}")
    if ref.get("kind", "ServiceRole") != "ServiceRole":
        raise conv.error(b, "spec.roleRef.kind", f"must be ServiceRole, not {ref.get('kind')!r}")
    key = (b.namespace, ref["name"])
    if key in invalid:
        conv.note(b, f"ServiceRole {b.namespace}/{ref['name']} is invalid; the binding grants nothing")
        return None
    role = roles.get(key)
    if role is None:
        conv.note(b, f"ServiceRole {b.namespace}/{ref['name']} does not exist; the binding grants nothing")
        return None
    role_rules = role.spec.get("rules") or []
    if not isinstance(role_rules, list):
        raise conv.error(role, "spec.rules", "must be a list")
    return role_rules, role, "spec.rules"


def _rule_scopes(
    conv: Conversion, b: KubeObject, role_obj: KubeObject, ar: AccessRule, enabled: Enabled
) -> list[tuple[str, dict[str, str] | None]]:
    """(service name or "" for the namespace, selector or None) an access rule applies to."""
    if "*" in ar.services and enabled(b.namespace, None):
        return [("", dict(ar.labels) or None)]
    if "*" in ar.services:
        matched = conv.services_in(b.namespace)
    else:
        matched = [s for p in ar.services for s in conv.find_services(role_obj, p, b.namespace)]
    scopes: list[tuple[str, dict[str, str] | None]] = []
    for s in matched:
        if not enabled(s.namespace, s):
            continue
        if not s.selector:
            conv.note(role_obj, f"service {s.ref} has no selector; it cannot be mapped to workloads")
            continue
        scopes.append((s.name, {**s.selector, **ar.labels}))
    return scopes


def _rules(ar: AccessRule, froms: list[_Source]) -> list[dict[str, Any]]:
    """One AuthorizationPolicy rule per subject for this access rule."""
    out = []
    for source, swhen in froms:
        rule: dict[str, Any] = {}
        if source:
            rule["from"] = [source]
        if ar.operation:
            rule["to"] = [{"operation": ar.operation}]
        if ar.when or swhen:
            rule["when"] = [*ar.when, *swhen]
        out.append(rule)
    return out


def _emit_binding_policies(conv: Conversion, b: KubeObject, targets: _Targets, *, dry: bool) -> None:
    for n, ((svc_name, labels), (selector, rules)) in enumerate(sorted(targets.items())):
        if not rules:
            continue
        name = f"{b.name}-{svc_name}" if svc_name else b.name
        if labels:
            name = f"{name}-{n}"
        spec_out: dict[str, Any] = {"action": "ALLOW", "rules": rules}
        if selector:
            spec_out = {"selector": {"matchLabels": selector}, **spec_out}
        conv.emit(b, "AuthorizationPolicy", name, b.namespace, spec_out, dry_run=dry)
