"""`authentication.istio.io/v1alpha1` Policy and MeshPolicy -> PeerAuthentication (+ JWT origins).

`peers: [{mtls: {}}]` is STRICT, `mode: PERMISSIVE` PERMISSIVE, `peerIsOptional: true` PERMISSIVE and no
`peers` at all DISABLE. `targets` become one PeerAuthentication per target Service (its selector; target
`ports` become `portLevelMtls` on the service's target ports). `origins` become a RequestAuthentication plus
a DENY AuthorizationPolicy for requests without a principal, unless `originIsOptional` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ztunnel.config.model import ClusterConfig, KubeObject, Service, labels_match
from ztunnel.policy.legacy.emit import Conversion, get_field

AUTHN_KINDS = ("Policy", "MeshPolicy")

_Scope = tuple[str, dict[str, str] | None, dict[int, str]]  # (name, selector or None, port -> mode)


def authn_namespace(conv: Conversion, obj: KubeObject) -> str:
    """Where the converted objects go: the root namespace for a MeshPolicy."""
    return conv.root if obj.kind == "MeshPolicy" else obj.namespace


def convert_authn(conv: Conversion, obj: KubeObject) -> None:
    """Convert one Policy/MeshPolicy; raises PolicyError when it cannot be read."""
    spec = obj.spec
    namespace = authn_namespace(conv, obj)
    if obj.kind == "MeshPolicy" and obj.name != "default":
        conv.note(obj, "a MeshPolicy should be named default; converted anyway")
    if spec.get("principalBinding", spec.get("principal_binding")) == "USE_ORIGIN":
        conv.note(obj, "principalBinding USE_ORIGIN has no equivalent; peer principals are used for authorization")
    mode = _peer_mode(conv, obj)
    scopes = _scopes(conv, obj, namespace, mode)
    for name, selector, ports in scopes:
        pa_spec: dict[str, Any] = {}
        if selector:
            pa_spec["selector"] = {"matchLabels": selector}
        if ports:
            pa_spec["portLevelMtls"] = {p: {"mode": m} for p, m in sorted(ports.items())}
        else:
            pa_spec["mtls"] = {"mode": mode}
        conv.emit(obj, "PeerAuthentication", name, namespace, pa_spec)
    _origins(conv, obj, namespace, scopes)


# ---- peers -----------------------------------------------------------------------------------------
def _peer_mode(conv: Conversion, obj: KubeObject) -> str:
    peers = obj.spec.get("peers")
    if peers is not None and not isinstance(peers, list):
        raise conv.error(obj, "spec.peers", "must be a list")
    mode = _first_mtls_mode(conv, obj, peers or [])
    if not peers:
        conv.note(obj, "no peers: peer authentication is not required, converted to mTLS mode DISABLE")
    if get_field(obj.spec, "peerIsOptional", "peer_is_optional") and mode == "STRICT":
        mode = "PERMISSIVE"
    return mode


def _first_mtls_mode(conv: Conversion, obj: KubeObject, peers: list[Any]) -> str:
    """The mode of the first `mtls` peer method; DISABLE when there is none."""
    for i, peer in enumerate(peers):
        if not isinstance(peer, Mapping):
            raise conv.error(obj, f"spec.peers[{i}]", "must be a mapping like {mtls: {mode: STRICT}}")
        if "mtls" in peer:
            return _mtls_mode(conv, obj, peer["mtls"], f"spec.peers[{i}].mtls")
        if "jwt" not in peer:
            raise conv.error(obj, f"spec.peers[{i}]", "unknown peer method; expected mtls")
        conv.note(obj, f"spec.peers[{i}].jwt (peer JWT) is not supported; ignored")
    return "DISABLE"


def _mtls_mode(conv: Conversion, obj: KubeObject, raw: Any, path: str) -> str:
    mtls = raw or {}
    if not isinstance(mtls, Mapping):
        raise conv.error(obj, path, "must be a mapping")
    mode = mtls.get("mode", "STRICT") or "STRICT"
    if mode not in ("STRICT", "PERMISSIVE"):
        raise conv.error(obj, f"{path}.mode", f"unknown mode {mode!r}; use STRICT or PERMISSIVE")
    return str(mode)


# ---- targets -----------------------------------------------------------------------------------------
def _scopes(conv: Conversion, obj: KubeObject, namespace: str, mode: str) -> list[_Scope]:
    """The namespace (no targets) or one scope per target Service that can be mapped to workloads."""
    targets = obj.spec.get("targets", obj.spec.get("target"))
    if targets is not None and not isinstance(targets, list):
        raise conv.error(obj, "spec.targets", "must be a list of {name, ports}")
    if not targets:
        return [(obj.name, None, {})]
    scopes = []
    for i, t in enumerate(targets):
        scope = _target_scope(conv, obj, namespace, mode, t, f"spec.targets[{i}]")
        if scope is not None:
            scopes.append(scope)
    return scopes


def _target_scope(conv: Conversion, obj: KubeObject, namespace: str, mode: str, t: Any, path: str) -> _Scope | None:
    if not isinstance(t, Mapping) or not isinstance(t.get("name"), str):
        raise conv.error(obj, f"{path}.name", "is required: a service name")
    svc = conv.service_by_fqdn(t["name"]) or next((s for s in conv.services_in(namespace) if s.name == t["name"]), None)
    if svc is None or not svc.selector:
        conv.note(obj, f"target service {t['name']!r} is not defined (or has no selector); skipped")
        return None
    ports: dict[int, str] = {}
    for j, p in enumerate(t.get("ports") or []):
        tp = _target_port(conv, obj, svc, p, f"{path}.ports[{j}]")
        if tp is not None:
            ports[tp] = mode
    return f"{obj.name}-{svc.name}", dict(svc.selector), ports


def _target_port(conv: Conversion, obj: KubeObject, svc: Service, p: Any, path: str) -> int | None:
    """The pods' port a target port (number or name of a Service port) reaches; None with a note if unknown."""
    if not isinstance(p, Mapping) or not (p.get("number") or p.get("name")):
        raise conv.error(obj, path, "needs number or name")
    sp = None
    for candidate in svc.ports:
        if candidate.port == p.get("number") or (p.get("name") and candidate.name == p.get("name")):
            sp = candidate
    target: Any = p.get("number") if sp is None else sp.target_port
    if isinstance(target, int):
        return target
    port = _named_container_port(conv.config, svc, target)
    if port is None:
        conv.note(obj, f"named target port {target!r} of {svc.ref} is not declared by its pods; skipped")
    return port


