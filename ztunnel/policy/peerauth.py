"""PeerAuthentication (mTLS mode per workload and port) and RequestAuthentication (for the waypoint):
their specs validated into the model. Which PeerAuthentication applies is evaluation.py's.

PeerAuthentication inheritance, as Istio documents it: a workload policy (selector) beats the namespace policy
(no selector) beats the mesh policy (root namespace, no selector); `UNSET` inherits from the next level up and
the mesh default is PERMISSIVE. `portLevelMtls` is keyed by the workload's (target) port and only allowed on
policies with a selector, as Istio's validation requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from ztunnel.config.model import KubeObject
from ztunnel.policy.matchers import parse_port
from ztunnel.policy.model import MTLS_MODES, JwtRule, PeerAuthentication, RequestAuthentication
from ztunnel.policy.validation import ObjectReader, parse_selector, type_name


def _mode(ctx: ObjectReader, raw: Any, path: str) -> str:
    m = ctx.mapping(raw, path)
    ctx.known_fields(m, ["mode"], path)
    mode = m.get("mode", "UNSET")
    if mode is None:
        mode = "UNSET"
    if not isinstance(mode, str) or mode not in MTLS_MODES:
        raise ctx.error(f"{path}.mode", f"unknown mode {mode!r}; use one of {', '.join(MTLS_MODES)}")
    return mode


def parse_peer_authentication(obj: KubeObject, *, order: int = 0, origin: str = "") -> PeerAuthentication:
    ctx = ObjectReader(obj)
    ctx.check_api_version()
    spec = ctx.mapping(obj.body.get("spec"), "spec")
    ctx.known_fields(spec, ["selector", "mtls", "portLevelMtls"], "spec")
    selector = parse_selector(ctx, spec)
    mode = _mode(ctx, spec.get("mtls"), "spec.mtls")
    port_modes: dict[int, str] = {}
    raw_ports = ctx.mapping(spec.get("portLevelMtls"), "spec.portLevelMtls")
    if raw_ports and selector is None:
        raise ctx.error(
            "spec.portLevelMtls", "is only allowed with a selector; mesh and namespace policies cannot set it"
        )
    for k, v in raw_ports.items():
        path = f"spec.portLevelMtls[{k}]"
        try:
            port = parse_port(k)
        except ValueError as e:
            raise ctx.error(path, str(e)) from None
        port_modes[port] = _mode(ctx, v, path)
    meta = obj.body.get("metadata") or {}
    created = str(meta.get("creationTimestamp") or "") if isinstance(meta, Mapping) else ""
    return PeerAuthentication(
        namespace=obj.namespace,
        name=obj.name,
        selector=selector,
        mode=mode,
        port_modes=port_modes,
        created=created,
        order=order,
        source=obj.source,
        origin=origin,
    )


_JWT_FIELDS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
)


def parse_request_authentication(obj: KubeObject) -> RequestAuthentication:
    ctx = ObjectReader(obj)
    ctx.check_api_version()
    spec = ctx.mapping(obj.body.get("spec"), "spec")
    ctx.known_fields(spec, ["selector", "targetRef", "targetRefs", "jwtRules"], "spec")
    selector = parse_selector(ctx, spec)
    rules = []
    for i, raw in enumerate(ctx.list_of(spec.get("jwtRules"), "spec.jwtRules")):
        path = f"spec.jwtRules[{i}]"
        r = ctx.mapping(raw, path)
        ctx.known_fields(r, _JWT_FIELDS, path)
        issuer = r.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise ctx.error(f"{path}.issuer", "is required: the JWT `iss` to accept")
        jwks_uri = r.get("jwksUri")
        if jwks_uri is not None and (
            not isinstance(jwks_uri, str) or urlparse(jwks_uri).scheme not in ("http", "https")
        ):
            raise ctx.error(f"{path}.jwksUri", f"{jwks_uri!r} is not an http(s) URL")
        jwks = r.get("jwks")
        if jwks is not None and not isinstance(jwks, str):
            raise ctx.error(f"{path}.jwks", f"must be a string (a JSON Web Key Set), not {type_name(jwks)}")
        headers = []
        for j, h in enumerate(r.get("fromHeaders") or []):
            hp = f"{path}.fromHeaders[{j}]"
            hm = ctx.mapping(h, hp)
            ctx.known_fields(hm, ["name", "prefix"], hp)
            if not isinstance(hm.get("name"), str) or not hm["name"]:
                raise ctx.error(f"{hp}.name", "is required")
            headers.append((hm["name"], str(hm.get("prefix") or "")))
        fwd = r.get("forwardOriginalToken", False)
        if not isinstance(fwd, bool):
            raise ctx.error(f"{path}.forwardOriginalToken", f"must be true or false, not {type_name(fwd)}")
        out_hdr = r.get("outputPayloadToHeader")
        if out_hdr is not None and not isinstance(out_hdr, str):
            raise ctx.error(f"{path}.outputPayloadToHeader", "must be a string")
        rules.append(
            JwtRule(
                issuer=issuer,
                audiences=tuple(ctx.str_list(r.get("audiences"), f"{path}.audiences")),
                jwks_uri=jwks_uri,
                jwks=jwks,
                from_headers=tuple(headers),
                from_params=tuple(ctx.str_list(r.get("fromParams"), f"{path}.fromParams")),
                forward_original_token=fwd,
                output_payload_to_header=out_hdr,
            )
        )
    return RequestAuthentication(obj.namespace, obj.name, selector, tuple(rules), obj.source)
