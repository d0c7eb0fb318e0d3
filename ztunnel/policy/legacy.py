"""Legacy Istio security APIs converted to the current ones, for the engine and for `ztunnel convert`.

`rbac.istio.io/v1alpha1`:
- `ClusterRbacConfig`/`RbacConfig` (`mode` OFF, ON, ON_WITH_INCLUSION, ON_WITH_EXCLUSION; `enforcementMode`)
  becomes "deny unless allowed" scaffolding: ON is a mesh-wide `AuthorizationPolicy` with `spec: {}` in the
  root namespace; ON_WITH_INCLUSION one such policy per included namespace (or per included service, with the
  service's selector); ON_WITH_EXCLUSION the mesh-wide one plus `rules: [{}]` allow-all policies for excluded
  namespaces and services (an ALLOW that matches everything cancels the default deny there, which is exactly
  "RBAC off"). `enforcementMode: PERMISSIVE` becomes the `istio.io/dry-run` annotation.
- `ServiceRole` + `ServiceRoleBinding` become one ALLOW `AuthorizationPolicy` per (binding, target): every
  (subject, access rule) pair is a rule. `services` are mapped to workloads through the `Service` objects of
  the config (their selector); `"*"` covers the namespace. Roles only produce policies where RBAC is enabled,
  since a new-style ALLOW would otherwise switch a workload from allow-all to deny-by-default.
  `methods: ["*"]` and `paths: ["*"]` mean "any" and are dropped, so such rules stay enforceable at L4.
  Binding `mode: PERMISSIVE` becomes dry-run.
`authentication.istio.io/v1alpha1`:
- `MeshPolicy` becomes a `PeerAuthentication` in the root namespace, `Policy` a namespace `PeerAuthentication`
  or, with `targets`, one per target service (selector of the Service; target `ports` become `portLevelMtls`
  on the service's target ports). `peers: [{mtls: {}}]` is STRICT, `mode: PERMISSIVE` PERMISSIVE,
  `peerIsOptional: true` PERMISSIVE, and no `peers` at all DISABLE (peer authentication not required).
- `origins` (JWT) become a `RequestAuthentication` plus a DENY `AuthorizationPolicy` with
  `notRequestPrincipals: ["*"]` (honouring `trigger_rules` paths), unless `originIsOptional` is set.

Not convertible exactly (reported as notes; the conversion always errs towards denying):
- a service in `services`/`targets` that no `Service` in the config defines: nothing is generated for it;
- `constraints` other than `destination.ip`, `destination.port`, `destination.namespace`,
  `destination.labels[...]` (single value) and `request.headers[...]`, and subject `properties` other than
  `source.principal`, `source.namespace`, `source.ip`, `request.auth.*` and `request.headers[...]`: the rule or
  subject is dropped, so it grants nothing;
- `principalBinding: USE_ORIGIN` (the request principal used as the peer principal) has no equivalent;
- JWT settings beyond issuer, audiences, jwksUri, jwks, header and query parameter locations;
- a named target port that no container of the selected pods declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ztunnel.config.model import ClusterConfig, KubeObject, Service, Source, labels_match
from ztunnel.policy.authz import DRY_RUN_ANNOTATION, PolicyError

CONVERTED_FROM_ANNOTATION = "ztunnel.io/converted-from"
RBAC_MODES = ("OFF", "ON", "ON_WITH_INCLUSION", "ON_WITH_EXCLUSION")
RBAC_KINDS = ("ClusterRbacConfig", "RbacConfig")
NEW_API = "security.istio.io/v1"


@dataclass
class ConversionResult:
    converted: list[tuple[KubeObject, str]] = field(default_factory=list)  # (new object, "Kind ns/name" it came from)
    notes: list[str] = field(default_factory=list)
    errors: list[PolicyError] = field(default_factory=list)

    @property
    def objects(self) -> list[KubeObject]:
        return [o for o, _ in self.converted]


@dataclass(frozen=True)
class _AccessRule:
    services: list[str]
    operation: dict[str, Any]
    when: list[Any]
    labels: dict[str, str]


def _get(m: Mapping[str, Any], *names: str) -> Any:
    """Legacy CRDs were written in both proto (snake_case) and JSON (camelCase) spelling."""
    for n in names:
        if n in m:
            return m[n]
    return None


class _Converter:
    def __init__(self, config: ClusterConfig | None, root_namespace: str):
        self.config = config
        self.root = root_namespace
        self.result = ConversionResult()
        self.invalid_roles: set[tuple[str, str]] = set()

    # ---- helpers ---------------------------------------------------------------------------------
    def error(self, obj: KubeObject, field_path: str, message: str) -> PolicyError:
        return PolicyError(message, source=obj.source, obj=obj.ref, field=field_path)

    def note(self, obj: KubeObject, message: str) -> None:
        text = f"{obj.ref}: {message}"
        if text not in self.result.notes:
            self.result.notes.append(text)

    def emit(
        self,
        origin: KubeObject,
        kind: str,
        name: str,
        namespace: str,
        spec: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> None:
        annotations = {CONVERTED_FROM_ANNOTATION: origin.ref}
        if dry_run:
            annotations[DRY_RUN_ANNOTATION] = "true"
        body = {
            "apiVersion": NEW_API,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
            "spec": dict(spec),
        }
        obj = KubeObject(
            api_version=NEW_API,
            kind=kind,
            name=name,
            namespace=namespace,
            labels={},
            annotations=annotations,
            body=body,
            source=origin.source,
        )
        self.result.converted.append((obj, origin.ref))

    def services_in(self, namespace: str) -> list[Service]:
        if self.config is None:
            return []
        return [s for s in self.config.services if s.namespace == namespace]

    def find_services(self, obj: KubeObject, pattern: str, namespace: str) -> list[Service]:
        """ServiceRole `services` entries: FQDN or short name, `*`, `prefix*` or `*suffix`."""
        out = []
        for s in self.services_in(namespace):
            names = (s.hostname, s.name, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc")
            if pattern == "*":
                ok = True
            elif pattern.startswith("*"):
                ok = any(n.endswith(pattern[1:]) for n in names)
            elif pattern.endswith("*"):
                ok = any(n.startswith(pattern[:-1]) for n in names)
            else:
                ok = pattern in names
            if ok:
                out.append(s)
        if not out and pattern != "*":
            self.note(obj, f"service {pattern!r} is not defined in namespace {namespace}; nothing is granted for it")
        return out

    def service_by_fqdn(self, name: str) -> Service | None:
        if self.config is None:
            return None
        for s in self.config.services:
            if name in (s.hostname, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc"):
                return s
        return None

    # ---- RBAC ------------------------------------------------------------------------------------
    def rbac(self, objects: list[KubeObject]) -> tuple[str, Any]:
        """Emit the default-deny scaffolding; returns (mode, enabled(service) predicate)."""
        configs = [o for o in objects if o.kind in RBAC_KINDS]
        if not configs:
            if any(o.kind in ("ServiceRole", "ServiceRoleBinding") for o in objects):
                first = next(o for o in objects if o.kind in ("ServiceRole", "ServiceRoleBinding"))
                self.note(first, "no ClusterRbacConfig: RBAC is OFF, so ServiceRoles and bindings have no effect")
            return "OFF", lambda ns, svc: False
        configs.sort(key=lambda o: (o.kind != "ClusterRbacConfig", o.name != "default"))
        cfg = configs[0]
        for other in configs[1:]:
            self.note(other, f"ignored: {cfg.ref} is the mesh's RBAC config")
        spec = cfg.spec
        mode = spec.get("mode", "OFF")
        if mode is None:
            mode = "OFF"
        if not isinstance(mode, str) or mode not in RBAC_MODES:
            err = self.error(cfg, "spec.mode", f"unknown mode {mode!r}; use one of {', '.join(RBAC_MODES)}")
            self.result.errors.append(err)
            mode = "ON"  # fail closed: everything RBAC-enabled, only explicit grants allow
            self.note(cfg, "invalid RBAC config treated as mode ON until fixed")
        enforcement = _get(spec, "enforcementMode", "enforcement_mode") or "ENFORCED"
        dry = enforcement == "PERMISSIVE"

        def lists(key: str) -> tuple[list[str], list[str]]:
            section = spec.get(key) or {}
            if not isinstance(section, Mapping):
                self.result.errors.append(self.error(cfg, f"spec.{key}", "must be a mapping"))
                return [], []
            namespaces = section.get("namespaces") or []
            services = section.get("services") or []
            for fname, val in (("namespaces", namespaces), ("services", services)):
                if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                    self.result.errors.append(self.error(cfg, f"spec.{key}.{fname}", "must be a list of strings"))
                    return [], []
            return namespaces, services

        inc_ns, inc_svc = lists("inclusion")
        exc_ns, exc_svc = lists("exclusion")

        def resolve(names: list[str], what: str) -> list[Service]:
            out = []
            for n in names:
                s = self.service_by_fqdn(n)
                if s is None:
                    self.note(cfg, f"{what} service {n!r} is not defined in the config; skipped")
                else:
                    out.append(s)
            return out

        if mode == "OFF":
            return mode, lambda ns, svc: False
        if mode == "ON":
            self.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", self.root, {}, dry_run=dry)
            return mode, lambda ns, svc: True
        if mode == "ON_WITH_INCLUSION":
            for ns in inc_ns:
                self.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", ns, {}, dry_run=dry)
            included = resolve(inc_svc, "included")
            for s in included:
                if s.namespace in inc_ns:
                    continue
                if not s.selector:
                    self.note(cfg, f"included service {s.ref} has no selector; it cannot be mapped to workloads")
                    continue
                self.emit(
                    cfg,
                    "AuthorizationPolicy",
                    f"rbac-default-deny-{s.name}",
                    s.namespace,
                    {"selector": {"matchLabels": dict(s.selector)}},
                    dry_run=dry,
                )
            inc_refs = {s.ref for s in included}
            return mode, lambda ns, svc: ns in inc_ns or (svc is not None and svc.ref in inc_refs)
        # ON_WITH_EXCLUSION
        self.emit(cfg, "AuthorizationPolicy", "rbac-default-deny", self.root, {}, dry_run=dry)
        for ns in exc_ns:
            self.emit(cfg, "AuthorizationPolicy", "rbac-excluded", ns, {"rules": [{}]}, dry_run=dry)
        excluded = resolve(exc_svc, "excluded")
        for s in excluded:
            if not s.selector:
                self.note(cfg, f"excluded service {s.ref} has no selector; it cannot be mapped to workloads")
                continue
            self.emit(
                cfg,
                "AuthorizationPolicy",
                f"rbac-excluded-{s.name}",
                s.namespace,
                {"selector": {"matchLabels": dict(s.selector)}, "rules": [{}]},
                dry_run=dry,
            )
        exc_refs = {s.ref for s in excluded}
        return mode, lambda ns, svc: ns not in exc_ns and (svc is None or svc.ref not in exc_refs)

    def access_rule(self, obj: KubeObject, rule: Any, path: str) -> _AccessRule | None:
        """One ServiceRole rule; None when it can never match (or cannot be converted: it grants nothing)."""
        if not isinstance(rule, Mapping):
            raise self.error(obj, path, "must be a mapping")
        services = rule.get("services")
        if not isinstance(services, list) or not services or not all(isinstance(s, str) for s in services):
            raise self.error(obj, f"{path}.services", "is required: a list of service names")
        op: dict[str, Any] = {}
        for new, names, kind in (
            ("methods", ("methods",), "str"),
            ("notMethods", ("notMethods", "not_methods"), "str"),
            ("paths", ("paths",), "str"),
            ("notPaths", ("notPaths", "not_paths"), "str"),
            ("hosts", ("hosts",), "str"),
            ("notHosts", ("notHosts", "not_hosts"), "str"),
            ("ports", ("ports",), "port"),
            ("notPorts", ("notPorts", "not_ports"), "port"),
        ):
            val = _get(rule, *names)
            if val is None:
                continue
            if not isinstance(val, list):
                raise self.error(obj, f"{path}.{names[-1]}", "must be a list")
            if kind == "port":
                vals = []
                for i, v in enumerate(val):
                    if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).isdigit():
                        raise self.error(obj, f"{path}.{names[-1]}[{i}]", f"{v!r} is not a port number")
                    vals.append(str(v))
            else:
                vals = [str(v) for v in val]
            if new in ("methods", "paths", "hosts") and "*" in vals:
                continue  # "*" meant "any" in v1alpha1; dropping it keeps the rule enforceable at L4
            if vals:
                op[new] = vals
        when: list[Any] = []
        labels: dict[str, str] = {}
        for i, c in enumerate(rule.get("constraints") or []):
            cpath = f"{path}.constraints[{i}]"
            if not isinstance(c, Mapping) or not isinstance(c.get("key"), str):
                raise self.error(obj, cpath, "needs key and values")
            key, values = c["key"], [str(v) for v in (c.get("values") or [])]
            if key == "destination.port" and "ports" not in op:
                op["ports"] = values
            elif key in ("destination.port", "destination.ip") or key.startswith("request.headers["):
                when.append({"key": key, "values": values})  # conditions AND with the rule's own fields
            elif key == "destination.namespace":
                if obj.namespace not in values and "*" not in values:
                    return None  # never matches in its own namespace
            elif key.startswith("destination.labels[") and key.endswith("]") and len(values) == 1:
                labels[key[len("destination.labels[") : -1]] = values[0]
            else:
                self.note(obj, f"constraint {key!r} at {cpath} cannot be converted; that rule grants nothing")
                return None
        return _AccessRule(services, op, when, labels)

    def subject(self, obj: KubeObject, subj: Any, path: str) -> tuple[dict[str, Any], list[Any]] | None:
        if not isinstance(subj, Mapping):
            raise self.error(obj, path, "must be a mapping")
        source: dict[str, list[str]] = {}
        when: list[Any] = []

        def add(key: str, value: Any) -> None:
            vals = [str(v) for v in (value if isinstance(value, list) else [value])]
            if key in source:  # a second constraint on the same attribute is ANDed in v1alpha1: keep it apart
                cond = {"principals": "source.principal", "namespaces": "source.namespace", "ipBlocks": "source.ip"}
                if key in cond:
                    when.append({"key": cond[key], "values": vals})
                    return
                if key == "requestPrincipals":
                    when.append({"key": "request.auth.principal", "values": vals})
                    return
            source.setdefault(key, []).extend(vals)

        user = subj.get("user")
        if user is not None and user != "*":
            add("principals", user)
        if subj.get("group") is not None and subj.get("group") != "*":
            when.append({"key": "request.auth.claims[groups]", "values": [str(subj["group"])]})
        for new, names in (
            ("principals", ("names",)),
            ("notPrincipals", ("notNames", "not_names")),
            ("namespaces", ("namespaces",)),
            ("notNamespaces", ("notNamespaces", "not_namespaces")),
            ("ipBlocks", ("ips",)),
            ("notIpBlocks", ("notIps", "not_ips")),
        ):
            val = _get(subj, *names)
            if val:
                add(new, val)
        props = subj.get("properties") or {}
        if not isinstance(props, Mapping):
            raise self.error(obj, f"{path}.properties", "must be a mapping")
        for key, value in props.items():
            if key in ("source.principal", "source.user"):
                if value != "*":
                    add("principals", value)
            elif key == "source.namespace":
                add("namespaces", value)
            elif key == "source.ip":
                add("ipBlocks", value)
            elif key == "request.auth.principal":
                add("requestPrincipals", value)
            elif key.startswith(("request.headers[", "request.auth.claims[")) or key in (
                "request.auth.audiences",
                "request.auth.presenter",
            ):
                when.append({"key": key, "values": [str(value)]})
            else:
                self.note(obj, f"subject property {key!r} at {path} cannot be converted; that subject is dropped")
                return None
        return ({"source": source} if source else {}), when

    def roles(self, objects: list[KubeObject], enabled: Any) -> None:
        roles = {(o.namespace, o.name): o for o in objects if o.kind == "ServiceRole"}
        for key, r in list(roles.items()):  # validate roles even when unbound; an invalid role grants nothing
            rules = r.spec.get("rules")
            try:
                if not isinstance(rules, list):
                    raise self.error(r, "spec.rules", "is required: a list of access rules")
                for i, rule in enumerate(rules):
                    self.access_rule(r, rule, f"spec.rules[{i}]")
            except PolicyError as e:
                self.result.errors.append(e)
                del roles[key]
                self.invalid_roles.add(key)
        for b in (o for o in objects if o.kind == "ServiceRoleBinding"):
            try:
                self.binding(b, roles, enabled)
            except PolicyError as e:
                self.result.errors.append(e)

    def binding(self, b: KubeObject, roles: Mapping[tuple[str, str], KubeObject], enabled: Any) -> None:
        spec = b.spec
        subjects = spec.get("subjects")
        if not isinstance(subjects, list) or not subjects:
            raise self.error(b, "spec.subjects", "is required: a list of subjects (user, group, properties)")
        role_rules: list[Any]
        role_obj: KubeObject
        if spec.get("actions") is not None:
            role_rules, role_obj = spec["actions"], b
            rules_path = "spec.actions"
        else:
            ref = _get(spec, "roleRef", "role_ref")
            if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str):
                raise self.error(b, "spec.roleRef", "is required: {kind: ServiceRole, name: ...}")
            if ref.get("kind", "ServiceRole") != "ServiceRole":
                raise self.error(b, "spec.roleRef.kind", f"must be ServiceRole, not {ref.get('kind')!r}")
            role = roles.get((b.namespace, ref["name"]))
            if (b.namespace, ref["name"]) in self.invalid_roles:
                self.note(b, f"ServiceRole {b.namespace}/{ref['name']} is invalid; the binding grants nothing")
                return
            if role is None:
                self.note(b, f"ServiceRole {b.namespace}/{ref['name']} does not exist; the binding grants nothing")
                return
            role_rules, role_obj, rules_path = role.spec.get("rules") or [], role, "spec.rules"
            if not isinstance(role_rules, list):
                raise self.error(role, "spec.rules", "must be a list")
        dry = spec.get("mode") == "PERMISSIVE"
        froms = []
        for i, s in enumerate(subjects):
            converted = self.subject(b, s, f"spec.subjects[{i}]")
            if converted is not None:
                froms.append(converted)
        # (service name or "" for the namespace, extra labels) -> (selector or None, rules)
        targets: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[dict[str, str] | None, list[Any]]] = {}
        for i, raw in enumerate(role_rules):
            ar = self.access_rule(role_obj, raw, f"{rules_path}[{i}]")
            if ar is None:
                continue
            scopes: list[tuple[str, dict[str, str] | None]] = []
            if "*" in ar.services and enabled(b.namespace, None):
                scopes.append(("", dict(ar.labels) or None))
            else:
                if "*" in ar.services:
                    matched = self.services_in(b.namespace)
                else:
                    matched = [s for p in ar.services for s in self.find_services(role_obj, p, b.namespace)]
                for s in matched:
                    if not enabled(s.namespace, s):
                        continue
                    if not s.selector:
                        self.note(role_obj, f"service {s.ref} has no selector; it cannot be mapped to workloads")
                        continue
                    scopes.append((s.name, {**s.selector, **ar.labels}))
            for svc_name, selector in scopes:
                entry = targets.setdefault((svc_name, tuple(sorted(ar.labels.items()))), (selector, []))
                for source, swhen in froms:
                    rule: dict[str, Any] = {}
                    if source:
                        rule["from"] = [source]
                    if ar.operation:
                        rule["to"] = [{"operation": ar.operation}]
                    if ar.when or swhen:
                        rule["when"] = [*ar.when, *swhen]
                    entry[1].append(rule)
        for n, ((svc_name, labels), (selector, rules)) in enumerate(sorted(targets.items())):
            if not rules:
                continue
            name = f"{b.name}-{svc_name}" if svc_name else b.name
            if labels:
                name = f"{name}-{n}"
            spec_out: dict[str, Any] = {"action": "ALLOW", "rules": rules}
            if selector:
                spec_out = {"selector": {"matchLabels": selector}, **spec_out}
            self.emit(b, "AuthorizationPolicy", name, b.namespace, spec_out, dry_run=dry)

    # ---- authentication ----------------------------------------------------------------------------
    def authn(self, obj: KubeObject) -> None:
        spec = obj.spec
        namespace = self.root if obj.kind == "MeshPolicy" else obj.namespace
        if obj.kind == "MeshPolicy" and obj.name != "default":
            self.note(obj, "a MeshPolicy should be named default; converted anyway")
        if spec.get("principalBinding", spec.get("principal_binding")) == "USE_ORIGIN":
            self.note(obj, "principalBinding USE_ORIGIN has no equivalent; peer principals are used for authorization")
        peers = spec.get("peers")
        mode = "DISABLE"
        if peers is not None and not isinstance(peers, list):
            raise self.error(obj, "spec.peers", "must be a list")
        for i, peer in enumerate(peers or []):
            if not isinstance(peer, Mapping):
                raise self.error(obj, f"spec.peers[{i}]", "must be a mapping like {mtls: {mode: STRICT}}")
            if "mtls" in peer:
                mtls = peer["mtls"] or {}
                if not isinstance(mtls, Mapping):
                    raise self.error(obj, f"spec.peers[{i}].mtls", "must be a mapping")
                m = mtls.get("mode", "STRICT") or "STRICT"
                if m not in ("STRICT", "PERMISSIVE"):
                    raise self.error(obj, f"spec.peers[{i}].mtls.mode", f"unknown mode {m!r}; use STRICT or PERMISSIVE")
                mode = m
                break
            if "jwt" in peer:
                self.note(obj, f"spec.peers[{i}].jwt (peer JWT) is not supported; ignored")
            else:
                raise self.error(obj, f"spec.peers[{i}]", "unknown peer method; expected mtls")
        if not peers:
            self.note(obj, "no peers: peer authentication is not required, converted to mTLS mode DISABLE")
        if _get(spec, "peerIsOptional", "peer_is_optional") and mode == "STRICT":
            mode = "PERMISSIVE"
        targets = spec.get("targets", spec.get("target"))
        if targets is not None and not isinstance(targets, list):
            raise self.error(obj, "spec.targets", "must be a list of {name, ports}")
        scopes: list[tuple[str, dict[str, str] | None, dict[int, str]]] = []
        if not targets:
            scopes.append((obj.name, None, {}))
        for i, t in enumerate(targets or []):
            if not isinstance(t, Mapping) or not isinstance(t.get("name"), str):
                raise self.error(obj, f"spec.targets[{i}].name", "is required: a service name")
            svc = self.service_by_fqdn(t["name"]) or next(
                (s for s in self.services_in(namespace) if s.name == t["name"]), None
            )
            if svc is None or not svc.selector:
                self.note(obj, f"target service {t['name']!r} is not defined (or has no selector); skipped")
                continue
            ports: dict[int, str] = {}
            for j, p in enumerate(t.get("ports") or []):
                tp = self.target_port(obj, svc, p, f"spec.targets[{i}].ports[{j}]")
                if tp is not None:
                    ports[tp] = mode
            scopes.append((f"{obj.name}-{svc.name}", dict(svc.selector), ports))
        for name, selector, ports in scopes:
            pa_spec: dict[str, Any] = {}
            if selector:
                pa_spec["selector"] = {"matchLabels": selector}
            if ports:
                pa_spec["portLevelMtls"] = {p: {"mode": m} for p, m in sorted(ports.items())}
            else:
                pa_spec["mtls"] = {"mode": mode}
            self.emit(obj, "PeerAuthentication", name, namespace, pa_spec)
        self.origins(obj, namespace, scopes)

    def target_port(self, obj: KubeObject, svc: Service, p: Any, path: str) -> int | None:
        if not isinstance(p, Mapping) or not (p.get("number") or p.get("name")):
            raise self.error(obj, path, "needs number or name")
        sp = None
        for candidate in svc.ports:
            if candidate.port == p.get("number") or (p.get("name") and candidate.name == p.get("name")):
                sp = candidate
        target: int | str = p.get("number") if sp is None else sp.target_port  # type: ignore[assignment]
        if isinstance(target, int):
            return target
        if self.config is not None:  # named target port: look it up in the selected pods' containers
            for w in self.config.workloads:
                if w.namespace == svc.namespace and labels_match(svc.selector, w.labels):
                    for c in w.containers:
                        for cp in c.get("ports") or []:
                            if isinstance(cp, Mapping) and cp.get("name") == target:
                                return int(cp.get("containerPort"))
        self.note(obj, f"named target port {target!r} of {svc.ref} is not declared by its pods; skipped")
        return None

    def origins(self, obj: KubeObject, namespace: str, scopes: list[Any]) -> None:
        origins = obj.spec.get("origins")
        if not origins:
            return
        if not isinstance(origins, list):
            raise self.error(obj, "spec.origins", "must be a list")
        jwt_rules = []
        included: list[str] = []
        excluded: list[str] = []
        for i, o in enumerate(origins):
            jwt = o.get("jwt") if isinstance(o, Mapping) else None
            if not isinstance(jwt, Mapping) or not isinstance(jwt.get("issuer"), str):
                raise self.error(obj, f"spec.origins[{i}].jwt.issuer", "is required")
            r: dict[str, Any] = {"issuer": jwt["issuer"]}
            for new, names in (("jwksUri", ("jwksUri", "jwks_uri")), ("jwks", ("jwks",))):
                if _get(jwt, *names):
                    r[new] = _get(jwt, *names)
            if jwt.get("audiences"):
                r["audiences"] = list(jwt["audiences"])
            headers = _get(jwt, "jwtHeaders", "jwt_headers")
            if headers:
                r["fromHeaders"] = [{"name": h} for h in headers]
            params = _get(jwt, "jwtParams", "jwt_params")
            if params:
                r["fromParams"] = list(params)
            jwt_rules.append(r)
            for tr in _get(jwt, "triggerRules", "trigger_rules") or []:
                for key, out in (("excludedPaths", excluded), ("excluded_paths", excluded)):
                    out.extend(_path_match(m) for m in tr.get(key) or [])
                for key, out in (("includedPaths", included), ("included_paths", included)):
                    out.extend(_path_match(m) for m in tr.get(key) or [])
        for name, selector, _ in scopes:
            base: dict[str, Any] = {"selector": {"matchLabels": selector}} if selector else {}
            self.emit(obj, "RequestAuthentication", f"{name}-jwt", namespace, {**base, "jwtRules": jwt_rules})
            if _get(obj.spec, "originIsOptional", "origin_is_optional"):
                continue
            op: dict[str, Any] = {}
            if included:
                op["paths"] = included
            if excluded:
                op["notPaths"] = excluded
            rule: dict[str, Any] = {"from": [{"source": {"notRequestPrincipals": ["*"]}}]}
            if op:
                rule["to"] = [{"operation": op}]
            self.emit(
                obj,
                "AuthorizationPolicy",
                f"{name}-require-jwt",
                namespace,
                {**base, "action": "DENY", "rules": [rule]},
            )


def _path_match(m: Any) -> str:
    if isinstance(m, Mapping):
        if "exact" in m:
            return str(m["exact"])
        if "prefix" in m:
            return f"{m['prefix']}*"
        if "suffix" in m:
            return f"*{m['suffix']}"
    return str(m)


def convert_objects(objects: Iterable[KubeObject], config: ClusterConfig | None = None) -> ConversionResult:
    """Convert every legacy object; errors and notes are collected, nothing raises."""
    objects = list(objects)
    conv = _Converter(config, config.root_namespace if config else "istio-system")
    try:
        _, enabled = conv.rbac(objects)
        conv.roles(objects, enabled)
    except PolicyError as e:
        conv.result.errors.append(e)
    for o in objects:
        if o.kind in ("Policy", "MeshPolicy"):
            try:
                conv.authn(o)
            except PolicyError as e:
                conv.result.errors.append(e)
                # fail closed: an unreadable peer policy demands mTLS for its scope
                namespace = conv.root if o.kind == "MeshPolicy" else o.namespace
                conv.emit(o, "PeerAuthentication", o.name, namespace, {"mtls": {"mode": "STRICT"}})
                conv.note(o, "invalid; treated as STRICT mTLS for its namespace until fixed")
    return conv.result


def object_to_yaml_dict(obj: KubeObject) -> dict[str, Any]:
    return dict(obj.body)


__all__ = ["CONVERTED_FROM_ANNOTATION", "ConversionResult", "Source", "convert_objects", "object_to_yaml_dict"]