def _named_container_port(config: ClusterConfig | None, svc: Service, name: Any) -> int | None:
    """A named target port looked up in the containers of the Service's pods."""
    if config is None:
        return None
    for w in config.workloads:
        if w.namespace != svc.namespace or not labels_match(svc.selector, w.labels):
            continue
        for c in w.containers:
            for cp in c.get("ports") or []:
                if isinstance(cp, Mapping) and cp.get("name") == name:
                    number: Any = cp.get("containerPort")
                    return int(number)
    return None


# ---- origins (JWT) -------------------------------------------------------------------------------------
def _origins(conv: Conversion, obj: KubeObject, namespace: str, scopes: list[_Scope]) -> None:
    origins = obj.spec.get("origins")
    if not origins:
        return
    if not isinstance(origins, list):
        raise conv.error(obj, "spec.origins", "must be a list")
    jwt_rules = []
    included: list[str] = []
    excluded: list[str] = []
    for i, o in enumerate(origins):
        jwt = o.get("jwt") if isinstance(o, Mapping) else None
        if not isinstance(jwt, Mapping) or not isinstance(jwt.get("issuer"), str):
            raise conv.error(obj, f"spec.origins[{i}].jwt.issuer", "is required")
        jwt_rules.append(_jwt_rule(jwt))
        _trigger_paths(jwt, included, excluded)
    optional = get_field(obj.spec, "originIsOptional", "origin_is_optional")
    for name, selector, _ in scopes:
        base: dict[str, Any] = {"selector": {"matchLabels": selector}} if selector else {}
        conv.emit(obj, "RequestAuthentication", f"{name}-jwt", namespace, {**base, "jwtRules": jwt_rules})
        if not optional:
            spec = {**base, "action": "DENY", "rules": [_require_jwt_rule(included, excluded)]}
            conv.emit(obj, "AuthorizationPolicy", f"{name}-require-jwt", namespace, spec)


def _jwt_rule(jwt: Mapping[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {"issuer": jwt["issuer"]}
    for new, names in (("jwksUri", ("jwksUri", "jwks_uri")), ("jwks", ("jwks",))):
        value = get_field(jwt, *names)
        if value:
            r[new] = value
    if jwt.get("audiences"):
        r["audiences"] = list(jwt["audiences"])
    headers = get_field(jwt, "jwtHeaders", "jwt_headers")
    if headers:
        r["fromHeaders"] = [{"name": h} for h in headers]
    params = get_field(jwt, "jwtParams", "jwt_params")
    if params:
        r["fromParams"] = list(params)
    return r


def _trigger_paths(jwt: Mapping[str, Any], included: list[str], excluded: list[str]) -> None:
    """Add the paths of the origin's trigger rules (both spellings) to `included` / `excluded`."""
    for tr in get_field(jwt, "triggerRules", "trigger_rules") or []:
        for key in ("excludedPaths", "excluded_paths"):
            excluded.extend(_path_match(m) for m in tr.get(key) or [])
        for key in ("includedPaths", "included_paths"):
            included.extend(_path_match(m) for m in tr.get(key) or [])


def _require_jwt_rule(included: list[str], excluded: list[str]) -> dict[str, Any]:
    """A DENY rule for requests without a request principal, on the trigger paths."""
    op: dict[str, Any] = {}
    if included:
        op["paths"] = included
    if excluded:
        op["notPaths"] = excluded
    rule: dict[str, Any] = {"from": [{"source": {"notRequestPrincipals": ["*"]}}]}
    if op:
        rule["to"] = [{"operation": op}]
    return rule


def _path_match(m: Any) -> str:
    if isinstance(m, Mapping):
        if "exact" in m:
            return str(m["exact"])
        if "prefix" in m:
            return f"{m['prefix']}*"
        if "suffix" in m:
            return f"*{m['suffix']}"
    return str(m)
